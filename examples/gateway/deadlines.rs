//! Step 9: a deadline and one trace follow an order across the hops.
//!
//! ```text
//!  client ──HTTP──▶ gateway ──HTTP──▶ orders ──gRPC──▶ payments
//!                   (1 s budget)
//! ```
//!
//! Every server reads the caller's deadline (`CorrelationIdLayer::accept_deadlines`);
//! the gateway gives a request that brings none a budget of [`BUDGET`]. Every client
//! sends the time left less [`MARGIN`] for the network, and the W3C trace context
//! (with the `opentelemetry` feature, the current span's, through OpenTelemetry's
//! propagator). The step shows the time left at each hop, prints the order's trace as
//! the in-memory exporter recorded it, then makes payments slow: every hop gives up at
//! its own deadline, before its caller's, and the client has its 504 within the
//! gateway's budget instead of waiting for payments.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade::context::{self, TraceContext};
use palisade::correlation::{CorrelationIdLayer, IncomingDeadlines, PropagateCorrelationIdLayer};
use palisade::tonic::RejectionsAsStatusLayer;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Endpoint;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tracing::Instrument;

use crate::Report;
use crate::logs::Logs;
use crate::payments::{ChargeRequest, Payments, PaymentsClient, PaymentsServer, Transport};

/// The gateway's deadline for a request that brings none.
const BUDGET: Duration = Duration::from_secs(1);
/// What each client keeps back for the network: the callee's deadline comes this much
/// before its caller's, so its answer arrives while the caller still waits.
const MARGIN: Duration = Duration::from_millis(50);
/// How long payments takes in the slow part: far past every deadline.
const SLOW: Duration = Duration::from_secs(5);

const GATEWAY_CALL: &str = "gateway → orders";
const ORDERS_CALL: &str = "orders → payments";

/// What a hop saw: when the request arrived, the time it had left then, and when its
/// handler stopped (finished, or was dropped at the deadline).
#[derive(Debug, Clone)]
struct Visit {
    hop: &'static str,
    arrived: Instant,
    left: Option<Duration>,
    ended: Option<Instant>,
}

impl Visit {
    fn deadline(&self) -> Option<Instant> {
        Some(self.arrived + self.left?)
    }
}

#[derive(Clone, Default)]
struct Journal(Arc<Mutex<Vec<Visit>>>);

impl Journal {
    fn arrive(&self, hop: &'static str) -> Leave {
        let mut visits = self.0.lock().expect("journal");
        visits.push(Visit {
            hop,
            arrived: Instant::now(),
            left: context::time_left(),
            ended: None,
        });
        Leave(self.clone(), visits.len() - 1)
    }

    fn take(&self) -> Vec<Visit> {
        std::mem::take(&mut *self.0.lock().expect("journal"))
    }
}

/// Notes when a hop's handler stopped, however it stopped.
struct Leave(Journal, usize);

impl Drop for Leave {
    fn drop(&mut self) {
        if let Some(visit) = self.0.0.lock().expect("journal").get_mut(self.1) {
            visit.ended = Some(Instant::now());
        }
    }
}

/// A hop's handler, observed: inside the server layer, so it sees the request context.
#[derive(Clone)]
struct Observe<S> {
    hop: &'static str,
    journal: Journal,
    inner: S,
}

fn observe<S>(hop: &'static str, journal: &Journal) -> impl Fn(S) -> Observe<S> + Clone + use<S> {
    let journal = journal.clone();
    move |inner| Observe {
        hop,
        journal: journal.clone(),
        inner,
    }
}

impl<S, R> Service<R> for Observe<S>
where
    S: Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let leave = self.journal.arrive(self.hop);
        let future = self.inner.call(request);
        Box::pin(async move {
            let _leave = leave;
            future.await
        })
    }
}

fn server_layer() -> Result<CorrelationIdLayer, BoxError> {
    let deadlines = IncomingDeadlines::builder()
        .max(Duration::from_secs(30))
        .default(BUDGET)
        .build()?;
    Ok(CorrelationIdLayer::new().accept_deadlines(deadlines))
}

