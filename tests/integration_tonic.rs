//! A real tonic server and a real tonic client on 127.0.0.1, with palisade's layers on
//! both sides, as a user writes them:
//!
//! - server: `Server::builder().layer(ServiceBuilder::new().layer(RejectionsAsStatusLayer::new())
//!   .rate_limiter(..).circuit_breaker(..))`;
//! - client: the same layers over a `Channel`, under a generated client (tonic-health's
//!   `HealthClient`), with retries that honour the server's pushback.
//!
//! Rejections must reach the caller as `RESOURCE_EXHAUSTED` / `UNAVAILABLE` with the
//! delay in the metadata, never as `UNKNOWN`.
#![cfg(all(feature = "tonic", feature = "http"))]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade::ServiceBuilderExt;
use palisade::circuit_breaker::{CircuitBreakerLayer, SlidingWindow, State as BreakerState};
use palisade::classify::{GrpcCode, GrpcErrorsAsFailures};
use palisade::correlation::{CorrelationId, CorrelationIdLayer};
use palisade::rate_limit::RateLimitLayer;
use palisade::retry::{Backoff, GrpcRetry, RetryLayer};
use palisade::tonic::RejectionsAsStatusLayer;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tower::ServiceBuilder;

/// A health service that records each call's `x-request-id` and can be told to fail.
#[derive(Clone, Default)]
struct Recorder {
    failing: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Option<String>>>>,
}

impl Recorder {
    fn calls(&self) -> usize {
        self.seen.lock().expect("seen").len()
    }
}

#[tonic::async_trait]
impl Health for Recorder {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let id = request
            .metadata()
            .get("x-request-id")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        self.seen.lock().expect("seen").push(id);
        if self.failing.load(Ordering::SeqCst) {
            return Err(Status::unavailable("disk full"));
        }
        Ok(Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }))
    }

    type WatchStream = Pin<
        Box<
            dyn tonic::codegen::tokio_stream::Stream<Item = Result<HealthCheckResponse, Status>>
                + Send,
        >,
    >;

    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not used"))
    }
}

/// Serves `recorder` on an OS-assigned loopback port behind `Server::builder().layer(layer)`,
/// exactly as a user writes it; evaluates to the address. (A macro: the layer types
/// differ and tonic's bounds on them are long.)
macro_rules! serve_behind {
    ($layer:expr, $recorder:expr) => {{
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address: SocketAddr = listener.local_addr().expect("address");
        tokio::spawn(
            Server::builder()
                .layer($layer)
                .add_service(HealthServer::new($recorder))
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        address
    }};
}

/// Serves `recorder` with no layers of palisade's.
async fn serve_plain(recorder: Recorder) -> SocketAddr {
    serve_behind!(CorrelationIdLayer::new(), recorder)
}

async fn channel(address: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{address}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

fn check() -> HealthCheckRequest {
    HealthCheckRequest {
        service: "orders".to_owned(),
    }
}

/// The pushback the status carries, in milliseconds, and its `retry-after` in seconds.
fn delays(status: &Status) -> (u64, u64) {
    let read = |key: &str| -> u64 {
        status
            .metadata()
            .get(key)
            .unwrap_or_else(|| panic!("{key} in {status:?}"))
            .to_str()
            .expect("ascii")
            .parse()
            .expect("a number")
    };
    (read("grpc-retry-pushback-ms"), read("retry-after"))
}

// ---------------------------------------------------------------------------------------
// Server side.

#[tokio::test]
async fn server_rejections_reach_the_client_as_statuses_with_the_delay() {
    let recorder = Recorder::default();
    let limit = RateLimitLayer::builder()
        .capacity(2)
        .refill(1, Duration::from_secs(10))
        .build()
        .expect("limit config");
    let breaker = CircuitBreakerLayer::builder()
        .open_for(Duration::from_secs(30))
        .classify(GrpcErrorsAsFailures::new())
        .build()
        .expect("breaker config");
    let breaker_handle = breaker.handle();
    let address = serve_behind!(
        ServiceBuilder::new()
            .layer(RejectionsAsStatusLayer::new())
            .rate_limiter(limit)
            .circuit_breaker(breaker),
        recorder.clone()
    );
    let mut client = HealthClient::new(channel(address).await);

    for _ in 0..2 {
        let reply = client.check(check()).await.expect("within the limit");
        assert_eq!(reply.into_inner().status, ServingStatus::Serving as i32);
    }
    let limited = client.check(check()).await.expect_err("over the limit");
    assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
    let (pushback_ms, retry_after) = delays(&limited);
    assert!((9_000..=10_000).contains(&pushback_ms), "{pushback_ms} ms");
    assert_eq!(retry_after, 10);
    assert_eq!(
        recorder.calls(),
        2,
        "a refused call never reaches the service"
    );

    // Another connection: the server's layers share one bucket and one breaker.
    let mut second = HealthClient::new(channel(address).await);
    let limited = second
        .check(check())
        .await
        .expect_err("still over the limit");
    assert_eq!(limited.code(), Code::ResourceExhausted);
    assert_eq!(recorder.calls(), 2);
    assert_eq!(
        breaker_handle.metrics().calls,
        2,
        "refused calls are not the breaker's"
    );
}

#[tokio::test]
async fn a_server_breaker_opens_on_grpc_errors_and_sheds_as_unavailable() {
    let recorder = Recorder::default();
    // `GrpcErrorsAsFailures` reads the status from the response (tonic answers errors
    // with HTTP 200) and wraps the body: the server must accept that body type.
    let breaker = CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count(10))
        .minimum_calls(2)
        .failure_rate_threshold(0.5)
        .open_for(Duration::from_secs(30))
        .classify(GrpcErrorsAsFailures::new())
        .build()
        .expect("breaker config");
    let handle = breaker.handle();
    let address = serve_behind!(
        ServiceBuilder::new()
            .layer(RejectionsAsStatusLayer::new())
            .circuit_breaker(breaker),
        recorder.clone()
    );
    let mut client = HealthClient::new(channel(address).await);

    recorder.failing.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        let status = client.check(check()).await.expect_err("the service fails");
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "disk full");
        assert!(status.metadata().get("grpc-retry-pushback-ms").is_none());
    }
    assert_eq!(handle.state(), BreakerState::Open);

    let shed = client
        .check(check())
        .await
        .expect_err("the circuit is open");
    assert_eq!(shed.code(), Code::Unavailable, "{shed:?}");
    let (pushback_ms, retry_after) = delays(&shed);
    assert!((29_000..=30_000).contains(&pushback_ms), "{pushback_ms} ms");
    assert_eq!(retry_after, 30);
    assert_eq!(
        recorder.calls(),
        2,
        "an open circuit does not call the service"
    );
}

