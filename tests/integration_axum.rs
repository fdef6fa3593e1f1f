//! All four layers at once in a real axum server on 127.0.0.1, driven by a real HTTP
//! client (hyper-util's legacy client, a new connection per request so that axum builds
//! fresh per-request clones of every layer).
//!
//! The composition is the one a service at the edge would use:
//!
//! ```text
//! client ─▶ CorrelationIdLayer ─▶ HandleErrorLayer(handle_error) ─▶ per-client limit
//!           (x-api-key) ─▶ circuit breaker (5xx = failure) ─▶ router
//!             /whoami  handler with the CorrelationId extractor
//!             /items   proxy to an inventory backend, through retry (per-attempt
//!                      timeout) and correlation-ID propagation
//! ```
#![cfg(all(feature = "http", feature = "axum"))]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderName, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade::ServiceBuilderExt;
use palisade::circuit_breaker::{
    CircuitBreakerHandle, CircuitBreakerLayer, SlidingWindow, State as BreakerState,
};
use palisade::classify::ServerErrorsAsFailures;
use palisade::correlation::CorrelationId;
use palisade::rate_limit::RateLimitLayer;
use palisade::rate_limit::key::Header;
use palisade::retry::{Backoff, HttpRetry, ReplayBody, RetryHandle, RetryLayer};
use tower::ServiceBuilder;

const API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const REQUEST_ID: &str = "x-request-id";
/// Requests each API key may make: the buckets never refill within a test.
const PER_CLIENT: u64 = 6;

// ---------------------------------------------------------------------------------------
// The inventory backend the edge proxies to.

/// The backend's switches and what it saw.
#[derive(Default)]
struct Inventory {
    /// The next this-many calls answer 503.
    fail_next: AtomicU32,
    /// Every call answers 503.
    down: AtomicBool,
    /// Every call hangs: it never answers.
    slow: AtomicBool,
    /// Each call's `x-request-id`.
    seen: Mutex<Vec<Option<String>>>,
}

impl Inventory {
    fn calls(&self) -> usize {
        self.seen.lock().expect("seen").len()
    }

    fn seen_ids(&self) -> Vec<Option<String>> {
        self.seen.lock().expect("seen").clone()
    }
}

async fn inventory(
    State(inventory): State<Arc<Inventory>>,
    request: axum::extract::Request,
) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    inventory.seen.lock().expect("seen").push(id);
    if inventory.slow.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    let flaky = inventory
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if flaky || inventory.down.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "inventory database is down",
        )
            .into_response();
    }
    "3 widgets".into_response()
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, router).await.expect("serve") });
    address
}

async fn spawn_inventory() -> (SocketAddr, Arc<Inventory>) {
    let state = Arc::new(Inventory::default());
    let router = Router::new()
        .fallback(inventory)
        .with_state(Arc::clone(&state));
    (serve(router).await, state)
}

/// An address nothing listens on: connecting to it is refused.
fn dead_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

// ---------------------------------------------------------------------------------------
// The edge.

struct Edge {
    address: SocketAddr,
    breaker: CircuitBreakerHandle,
    retry: RetryHandle,
}

/// The handler-level view of the request's ID.
async fn whoami(id: CorrelationId) -> String {
    id.as_str().to_owned()
}

/// A proxy to `backend`: retries (idempotent methods; 5xx and connection errors; each
/// attempt bounded by the edge's per-attempt timeout) and carries the caller's correlation ID. Its errors are
/// answered by `handle_error` like the router's.
fn proxy(
    backend: SocketAddr,
    retry: RetryLayer<HttpRetry, palisade::retry::ReplayBodies>,
) -> axum::routing::MethodRouter {
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<ReplayBody<axum::body::Body>>();
    let service = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(palisade::axum::handle_error))
        .retries(retry)
        .propagate_correlation_id()
        .map_request(move |mut request: Request<ReplayBody<axum::body::Body>>| {
            let path = request
                .uri()
                .path_and_query()
                .map_or("/", |path| path.as_str());
            if let Ok(uri) = format!("http://{backend}{path}").parse::<Uri>() {
                *request.uri_mut() = uri;
            }
            request
        })
        .service(client);
    axum::routing::get_service(service)
}

/// A per-attempt timeout no healthy loopback call comes near, even in a debug build on a
/// loaded CI machine: only a backend that never answers reaches it.
const GENEROUS: Duration = Duration::from_secs(10);

