//! Deadlines, trace context and retry counts across three real hops on 127.0.0.1: an
//! axum gateway calls an axum orders service over HTTP (hyper client), which calls a
//! tonic inventory service over a `Channel`. Every server has a `CorrelationIdLayer`
//! that accepts deadlines, every client a `PropagateCorrelationIdLayer` (and a
//! `RetryLayer`); nothing passes the context by hand.
//!
//! The machine may be loaded: the tests assert orderings and bounds with generous
//! margins, never exact milliseconds.
#![cfg(all(feature = "axum", feature = "tonic"))]

#[path = "hops/net.rs"]
mod net;

use self::net::{listener, serve};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade::context::{self, TraceContext};
use palisade::correlation::{CorrelationIdLayer, IncomingDeadlines, PropagateCorrelationIdLayer};
use palisade::retry::{Backoff, GrpcRetry, HttpRetry, ReplayBody, RetryLayer};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Endpoint;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceBuilder, ServiceExt};

const MARGIN: Duration = Duration::from_millis(20);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// What a hop saw on arrival.
#[derive(Debug, Clone)]
struct Visit {
    hop: &'static str,
    deadline: Option<Instant>,
    left: Option<Duration>,
    trace: Option<TraceContext>,
}

#[derive(Clone, Default)]
struct Journal {
    visits: Arc<Mutex<Vec<Visit>>>,
    /// When each hop's handler stopped (finished or was dropped).
    ends: Arc<Mutex<Vec<(&'static str, Instant)>>>,
    /// The `traceparent` each client sent.
    sent: Arc<Mutex<Vec<(&'static str, TraceContext)>>>,
}

/// Notes when a handler stops, however it stops.
struct End(Journal, &'static str);

impl Drop for End {
    fn drop(&mut self) {
        self.0.ends.lock().unwrap().push((self.1, Instant::now()));
    }
}

impl Journal {
    fn arrive(&self, hop: &'static str) -> End {
        self.visits.lock().unwrap().push(Visit {
            hop,
            deadline: context::deadline(),
            left: context::time_left(),
            trace: context::trace_context(),
        });
        End(self.clone(), hop)
    }

    fn visits(&self, hop: &str) -> Vec<Visit> {
        let visits = self.visits.lock().unwrap();
        visits.iter().filter(|v| v.hop == hop).cloned().collect()
    }

    fn end(&self, hop: &str) -> Instant {
        let ends = self.ends.lock().unwrap();
        ends.iter()
            .find(|(h, _)| *h == hop)
            .expect("the hop ended")
            .1
    }

    fn sent_by(&self, hop: &str) -> TraceContext {
        let sent = self.sent.lock().unwrap();
        sent.iter()
            .find(|(h, _)| *h == hop)
            .expect("a traceparent")
            .1
            .clone()
    }

    fn log_sent<B>(&self, hop: &'static str, request: &http::Request<B>) {
        if let Some(value) = request.headers().get("traceparent") {
            let trace = TraceContext::parse(value.as_bytes()).expect("a valid traceparent");
            self.sent.lock().unwrap().push((hop, trace));
        }
    }
}

/// How the hops behave.
#[derive(Clone, Copy)]
struct Setup {
    /// Each HTTP hop works this long before calling the next.
    work: Duration,
    inventory_delay: Duration,
    inventory_fails: bool,
    attempts: u32,
    defer: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            work: Duration::ZERO,
            inventory_delay: Duration::ZERO,
            inventory_fails: false,
            attempts: 1,
            defer: true,
        }
    }
}

fn server_layer() -> CorrelationIdLayer {
    let deadlines = IncomingDeadlines::builder()
        .max(Duration::from_secs(30))
        .default(Duration::from_secs(10))
        .build()
        .unwrap();
    CorrelationIdLayer::new().accept_deadlines(deadlines)
}

fn client_layer() -> PropagateCorrelationIdLayer {
    PropagateCorrelationIdLayer::new().deadline_margin(MARGIN)
}

fn retry<P>(setup: Setup, policy: P) -> RetryLayer<P, palisade::retry::ReplayBodies> {
    RetryLayer::builder()
        .max_attempts(setup.attempts)
        .backoff(Backoff::constant(Duration::from_millis(10)))
        .defer_to_retrying_caller(setup.defer)
        .policy(policy)
        .replay_bodies()
        .build()
        .unwrap()
}

struct Inventory {
    journal: Journal,
    setup: Setup,
}

#[tonic::async_trait]
impl Health for Inventory {
    async fn check(
        &self,
        _request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let _end = self.journal.arrive("inventory");
        tokio::time::sleep(self.setup.inventory_delay).await;
        if self.setup.inventory_fails {
            return Err(tonic::Status::unavailable("out of stock service"));
        }
        Ok(tonic::Response::new(HealthCheckResponse { status: 1 }))
    }

