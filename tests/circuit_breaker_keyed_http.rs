//! A keyed breaker in a real gateway: an axum server on loopback in front of three
//! upstream axum servers, calling them through a real HTTP client behind one breaker per
//! upstream authority. One upstream fails: only its breaker opens, the other two keep
//! serving, and it closes again once it recovers.
#![cfg(feature = "http")]

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State as AxumState};
use axum::http::{Request, StatusCode, uri::Authority};
use axum::routing::get;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade::circuit_breaker::{
    CircuitBreakerLayer, CircuitOpen, KeyedCircuitBreakerService, SlidingWindow, State,
};
use palisade::classify::ServerErrorsAsFailures;
use palisade::key;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tower::{Layer, ServiceExt};

const OPEN_FOR: Duration = Duration::from_secs(30);

/// An upstream server: counts the requests it gets, and answers 500 while `failing`.
struct Upstream {
    address: SocketAddr,
    failing: Arc<AtomicBool>,
    reached: Arc<AtomicUsize>,
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    address
}

async fn upstream() -> Upstream {
    let failing = Arc::new(AtomicBool::new(false));
    let reached = Arc::new(AtomicUsize::new(0));
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
    let address = serve(Router::new().route("/", get(handler))).await;
    Upstream {
        address,
        failing,
        reached,
    }
}

type Upstreams = KeyedCircuitBreakerService<
    Client<HttpConnector, Empty<Bytes>>,
    key::Authority,
    Authority,
    ServerErrorsAsFailures,
>;

struct Gateway {
    client: Upstreams,
    upstreams: Vec<SocketAddr>,
}

/// `GET /{n}`: forwards to upstream `n`; 503 when its breaker is open.
async fn forward(
    AxumState(gateway): AxumState<Arc<Gateway>>,
    Path(n): Path<usize>,
) -> (StatusCode, String) {
    let Some(address) = gateway.upstreams.get(n) else {
        return (StatusCode::NOT_FOUND, "no such upstream".to_owned());
    };
    let request = Request::get(format!("http://{address}/"))
        .body(Empty::new())
        .expect("request");
    match gateway.client.clone().oneshot(request).await {
        Ok(response) => {
            let status = response.status();
            let body = response.into_body().collect().await.expect("body");
            (
                status,
                String::from_utf8_lossy(&body.to_bytes()).into_owned(),
            )
        }
        Err(error) if error.is::<CircuitOpen>() => {
            (StatusCode::SERVICE_UNAVAILABLE, "circuit open".to_owned())
        }
        Err(error) => (StatusCode::BAD_GATEWAY, error.to_string()),
    }
}

#[tokio::test(start_paused = true)]
async fn one_failing_upstream_opens_only_its_own_breaker() {
    let upstreams = [upstream().await, upstream().await, upstream().await];
    let breaker = CircuitBreakerLayer::builder()
        .minimum_calls(4)
        .sliding_window(SlidingWindow::count(10))
        .open_for(OPEN_FOR)
        .half_open_probes(2)
        .classify(ServerErrorsAsFailures)
        .keyed(key::Authority)
        .max_keys(16)
        .build()
        .expect("valid");
    let handle = breaker.handle();
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let gateway = Arc::new(Gateway {
        client: breaker.layer(client),
        upstreams: upstreams.iter().map(|upstream| upstream.address).collect(),
    });
    let address = serve(
        Router::new()
            .route("/{n}", get(forward))
            .with_state(gateway),
    )
    .await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let get = |n: usize| {
        let client = client.clone();
        async move {
            let request = Request::get(format!("http://{address}/{n}"))
                .body(Empty::new())
                .expect("request");
            let response = client.request(request).await.expect("response");
            let status = response.status();
            response.into_body().collect().await.expect("body");
            status
        }
    };
    let authority =
        |n: usize| Authority::try_from(upstreams[n].address.to_string()).expect("an authority");

    upstreams[1].failing.store(true, Ordering::SeqCst);
    for _ in 0..4 {
        for n in 0..3 {
            let expected = if n == 1 {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::OK
            };
            assert_eq!(get(n).await, expected);
        }
    }
    assert_eq!(handle.state_for(&authority(1)), State::Open);
    assert_eq!(handle.not_closed(), vec![(authority(1), State::Open)]);

    // Upstream 1 is no longer called; 0 and 2 keep serving.
    for _ in 0..10 {
        assert_eq!(get(1).await, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(get(0).await, StatusCode::OK);
        assert_eq!(get(2).await, StatusCode::OK);
    }
    assert_eq!(upstreams[1].reached.load(Ordering::SeqCst), 4);
    assert_eq!(upstreams[0].reached.load(Ordering::SeqCst), 14);
    assert_eq!(handle.state_for(&authority(0)), State::Closed);
    assert_eq!(handle.state_for(&authority(2)), State::Closed);

    // It recovers: after the open time, two probes close its breaker.
    upstreams[1].failing.store(false, Ordering::SeqCst);
    tokio::time::advance(OPEN_FOR).await;
    assert_eq!(get(1).await, StatusCode::OK);
    assert_eq!(handle.state_for(&authority(1)), State::HalfOpen);
    assert_eq!(get(1).await, StatusCode::OK);
    assert_eq!(handle.state_for(&authority(1)), State::Closed);
    assert!(handle.not_closed().is_empty());
    assert_eq!(upstreams[1].reached.load(Ordering::SeqCst), 6);
}

/// On the server side, one breaker per route: axum's matched route is the key, so a
/// failing handler opens its own route's breaker and the other route keeps serving.
#[cfg(feature = "axum")]
#[tokio::test(start_paused = true)]
async fn one_breaker_per_matched_route() {
    use axum::error_handling::HandleErrorLayer;
    use tower::ServiceBuilder;

    let breaker = CircuitBreakerLayer::builder()
        .minimum_calls(2)
        .sliding_window(SlidingWindow::count(2))
        .open_for(OPEN_FOR)
        .classify(ServerErrorsAsFailures)
        .keyed(key::MatchedPath)
        .build()
        .expect("valid");
    let handle = breaker.handle();
    let app = Router::new()
        .route(
            "/reports/{id}",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "down") }),
        )
        .route("/users/{id}", get(|| async { "up" }))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(palisade::axum::handle_error))
                .layer(breaker),
        );
    let address = serve(app).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let get = |path: String| {
        let client = client.clone();
        async move {
            let request = Request::get(format!("http://{address}{path}"))
                .body(Empty::new())
                .expect("request");
            client.request(request).await.expect("response").status()
        }
    };
    for id in 0..2 {
        assert_eq!(
            get(format!("/reports/{id}")).await,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    assert_eq!(
        get("/reports/7".to_owned()).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    for id in 0..5 {
        assert_eq!(get(format!("/users/{id}")).await, StatusCode::OK);
    }
    let routes: Vec<_> = handle
        .not_closed()
        .into_iter()
        .map(|(route, state)| (route.as_str().to_owned(), state))
        .collect();
    assert_eq!(routes, vec![("/reports/{id}".to_owned(), State::Open)]);
}