#[tokio::test]
async fn without_the_status_layer_a_server_rejection_resets_the_call() {
    // Why `RejectionsAsStatusLayer` exists: tonic's server cannot tell what a
    // `CircuitOpen` is and drops the call.
    let recorder = Recorder::default();
    let breaker = CircuitBreakerLayer::builder()
        .build()
        .expect("breaker config");
    breaker.handle().force_open();
    let address = serve_behind!(
        ServiceBuilder::new().circuit_breaker(breaker),
        recorder.clone()
    );
    let mut client = HealthClient::new(channel(address).await);
    let status = client.check(check()).await.expect_err("rejected");
    // tonic's server resets the HTTP/2 stream; the client reads that as INTERNAL.
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.metadata().get("grpc-retry-pushback-ms").is_none());
    assert_eq!(recorder.calls(), 0);
}

#[tokio::test]
async fn per_client_limits_on_a_server_key_on_metadata_or_on_the_peer() {
    use palisade::rate_limit::key::Header;
    use tonic::transport::server::TcpConnectInfo;

    let by_tenant = RateLimitLayer::builder()
        .capacity(1)
        .refill(1, Duration::from_secs(60))
        .keyed(Header::new(http::HeaderName::from_static("x-tenant")))
        .build()
        .expect("limit config");
    // tonic records the peer as `TcpConnectInfo`, which `PeerIp` does not read.
    let by_peer = RateLimitLayer::builder()
        .capacity(3)
        .refill(1, Duration::from_secs(60))
        .keyed(|request: &http::Request<tonic::body::Body>| {
            request
                .extensions()
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr)
                .map(|peer| peer.ip())
        })
        .build()
        .expect("limit config");
    let recorder = Recorder::default();
    let address = serve_behind!(
        ServiceBuilder::new()
            .layer(RejectionsAsStatusLayer::new())
            .rate_limiter(by_peer)
            .rate_limiter(by_tenant),
        recorder.clone()
    );
    let mut client = HealthClient::new(channel(address).await);
    let tenant_check = |tenant: Option<&str>| {
        let mut request = Request::new(check());
        if let Some(tenant) = tenant {
            request
                .metadata_mut()
                .insert("x-tenant", tenant.parse().expect("ascii"));
        }
        request
    };

    client
        .check(tenant_check(Some("a")))
        .await
        .expect("a's first call");
    let code =
        |result: Result<Response<HealthCheckResponse>, Status>| result.expect_err("refused").code();
    assert_eq!(
        code(client.check(tenant_check(Some("a"))).await),
        Code::ResourceExhausted
    );
    let missing = client.check(tenant_check(None)).await;
    assert_eq!(code(missing), Code::InvalidArgument, "no tenant, no key");
    // The peer's three tokens are spent (a refused tenant call still cost one).
    assert_eq!(
        code(client.check(tenant_check(Some("b"))).await),
        Code::ResourceExhausted
    );
    assert_eq!(recorder.calls(), 1);
}