/// An edge in front of `backend` whose proxy gives each attempt `per_attempt`.
async fn spawn_edge(backend: SocketAddr, per_attempt: Duration) -> Edge {
    let per_client = RateLimitLayer::builder()
        .capacity(PER_CLIENT)
        .refill(1, Duration::from_secs(3600))
        .keyed(Header::new(API_KEY))
        .build()
        .expect("limit config");
    let breaker = CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count(100))
        .minimum_calls(2)
        .failure_rate_threshold(0.5)
        .open_for(Duration::from_secs(60))
        .classify(ServerErrorsAsFailures)
        .build()
        .expect("breaker config");
    let retry = RetryLayer::builder()
        .max_attempts(3)
        .backoff(Backoff::constant(Duration::from_millis(5)))
        .per_attempt_timeout(per_attempt)
        .policy(HttpRetry::new())
        .replay_bodies()
        .build()
        .expect("retry config");
    let (breaker_handle, retry_handle) = (breaker.handle(), retry.handle());
    let router = Router::new()
        .route("/whoami", get(whoami))
        .route("/items", proxy(backend, retry))
        .layer(
            ServiceBuilder::new()
                .correlation_id()
                .layer(HandleErrorLayer::new(palisade::axum::handle_error))
                .rate_limiter(per_client)
                .circuit_breaker(breaker),
        );
    Edge {
        address: serve(router).await,
        breaker: breaker_handle,
        retry: retry_handle,
    }
}

// ---------------------------------------------------------------------------------------
// The client.

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|value| value.to_str().expect("ascii"))
    }

    fn request_id(&self) -> &str {
        self.header(REQUEST_ID)
            .expect("every answer carries an x-request-id")
    }
}

/// Sends `GET path` on a new connection, with the API key and request ID if given.
async fn get_path(
    address: SocketAddr,
    path: &str,
    api_key: Option<&str>,
    request_id: Option<&str>,
) -> Answer {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    let mut request = Request::get(format!("http://{address}{path}"));
    if let Some(key) = api_key {
        request = request.header(API_KEY, key);
    }
    if let Some(id) = request_id {
        request = request.header(REQUEST_ID, id);
    }
    let response = client
        .request(request.body(Full::default()).expect("request"))
        .await
        .expect("the server answers");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8(body.to_vec()).expect("utf-8"),
    }
}

// ---------------------------------------------------------------------------------------
// Router-level stack.

#[tokio::test]
async fn a_request_passes_every_layer_and_its_id_is_the_same_everywhere() {
    let (backend, inventory) = spawn_inventory().await;
    let edge = spawn_edge(backend, GENEROUS).await;

    let whoami = get_path(edge.address, "/whoami", Some("alice"), Some("trace-42")).await;
    assert_eq!(whoami.status, StatusCode::OK);
    assert_eq!(whoami.request_id(), "trace-42", "echoed");
    assert_eq!(
        whoami.body, "trace-42",
        "the extractor sees the client's ID"
    );

    let items = get_path(edge.address, "/items", Some("alice"), Some("trace-43")).await;
    assert_eq!(
        (items.status, items.body.as_str()),
        (StatusCode::OK, "3 widgets")
    );
    assert_eq!(items.request_id(), "trace-43");
    assert_eq!(
        inventory.seen_ids(),
        [Some("trace-43".to_owned())],
        "propagated to the backend"
    );

    // Without an ID (or with a hostile one) the edge mints one; the handler and the
    // backend see the minted ID, never the raw value.
    let minted = get_path(edge.address, "/whoami", Some("alice"), None).await;
    assert_eq!(minted.body, minted.request_id());
    assert_eq!(minted.request_id().len(), 36, "a UUID");
    let replaced = get_path(edge.address, "/items", Some("alice"), Some("a b\tc")).await;
    assert_ne!(replaced.request_id(), "a b\tc");
    assert_eq!(
        inventory.seen_ids()[1].as_deref(),
        Some(replaced.request_id())
    );
}

