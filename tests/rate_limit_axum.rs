//! A real axum server on 127.0.0.1 behind the keyed limiter, driven by a real HTTP client
//! over many connections. axum clones the route stack per request: the counts below
//! are exact only because every clone shares the layer's buckets.
#![cfg(all(feature = "http", feature = "axum"))]

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::routing::Route;
use axum::routing::get;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade::rate_limit::key::{Header, PeerIp};
use palisade::rate_limit::{LocalStore, RateLimitLayer};
use palisade::rejection::rejection_response;
use tower::{BoxError, Layer, Service, ServiceBuilder};

/// Turns the limiter's errors into their HTTP answers, as the axum integration will.
async fn answer(error: BoxError) -> Response<Body> {
    rejection_response(&error).unwrap_or_else(|| {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        response
    })
}

/// Serves a route behind `limit` (its errors answered by [`answer`]) on an OS-assigned
/// loopback port, with the peer address available as `ConnectInfo`.
async fn serve<X, C, K, H>(limit: RateLimitLayer<X, C, LocalStore<K>, H>) -> SocketAddr
where
    RateLimitLayer<X, C, LocalStore<K>, H>: Layer<Route> + Clone + Send + Sync + 'static,
    <RateLimitLayer<X, C, LocalStore<K>, H> as Layer<Route>>::Service:
        Service<Request<Body>, Response = Response<Body>, Error = BoxError>
            + Clone
            + Send
            + Sync
            + 'static,
    <<RateLimitLayer<X, C, LocalStore<K>, H> as Layer<Route>>::Service as Service<
        Request<Body>,
    >>::Future: Send + 'static,
{
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(answer))
            .layer(limit),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    address
}

/// A client that opens a new connection for every request.
fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

async fn get_with(
    client: &Client<HttpConnector, Full<Bytes>>,
    address: SocketAddr,
    api_key: Option<&str>,
) -> Response<hyper::body::Incoming> {
    let mut request = Request::get(format!("http://{address}/")).body(Full::default());
    let request = request.as_mut().unwrap();
    if let Some(key) = api_key {
        request
            .headers_mut()
            .insert("x-api-key", key.parse().unwrap());
    }
    client
        .request(std::mem::take(request))
        .await
        .expect("response")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_limiter_admits_exactly_the_bucket_per_client() {
    let limit = RateLimitLayer::builder()
        .capacity(4)
        .refill(1, Duration::from_secs(3600))
        .keyed(Header::new(http::HeaderName::from_static("x-api-key")))
        .headers_on_success()
        .build()
        .unwrap();
    let handle = limit.handle();
    let address = serve(limit).await;

    // Three clients, ten requests each, all at once over separate connections.
    let mut requests = Vec::new();
    for api_key in ["alice", "bob", "carol"] {
        for _ in 0..10 {
            let client = client();
            requests.push(tokio::spawn(async move {
                let response = get_with(&client, address, Some(api_key)).await;
                (api_key, response)
            }));
        }
    }
    let mut admitted = std::collections::HashMap::new();
    for request in requests {
        let (api_key, response) = request.await.unwrap();
        match response.status() {
            StatusCode::OK => {
                *admitted.entry(api_key).or_insert(0) += 1;
                assert!(response.headers().contains_key("ratelimit"));
            }
            StatusCode::TOO_MANY_REQUESTS => {
                let retry_after: u64 = response.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((3_599..=3_600).contains(&retry_after), "{retry_after}");
                assert_eq!(
                    response.headers()["ratelimit-policy"],
                    "\"default\";q=4;w=14400"
                );
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(admitted["alice"], 4);
    assert_eq!(admitted["bob"], 4);
    assert_eq!(admitted["carol"], 4);
    assert_eq!(handle.tracked_keys(), 3);

    // No key: refused with a clear 400, not charged to anyone.
    let response = get_with(&client(), address, None).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // A new client still has its own full bucket.
    let response = get_with(&client(), address, Some("dave")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["ratelimit"], "\"default\";r=3;t=3600");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_ip_limiter_reads_axum_connect_info() {
    let limit = RateLimitLayer::builder()
        .capacity(3)
        .refill(1, Duration::from_secs(3600))
        .keyed(PeerIp)
        .build()
        .unwrap();
    let handle = limit.handle();
    let address = serve(limit).await;
    let client = client();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(get_with(&client, address, None).await.status());
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(handle.available_for(&"127.0.0.1".parse().unwrap()), 0);
}