fn client_layer() -> PropagateCorrelationIdLayer {
    PropagateCorrelationIdLayer::new().deadline_margin(MARGIN)
}

async fn listen() -> Result<(TcpListener, SocketAddr), BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    Ok((listener, address))
}

async fn serve(router: Router) -> Result<SocketAddr, BoxError> {
    let (listener, address) = listen().await?;
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(address)
}

async fn place_order(State(payments): State<PaymentsClient>) -> StatusCode {
    let charge = ChargeRequest {
        order_id: "order-9".into(),
        amount_cents: 1200,
    };
    let call = tracing::info_span!(target: "gateway", ORDERS_CALL, otel.kind = "client");
    match payments.charge(charge).instrument(call).await {
        Ok(_) => StatusCode::CREATED,
        // tonic's server enforces `grpc-timeout` too, and answers CANCELLED when it
        // is first.
        Err(status) if matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled) => {
            StatusCode::GATEWAY_TIMEOUT
        }
        Err(_) => StatusCode::BAD_GATEWAY,
    }
}

type HttpClient = tower::util::BoxCloneSyncService<
    Request<Full<Bytes>>,
    hyper::Response<hyper::body::Incoming>,
    BoxError,
>;

#[derive(Clone)]
struct Gateway {
    orders: SocketAddr,
    client: HttpClient,
}

async fn route_order(State(gateway): State<Gateway>) -> StatusCode {
    let request = Request::post(format!("http://{}/orders", gateway.orders))
        .body(Full::new(Bytes::new()))
        .expect("a request");
    let call = tracing::info_span!(target: "gateway", GATEWAY_CALL, otel.kind = "client");
    match gateway.client.oneshot(request).instrument(call).await {
        Ok(response) => response.status(),
        // Too little left to send it: the rejection contract's own answer (504).
        Err(error) => palisade::rejection::http_response::<()>(&error).status(),
    }
}

