//! The `opentelemetry` feature across three real hops on 127.0.0.1: an axum gateway
//! calls an axum orders service over HTTP (hyper client), which calls a tonic inventory
//! service over a `Channel`. Every server has a `CorrelationIdLayer`, every client a
//! `PropagateCorrelationIdLayer`; the application records its spans with
//! `tracing-opentelemetry` into the SDK's in-memory exporter.
//!
//! What must hold: the spans of one request form one trace, and each hop's server span
//! is the child of the client span its caller sent the request in (the server side's
//! `set_parent`, the client side's injection through OpenTelemetry's propagator).
#![cfg(all(feature = "axum", feature = "tonic", feature = "opentelemetry"))]

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
use opentelemetry::trace::{SpanId, TraceId, TracerProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use palisade::correlation::{CorrelationIdLayer, PropagateCorrelationIdLayer};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;
use tonic::transport::Endpoint;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tracing::Instrument;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Layer, SubscriberExt};

/// palisade's server span, one per request at every hop.
const SERVER_SPAN: &str = "correlation";
const GATEWAY_CALL: &str = "gateway -> orders";
const ORDERS_CALL: &str = "orders -> inventory";
const INVENTORY_WORK: &str = "inventory: check stock";
/// The trace the first test's caller sends.
const CALLERS_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// The process-wide subscriber: the servers' tasks run on the runtime's worker threads,
/// so a thread-local default would not see them. Tests tell their spans apart by trace.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        // Only the spans of the hops: hyper's, h2's and tower's would be exported too.
        let hops = Targets::new()
            .with_target("palisade", Level::TRACE)
            .with_target("otel_hops", Level::TRACE);
        let subscriber = tracing_subscriber::registry().with(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("otel_hops"))
                .with_filter(hops),
        );
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        exporter
    })
}

