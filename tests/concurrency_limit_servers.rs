//! The concurrency limit in real servers on 127.0.0.1: an axum server overloaded by
//! concurrent hyper clients, and a tonic server whose shed calls a palisade retry client
//! waits out. The handlers are held by a gate the test opens, so "in flight" is exact
//! and nothing depends on timing.
#![cfg(all(feature = "axum", feature = "tonic"))]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::routing::get;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use palisade::ServiceBuilderExt;
use palisade::classify::{GrpcErrorsAsFailures, ServerErrorsAsFailures};
use palisade::concurrency_limit::{ConcurrencyLimitHandle, ConcurrencyLimitLayer};
use palisade::retry::{Backoff, GrpcRetry, ReplayBody, RetryLayer};
use palisade::tonic::RejectionsAsStatusLayer;
use tokio::sync::Semaphore;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tower::ServiceBuilder;

/// Holds every request until the test lets it through, counting those inside.
#[derive(Clone)]
struct Gate {
    open: Arc<Semaphore>,
    inside: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            open: Arc::new(Semaphore::new(0)),
            inside: Arc::default(),
            peak: Arc::default(),
        }
    }
}

impl Gate {
    async fn pass(&self) {
        let now = self.inside.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        self.open.acquire().await.expect("open").forget();
        self.inside.fetch_sub(1, Ordering::SeqCst);
    }

    fn let_through(&self, requests: usize) {
        self.open.add_permits(requests);
    }

    /// Waits (yielding, without sleeping) until `n` requests are inside.
    async fn until_inside(&self, n: usize) {
        while self.inside.load(Ordering::SeqCst) < n {
            tokio::task::yield_now().await;
        }
    }
}

/// Waits (yielding) until the layer has refused `n` requests.
async fn until_rejected(handle: &ConcurrencyLimitHandle, n: u64) {
    while handle.rejected() < n {
        tokio::task::yield_now().await;
    }
}

async fn serve_axum(
    gate: Gate,
    limit: ConcurrencyLimitLayer<
        ServerErrorsAsFailures,
        palisade::concurrency_limit::ReleaseOnBodyEnd,
    >,
) -> SocketAddr {
    let app = Router::new()
        .route(
            "/",
            get(move || {
                let gate = gate.clone();
                async move {
                    gate.pass().await;
                    "served"
                }
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(palisade::axum::handle_error))
                .concurrency_limiter(limit),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_overloaded_axum_server_answers_every_request_200_or_503_and_never_exceeds_its_limit() {
    const LIMIT: usize = 4;
    const CLIENTS: usize = 32;
    let gate = Gate::default();
    let limit = ConcurrencyLimitLayer::builder()
        .max_in_flight(LIMIT as u32)
        .retry_after(Duration::from_secs(2))
        .classify(ServerErrorsAsFailures)
        .release_on_body_end()
        .build()
        .unwrap();
    let handle = limit.handle();
    let address = serve_axum(gate.clone(), limit).await;
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<Full<Bytes>>();

    let requests: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let request = http::Request::get(format!("http://{address}/"))
                    .body(Full::default())
                    .unwrap();
                let response = client.request(request).await.expect("answered");
                let (parts, body) = response.into_parts();
                let body = body.collect().await.expect("a whole body").to_bytes();
                (
                    parts.status,
                    parts.headers.get("retry-after").cloned(),
                    body,
                )
            })
        })
        .collect();

    // Everyone beyond the limit is refused while the first LIMIT are held at the gate.
    let overall = async {
        gate.until_inside(LIMIT).await;
        until_rejected(&handle, (CLIENTS - LIMIT) as u64).await;
        assert_eq!(handle.in_flight() as usize, LIMIT);
        gate.let_through(CLIENTS);
        let mut answers = Vec::new();
        for request in requests {
            answers.push(request.await.unwrap());
        }
        answers
    };
    let answers = tokio::time::timeout(Duration::from_secs(20), overall)
        .await
        .expect("no request hangs");

    let served = answers
        .iter()
        .filter(|(status, _, _)| *status == StatusCode::OK)
        .count();
    let shed: Vec<_> = answers
        .iter()
        .filter(|(status, _, _)| *status == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    assert_eq!(served, LIMIT);
    assert_eq!(shed.len(), CLIENTS - LIMIT, "every other request is 503");
    for (_, retry_after, body) in &shed {
        assert_eq!(retry_after.as_ref().expect("Retry-After"), "2");
        assert!(body.is_empty(), "no error text reaches the client");
    }
    assert_eq!(
        gate.peak.load(Ordering::SeqCst),
        LIMIT,
        "in flight never exceeded the limit"
    );
    assert_eq!(handle.in_flight(), 0, "every permit came back");
}

