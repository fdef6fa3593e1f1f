//! One correlation ID across three hops on 127.0.0.1: an axum "gateway" calls an axum
//! "orders" service over HTTP (hyper-util client), which calls a tonic "inventory"
//! service over a `Channel`. Both clients are wrapped in `PropagateCorrelationIdLayer`
//! and every server in `CorrelationIdLayer`; nothing passes the ID by hand.
#![cfg(all(feature = "http", feature = "tracing"))]

#[path = "hops/net.rs"]
mod net;

use self::net::{listener, serve};

use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade::correlation::{
    CorrelationId, CorrelationIdLayer, PropagateCorrelationIdLayer, PropagateCorrelationIdService,
};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tower::{ServiceBuilder, ServiceExt};
use tracing_subscriber::fmt::MakeWriter;

/// What one hop saw: its name, the `x-request-id` it received, its `current()` ID.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    hop: &'static str,
    header: Option<String>,
    current: Option<String>,
}

#[derive(Clone, Default)]
struct Journal(Arc<Mutex<Vec<Seen>>>);

impl Journal {
    fn record(&self, hop: &'static str, header: Option<&[u8]>) {
        let header = header.map(|h| String::from_utf8_lossy(h).into_owned());
        let current = CorrelationId::current().map(|id| id.to_string());
        self.0.lock().unwrap().push(Seen {
            hop,
            header,
            current,
        });
    }

    fn entries(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }
}

/// Log lines of every hop, as a `fmt` subscriber writes them.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Logs {
    fn line_with(&self, message: &str) -> String {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<_> = text.lines().filter(|l| l.contains(message)).collect();
        assert_eq!(lines.len(), 1, "one line with {message:?} in:\n{text}");
        lines[0].to_owned()
    }
}

struct Inventory {
    journal: Journal,
}

#[tonic::async_trait]
impl Health for Inventory {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let header = request.metadata().get("x-request-id").map(|v| v.as_bytes());
        self.journal.record("inventory", header);
        tracing::info!("inventory: stock checked");
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

async fn start_inventory(journal: Journal) -> SocketAddr {
    let (listener, address) = listener().await;
    let server = tonic::transport::Server::builder()
        .layer(CorrelationIdLayer::new())
        .add_service(HealthServer::new(Inventory { journal }))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);
    address
}

#[derive(Clone)]
struct Orders {
    journal: Journal,
    inventory: PropagateCorrelationIdService<Channel>,
}

async fn place_order(State(orders): State<Orders>, headers: HeaderMap) -> String {
    let header = headers.get("x-request-id").map(|v| v.as_bytes());
    orders.journal.record("orders", header);
    tracing::info!("orders: placing order");
    let mut inventory = HealthClient::new(orders.inventory);
    let request = HealthCheckRequest {
        service: "stock".into(),
    };
    let status = inventory.check(request).await.unwrap().into_inner().status;
    format!("order placed, stock status {status}")
}

async fn start_orders(journal: Journal, inventory: SocketAddr) -> SocketAddr {
    let channel = Endpoint::from_shared(format!("http://{inventory}"))
        .unwrap()
        .connect_lazy();
    let inventory = ServiceBuilder::new()
        .layer(PropagateCorrelationIdLayer::new())
        .service(channel);
    let app = axum::Router::new()
        .route("/orders", get(place_order))
        .with_state(Orders { journal, inventory })
        .layer(CorrelationIdLayer::new());
    serve(app).await
}

type HttpClient = PropagateCorrelationIdService<Client<HttpConnector, Full<Bytes>>>;

#[derive(Clone)]
struct Gateway {
    journal: Journal,
    orders_url: String,
    client: HttpClient,
}

async fn route_order(
    State(gateway): State<Gateway>,
    Extension(id): Extension<CorrelationId>,
    headers: HeaderMap,
) -> String {
    let header = headers.get("x-request-id").map(|v| v.as_bytes());
    gateway.journal.record("gateway", header);
    assert_eq!(
        CorrelationId::current(),
        Some(id),
        "extension and scope agree"
    );
    tracing::info!("gateway: routing order");
    let request = http::Request::get(&gateway.orders_url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = gateway.client.oneshot(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

async fn start_gateway(journal: Journal, orders: SocketAddr) -> SocketAddr {
    let client = ServiceBuilder::new()
        .layer(PropagateCorrelationIdLayer::new())
        .service(Client::builder(TokioExecutor::new()).build_http());
    let gateway = Gateway {
        journal,
        orders_url: format!("http://{orders}/orders"),
        client,
    };
    let app = axum::Router::new()
        .route("/order", get(route_order))
        .with_state(gateway)
        .layer(CorrelationIdLayer::new());
    serve(app).await
}

/// Starts the three hops, sends one request to the gateway (with `id` if given) and
/// returns the ID echoed to the client, what each hop saw, and the logs.
async fn one_request_through_three_hops(id: Option<&str>) -> (String, Vec<Seen>, Logs) {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    // Every hop runs on this current-thread runtime, so a thread-local default
    // subscriber sees all of them, and no other test's lines.
    let _default = tracing::subscriber::set_default(subscriber);

    let journal = Journal::default();
    let inventory = start_inventory(journal.clone()).await;
    let orders = start_orders(journal.clone(), inventory).await;
    let gateway = start_gateway(journal.clone(), orders).await;

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = http::Request::get(format!("http://{gateway}/order"));
    if let Some(id) = id {
        request = request.header("x-request-id", id);
    }
    let response = client
        .request(request.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echoed = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "order placed, stock status 1");
    (echoed, journal.entries(), logs)
}

fn assert_every_hop_carries(id: &str, seen: &[Seen], logs: &Logs) {
    let hops: Vec<_> = seen.iter().map(|s| s.hop).collect();
    assert_eq!(hops, ["gateway", "orders", "inventory"]);
    for hop in seen {
        assert_eq!(
            hop.header.as_deref(),
            Some(id),
            "{} received header",
            hop.hop
        );
        assert_eq!(hop.current.as_deref(), Some(id), "{} current()", hop.hop);
    }
    for message in [
        "gateway: routing order",
        "orders: placing order",
        "inventory: stock checked",
    ] {
        let line = logs.line_with(message);
        assert!(
            line.contains(&format!("correlation_id={id}")),
            "log line lacks the ID: {line}"
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_client_id_reaches_every_hop_and_comes_back() {
    let (echoed, seen, logs) = one_request_through_three_hops(Some("checkout-7f3a:1")).await;
    assert_eq!(echoed, "checkout-7f3a:1");
    assert_every_hop_carries("checkout-7f3a:1", &seen, &logs);
}

#[tokio::test(flavor = "current_thread")]
async fn an_id_minted_at_the_gateway_reaches_every_hop() {
    let (echoed, seen, logs) = one_request_through_three_hops(None).await;
    let uuid = uuid::Uuid::parse_str(&echoed).expect("the minted ID is a UUID");
    assert_eq!(uuid.get_version_num(), 4);
    assert_eq!(
        seen[0].header.as_deref(),
        Some(echoed.as_str()),
        "written into the request"
    );
    assert_every_hop_carries(&echoed, &seen, &logs);
}

#[tokio::test(flavor = "current_thread")]
async fn a_hostile_id_is_replaced_before_the_first_hop() {
    let (echoed, seen, logs) = one_request_through_three_hops(Some("evil value")).await;
    assert_ne!(echoed, "evil value");
    assert!(CorrelationId::parse(&echoed).is_ok());
    assert_every_hop_carries(&echoed, &seen, &logs);
    let all_logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        !all_logs.contains("evil value"),
        "the raw value is never logged"
    );
}
