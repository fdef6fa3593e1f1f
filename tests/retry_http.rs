//! The retry layer in front of a real hyper client talking to a real axum server on
//! 127.0.0.1, with streaming request bodies replayed from their kept copy.
#![cfg(feature = "http")]
use axum::Router;
use axum::extract::{Request as AxumRequest, State};
use axum::response::{IntoResponse, Response as AxumResponse};
use bytes::Bytes;
use http::{HeaderName, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade::retry::{Backoff, HttpRetry, ReplayBody, RetryLayer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::{BoxError, Layer, Service, ServiceExt};

/// What the server saw of one request.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    method: Method,
    body: Bytes,
    attempt: Option<String>,
}

#[derive(Clone, Default)]
struct Server {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

/// `/flaky-once`: 503 with `Retry-After: 1` to the first request, 200 after.
/// `/down`: always 503.
async fn answer(State(server): State<Server>, request: AxumRequest) -> AxumResponse {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let count = {
        let mut seen = server.seen.lock().expect("seen");
        seen.push(Seen {
            method: parts.method.clone(),
            body,
            attempt: parts
                .headers
                .get("x-attempt")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned),
        });
        seen.len()
    };
    match parts.uri.path() {
        "/flaky-once" if count == 1 => (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "1")],
            "busy",
        )
            .into_response(),
        "/flaky-once" => (StatusCode::OK, "done").into_response(),
        _ => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

/// Serves on its own thread and runtime, on real time, so that the client's runtime
/// can pause its clock.
fn spawn_server() -> (SocketAddr, Server) {
    let server = Server::default();
    let app = Router::new().fallback(answer).with_state(server.clone());
    let (address_tx, address_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("server runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            address_tx
                .send(listener.local_addr().expect("address"))
                .expect("send");
            axum::serve(listener, app).await.expect("serve");
        });
    });
    (address_rx.recv().expect("server address"), server)
}

type Chunks = StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>,
>;

/// A streaming body of `chunks` chunks of `size` bytes each: not `Clone`.
fn streaming(chunks: usize, size: usize) -> (Chunks, Bytes) {
    let whole: Vec<u8> = (0..chunks * size)
        .map(|index| (index % 251) as u8)
        .collect();
    let frames: Vec<_> = whole
        .chunks(size)
        .map(|chunk| Ok(http_body::Frame::data(Bytes::copy_from_slice(chunk))))
        .collect();
    (
        StreamBody::new(futures_util::stream::iter(frames)),
        Bytes::from(whole),
    )
}

fn client<B>() -> Client<HttpConnector, ReplayBody<B>>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    Client::builder(TokioExecutor::new()).build_http()
}

fn request<B>(method: Method, address: SocketAddr, path: &str, body: B) -> Request<B> {
    Request::builder()
        .method(method)
        .uri(format!("http://{address}{path}"))
        .body(body)
        .expect("request")
}

#[tokio::test(start_paused = true)]
async fn waits_for_retry_after_then_succeeds_over_a_real_connection() {
    let (address, server) = spawn_server();
    let layer = RetryLayer::builder()
        .backoff(Backoff::constant(Duration::from_millis(10)))
        .policy(HttpRetry::new())
        .replay_bodies()
        .build()
        .expect("config");
    let handle = layer.handle();
    let service = layer.layer(client::<Full<Bytes>>());
    let started = tokio::time::Instant::now();
    let response = service
        .oneshot(request(
            Method::GET,
            address,
            "/flaky-once",
            Full::new(Bytes::new()),
        ))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body, "done");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(server.seen().len(), 2);
    assert_eq!(handle.metrics().success_with_retry, 1);
}

#[tokio::test(start_paused = true)]
async fn post_is_sent_once_by_default() {
    let (address, server) = spawn_server();
    let layer = RetryLayer::builder()
        .policy(HttpRetry::new())
        .replay_bodies()
        .build()
        .expect("config");
    let (body, whole) = streaming(4, 100);
    let response = layer
        .layer(client())
        .oneshot(request(Method::POST, address, "/down", body))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, whole);
}

#[tokio::test(start_paused = true)]
async fn a_streaming_body_is_replayed_in_full_on_each_retry() {
    let (address, server) = spawn_server();
    let layer = RetryLayer::builder()
        .max_attempts(3)
        .backoff(Backoff::constant(Duration::from_millis(10)))
        .policy(HttpRetry::new())
        .replay_bodies()
        .attempt_header(HeaderName::from_static("x-attempt"))
        .build()
        .expect("config");
    let (body, whole) = streaming(8, 1000);
    let response = layer
        .layer(client())
        .oneshot(request(Method::PUT, address, "/down", body))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let seen = server.seen();
    assert_eq!(seen.len(), 3);
    for (index, seen) in seen.iter().enumerate() {
        assert_eq!(seen.method, Method::PUT);
        assert_eq!(seen.body, whole, "attempt {}", index + 1);
        assert_eq!(
            seen.attempt.as_deref(),
            Some((index + 1).to_string().as_str())
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_replay_limit_is_sent_once_in_full() {
    let (address, server) = spawn_server();
    let layer = RetryLayer::builder()
        .policy(HttpRetry::new())
        .replay_bodies()
        .replay_limit(1024)
        .build()
        .expect("config");
    let handle = layer.handle();
    let (body, whole) = streaming(4, 1000);
    let response = layer
        .layer(client())
        .oneshot(request(Method::PUT, address, "/down", body))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let seen = server.seen();
    assert_eq!(seen.len(), 1, "not retried");
    assert_eq!(seen[0].body, whole, "never truncated");
    assert_eq!(handle.metrics().failure_without_retry, 1);
}

#[tokio::test(start_paused = true)]
async fn connection_errors_are_retried() {
    // Bind then close a port, so that connecting to it is refused.
    let address = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address")
    };
    let layer = RetryLayer::builder()
        .max_attempts(3)
        .backoff(Backoff::constant(Duration::from_millis(10)))
        .policy(HttpRetry::new())
        .replay_bodies()
        .build()
        .expect("config");
    let handle = layer.handle();
    let mut service = layer.layer(client::<Full<Bytes>>());
    let error = service
        .ready()
        .await
        .expect("ready")
        .call(request(Method::GET, address, "/", Full::new(Bytes::new())))
        .await
        .expect_err("refused");
    assert!(error.to_string().contains("client error"), "{error}");
    let metrics = handle.metrics();
    assert_eq!((metrics.retries, metrics.failure_with_retry), (2, 1));
}
