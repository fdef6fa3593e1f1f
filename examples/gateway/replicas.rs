//! Payments as two replicas behind a balancer: the orders service calls them through a
//! tower p2c pool whose every endpoint has a breaker of its own, in ejection mode. A
//! replica whose breaker is open reports not-ready and the pool sends its calls to the
//! other one; when both are open the pool answers at once with the rejection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{Either, Ready, ready};
use palisade::circuit_breaker::{
    CircuitBreakerHandle, CircuitBreakerLayer, EjectionGroup, SlidingWindow, State,
};
use palisade::classify::GrpcErrorsAsFailures;
use tokio::net::TcpListener;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::Endpoint;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PendingRequests};
use tower::{BoxError, Service, ServiceBuilder};

use crate::payments::{Payments, PaymentsServer};
use crate::{Call, Report, System};

/// One replica's switch: it can be taken down on its own, and counts what reaches it.
#[derive(Debug, Default)]
pub struct Replica {
    down: AtomicBool,
    calls: AtomicU64,
}

impl Replica {
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

/// The replicas and their breakers, as the scenario sees them.
pub struct Replicas {
    pub replicas: [Arc<Replica>; 2],
    pub breakers: [CircuitBreakerHandle; 2],
}

impl Replicas {
    pub fn all(&self, state: State) -> bool {
        self.breakers.iter().all(|breaker| breaker.state() == state)
    }

    pub fn states(&self) -> [State; 2] {
        [0, 1].map(|index| self.breakers[index].state())
    }
}

/// The request the pool takes: what the retry layer above it sends on.
type ChannelRequest = http::Request<Body>;

/// Starts two replicas over the one `payments` backend and returns the balanced
/// transport to them, with per-replica breakers (`open_for` each).
pub async fn start(
    payments: &Arc<Payments>,
    open_for: Duration,
) -> Result<
    (
        impl Service<
            ChannelRequest,
            Response = http::Response<
                impl http_body::Body<Data = bytes::Bytes, Error: Into<BoxError>> + Send + 'static,
            >,
            Error = BoxError,
            Future: Send,
        > + Clone
        + Send
        + Sync
        + 'static,
        Replicas,
    ),
    BoxError,
> {
    let group = EjectionGroup::new();
    let mut endpoints = Vec::new();
    let mut replicas = Vec::new();
    let mut breakers = Vec::new();
    for _ in 0..2 {
        let replica = Arc::new(Replica::default());
        let address = serve(payments, &replica).await?;
        // A short window, so that a replica that goes down is ejected within the
        // attempts of one order: its second failure in a row opens its breaker.
        let breaker = CircuitBreakerLayer::builder()
            .sliding_window(SlidingWindow::count(4))
            .minimum_calls(2)
            .failure_rate_threshold(0.5)
            .open_for(open_for)
            .half_open_probes(1)
            .classify(GrpcErrorsAsFailures::new())
            .build()?;
        breakers.push(breaker.handle());
        let channel = Endpoint::from_shared(format!("http://{address}"))?.connect_lazy();
        let endpoint = ServiceBuilder::new()
            .layer(breaker.ejecting(&group))
            .service(channel);
        endpoints.push(PendingRequests::new(
            endpoint,
            CompleteOnResponse::default(),
        ));
        replicas.push(replica);
    }
    // The balancer is one task's: a buffer lets every clone of the transport share it.
    let pool = Buffer::new(Balance::new(ServiceList::new(endpoints)), 64);
    let replicas = Replicas {
        replicas: replicas.try_into().expect("two replicas"),
        breakers: breakers.try_into().expect("two breakers"),
    };
    Ok((pool, replicas))
}

/// Serves `payments` as one replica, behind its switch.
async fn serve(payments: &Arc<Payments>, replica: &Arc<Replica>) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let switch = Arc::clone(replica);
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(palisade::correlation::CorrelationIdLayer::new())
            .layer(tower::layer::layer_fn(move |inner| Switched {
                inner,
                replica: Arc::clone(&switch),
            }))
            .add_service(PaymentsServer::new(Arc::clone(payments)))
            .serve_with_incoming(incoming),
    );
    Ok(address)
}

/// A replica that answers UNAVAILABLE itself while it is down.
#[derive(Clone)]
struct Switched<S> {
    inner: S,
    replica: Arc<Replica>,
}

impl<S, B> Service<http::Request<B>> for Switched<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<Ready<Result<http::Response<Body>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        self.replica.calls.fetch_add(1, Ordering::SeqCst);
        if self.replica.down.load(Ordering::SeqCst) {
            tracing::warn!("payments: replica down (UNAVAILABLE)");
            return Either::Left(ready(Ok(Status::unavailable("replica down").into_http())));
        }
        Either::Right(self.inner.call(request))
    }
}

/// Customers placing the step's orders in turn, so that none of them meets the
/// gateway's per-client limit.
const CUSTOMERS: [&str; 8] = [
    "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mike",
];

/// Places the `n`th order of the step; true if it was paid.
async fn order(system: &System, n: usize) -> bool {
    let customer = CUSTOMERS[n % CUSTOMERS.len()];
    system.send(Call::order(customer)).await.status == crate::StatusCode::CREATED
}

/// The scenario's step: one replica goes down, no order fails, then it comes back.
pub async fn one_replica_down(system: &System, report: &mut Report, open_for: Duration) {
    report.section("7. one payments replica goes down: the pool routes around it");
    let (up, down) = (&system.replicas.replicas[0], &system.replicas.replicas[1]);
    down.set_down(true);
    let mut placed = 0;
    let mut failed = 0;
    for _ in 0..10 {
        failed += usize::from(!order(system, placed).await);
        placed += 1;
    }
    report.check(
        failed == 0,
        format!("10 orders while replica 2 is down: {failed} failed"),
    );
    report.check(
        system.replicas.breakers[1].state() == State::Open
            && system.replicas.breakers[0].state() == State::Closed,
        format!(
            "only replica 2's breaker opened: {:?}",
            system.replicas.states()
        ),
    );
    let (before_up, before_down) = (up.calls(), down.calls());
    for _ in 0..5 {
        failed += usize::from(!order(system, placed).await);
        placed += 1;
    }
    report.check(
        failed == 0 && down.calls() == before_down && up.calls() == before_up + 5,
        format!(
            "while it is ejected, 5 more orders: {failed} failed; replica 1 took {} calls, replica 2 {}",
            up.calls() - before_up,
            down.calls() - before_down
        ),
    );

    down.set_down(false);
    tokio::time::sleep(open_for + Duration::from_millis(100)).await;
    let before_down = down.calls();
    let mut orders = 0;
    while orders < 40 && (down.calls() == before_down || !system.replicas.all(State::Closed)) {
        failed += usize::from(!order(system, placed).await);
        placed += 1;
        orders += 1;
    }
    report.check(
        failed == 0 && system.replicas.all(State::Closed) && down.calls() > before_down,
        format!(
            "replica 2 comes back: its probe succeeds and it takes calls again ({} of {orders} orders, {failed} failed), breakers {:?}",
            down.calls() - before_down,
            system.replicas.states()
        ),
    );
}
