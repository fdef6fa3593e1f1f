//! tonic integration: palisade's rejections as gRPC statuses.
//!
//! tonic turns an error it does not know into `UNKNOWN`, which tells a client nothing.
//! [`RejectionsAsStatusLayer`], placed outside palisade's layers, turns each
//! [rejection](crate::rejection) (palisade's own, or any layer's
//! [`Rejected`](crate::rejection::Rejected), also wrapped inside another error) into
//! the [`Status`] it stands for, with the delay in the metadata:
//!
//! | rejection kind | status | metadata |
//! |---|---|---|
//! | `Unavailable` (an open circuit, a fail-closed store), `Overloaded` | `UNAVAILABLE` | `grpc-retry-pushback-ms`, `retry-after` |
//! | `RateLimited` | `RESOURCE_EXHAUSTED` | `grpc-retry-pushback-ms`, `retry-after` |
//! | `Malformed` (a missing rate-limit key) | `INVALID_ARGUMENT` | |
//! | `DeadlineExceeded` (timeouts, deadlines) | `DEADLINE_EXCEEDED` | |
//!
//! The delay is sent when the rejection has a `retry_after` (a cost above the
//! capacity has none: waiting would not help); the message is the rejection's
//! [`reason`](crate::rejection::Rejection::reason). Any other error becomes the status
//! tonic would make of it. The same layer serves both
//! sides: on a server (`Server::builder().layer(...)`) tonic sends the status to the
//! client; on a client (layers over a `Channel`) the generated client returns it from
//! the call. Without it, a server resets the call (the client sees `INTERNAL`, "h2
//! protocol error") and a client stack returns `UNKNOWN`. Its error type is the concrete
//! `Status`, not `BoxError`, which also spares a client stack a compiler limitation: a
//! generated client over a service whose error is `BoxError` cannot always be proven
//! `Send` inside another async function ("implementation of `From` is not general
//! enough").
//!
//! # Example
//!
//! A server that sheds load and a client that backs off, over a real connection on
//! 127.0.0.1 (the service is tonic-health's, for brevity):
//!
//! ```
//! use palisade::ServiceBuilderExt;
//! use palisade::circuit_breaker::CircuitBreakerLayer;
//! use palisade::classify::{GrpcCode, GrpcErrorsAsFailures};
//! use palisade::rate_limit::RateLimitLayer;
//! use palisade::retry::{GrpcRetry, RetryLayer};
//! use palisade::tonic::RejectionsAsStatusLayer;
//! use std::time::Duration;
//! use tonic::transport::{Endpoint, Server, server::TcpIncoming};
//! use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
//! use tower::ServiceBuilder;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! // Server: a rate limit and a breaker; rejections become statuses the client reads.
//! let (_reporter, health) = tonic_health::server::health_reporter();
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let address = listener.local_addr()?;
//! let server = Server::builder()
//!     .layer(
//!         ServiceBuilder::new()
//!             .layer(RejectionsAsStatusLayer::new()) // outermost
//!             .rate_limiter(RateLimitLayer::builder().capacity(1).refill(1, Duration::from_millis(50)).build()?)
//!             .circuit_breaker(
//!                 CircuitBreakerLayer::builder()
//!                     .classify(GrpcErrorsAsFailures::new()) // tonic errors are HTTP 200s
//!                     .build()?,
//!             ),
//!     )
//!     .add_service(health)
//!     .serve_with_incoming(TcpIncoming::from(listener));
//! tokio::spawn(server);
//!
//! // Client: retries that wait out the server's pushback, a breaker of its own, and
//! // correlation IDs, over a `Channel`.
//! let channel = Endpoint::from_shared(format!("http://{address}"))?.connect_lazy();
//! let transport = ServiceBuilder::new()
//!     .layer(RejectionsAsStatusLayer::new()) // outermost: local rejections are statuses too
//!     .retries(
//!         RetryLayer::builder()
//!             .policy(GrpcRetry::new()) // also RESOURCE_EXHAUSTED with a pushback
//!             .max_server_delay(Duration::from_secs(1))
//!             .replay_bodies() // a `Channel`'s request body is a stream
//!             .build()?,
//!     )
//!     .map_request(palisade::tonic::into_channel_request)
//!     .circuit_breaker(
//!         CircuitBreakerLayer::builder()
//!             .classify(GrpcErrorsAsFailures::new().without_failure(GrpcCode::ResourceExhausted))
//!             .build()?,
//!     )
//!     .propagate_correlation_id()
//!     .service(channel);
//! let mut client = HealthClient::new(transport);
//!
//! // The second call is refused with RESOURCE_EXHAUSTED and a 50 ms pushback, waits
//! // and passes.
//! for _ in 0..2 {
//!     let request = HealthCheckRequest { service: String::new() };
//!     client.check(request).await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # What to know when composing
//!
//! - **`RejectionsAsStatusLayer` goes outermost**, first in the `ServiceBuilder`, on
//!   both sides.
//! - **Classify gRPC responses.** tonic answers an error with HTTP 200 and a
//!   `grpc-status`; a breaker with the default classifier (errors only) never sees it.
//!   Use [`GrpcErrorsAsFailures`](crate::classify::GrpcErrorsAsFailures). It wraps the
//!   response body to read the status from the trailers; `Server::builder().layer`
//!   and generated clients take any body, so nothing else changes. To name the client
//!   stack's type (to keep the client in a struct), box the body back and the stack
//!   with it: `.map_response(|r: http::Response<_>| r.map(tonic::body::Body::new))`
//!   outermost, then `tower::util::BoxCloneSyncService::new(stack)`.
//! - **On a client, `RESOURCE_EXHAUSTED` is not sickness**: leave it out of the
//!   breaker's failures (`.without_failure(GrpcCode::ResourceExhausted)`) and let the
//!   retry layer wait out the pushback instead.
//! - **Retries over a `Channel`** need `.replay_bodies()` (its request body is a
//!   stream) and [`into_channel_request`] below the retry layer. Keep the retry layer
//!   above the breaker: it does not retry an open circuit before its `retry_after()`,
//!   and gives up at once when that is beyond `max_server_delay`.
//! - **Per-client limits on a server**: tonic records the peer as `TcpConnectInfo`, not
//!   `SocketAddr`, so [`PeerIp`](crate::key::PeerIp) finds no key there
//!   (every call is `INVALID_ARGUMENT`). Key on metadata with
//!   [`Header`](crate::key::Header) (an API key, a tenant), or on
//!   `request.extensions().get::<TcpConnectInfo>()` in a closure.
//! - **Shared state.** `Server::builder().layer` builds the stack per connection; every
//!   copy shares the layer's breaker and buckets.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use tower::BoxError;
use tower_layer::Layer;
use tower_service::Service;