// ---------------------------------------------------------------------------------------
// Client side.

#[tokio::test]
async fn without_the_status_layer_a_local_rejection_is_unknown() {
    let recorder = Recorder::default();
    let address = serve_plain(recorder.clone()).await;
    let breaker = CircuitBreakerLayer::builder()
        .build()
        .expect("breaker config");
    breaker.handle().force_open();
    let mut client = HealthClient::new(
        ServiceBuilder::new()
            .circuit_breaker(breaker)
            .service(channel(address).await),
    );
    let status = client.check(check()).await.expect_err("rejected");
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    assert!(status.metadata().get("grpc-retry-pushback-ms").is_none());
}

#[tokio::test]
async fn local_rejections_surface_from_the_generated_client_as_the_same_statuses() {
    let recorder = Recorder::default();
    let address = serve_plain(recorder.clone()).await;
    let breaker = CircuitBreakerLayer::builder()
        .open_for(Duration::from_secs(20))
        .classify(GrpcErrorsAsFailures::new())
        .build()
        .expect("breaker config");
    let breaker_handle = breaker.handle();
    let limit = RateLimitLayer::builder()
        .capacity(1)
        .refill(1, Duration::from_secs(5))
        .build()
        .expect("limit config");
    let mut client = HealthClient::new(
        ServiceBuilder::new()
            .layer(RejectionsAsStatusLayer::new())
            .circuit_breaker(breaker)
            .rate_limiter(limit)
            .service(channel(address).await),
    );

    client.check(check()).await.expect("the first call passes");
    let limited = client.check(check()).await.expect_err("local limit");
    assert_eq!(limited.code(), Code::ResourceExhausted);
    let (pushback_ms, retry_after) = delays(&limited);
    assert!((4_000..=5_000).contains(&pushback_ms), "{pushback_ms} ms");
    assert_eq!(retry_after, 5);

    breaker_handle.force_open();
    let shed = client.check(check()).await.expect_err("local breaker");
    assert_eq!(shed.code(), Code::Unavailable);
    let (_, retry_after) = delays(&shed);
    assert!(retry_after > 0);
    assert_eq!(
        recorder.calls(),
        1,
        "local rejections never leave the process"
    );
}

#[tokio::test]
async fn client_retries_honour_the_server_pushback() {
    // Long enough that a loaded machine cannot let the bucket refill between the two
    // calls (which would admit the second outright) or eat most of the pushback.
    const REFILL: Duration = Duration::from_secs(2);
    let recorder = Recorder::default();
    let server_limit = RateLimitLayer::builder()
        .capacity(1)
        .refill(1, REFILL)
        .build()
        .expect("limit config");
    let address = serve_behind!(
        ServiceBuilder::new()
            .layer(CorrelationIdLayer::new())
            .layer(RejectionsAsStatusLayer::new())
            .rate_limiter(server_limit),
        recorder.clone()
    );

    let delays_seen = Arc::new(Mutex::new(Vec::new()));
    let retry = RetryLayer::builder()
        .max_attempts(3)
        // Far shorter than the refill: only the pushback makes the retry succeed.
        .backoff(Backoff::constant(Duration::from_millis(1)))
        .policy(GrpcRetry::new().with_code(GrpcCode::ResourceExhausted))
        .replay_bodies()
        .on_retry({
            let delays_seen = Arc::clone(&delays_seen);
            move |event| delays_seen.lock().expect("delays").push(event.delay)
        })
        .build()
        .expect("retry config");
    let retry_handle = retry.handle();
    let mut client = HealthClient::new(
        ServiceBuilder::new()
            .layer(RejectionsAsStatusLayer::new())
            .retries(retry)
            .map_request(palisade::tonic::into_channel_request)
            .propagate_correlation_id()
            .service(channel(address).await),
    );

    let id = CorrelationId::parse("checkout-7").expect("valid id");
    let (first, second) = id
        .scope(async {
            let first = client.check(check()).await;
            let second = client.check(check()).await;
            (first, second)
        })
        .await;
    first.expect("the first call takes the only token");
    second.expect("the second is refused, waits out the pushback and passes");

    let delays_seen = delays_seen.lock().expect("delays").clone();
    assert_eq!(delays_seen.len(), 1, "one retry: {delays_seen:?}");
    // The pushback is the refill less the time between the two calls: far above the
    // 1 ms backoff unless the second call came a whole second after the first.
    assert!(delays_seen[0] >= Duration::from_secs(1), "{delays_seen:?}");
    assert_eq!(retry_handle.metrics().success_with_retry, 1);
    assert_eq!(
        *recorder.seen.lock().expect("seen"),
        [Some("checkout-7".to_owned()), Some("checkout-7".to_owned())],
        "both admitted attempts carried the caller's ID"
    );
}
