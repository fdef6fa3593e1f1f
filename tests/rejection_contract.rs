//! The rejection contract from the outside: a layer defined here, which palisade knows
//! nothing of, refuses with `palisade::rejection::Rejected`, and palisade's axum answer,
//! its tonic status and its retry layer treat it exactly like their own rejections. A
//! user's error that wraps one of palisade's rejections is found through `source()`.
#![cfg(all(feature = "axum", feature = "tonic"))]

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use palisade::circuit_breaker::CircuitBreakerLayer;
use palisade::rejection::{RateLimitInfo, Rejected, Rejection, RejectionKind, http_response};
use palisade::retry::{Decision, RetryLayer, RetryPolicy, RetryReason};
use palisade::tonic::{RejectionsAsStatusLayer, rejection_status};
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt, service_fn};

/// A third-party layer: refuses its first `refusals` calls with `rejection`, then lets
/// every call through.
#[derive(Clone)]
struct RefuseLayer {
    rejection: Rejection,
    refusals: Arc<AtomicUsize>,
}

impl RefuseLayer {
    fn new(rejection: Rejection, refusals: usize) -> Self {
        Self {
            rejection,
            refusals: Arc::new(AtomicUsize::new(refusals)),
        }
    }
}

impl<S> Layer<S> for RefuseLayer {
    type Service = Refuse<S>;

    fn layer(&self, inner: S) -> Refuse<S> {
        Refuse {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
struct Refuse<S> {
    inner: S,
    layer: RefuseLayer,
}

type Boxed<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

impl<S, Req> Service<Req> for Refuse<S>
where
    S: Service<Req>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Boxed<S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let refuse = self
            .layer
            .refusals
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_ok();
        if refuse {
            let error = Rejected::new(self.layer.rejection).with_source(QueueFull);
            return Box::pin(async move { Err(error.into()) });
        }
        let future = self.inner.call(request);
        Box::pin(async move { future.await.map_err(Into::into) })
    }
}

/// The third-party layer's own error, kept as the carrier's source.
#[derive(Debug)]
struct QueueFull;

impl fmt::Display for QueueFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("work queue full")
    }
}

impl std::error::Error for QueueFull {}

/// A user's error that wraps another as its `source()`.
#[derive(Debug)]
struct Upstream(BoxError);

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the upstream call failed")
    }
}

impl std::error::Error for Upstream {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

fn overloaded(retry_after: Duration) -> Rejection {
    Rejection::new(RejectionKind::Overloaded, "queue full").with_retry_after(retry_after)
}

fn over_quota(retry_after: Duration) -> Rejection {
    let fields = RateLimitInfo::new(50, Duration::from_secs(10), 0, retry_after);
    Rejection::new(RejectionKind::RateLimited, "quota spent")
        .with_retry_after(retry_after)
        .with_rate_limit(fields)
}

// ---------------------------------------------------------------------------------------
// axum

/// Serves `GET /` behind `HandleErrorLayer(palisade::axum::handle_error)` and `refuse`
/// on a loopback port.
async fn serve_axum(refuse: RefuseLayer) -> SocketAddr {
    let router = Router::new().route("/", get(|| async { "ok" })).layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(palisade::axum::handle_error))
            .layer(refuse),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, router).await.expect("serve") });
    address
}

async fn get_root(address: SocketAddr) -> http::Response<hyper::body::Incoming> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = http::Request::get(format!("http://{address}/"))
        .body(Full::default())
        .expect("request");
    client.request(request).await.expect("the server answers")
}

#[tokio::test]
async fn axum_answers_a_third_party_overload_with_503_and_retry_after() {
    let address = serve_axum(RefuseLayer::new(
        overloaded(Duration::from_millis(1_500)),
        1,
    ))
    .await;
    let refused = get_root(address).await;
    assert_eq!(refused.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()["retry-after"], "2", "rounded up");
    assert!(refused.headers().get("ratelimit").is_none());
    assert_eq!(get_root(address).await.status(), http::StatusCode::OK);
}

#[tokio::test]
async fn axum_answers_a_third_party_rate_limit_with_429_and_its_fields() {
    let address = serve_axum(RefuseLayer::new(over_quota(Duration::from_secs(3)), 1)).await;
    let refused = get_root(address).await;
    assert_eq!(refused.status(), http::StatusCode::TOO_MANY_REQUESTS);
    let headers = refused.headers();
    assert_eq!(headers["retry-after"], "3");
    assert_eq!(headers["ratelimit-policy"], "\"default\";q=50;w=10");
    assert_eq!(headers["ratelimit"], "\"default\";r=0;t=3");
}

#[tokio::test]
async fn a_circuit_open_wrapped_in_a_users_error_is_still_503_and_unavailable() {
    let breaker = CircuitBreakerLayer::builder().build().expect("config");
    breaker.handle().force_open();
    let open = breaker
        .layer(service_fn(|()| async { Ok::<_, BoxError>(()) }))
        .oneshot(())
        .await
        .expect_err("forced open");
    let wrapped: BoxError = Upstream(open).into();

    let response = http_response::<()>(&wrapped);
    assert_eq!(response.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let status = rejection_status(&*wrapped).expect("found through source()");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.metadata().contains_key("grpc-retry-pushback-ms"));

    // Not a rejection anywhere in the chain: 500, and no status of ours.
    let plain: BoxError = Upstream("connection reset".into()).into();
    assert_eq!(http_response::<()>(&plain).status(), 500);
    assert!(rejection_status(&*plain).is_none());
}

