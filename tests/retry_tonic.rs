//! A tonic client over a real `Channel`, wrapped in the retry layer, against a real
//! tonic server on 127.0.0.1. The `Channel`'s request body is a stream: the replayable
//! body is what lets these calls be retried at all.
#![cfg(feature = "http")]
use palisade::classify::GrpcCode;
use palisade::retry::{Backoff, GrpcRetry, ReplayBody, RetryLayer};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tower::ServiceBuilder;

/// Each call's service name and `grpc-previous-rpc-attempts`.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// Answers `code` (with an optional pushback) to its first `failures` calls, then
/// `SERVING`; records each call's service name and `grpc-previous-rpc-attempts`.
#[derive(Clone)]
struct FlakyHealth {
    code: Code,
    failures: usize,
    pushback: Option<&'static str>,
    seen: Seen,
}

#[tonic::async_trait]
impl Health for FlakyHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let previous = request
            .metadata()
            .get("grpc-previous-rpc-attempts")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let count = {
            let mut seen = self.seen.lock().expect("seen");
            seen.push((request.into_inner().service, previous));
            seen.len()
        };
        if count <= self.failures {
            let mut status = Status::new(self.code, "warming up");
            if let Some(pushback) = self.pushback {
                status
                    .metadata_mut()
                    .insert("grpc-retry-pushback-ms", pushback.parse().expect("ascii"));
            }
            return Err(status);
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

/// Starts a server answering `UNAVAILABLE`; returns a `Channel` to it and what it saw.
async fn serve(failures: usize, pushback: Option<&'static str>) -> (Channel, Seen) {
    serve_code(Code::Unavailable, failures, pushback).await
}

/// Starts a server answering `code`; returns a `Channel` to it and what it saw.
async fn serve_code(
    code: Code,
    failures: usize,
    pushback: Option<&'static str>,
) -> (Channel, Seen) {
    let seen = Arc::default();
    let health = FlakyHealth {
        code,
        failures,
        pushback,
        seen: Arc::clone(&seen),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(
        Server::builder()
            .add_service(HealthServer::new(health))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let channel = Channel::from_shared(format!("http://{address}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    (channel, seen)
}

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_owned(),
    }
}

/// The layer over the `Channel`: replayed bodies are boxed back into tonic's body type.
macro_rules! retrying_client {
    ($layer:expr, $channel:expr) => {
        HealthClient::new(
            ServiceBuilder::new()
                .layer($layer)
                .map_request(|request: http::Request<ReplayBody<tonic::body::Body>>| {
                    request.map(tonic::body::Body::new)
                })
                .service($channel),
        )
    };
}

#[tokio::test]
async fn a_channel_client_retries_unavailable_until_it_succeeds() {
    const FAILURES: usize = 2;
    let (channel, seen) = serve(FAILURES, None).await;
    let layer = RetryLayer::builder()
        .max_attempts(4)
        .backoff(Backoff::constant(Duration::from_millis(5)))
        .policy(GrpcRetry::new())
        .replay_bodies()
        .build()
        .expect("config");
    let handle = layer.handle();
    let mut client = retrying_client!(layer, channel);
    let response = client
        .check(check("orders"))
        .await
        .expect("served on the third attempt");
    assert_eq!(response.into_inner().status, ServingStatus::Serving as i32);

    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), FAILURES + 1, "exactly N + 1 attempts");
    // Every attempt carried the whole request message, replayed from the kept copy.
    assert!(seen.iter().all(|(service, _)| service == "orders"));
    let previous: Vec<_> = seen
        .iter()
        .map(|(_, previous)| previous.as_deref())
        .collect();
    assert_eq!(previous, [None, Some("1"), Some("2")]);
    let metrics = handle.metrics();
    assert_eq!((metrics.success_with_retry, metrics.retries), (1, 2));
}

/// Calls a server answering `UNAVAILABLE` to its first `failures` calls through a
/// layer with `policy`; returns the status the client got and the attempts the server
/// saw.
async fn failing_call(
    failures: usize,
    pushback: Option<&'static str>,
    policy: GrpcRetry,
) -> (Code, usize) {
    let (channel, seen) = serve(failures, pushback).await;
    let layer = RetryLayer::builder()
        .max_attempts(3)
        .backoff(Backoff::constant(Duration::from_millis(1)))
        .policy(policy)
        .replay_bodies()
        .build()
        .expect("config");
    let mut client = retrying_client!(layer, channel);
    let status = client.check(check("orders")).await.expect_err("fails");
    let attempts = seen.lock().expect("seen").len();
    (status.code(), attempts)
}

#[tokio::test]
async fn attempts_run_out_and_the_last_status_is_returned() {
    let outcome = failing_call(usize::MAX, None, GrpcRetry::new()).await;
    assert_eq!(outcome, (Code::Unavailable, 3));
}

#[tokio::test]
async fn a_negative_pushback_from_the_server_stops_retries() {
    let outcome = failing_call(usize::MAX, Some("-1"), GrpcRetry::new()).await;
    assert_eq!(outcome, (Code::Unavailable, 1));
}

#[tokio::test]
async fn codes_outside_the_set_are_not_retried() {
    let policy = GrpcRetry::new()
        .without_code(GrpcCode::Unavailable)
        .with_code(GrpcCode::Aborted);
    let outcome = failing_call(usize::MAX, None, policy).await;
    assert_eq!(outcome, (Code::Unavailable, 1));
}

#[tokio::test]
async fn resource_exhausted_with_a_pushback_is_retried_by_default() {
    // A pushback of 0 asks for the retry at once: no real wait in the test.
    let (channel, seen) = serve_code(Code::ResourceExhausted, 1, Some("0")).await;
    let layer = RetryLayer::builder()
        .max_attempts(3)
        .backoff(Backoff::constant(Duration::from_millis(1)))
        .policy(GrpcRetry::new())
        .replay_bodies()
        .build()
        .expect("config");
    let mut client = retrying_client!(layer, channel);
    client
        .check(check("orders"))
        .await
        .expect("retried as the pushback invited");
    assert_eq!(seen.lock().expect("seen").len(), 2);

    // Without a pushback the server did not invite a retry.
    let (channel, seen) = serve_code(Code::ResourceExhausted, 1, None).await;
    let layer = RetryLayer::builder()
        .policy(GrpcRetry::new())
        .replay_bodies()
        .build()
        .expect("config");
    let mut client = retrying_client!(layer, channel);
    let status = client
        .check(check("orders"))
        .await
        .expect_err("not retried");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(seen.lock().expect("seen").len(), 1);
}
