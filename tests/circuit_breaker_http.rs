//! The breaker over HTTP and gRPC: a real axum server on loopback driven by a real
//! HTTP client, and gRPC statuses read from trailers at the end of the body.
#![cfg(feature = "http")]

use axum::Router;
use axum::body::Bytes;
use axum::error_handling::HandleErrorLayer;
use axum::http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use palisade::circuit_breaker::{CircuitBreakerLayer, CircuitOpen, SlidingWindow, State};
use palisade::classify::{GrpcErrorsAsFailures, ServerErrorsAsFailures};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::advance;
use tower::{BoxError, Layer, ServiceBuilder, ServiceExt, service_fn};

/// What the test maps breaker errors to; the crate's own mapping lives elsewhere.
async fn answer(error: BoxError) -> Response<axum::body::Body> {
    match error.downcast_ref::<CircuitOpen>() {
        Some(open) => {
            let seconds = open.retry_after().as_secs_f64().ceil() as u64;
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, seconds.to_string())],
                "circuit open",
            )
                .into_response()
        }
        None => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

#[tokio::test(start_paused = true)]
async fn an_axum_server_opens_rejects_half_opens_and_closes() {
    let failing = Arc::new(AtomicBool::new(true));
    let reached = Arc::new(AtomicUsize::new(0));
    let breaker = CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .minimum_calls(4)
        .sliding_window(SlidingWindow::count(10))
        .open_for(Duration::from_secs(60))
        .half_open_probes(2)
        .classify(ServerErrorsAsFailures)
        .build()
        .expect("valid");
    let handle = breaker.handle();

    let handler = {
        let (failing, reached) = (Arc::clone(&failing), Arc::clone(&reached));
        move || async move {
            reached.fetch_add(1, Ordering::SeqCst);
            if failing.load(Ordering::SeqCst) {
                (StatusCode::INTERNAL_SERVER_ERROR, "down")
            } else {
                (StatusCode::OK, "up")
            }
        }
    };
    // Router::layer clones the layered route for every request: the breaker must be
    // shared by all those clones. A second route gets the same layer.
    let app = Router::new()
        .route("/", get(handler.clone()))
        .route("/other", get(handler))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(answer))
                .layer(breaker),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let get = |path: &'static str| {
        let client = client.clone();
        async move {
            let request = Request::get(format!("http://{address}{path}"))
                .body(Empty::new())
                .expect("request");
            let response = client.request(request).await.expect("response");
            let status = response.status();
            let retry_after = response.headers().get(header::RETRY_AFTER).cloned();
            response.into_body().collect().await.expect("body");
            (status, retry_after)
        }
    };

    // Four 500s, on both routes: 100% of 4 calls trips.
    for path in ["/", "/other", "/", "/other"] {
        assert_eq!(get(path).await.0, StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(handle.state(), State::Open);

    // Open: 503 with Retry-After, and the handler is not reached.
    let (status, retry_after) = get("/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry_after, Some(HeaderValue::from_static("60")));
    assert_eq!(reached.load(Ordering::SeqCst), 4);

    // The dependency recovers; after the open time two probes close the breaker.
    failing.store(false, Ordering::SeqCst);
    advance(Duration::from_secs(60)).await;
    assert_eq!(get("/").await.0, StatusCode::OK);
    assert_eq!(handle.state(), State::HalfOpen);
    assert_eq!(get("/other").await.0, StatusCode::OK);
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(get("/").await.0, StatusCode::OK);
    assert_eq!(reached.load(Ordering::SeqCst), 7);
}

type GrpcFrames = futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>;

/// A gRPC-shaped response: 200, a message, then `grpc-status` in the trailers.
fn grpc_response(status: &'static str) -> Response<StreamBody<GrpcFrames>> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static(status));
    let frames = vec![
        Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
        Ok(Frame::trailers(trailers)),
    ];
    Response::new(StreamBody::new(futures_util::stream::iter(frames)))
}

/// A backend answering with the gRPC status it is asked for, in the trailers.
fn grpc_backend() -> impl tower::Service<
    &'static str,
    Response = Response<StreamBody<GrpcFrames>>,
    Error = Infallible,
    Future: Send,
> + Clone {
    service_fn(|status: &'static str| async move { Ok(grpc_response(status)) })
}

#[tokio::test(start_paused = true)]
async fn grpc_status_in_trailers_is_classified_at_the_end_of_the_body() {
    let breaker = CircuitBreakerLayer::builder()
        .minimum_calls(2)
        .sliding_window(SlidingWindow::count(2))
        .slow_calls(Duration::from_secs(1), 1.0)
        .classify(GrpcErrorsAsFailures::new())
        .build()
        .expect("valid");
    let handle = breaker.handle();
    let service = breaker.layer(grpc_backend());

    // The head says nothing: the outcome is known only once the trailers are read.
    let response = service.clone().oneshot("14").await.expect("response");
    assert_eq!(handle.metrics().calls, 0);
    // Reading the body takes 2s: the call is timed to the end of the stream.
    advance(Duration::from_secs(2)).await;
    response.into_body().collect().await.expect("body");
    let metrics = handle.metrics();
    assert_eq!(
        (metrics.calls, metrics.failures, metrics.slow_calls),
        (1, 1, 1)
    );

    // NOT_FOUND is an answer, not an outage; and it was quick.
    let response = service.clone().oneshot("5").await.expect("response");
    response.into_body().collect().await.expect("body");
    let metrics = handle.metrics();
    assert_eq!(
        (metrics.calls, metrics.failures, metrics.slow_calls),
        (2, 1, 1)
    );
    assert_eq!(handle.state(), State::Open, "1 failure in 2 calls is 50%");
}

#[tokio::test(start_paused = true)]
async fn a_grpc_body_dropped_before_its_trailers_records_nothing() {
    let breaker = CircuitBreakerLayer::builder()
        .minimum_calls(1)
        .sliding_window(SlidingWindow::count(1))
        .classify(GrpcErrorsAsFailures::new())
        .build()
        .expect("valid");
    let handle = breaker.handle();
    let service = breaker.layer(grpc_backend());
    for _ in 0..3 {
        drop(service.clone().oneshot("14").await.expect("response"));
    }
    assert_eq!(handle.metrics().calls, 0);
    assert_eq!(handle.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn server_errors_are_failures_and_client_errors_are_not() {
    let breaker = CircuitBreakerLayer::builder()
        .minimum_calls(1)
        .sliding_window(SlidingWindow::count(10))
        .classify(ServerErrorsAsFailures)
        .build()
        .expect("valid");
    let handle = breaker.handle();
    let service = breaker.layer(service_fn(|status: u16| async move {
        let mut response = Response::new(());
        *response.status_mut() = StatusCode::from_u16(status).expect("status");
        Ok::<_, Infallible>(response)
    }));
    for status in [200, 404, 429, 404] {
        service.clone().oneshot(status).await.expect("response");
    }
    assert_eq!(handle.metrics().failures, 0);
    assert_eq!(handle.state(), State::Closed);
    for status in [503, 500, 502, 500] {
        let _ = service.clone().oneshot(status).await;
    }
    assert_eq!(handle.state(), State::Open);
}