#[tokio::test]
async fn a_noisy_client_gets_429_with_the_rate_limit_fields_and_others_do_not() {
    let (backend, _inventory) = spawn_inventory().await;
    let edge = spawn_edge(backend, GENEROUS).await;

    for call in 1..=PER_CLIENT {
        let answer = get_path(edge.address, "/whoami", Some("noisy"), None).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "call {call} is within the quota"
        );
    }
    let refused = get_path(edge.address, "/whoami", Some("noisy"), Some("refused-1")).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = refused
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .expect("seconds");
    assert!(
        (1..=3600).contains(&retry_after),
        "retry-after {retry_after}"
    );
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"default\";q=6;w=21600")
    );
    let limit = refused.header("ratelimit").expect("ratelimit");
    assert!(limit.starts_with("\"default\";r=0;t="), "{limit}");
    assert_eq!(
        refused.request_id(),
        "refused-1",
        "rejections carry the ID too"
    );
    assert!(refused.body.is_empty());

    let quiet = get_path(edge.address, "/whoami", Some("quiet"), None).await;
    assert_eq!(quiet.status, StatusCode::OK, "another client is unaffected");

    let anonymous = get_path(edge.address, "/whoami", None, None).await;
    assert_eq!(
        anonymous.status,
        StatusCode::BAD_REQUEST,
        "no key to charge"
    );
}

#[tokio::test]
async fn retries_absorb_a_flaky_backend() {
    let (backend, inventory) = spawn_inventory().await;
    let edge = spawn_edge(backend, GENEROUS).await;
    inventory.fail_next.store(2, Ordering::SeqCst);

    let answer = get_path(edge.address, "/items", Some("alice"), Some("flaky-1")).await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (StatusCode::OK, "3 widgets")
    );
    assert_eq!(inventory.calls(), 3, "two failures, then the answer");
    assert!(
        inventory
            .seen_ids()
            .iter()
            .all(|id| id.as_deref() == Some("flaky-1")),
        "every attempt carries the caller's ID"
    );
    let metrics = edge.retry.metrics();
    assert_eq!((metrics.success_with_retry, metrics.retries), (1, 2));
    assert_eq!(edge.breaker.state(), BreakerState::Closed);
}

#[tokio::test]
async fn the_breaker_opens_on_server_errors_and_answers_503_without_calling_the_backend() {
    let (backend, inventory) = spawn_inventory().await;
    let edge = spawn_edge(backend, GENEROUS).await;
    inventory.down.store(true, Ordering::SeqCst);

    // Two calls, each three attempts that all fail: the backend's own 503 reaches the
    // client (no Retry-After), and the breaker counts both as failures.
    for _ in 0..2 {
        let answer = get_path(edge.address, "/items", Some("alice"), None).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.header("retry-after"), None);
    }
    assert_eq!(inventory.calls(), 6);
    assert_eq!(edge.breaker.state(), BreakerState::Open);

    let shed = get_path(edge.address, "/items", Some("alice"), Some("shed-1")).await;
    assert_eq!(shed.status, StatusCode::SERVICE_UNAVAILABLE);
    let retry_after: u64 = shed
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "retry-after {retry_after}");
    assert_eq!(shed.request_id(), "shed-1");
    assert!(shed.body.is_empty());
    assert_eq!(
        inventory.calls(),
        6,
        "an open circuit does not call the backend"
    );
    // The breaker guards the whole router: the other route is shed too.
    let whoami = get_path(edge.address, "/whoami", Some("alice"), None).await;
    assert_eq!(whoami.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn a_backend_slower_than_the_per_attempt_timeout_is_a_504() {
    let (backend, inventory) = spawn_inventory().await;
    // The backend never answers, so every attempt times out however slow the machine.
    let edge = spawn_edge(backend, Duration::from_secs(1)).await;
    inventory.slow.store(true, Ordering::SeqCst);

    let answer = get_path(edge.address, "/items", Some("alice"), Some("slow-1")).await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.request_id(), "slow-1");
    assert!(answer.body.is_empty());
    assert_eq!(
        inventory.calls(),
        3,
        "each attempt timed out and was retried"
    );
}

