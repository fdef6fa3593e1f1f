//! The payments service: a gRPC service written by hand on tonic's building blocks, so
//! the demo needs no `protoc`. It can be told to fail, to show the breaker and retries.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tonic::codegen::{BoxFuture, http};
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;
use tracing::Instrument;

const CHARGE: &str = "/payments.Payments/Charge";

/// What an order costs.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ChargeRequest {
    #[prost(string, tag = "1")]
    pub order_id: String,
    #[prost(uint64, tag = "2")]
    pub amount_cents: u64,
}

/// A successful charge.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ChargeReply {
    #[prost(string, tag = "1")]
    pub payment_id: String,
}

/// The payments backend, with switches for the scenario.
#[derive(Debug, Default)]
pub struct Payments {
    down: AtomicBool,
    fail_next: AtomicU32,
    calls: AtomicU64,
    delay_ms: AtomicU64,
}

impl Payments {
    /// Every charge fails with UNAVAILABLE until `set_down(false)`.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// The next `n` charges fail with UNAVAILABLE, then charges succeed again.
    pub fn fail_next(&self, n: u32) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// Every charge takes `delay` before it is made (zero unless set).
    pub fn set_delay(&self, delay: Duration) {
        let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(millis, Ordering::SeqCst);
    }

    fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.load(Ordering::SeqCst))
    }

    /// How many charge calls reached the service.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    fn charge(&self, request: &ChargeRequest) -> Result<ChargeReply, Status> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let flaky = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if self.down.load(Ordering::SeqCst) || flaky {
            tracing::warn!(order = %request.order_id, "payments: charge failed (UNAVAILABLE)");
            return Err(Status::unavailable("payments backend unavailable"));
        }
        tracing::info!(order = %request.order_id, amount_cents = request.amount_cents, "payments: charged");
        Ok(ChargeReply {
            payment_id: format!("pay-{call}"),
        })
    }
}

/// The server side: route `Charge` calls to [`Payments`].
#[derive(Debug, Clone)]
pub struct PaymentsServer {
    payments: Arc<Payments>,
}

impl PaymentsServer {
    pub fn new(payments: Arc<Payments>) -> Self {
        Self { payments }
    }
}

impl NamedService for PaymentsServer {
    const NAME: &'static str = "payments.Payments";
}

impl tower::Service<http::Request<Body>> for PaymentsServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != CHARGE {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        let method = ChargeMethod(self.payments.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
            Ok(grpc.unary(method, request).await)
        })
    }
}

struct ChargeMethod(Arc<Payments>);

impl tonic::server::UnaryService<ChargeRequest> for ChargeMethod {
    type Response = ChargeReply;
    type Future = BoxFuture<Response<ChargeReply>, Status>;

    fn call(&mut self, request: Request<ChargeRequest>) -> Self::Future {
        let payments = Arc::clone(&self.0);
        let delay = payments.delay();
        let span = tracing::info_span!("payments: charge");
        if delay.is_zero() {
            let result = span.in_scope(|| payments.charge(request.get_ref()).map(Response::new));
            return Box::pin(async move { result });
        }
        Box::pin(
            async move {
                // A slow backend: dropped at the request's deadline, before it charges.
                tokio::time::sleep(delay).await;
                payments.charge(request.get_ref()).map(Response::new)
            }
            .instrument(span),
        )
    }
}

/// The transport the orders service calls payments over: a `Channel` inside palisade's
/// client layers, boxed so the type stays short.
pub type Transport =
    tower::util::BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Status>;

/// The client side, over the orders service's resilient transport.
#[derive(Debug, Clone)]
pub struct PaymentsClient {
    grpc: tonic::client::Grpc<Transport>,
}

impl PaymentsClient {
    pub fn new(transport: Transport) -> Self {
        Self {
            grpc: tonic::client::Grpc::new(transport),
        }
    }

    pub async fn charge(&self, request: ChargeRequest) -> Result<ChargeReply, Status> {
        let mut grpc = self.grpc.clone();
        grpc.ready().await?;
        let path = http::uri::PathAndQuery::from_static(CHARGE);
        let response = grpc
            .unary(Request::new(request), path, ProstCodec::default())
            .await?;
        Ok(response.into_inner())
    }
}