    type WatchStream = futures_util::stream::Empty<Result<HealthCheckResponse, tonic::Status>>;

    async fn watch(
        &self,
        _request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not part of the test"))
    }
}

async fn start_inventory(journal: Journal, setup: Setup) -> SocketAddr {
    let (listener, address) = listener().await;
    let server = tonic::transport::Server::builder()
        .layer(server_layer())
        .add_service(HealthServer::new(Inventory { journal, setup }))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);
    address
}

/// Its error is concrete: a boxed `BoxError` trips tonic's higher-ranked bounds.
type GrpcClient = BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    std::io::Error,
>;

#[derive(Clone)]
struct Orders {
    journal: Journal,
    setup: Setup,
    inventory: GrpcClient,
}

/// Boxed, so that the handler's future does not carry tonic's higher-ranked bounds.
fn check_stock(
    inventory: GrpcClient,
) -> std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>> {
    Box::pin(async move {
        let request = HealthCheckRequest {
            service: "stock".into(),
        };
        HealthClient::new(inventory).check(request).await.map(drop)
    })
}

async fn place_order(State(orders): State<Orders>) -> StatusCode {
    let _end = orders.journal.arrive("orders");
    tokio::time::sleep(orders.setup.work).await;
    match check_stock(orders.inventory).await {
        Ok(_) => StatusCode::OK,
        Err(status) if status.code() == tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        // tonic's server enforces `grpc-timeout` itself, at the same instant as the
        // server layer, and answers `CANCELLED` ("Timeout expired") when it wins.
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ) =>
        {
            StatusCode::GATEWAY_TIMEOUT
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn start_orders(journal: Journal, setup: Setup, inventory: SocketAddr) -> SocketAddr {
    let channel = Endpoint::from_shared(format!("http://{inventory}"))
        .unwrap()
        .connect_lazy();
    let log = journal.clone();
    let inventory = ServiceBuilder::new()
        .layer(retry(setup, GrpcRetry::new()))
        .map_request(|request: http::Request<ReplayBody<tonic::body::Body>>| {
            request.map(tonic::body::Body::new)
        })
        .layer(client_layer())
        .map_request(move |request: http::Request<tonic::body::Body>| {
            log.log_sent("orders", &request);
            request
        })
        .service(channel);
    let app = axum::Router::new()
        .route("/orders", get(place_order))
        .with_state(Orders {
            journal,
            setup,
            inventory: BoxCloneSyncService::new(inventory.map_err(std::io::Error::other)),
        })
        .layer(server_layer());
    serve(app).await
}

type HttpClient = BoxCloneSyncService<
    http::Request<Full<Bytes>>,
    http::Response<hyper::body::Incoming>,
    BoxError,
>;

#[derive(Clone)]
struct Gateway {
    journal: Journal,
    setup: Setup,
    orders_url: String,
    client: HttpClient,
}

async fn route_order(State(gateway): State<Gateway>) -> StatusCode {
    let _end = gateway.journal.arrive("gateway");
    tokio::time::sleep(gateway.setup.work).await;
    let request = http::Request::get(&gateway.orders_url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    match gateway.client.oneshot(request).await {
        Ok(response) => response.status(),
        Err(error) => palisade::rejection::http_response::<()>(&error).status(),
    }
}

async fn start_gateway(journal: Journal, setup: Setup, orders: SocketAddr) -> SocketAddr {
    let log = journal.clone();
    let client = ServiceBuilder::new()
        .layer(retry(setup, HttpRetry::default()))
        .layer(client_layer())
        .map_request(move |request: http::Request<ReplayBody<Full<Bytes>>>| {
            log.log_sent("gateway", &request);
            request
        })
        .service(Client::builder(TokioExecutor::new()).build_http());
    let gateway = Gateway {
        journal,
        setup,
        orders_url: format!("http://{orders}/orders"),
        client: BoxCloneSyncService::new(client),
    };
    let app = axum::Router::new()
        .route("/order", get(route_order))
        .with_state(gateway)
        .layer(server_layer());
    serve(app).await
}

/// Starts the three hops and sends one request to the gateway with `timeout_ms` left.
async fn one_order(setup: Setup, timeout_ms: u64) -> (StatusCode, Duration, Journal) {
    let journal = Journal::default();
    let inventory = start_inventory(journal.clone(), setup).await;
    let orders = start_orders(journal.clone(), setup, inventory).await;
    let gateway = start_gateway(journal.clone(), setup, orders).await;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::get(format!("http://{gateway}/order"))
        .header("x-request-timeout-ms", timeout_ms)
        .header("traceparent", TRACEPARENT)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let started = Instant::now();
    let response = client.request(request).await.unwrap();
    (response.status(), started.elapsed(), journal)
}

#[tokio::test]
async fn the_deadline_shrinks_by_the_time_spent_and_one_trace_links_the_hops() {
    let work = Duration::from_millis(150);
    let setup = Setup {
        work,
        ..Setup::default()
    };
    let (status, _, journal) = one_order(setup, 5_000).await;
    assert_eq!(status, StatusCode::OK);
    let [gateway, orders, inventory] =
        ["gateway", "orders", "inventory"].map(|hop| journal.visits(hop).remove(0));

    // Each hop had less left than its caller, by at least the caller's work and margin.
    let left = |visit: &Visit| visit.left.expect("a deadline at every hop");
    assert!(left(&gateway) <= Duration::from_secs(5));
    assert!(
        left(&orders) + work + MARGIN <= left(&gateway),
        "{orders:?} {gateway:?}"
    );
    assert!(
        left(&inventory) + work + MARGIN <= left(&orders),
        "{inventory:?} {orders:?}"
    );
    assert!(left(&inventory) > Duration::ZERO);

    // One trace; each hop's parent is the span id its caller sent.
    let trace = |visit: &Visit| visit.trace.clone().expect("a trace at every hop");
    let incoming = TraceContext::parse(TRACEPARENT.as_bytes()).unwrap();
    for visit in [&gateway, &orders, &inventory] {
        assert_eq!(trace(visit).trace_id(), incoming.trace_id());
        assert!(trace(visit).is_sampled());
    }
    assert_eq!(trace(&gateway).parent_id(), incoming.parent_id());
    assert_eq!(
        trace(&orders).parent_id(),
        journal.sent_by("gateway").parent_id()
    );
    assert_eq!(
        trace(&inventory).parent_id(),
        journal.sent_by("orders").parent_id()
    );
    let parents = [&gateway, &orders, &inventory].map(|visit| trace(visit).parent_id());
    assert!(parents[0] != parents[1] && parents[1] != parents[2] && parents[0] != parents[2]);
}

#[tokio::test]
async fn a_slow_last_hop_makes_every_hop_give_up_at_its_own_deadline() {
    let setup = Setup {
        inventory_delay: Duration::from_secs(30),
        ..Setup::default()
    };
    let (status, elapsed, journal) = one_order(setup, 1_500).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    // The caller had its answer about when it stopped waiting, not 30 s later.
    assert!(elapsed >= Duration::from_millis(1_400), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(1_500 + 1_500),
        "{elapsed:?}"
    );

    let deadline = |hop: &str| journal.visits(hop)[0].deadline.expect("a deadline");
    let (gateway, orders, inventory) = (
        deadline("gateway"),
        deadline("orders"),
        deadline("inventory"),
    );
    // Each callee's deadline comes before its caller's: the margin covers the network.
    assert!(inventory < orders && orders < gateway);
    // Every hop worked until its own deadline and stopped then: never past its caller's.
    let slack = Duration::from_millis(500);
    for (hop, deadline) in [
        ("inventory", inventory),
        ("orders", orders),
        ("gateway", gateway),
    ] {
        let end = journal.end(hop);
        assert!(end + slack >= deadline, "{hop} gave up early");
        assert!(end <= deadline + slack, "{hop} worked past its deadline");
    }
    assert!(journal.end("inventory") <= orders);
    assert!(journal.end("orders") <= gateway);
}

#[tokio::test]
async fn a_retrying_gateway_above_a_retrying_service_does_not_multiply_attempts() {
    let failing = Setup {
        inventory_fails: true,
        attempts: 3,
        ..Setup::default()
    };
    let (status, _, journal) = one_order(failing, 10_000).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(journal.visits("gateway").len(), 1);
    assert_eq!(journal.visits("orders").len(), 3);
    // 3 from the gateway's first attempt, 1 for each of its two retries.
    assert_eq!(journal.visits("inventory").len(), 5);

    // Without the policy, 3 × 3.
    let eager = Setup {
        defer: false,
        ..failing
    };
    let (status, _, journal) = one_order(eager, 10_000).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(journal.visits("inventory").len(), 9);
}