use crate::rejection::{Rejection, RejectionKind, whole_seconds};

/// The status a [rejection](crate::rejection) stands for (see the [module docs](self)),
/// found in `error` or its `source()` chain; `None` for any other error.
pub fn rejection_status(error: &(dyn std::error::Error + 'static)) -> Option<Status> {
    Rejection::find(error).map(|rejection| rejection.to_status())
}

/// The [`Status`] for any error: a rejection's (see [`rejection_status`]), else what
/// tonic makes of it (`Status::from_error`: a `Status` inside stays itself).
pub fn status_from_error(error: BoxError) -> Status {
    rejection_status(&*error).unwrap_or_else(|| Status::from_error(error))
}

impl Rejection {
    /// The gRPC status for this rejection (feature `tonic`): the code its
    /// [kind](Rejection::kind) stands for, its [reason](Rejection::reason) as the
    /// message, and its `retry_after` as `grpc-retry-pushback-ms` and `retry-after`.
    pub fn to_status(&self) -> Status {
        let code = match self.kind() {
            RejectionKind::Unavailable | RejectionKind::Overloaded => Code::Unavailable,
            RejectionKind::RateLimited => Code::ResourceExhausted,
            RejectionKind::Malformed => Code::InvalidArgument,
            RejectionKind::DeadlineExceeded => Code::DeadlineExceeded,
        };
        let status = Status::new(code, self.reason());
        match self.retry_after() {
            Some(delay) => with_delay(status, delay),
            None => status,
        }
    }
}

fn with_delay(mut status: Status, delay: Duration) -> Status {
    let metadata = status.metadata_mut();
    // Rounded up, like `Retry-After`: a client that waits exactly this long is never early.
    let millis = u64::try_from(delay.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    metadata.insert("grpc-retry-pushback-ms", MetadataValue::from(millis));
    metadata.insert("retry-after", MetadataValue::from(whole_seconds(delay)));
    status
}

/// Turns a request of any body into the `tonic::body::Body` request a `Channel` takes.
///
/// Layers that wrap the request body, such as the retry layer's replayable body, sit
/// above a `Channel` with this as a `map_request`:
///
/// ```
/// use palisade::retry::RetryLayer;
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), tower::BoxError> {
/// # let channel = tower::service_fn(|_: http::Request<tonic::body::Body>| async {
/// #     Ok::<_, tower::BoxError>(http::Response::new(tonic::body::Body::empty()))
/// # });
/// let transport = ServiceBuilder::new()
///     .layer(RetryLayer::builder().replay_bodies().build()?)
///     .map_request(palisade::tonic::into_channel_request)
///     .service(channel);
/// // What a generated tonic client takes:
/// # fn grpc_transport<T: tonic::client::GrpcService<tonic::body::Body>>(_: T) {}
/// grpc_transport(transport);
/// # Ok(())
/// # }
/// ```
pub fn into_channel_request<B>(request: http::Request<B>) -> http::Request<tonic::body::Body>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    request.map(tonic::body::Body::new)
}

/// Maps palisade rejections to gRPC statuses; see the [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
#[must_use = "a layer or builder does nothing until it is used"]
pub struct RejectionsAsStatusLayer {
    _private: (),
}

impl RejectionsAsStatusLayer {
    /// The layer.
    pub const fn new() -> Self {
        Self { _private: () }
    }
}

impl<S> Layer<S> for RejectionsAsStatusLayer {
    type Service = RejectionsAsStatusService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RejectionsAsStatusService { inner }
    }
}