/// A health service whose checks wait at the gate.
#[derive(Clone)]
struct GatedHealth(Gate);

#[tonic::async_trait]
impl Health for GatedHealth {
    async fn check(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.0.pass().await;
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

async fn serve_tonic(gate: Gate, retry_after: Duration) -> (Channel, ConcurrencyLimitHandle) {
    let limit = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .retry_after(retry_after)
        .classify(GrpcErrorsAsFailures::new())
        .release_on_body_end() // a gRPC response ends with its trailers
        .build()
        .unwrap();
    let handle = limit.handle();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .layer(
                ServiceBuilder::new()
                    .layer(RejectionsAsStatusLayer::new())
                    .concurrency_limiter(limit),
            )
            .add_service(HealthServer::new(GatedHealth(gate)))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (channel, handle)
}

fn check() -> HealthCheckRequest {
    HealthCheckRequest {
        service: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tonic_server_sheds_with_unavailable_and_pushback_and_a_retry_client_waits_it_out() {
    let gate = Gate::default();
    let (channel, handle) = serve_tonic(gate.clone(), Duration::from_millis(150)).await;

    let test = async {
        // One call holds the only permit.
        let mut holder = HealthClient::new(channel.clone());
        let held = tokio::spawn(async move { holder.check(check()).await });
        gate.until_inside(1).await;

        // A plain client is shed with the documented status.
        let mut plain = HealthClient::new(channel.clone());
        let status = plain.check(check()).await.expect_err("shed");
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "overloaded");
        assert_eq!(
            status.metadata().get("grpc-retry-pushback-ms").unwrap(),
            "150"
        );
        assert_eq!(handle.rejected(), 1);

        // A retrying client is shed too, waits the pushback, and gets through once the
        // held call has ended.
        let retry = RetryLayer::builder()
            .max_attempts(5)
            .backoff(Backoff::constant(Duration::from_millis(1)))
            .policy(GrpcRetry::new())
            .max_server_delay(Duration::from_secs(1))
            .replay_bodies()
            .build()
            .unwrap();
        let retry_handle = retry.handle();
        let mut retrying = HealthClient::new(
            ServiceBuilder::new()
                .layer(retry)
                .map_request(|request: http::Request<ReplayBody<tonic::body::Body>>| {
                    request.map(tonic::body::Body::new)
                })
                .service(channel.clone()),
        );
        let waited = tokio::spawn(async move { retrying.check(check()).await });
        until_rejected(&handle, 2).await;
        gate.let_through(2);
        held.await.unwrap().expect("the held call is served");
        let response = waited
            .await
            .unwrap()
            .expect("served after waiting out the pushback");
        assert_eq!(response.into_inner().status, ServingStatus::Serving as i32);
        let metrics = retry_handle.metrics();
        assert!(
            metrics.retries >= 1 && metrics.success_with_retry == 1,
            "{metrics:?}"
        );
        assert_eq!(gate.peak.load(Ordering::SeqCst), 1);
    };
    tokio::time::timeout(Duration::from_secs(20), test)
        .await
        .expect("no call hangs");
    assert_eq!(handle.in_flight(), 0);
}
