//! The request context: one task-local value that follows a request through everything
//! its handler awaits and onto every call it makes.
//!
//! A [`RequestContext`] holds what the hops of one request share:
//!
//! - its correlation ID (feature `http`; see [`crate::correlation`]),
//! - its **deadline**: the instant after which nobody waits for the answer any more,
//! - its W3C **trace context** ([`TraceContext`]: trace-id, the caller's span id, the
//!   sampled flag and `tracestate`),
//! - how many **earlier attempts** of this request the caller already made, so that a
//!   hop does not retry what its caller is retrying.
//!
//! [`CorrelationIdLayer`](crate::correlation::CorrelationIdLayer) fills it from the
//! incoming request and makes it current around the handler;
//! [`PropagateCorrelationIdLayer`](crate::correlation::PropagateCorrelationIdLayer)
//! writes it onto outgoing requests. Anything in between reads it with the free
//! functions here ([`deadline`], [`time_left`], [`trace_context`],
//! [`previous_attempts`]) or [`RequestContext::current`]. The retry layer never waits or
//! starts an attempt past [`deadline`], and the circuit breaker does not blame its
//! dependency for a deadline that passed before the call.
//!
//! A task-local stays with its task: wrap futures you `tokio::spawn` with
//! [`RequestContext::scope`] (or
//! [`WithCorrelationId`](crate::correlation::WithCorrelationId)) to carry it along.
//!
//! # Example
//!
//! ```
//! use palisade::context::{self, RequestContext};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let context = RequestContext::new().with_timeout(Duration::from_millis(800));
//! context
//!     .scope(async {
//!         tokio::time::sleep(Duration::from_millis(300)).await;
//!         // Anything the handler awaits sees how much time is left.
//!         assert_eq!(context::time_left(), Some(Duration::from_millis(500)));
//!     })
//!     .await;
//! assert_eq!(context::deadline(), None); // outside the scope
//! # }
//! ```
//!
//! # Wire formats
//!
//! | what | gRPC | HTTP |
//! |---|---|---|
//! | time left | `grpc-timeout` ([`parse_grpc_timeout`], [`GrpcTimeout`]) | `x-request-timeout-ms`, whole milliseconds ([`parse_timeout_ms`]) |
//! | earlier attempts | `grpc-previous-rpc-attempts` | `x-previous-attempts` |
//! | trace context | `traceparent`, `tracestate` | `traceparent`, `tracestate` |
//!
//! Deadlines travel as the **time left**, never as an instant, because the clocks of two
//! hosts disagree and a relative time needs none of them to agree. The HTTP header is
//! plain milliseconds (the unit of Envoy's `x-envoy-expected-rq-timeout-ms`, readable in
//! a `curl` line) rather than `grpc-timeout`'s unit letters; its name is configurable.

mod deadline;
mod scope;
mod timeout;
mod trace;
#[cfg(feature = "http")]
mod wire;

pub use self::deadline::DeadlineExceeded;
pub use self::scope::{RequestContext, Scoped};
pub use self::timeout::{
    GrpcTimeout, MAX_TIMEOUT_MS, format_timeout_ms, parse_grpc_timeout, parse_timeout_ms,
};
pub use self::trace::{
    InvalidTraceContext, MAX_TRACESTATE_MEMBERS, SpanId, TraceContext, TraceId, TraceState,
};

#[cfg(feature = "http")]
pub(crate) use self::scope::enter;
pub(crate) use self::scope::with_current;
#[cfg(feature = "http")]
pub use self::wire::{
    DEFAULT_TIMEOUT_HEADER, GRPC_PREVIOUS_ATTEMPTS, GRPC_TIMEOUT, HTTP_PREVIOUS_ATTEMPTS,
    TRACEPARENT, TRACESTATE,
};
#[cfg(feature = "http")]
pub(crate) use self::wire::{
    is_grpc_content_type, parse_previous_attempts, parse_timeout, refusal, write_previous_attempts,
    write_timeout,
};

use std::time::Duration;
use tokio::time::Instant;

/// The current request's deadline, if it has one.
#[inline]
pub fn deadline() -> Option<Instant> {
    with_current(|context| context?.deadline())
}

/// How long the current request has left before its deadline (zero once it passed);
/// `None` when it has no deadline.
pub fn time_left() -> Option<Duration> {
    let deadline = deadline()?;
    Some(deadline.saturating_duration_since(Instant::now()))
}

/// The current request's W3C trace context, if it came with one (or one was started).
pub fn trace_context() -> Option<TraceContext> {
    with_current(|context| context?.trace().cloned())
}

/// How many attempts of the current request its caller made before this one: 0 for a
/// first attempt, or outside any request.
pub fn previous_attempts() -> u32 {
    with_current(|context| context.map_or(0, RequestContext::previous_attempts))
}