/// The service made by [`RejectionsAsStatusLayer`].
#[derive(Debug, Clone)]
pub struct RejectionsAsStatusService<S> {
    inner: S,
}

impl<S, Req> Service<Req> for RejectionsAsStatusService<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = Status;
    type Future = RejectionsAsStatusFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|error| status_from_error(error.into()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        RejectionsAsStatusFuture {
            inner: self.inner.call(request),
        }
    }
}

/// The response future of [`RejectionsAsStatusService`].
#[pin_project::pin_project]
#[derive(Debug)]
pub struct RejectionsAsStatusFuture<F> {
    #[pin]
    inner: F,
}

impl<F, T, E> Future for RejectionsAsStatusFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, Status>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = ready!(self.project().inner.poll(cx));
        Poll::Ready(result.map_err(|error| status_from_error(error.into())))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::rate_limit::{CostExceedsCapacity, MissingKey};
    use crate::retry::{AttemptTimedOut, DeadlineExceeded};

    fn code_and_delay(error: impl Into<BoxError>) -> (Code, Option<String>) {
        let status = status_from_error(error.into());
        let pushback = status
            .metadata()
            .get("grpc-retry-pushback-ms")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        (status.code(), pushback)
    }

    #[test]
    fn every_palisade_error_has_its_status() {
        let cases: [(BoxError, Code); 6] = [
            (
                CostExceedsCapacity {
                    cost: 5,
                    capacity: 4,
                }
                .into(),
                Code::ResourceExhausted,
            ),
            (MissingKey.into(), Code::InvalidArgument),
            (
                AttemptTimedOut::new(Duration::from_secs(1)).into(),
                Code::DeadlineExceeded,
            ),
            (
                DeadlineExceeded::new(Some(Duration::from_secs(1))).into(),
                Code::DeadlineExceeded,
            ),
            (
                tower::timeout::error::Elapsed::new().into(),
                Code::DeadlineExceeded,
            ),
            ("connection reset".into(), Code::Unknown),
        ];
        for (error, code) in cases {
            let shown = error.to_string();
            assert_eq!(code_and_delay(error), (code, None), "{shown}");
        }
    }

    #[test]
    fn a_status_inside_stays_itself() {
        let status = Status::permission_denied("no");
        assert_eq!(code_and_delay(status), (Code::PermissionDenied, None));
    }

    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn a_fail_closed_redis_store_is_unavailable_with_the_delay() {
        let error = crate::rejection::redis_unavailable(Duration::from_millis(2500)).await;
        let status = status_from_error(error);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "rate limit store unavailable");
        let metadata = status.metadata();
        assert_eq!(
            metadata
                .get("grpc-retry-pushback-ms")
                .map(|value| value.to_str().ok()),
            Some(Some("2500"))
        );
        assert_eq!(
            metadata.get("retry-after").map(|value| value.to_str().ok()),
            Some(Some("3"))
        );
    }
}