// ---------------------------------------------------------------------------------------
// tonic

/// A tonic health server behind `RejectionsAsStatusLayer` and `refuse`; a client to it.
async fn health_behind(refuse: RefuseLayer) -> HealthClient<tonic::transport::Channel> {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(
        Server::builder()
            .layer(
                ServiceBuilder::new()
                    .layer(RejectionsAsStatusLayer::new())
                    .layer(refuse),
            )
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    HealthClient::new(channel)
}

fn metadata(status: &tonic::Status, key: &str) -> String {
    status
        .metadata()
        .get(key)
        .unwrap_or_else(|| panic!("{key} in {status:?}"))
        .to_str()
        .expect("ascii")
        .to_owned()
}

#[tokio::test]
async fn tonic_answers_third_party_rejections_with_their_code_and_pushback() {
    let cases = [
        (
            overloaded(Duration::from_millis(250)),
            Code::Unavailable,
            "250",
            "1",
        ),
        (
            over_quota(Duration::from_millis(1_200)),
            Code::ResourceExhausted,
            "1200",
            "2",
        ),
    ];
    for (rejection, code, pushback_ms, retry_after) in cases {
        let mut client = health_behind(RefuseLayer::new(rejection, 1)).await;
        let request = || HealthCheckRequest {
            service: String::new(),
        };
        let status = client.check(request()).await.expect_err("refused");
        assert_eq!(status.code(), code, "{status:?}");
        assert_eq!(
            status.message(),
            rejection.reason(),
            "the reason, not the source's text"
        );
        assert_eq!(metadata(&status, "grpc-retry-pushback-ms"), pushback_ms);
        assert_eq!(metadata(&status, "retry-after"), retry_after);
        client.check(request()).await.expect("then served");
    }
}

// ---------------------------------------------------------------------------------------
// retry

/// An inner service that records when each call reaches it.
fn recording() -> (
    impl Service<(), Response = (), Error = Infallible, Future: Send> + Clone,
    Arc<Mutex<Vec<Instant>>>,
) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&calls);
    let service = service_fn(move |()| {
        seen.lock().expect("calls").push(Instant::now());
        async { Ok::<_, Infallible>(()) }
    });
    (service, calls)
}

#[tokio::test(start_paused = true)]
async fn the_retry_layer_waits_out_a_third_party_rejection() {
    let reasons = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&reasons);
    let retry = RetryLayer::builder()
        .on_retry(move |event| seen.lock().expect("reasons").push(event.reason))
        .build()
        .expect("config");
    let (inner, calls) = recording();
    let start = Instant::now();
    let refuse = RefuseLayer::new(overloaded(Duration::from_millis(300)), 1);
    let stack = ServiceBuilder::new()
        .layer(retry)
        .layer(refuse)
        .service(inner);
    stack.oneshot(()).await.expect("passes on the retry");

    let calls = calls.lock().expect("calls");
    assert_eq!(
        calls.len(),
        1,
        "the refusal never reached the inner service"
    );
    assert!(
        calls[0] - start >= Duration::from_millis(300),
        "{:?}",
        calls[0] - start
    );
    assert_eq!(
        *reasons.lock().expect("reasons"),
        [RetryReason::Rejected(RejectionKind::Overloaded)]
    );
}

#[tokio::test(start_paused = true)]
async fn a_third_party_rejection_beyond_max_server_delay_is_returned_at_once() {
    let retry = RetryLayer::builder()
        .max_server_delay(Duration::from_secs(1))
        .build()
        .expect("config");
    let (inner, calls) = recording();
    let refuse = RefuseLayer::new(overloaded(Duration::from_secs(5)), 1);
    let start = Instant::now();
    let error = ServiceBuilder::new()
        .layer(retry)
        .layer(refuse)
        .service(inner)
        .oneshot(())
        .await
        .expect_err("given up");
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert!(error.is::<Rejected>(), "the layer's own error: {error}");
    assert!(calls.lock().expect("calls").is_empty());
}

/// A policy that never waits out a rejection: overrides `on_rejection`.
#[derive(Clone)]
struct NeverWaitForRejections;

impl<Req, Res> RetryPolicy<Req, Res> for NeverWaitForRejections {
    fn decide(&self, result: &Result<Res, BoxError>) -> Decision {
        match result {
            Ok(_) => Decision::Return,
            Err(_) => Decision::retry(RetryReason::Error),
        }
    }

    fn on_rejection(&self, _: &Rejection, _: &Result<Res, BoxError>) -> Decision {
        Decision::Return
    }
}

#[tokio::test(start_paused = true)]
async fn a_policy_can_override_how_rejections_are_retried() {
    let retry = RetryLayer::builder()
        .policy(NeverWaitForRejections)
        .build()
        .expect("config");
    let (inner, calls) = recording();
    let refuse = RefuseLayer::new(overloaded(Duration::from_millis(10)), 1);
    let error = ServiceBuilder::new()
        .layer(retry)
        .layer(refuse)
        .service(inner)
        .oneshot(())
        .await
        .expect_err("not retried");
    let rejection = Rejection::find(&*error).expect("a rejection");
    assert_eq!(rejection.kind(), RejectionKind::Overloaded);
    assert!(calls.lock().expect("calls").is_empty());
}