#[tokio::test]
async fn any_other_error_is_a_500_without_the_inner_error_text() {
    let edge = spawn_edge(dead_address(), GENEROUS).await;

    let answer = get_path(edge.address, "/items", Some("alice"), Some("dead-1")).await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(answer.request_id(), "dead-1");
    assert!(answer.body.is_empty(), "leaked: {:?}", answer.body);
    let metrics = edge.retry.metrics();
    assert_eq!(
        (metrics.retries, metrics.failure_with_retry),
        (2, 1),
        "connection errors are retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_per_request_clone_shares_one_bucket() {
    let (backend, _inventory) = spawn_inventory().await;
    let edge = spawn_edge(backend, GENEROUS).await;

    let calls = (0..PER_CLIENT * 3).map(|_| {
        let address = edge.address;
        tokio::spawn(async move {
            get_path(address, "/whoami", Some("burst"), None)
                .await
                .status
        })
    });
    let mut statuses = Vec::new();
    for call in calls {
        statuses.push(call.await.expect("task"));
    }
    let admitted = statuses
        .iter()
        .filter(|status| **status == StatusCode::OK)
        .count();
    let refused = statuses
        .iter()
        .filter(|status| **status == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(
        (admitted, refused),
        (6, 12),
        "exactly the capacity, over many connections"
    );
    // The breaker saw exactly the admitted calls, every one a success.
    let metrics = edge.breaker.metrics();
    assert_eq!((metrics.calls, metrics.failures), (6, 0));
}

// ---------------------------------------------------------------------------------------
// Handler-level stacks.

#[tokio::test]
async fn layers_on_one_handler_guard_only_that_handler() {
    let limit = RateLimitLayer::builder()
        .capacity(2)
        .refill(1, Duration::from_secs(3600))
        .build()
        .expect("limit config");
    let router = Router::new()
        .route(
            "/reports",
            get(|| async { "report" }).layer(
                ServiceBuilder::new()
                    .layer(HandleErrorLayer::new(palisade::axum::handle_error))
                    .rate_limiter(limit),
            ),
        )
        .route("/health", get(|| async { "ok" }))
        .layer(ServiceBuilder::new().correlation_id());
    let address = serve(router).await;

    for _ in 0..2 {
        assert_eq!(
            get_path(address, "/reports", None, None).await.status,
            StatusCode::OK
        );
    }
    let refused = get_path(address, "/reports", None, Some("report-3")).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.header("retry-after").is_some());
    assert_eq!(refused.request_id(), "report-3");
    for _ in 0..5 {
        assert_eq!(
            get_path(address, "/health", None, None).await.status,
            StatusCode::OK
        );
    }
}

#[tokio::test]
async fn route_layer_guards_the_routes_and_leaves_unmatched_paths_404() {
    let breaker = CircuitBreakerLayer::builder()
        .open_for(Duration::from_secs(60))
        .classify(ServerErrorsAsFailures)
        .build()
        .expect("breaker config");
    let handle = breaker.handle();
    let router = Router::new()
        .route("/admin", get(|| async { "admin" }))
        .route_layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(palisade::axum::handle_error))
                .circuit_breaker(breaker),
        )
        .layer(ServiceBuilder::new().correlation_id());
    let address = serve(router).await;

    assert_eq!(
        get_path(address, "/admin", None, None).await.status,
        StatusCode::OK
    );
    handle.force_open();
    let shed = get_path(address, "/admin", None, None).await;
    assert_eq!(shed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(shed.header("retry-after").is_some());
    assert_eq!(
        get_path(address, "/missing", None, None).await.status,
        StatusCode::NOT_FOUND,
        "route_layer does not wrap the fallback"
    );
    handle.force_closed();
    assert_eq!(
        get_path(address, "/admin", None, None).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn rejections_are_responses_in_handlers_too() {
    use palisade::circuit_breaker::CircuitOpen;

    // A handler that checks a breaker of its own (say, before an expensive step) can
    // return the rejection directly: it is `IntoResponse`.
    let breaker = CircuitBreakerLayer::builder()
        .build()
        .expect("breaker config");
    let handle = breaker.handle();
    handle.force_open();
    // Boxed: rustc cannot prove the unboxed stack's future `Send` inside the handler's
    // async block ("implementation of `From` is not general enough"); see the
    // `palisade::axum` module docs.
    let guarded = tower::util::BoxCloneSyncService::new(
        ServiceBuilder::new()
            .circuit_breaker(breaker)
            .service_fn(|_: ()| async { Ok::<_, tower::BoxError>("done") }),
    );
    let router = Router::new().route(
        "/step",
        get(move || {
            let guarded = guarded.clone();
            async move {
                match tower::ServiceExt::oneshot(guarded, ()).await {
                    Ok(done) => done.into_response(),
                    Err(error) => match error.downcast::<CircuitOpen>() {
                        Ok(open) => (*open).into_response(),
                        Err(error) => palisade::rejection::http_response(&error),
                    },
                }
            }
        }),
    );
    let address = serve(router).await;
    let answer = get_path_without_id(address, "/step").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(answer.header("retry-after").is_some());
}

/// Like [`get_path`], for routers without a `CorrelationIdLayer`.
async fn get_path_without_id(address: SocketAddr, path: &str) -> Answer {
    let answer = get_path(address, path, None, None).await;
    assert!(answer.headers.get(REQUEST_ID).is_none());
    answer
}
