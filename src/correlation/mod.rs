//! Correlation IDs: accept or mint one at the edge, carry it through every hop.
//!
//! - [`CorrelationIdLayer`] (server) gives every request a validated [`CorrelationId`]:
//!   the one it brings in `x-request-id` (configurable, several headers, optionally the
//!   W3C `traceparent` trace-id) or a freshly minted UUID. It echoes it on the response,
//!   puts it in the request extensions, in a `tracing` span, and makes it
//!   [`CorrelationId::current`] for everything the handler awaits.
//! - [`PropagateCorrelationIdLayer`] (client) sets the header on the requests a handler
//!   makes, on a tonic `Channel` or any tower HTTP client, from
//!   [`CorrelationId::current`], with no plumbing in between.
//! - [`WithCorrelationId`] carries the ID into `tokio::spawn`ed tasks, which task-locals
//!   do not reach on their own.
//!
//! Values from clients are validated (1 to 128 of letters, digits and `-._~+/=:`);
//! anything else is replaced, never echoed or logged raw.
//!
//! The module needs the `http` feature (on by default).
//!
//! # Example
//!
//! A service that calls another; the downstream call carries the caller's ID.
//!
//! ```
//! use http::{Request, Response};
//! use palisade::correlation::{CorrelationIdLayer, PropagateCorrelationIdLayer};
//! use tower::{BoxError, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! // Downstream: answers with the ID it received.
//! let downstream = service_fn(|request: Request<()>| async move {
//!     let received = request.headers().get("x-request-id").cloned();
//!     Ok::<_, BoxError>(Response::new(received))
//! });
//! let client = ServiceBuilder::new()
//!     .layer(PropagateCorrelationIdLayer::new())
//!     .service(downstream);
//!
//! // Upstream: calls downstream without passing the ID around.
//! let server = ServiceBuilder::new()
//!     .layer(CorrelationIdLayer::new())
//!     .service(service_fn(move |_request: Request<()>| {
//!         let client = client.clone();
//!         async move { client.oneshot(Request::new(())).await }
//!     }));
//!
//! let request = Request::builder().header("x-request-id", "order-42").body(())?;
//! let response = server.clone().oneshot(request).await?;
//! assert_eq!(response.headers()["x-request-id"], "order-42"); // echoed
//! assert_eq!(response.body().as_ref().unwrap(), "order-42"); // propagated
//!
//! // A hostile value is replaced by a fresh UUID, which still reaches downstream.
//! let request = Request::builder().header("x-request-id", "a b\tc").body(())?;
//! let response = server.oneshot(request).await?;
//! let minted = &response.headers()["x-request-id"];
//! assert_eq!(minted.len(), 36);
//! assert_eq!(response.body().as_ref(), Some(minted));
//! # Ok(())
//! # }
//! ```
//!
//! # Logs
//!
//! With the `tracing` feature, the server layer runs the request inside a span
//! `correlation{correlation_id=...}` (target `palisade::correlation`), so the ID shows on
//! every event the request emits. The span is at level `ERROR` so that any filter that
//! lets an event through also keeps the span; when no subscriber listens it costs
//! nothing. To have the ID in a span of your own (say `TraceLayer`'s), declare a
//! `correlation_id` field there and fill it from the request's `CorrelationId`
//! extension, with the `CorrelationIdLayer` outside.
//!
//! # Spawned tasks
//!
//! A task-local does not cross `tokio::spawn`: a spawned task sees no current ID, and
//! its outgoing calls carry none, unless the future is wrapped with
//! [`WithCorrelationId::with_current_correlation_id`] (or
//! [`CorrelationId::scope`]).

mod client;
mod deadline;
#[cfg(feature = "axum")]
mod extract;
mod id;
#[cfg(feature = "opentelemetry")]
mod otel;
mod scope;
mod server;

pub use self::client::{
    PropagateCorrelationIdLayer, PropagateCorrelationIdService, PropagateFuture,
};
pub use self::deadline::{DeadlineConfigError, IncomingDeadlines, IncomingDeadlinesBuilder};
#[cfg(feature = "axum")]
pub use self::extract::MissingCorrelationId;
pub use self::id::{CorrelationId, Generator, InvalidCorrelationId};
pub use self::scope::WithCorrelationId;
pub use self::server::{CorrelationIdLayer, CorrelationIdService, ResponseFuture};
pub use crate::context::Scoped;