/// The finished spans of `trace`, once there are `count` of them: a server span ends
/// when its response future is dropped, a moment after the answer went out.
async fn spans_of(trace: TraceId, count: usize) -> Vec<SpanData> {
    for _ in 0..500 {
        let spans: Vec<_> = exporter()
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .filter(|span| span.span_context.trace_id() == trace)
            .collect();
        if spans.len() >= count {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all = exporter().get_finished_spans().unwrap();
    let summary: Vec<_> = all
        .iter()
        .map(|span| (span.name.clone(), span.span_context.trace_id()))
        .collect();
    panic!("fewer than {count} spans in trace {trace}; all spans: {summary:?}")
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    let mut found = spans.iter().filter(|span| span.name == name);
    let span = found.next().unwrap_or_else(|| panic!("no span {name}"));
    assert!(found.next().is_none(), "more than one span {name}");
    span
}

/// The server span whose parent is `parent`: the callee's side of a call.
fn server_span_under(spans: &[SpanData], parent: SpanId) -> &SpanData {
    let servers: Vec<_> = spans
        .iter()
        .filter(|span| span.name == SERVER_SPAN && span.parent_span_id == parent)
        .collect();
    assert_eq!(
        servers.len(),
        1,
        "one server span must be the child of {parent}; server spans: {:?}",
        spans
            .iter()
            .filter(|span| span.name == SERVER_SPAN)
            .map(|span| (span.span_context.span_id(), span.parent_span_id))
            .collect::<Vec<_>>()
    );
    servers[0]
}

fn span_id(span: &SpanData) -> SpanId {
    span.span_context.span_id()
}

struct Inventory;

#[tonic::async_trait]
impl Health for Inventory {
    async fn check(
        &self,
        _request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        // Under palisade's server span, which is the current span here.
        tracing::info_span!(INVENTORY_WORK).in_scope(|| {});
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

async fn start_inventory() -> SocketAddr {
    let (listener, address) = listener().await;
    let server = tonic::transport::Server::builder()
        .layer(CorrelationIdLayer::new())
        .add_service(HealthServer::new(Inventory))
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

async fn place_order(State(inventory): State<GrpcClient>) -> StatusCode {
    let call = tracing::info_span!(ORDERS_CALL, otel.kind = "client");
    match check_stock(inventory).instrument(call).await {
        Ok(()) => StatusCode::OK,
        Err(_) => StatusCode::BAD_GATEWAY,
    }
}

async fn start_orders(inventory: SocketAddr) -> SocketAddr {
    let channel = Endpoint::from_shared(format!("http://{inventory}"))
        .unwrap()
        .connect_lazy();
    let inventory = ServiceBuilder::new()
        .layer(PropagateCorrelationIdLayer::new())
        .service(channel)
        .map_err(std::io::Error::other);
    let app = axum::Router::new()
        .route("/orders", get(place_order))
        .with_state(BoxCloneSyncService::new(inventory))
        .layer(CorrelationIdLayer::new());
    serve(app).await
}

type HttpClient = BoxCloneSyncService<
    http::Request<Full<Bytes>>,
    http::Response<hyper::body::Incoming>,
    BoxError,
>;

#[derive(Clone)]
struct Gateway {
    orders_url: String,
    client: HttpClient,
}

async fn route_order(State(gateway): State<Gateway>) -> StatusCode {
    let request = http::Request::get(&gateway.orders_url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let call = tracing::info_span!(GATEWAY_CALL, otel.kind = "client");
    match gateway.client.oneshot(request).instrument(call).await {
        Ok(response) => response.status(),
        Err(_) => StatusCode::BAD_GATEWAY,
    }
}

async fn start_gateway(orders: SocketAddr) -> SocketAddr {
    let client = ServiceBuilder::new()
        .layer(PropagateCorrelationIdLayer::new())
        .service(Client::builder(TokioExecutor::new()).build_http());
    let gateway = Gateway {
        orders_url: format!("http://{orders}/orders"),
        client: BoxCloneSyncService::new(client.map_err(BoxError::from)),
    };
    let app = axum::Router::new()
        .route("/order", get(route_order))
        .with_state(gateway)
        .layer(CorrelationIdLayer::new());
    serve(app).await
}

/// Starts the three hops and sends one order to the gateway with `traceparent`.
async fn one_order(traceparent: Option<&str>) -> StatusCode {
    exporter();
    let inventory = start_inventory().await;
    let orders = start_orders(inventory).await;
    let gateway = start_gateway(orders).await;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut request = http::Request::get(format!("http://{gateway}/order"));
    if let Some(traceparent) = traceparent {
        request = request.header("traceparent", traceparent);
    }
    let response = client
        .request(request.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    response.status()
}

/// The links below the gateway's server span: gateway client span -> orders server
/// span -> orders client span -> inventory server span -> the inventory's own span,
/// all in `gateway`'s trace.
fn assert_hops_below(spans: &[SpanData], gateway: &SpanData) {
    let gateway_call = named(spans, GATEWAY_CALL);
    assert_eq!(gateway_call.parent_span_id, span_id(gateway));

    let orders = server_span_under(spans, span_id(gateway_call));
    assert!(
        orders.parent_span_is_remote,
        "orders' parent came over HTTP"
    );
    let orders_call = named(spans, ORDERS_CALL);
    assert_eq!(orders_call.parent_span_id, span_id(orders));

    let inventory = server_span_under(spans, span_id(orders_call));
    assert!(
        inventory.parent_span_is_remote,
        "inventory's came over gRPC"
    );
    assert_eq!(
        named(spans, INVENTORY_WORK).parent_span_id,
        span_id(inventory)
    );

    let trace = gateway.span_context.trace_id();
    assert!(
        spans
            .iter()
            .all(|span| span.span_context.trace_id() == trace)
    );
    assert!(spans.iter().all(|span| span.span_context.is_sampled()));
}

#[tokio::test]
async fn three_hops_make_one_trace_with_the_callers_client_spans_as_parents() {
    let trace = TraceId::from_hex(CALLERS_TRACE).unwrap();
    let caller = SpanId::from_hex("00f067aa0ba902b7").unwrap();
    let status = one_order(Some(&format!("00-{trace}-{caller}-01"))).await;
    assert_eq!(status, StatusCode::OK);

    // 3 server spans, 2 client spans, the inventory's own span.
    let spans = spans_of(trace, 6).await;
    assert_eq!(spans.len(), 6, "{spans:#?}");
    // The gateway's server span continues the caller's trace under the caller's span.
    let gateway = server_span_under(&spans, caller);
    assert!(gateway.parent_span_is_remote);
    assert_hops_below(&spans, gateway);
}

#[tokio::test]
async fn without_an_incoming_trace_the_gateway_starts_the_one_trace() {
    assert_eq!(one_order(None).await, StatusCode::OK);

    // The trace the gateway's OpenTelemetry span started: find it by its client span.
    let mut found = None;
    for _ in 0..500 {
        found = exporter()
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .filter(|span| span.name == GATEWAY_CALL)
            .map(|span| span.span_context.trace_id())
            .find(|&trace| trace != TraceId::from_hex(CALLERS_TRACE).unwrap());
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let trace = found.expect("the gateway's client span");
    let spans = spans_of(trace, 6).await;
    assert_eq!(spans.len(), 6, "{spans:#?}");
    let gateway = server_span_under(&spans, SpanId::INVALID);
    assert!(!gateway.parent_span_is_remote);
    assert_hops_below(&spans, gateway);
}