struct Hops {
    gateway: SocketAddr,
    payments: Arc<Payments>,
    journal: Journal,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Hops {
    async fn start() -> Result<Self, BoxError> {
        let journal = Journal::default();
        let payments = Arc::new(Payments::default());

        let (listener, payments_addr) = listen().await?;
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .layer(
                    ServiceBuilder::new()
                        .layer(server_layer()?)
                        .layer_fn(observe("payments", &journal)),
                )
                .add_service(PaymentsServer::new(Arc::clone(&payments)))
                .serve_with_incoming(incoming),
        );

        let channel = Endpoint::from_shared(format!("http://{payments_addr}"))?.connect_lazy();
        let transport = Transport::new(
            ServiceBuilder::new()
                .layer(RejectionsAsStatusLayer::new())
                .layer(client_layer())
                .service(channel),
        );
        let orders = serve(
            Router::new()
                .route("/orders", post(place_order))
                .with_state(PaymentsClient::new(transport))
                .layer(tower::layer::layer_fn(observe("orders", &journal)))
                .layer(server_layer()?),
        )
        .await?;

        let client = ServiceBuilder::new()
            .layer(client_layer())
            .service(Client::builder(TokioExecutor::new()).build_http());
        let gateway = Gateway {
            orders,
            client: HttpClient::new(client.map_err(BoxError::from)),
        };
        let gateway = serve(
            Router::new()
                .route("/orders", post(route_order))
                .with_state(gateway)
                .layer(tower::layer::layer_fn(observe("gateway", &journal)))
                .layer(server_layer()?),
        )
        .await?;

        Ok(Self {
            gateway,
            payments,
            journal,
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// One order, sent by a caller that starts a trace (as a browser's or an edge
    /// proxy's tracing would) and sets no deadline: its status, how long it took, and
    /// what the hops saw.
    async fn order(&self, trace: &TraceContext) -> (StatusCode, Duration, Vec<Visit>) {
        let request = Request::post(format!("http://{}/orders", self.gateway))
            .header("traceparent", trace.to_string())
            .body(Full::new(Bytes::new()))
            .expect("a request");
        let started = Instant::now();
        let status = match self.client.request(request).await {
            Ok(response) => {
                let status = response.status();
                let _ = response.into_body().collect().await;
                status
            }
            Err(_) => StatusCode::BAD_GATEWAY,
        };
        let took = started.elapsed();
        // A hop's handler is dropped a moment after its answer went out.
        for _ in 0..200 {
            if self
                .journal
                .0
                .lock()
                .expect("journal")
                .iter()
                .all(|visit| visit.ended.is_some())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (status, took, self.journal.take())
    }
}

fn visit<'a>(visits: &'a [Visit], hop: &str) -> Option<&'a Visit> {
    visits.iter().find(|visit| visit.hop == hop)
}

fn millis(duration: Option<Duration>) -> String {
    duration.map_or_else(|| "-".to_owned(), |d| format!("{} ms", d.as_millis()))
}

pub(crate) async fn step(report: &mut Report, logs: &Logs) {
    report.section("9. a deadline and one trace follow an order across the hops");
    let hops = match Hops::start().await {
        Ok(hops) => hops,
        Err(error) => return report.check(false, format!("could not start: {error}")),
    };

    let trace = TraceContext::new_root(true);
    let (status, _, visits) = hops.order(&trace).await;
    report.check(
        status == StatusCode::CREATED,
        format!("an order through gateway, orders and payments: {status}"),
    );
    let left = |hop| visit(&visits, hop).and_then(|visit| visit.left);
    let (gateway, orders, payments) = (left("gateway"), left("orders"), left("payments"));
    let shrinks = |caller: Option<Duration>, callee: Option<Duration>| matches!((caller, callee), (Some(caller), Some(callee)) if callee + MARGIN <= caller);
    report.check(
        gateway.is_some_and(|left| left <= BUDGET)
            && shrinks(gateway, orders)
            && shrinks(orders, payments),
        format!(
            "the time left at each hop: gateway {}, orders {}, payments {} \
             (each less than its caller's by the time spent and the {} ms margin)",
            millis(gateway),
            millis(orders),
            millis(payments),
            MARGIN.as_millis()
        ),
    );
    #[cfg(feature = "opentelemetry")]
    tree::check(report, logs, &trace, &visits).await;
    #[cfg(not(feature = "opentelemetry"))]
    {
        let _ = logs;
        println!("        (the trace tree needs the `opentelemetry` feature)");
    }

    hops.payments.set_delay(SLOW);
    let charged = hops.payments.calls();
    let (status, took, visits) = hops.order(&TraceContext::new_root(true)).await;
    report.check(
        status == StatusCode::GATEWAY_TIMEOUT && took <= BUDGET,
        format!(
            "payments takes {SLOW:?}: the client has 504 in {} ms, within the gateway's {} ms budget",
            took.as_millis(),
            BUDGET.as_millis()
        ),
    );
    let chain = ["gateway", "orders", "payments"].map(|hop| visit(&visits, hop).cloned());
    let [Some(gateway), Some(orders), Some(payments)] = chain else {
        return report.check(false, format!("every hop saw the order: {visits:?}"));
    };
    for (callee, caller) in [
        (&payments, Some(&orders)),
        (&orders, Some(&gateway)),
        (&gateway, None),
    ] {
        let (Some(deadline), Some(ended)) = (callee.deadline(), callee.ended) else {
            report.check(false, format!("{} had a deadline and stopped", callee.hop));
            continue;
        };
        let (ok, callers) = match caller.and_then(|caller| Some((caller.hop, caller.deadline()?))) {
            Some((hop, callers)) => (
                ended <= callers,
                format!(", {} its caller's ({hop})", relative(ended, callers)),
            ),
            // The client's deadline is the gateway's own.
            None => (ended <= deadline, String::new()),
        };
        report.check(
            ok,
            format!(
                "{}: {} left on arrival; stopped {} its deadline{callers}",
                callee.hop,
                millis(callee.left),
                relative(ended, deadline),
            ),
        );
    }
    report.check(
        hops.payments.calls() == charged,
        "payments was stopped at its deadline, before it charged anything",
    );
    hops.payments.set_delay(Duration::ZERO);
}

/// "12 ms before" or "3 ms after": when `at` was, seen from `deadline`.
fn relative(at: Instant, deadline: Instant) -> String {
    if at <= deadline {
        format!("{} ms before", (deadline - at).as_millis())
    } else {
        format!("{} ms after", (at - deadline).as_millis())
    }
}

/// The order's trace, from the spans the in-memory exporter recorded.
#[cfg(feature = "opentelemetry")]
mod tree {
    use super::{GATEWAY_CALL, ORDERS_CALL, Visit, millis, visit};
    use crate::Report;
    use crate::logs::Logs;
    use opentelemetry::trace::{SpanId, TraceId};
    use opentelemetry_sdk::trace::SpanData;
    use palisade::context::TraceContext;
    use std::time::Duration;

    /// palisade's server span, one per request at every hop.
    const SERVER_SPAN: &str = "correlation";
    /// The payments handler's own span (examples/gateway/payments.rs).
    const CHARGE: &str = "payments: charge";

    pub(super) async fn check(
        report: &mut Report,
        logs: &Logs,
        trace: &TraceContext,
        visits: &[Visit],
    ) {
        let trace_id = TraceId::from_bytes(trace.trace_id().to_bytes());
        let caller = SpanId::from_bytes(trace.parent_id().to_bytes());
        let mut spans = Vec::new();
        // A server span ends a moment after its answer went out.
        for _ in 0..200 {
            spans = logs
                .spans()
                .into_iter()
                .filter(|span| span.span_context.trace_id() == trace_id)
                .collect();
            if spans.len() >= 6 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        println!("        trace {trace_id}");
        print(&spans, caller, visits, "gateway", 0);

        let child = |parent: SpanId, name: &str| {
            spans
                .iter()
                .find(|span| span.parent_span_id == parent && span.name == name)
                .map(|span| span.span_context.span_id())
        };
        let links = child(caller, SERVER_SPAN)
            .and_then(|gateway| child(gateway, GATEWAY_CALL))
            .and_then(|call| child(call, SERVER_SPAN))
            .and_then(|orders| child(orders, ORDERS_CALL))
            .and_then(|call| child(call, SERVER_SPAN))
            .and_then(|payments| child(payments, CHARGE));
        report.check(
            spans.len() == 6 && links.is_some(),
            format!(
                "one trace of {} spans; each hop's server span is the child of its caller's client span",
                spans.len()
            ),
        );
    }

    /// Prints the spans under `parent` as a tree; `hop` names the server spans there.
    fn print(spans: &[SpanData], parent: SpanId, visits: &[Visit], hop: &str, depth: usize) {
        let mut children: Vec<_> = spans
            .iter()
            .filter(|span| span.parent_span_id == parent)
            .collect();
        children.sort_by_key(|span| span.start_time);
        for span in children {
            let took = span
                .end_time
                .duration_since(span.start_time)
                .unwrap_or_default();
            let label = if span.name == SERVER_SPAN {
                let left = visit(visits, hop).and_then(|visit| visit.left);
                format!("{hop}: server span, {} left on arrival", millis(left))
            } else {
                span.name.to_string()
            };
            println!(
                "        {}└─ {label} ({} ms)",
                "   ".repeat(depth),
                took.as_millis()
            );
            // Under a client span "a → b", the server span is b's.
            let next = span.name.rsplit("→ ").next().unwrap_or(hop);
            let next = if span.name == SERVER_SPAN { hop } else { next };
            print(spans, span.span_context.span_id(), visits, next, depth + 1);
        }
    }
}
