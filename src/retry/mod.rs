//! Retries with backoff, jitter and a retry budget, honouring server hints, for any
//! tower service, including tonic `Channel`s and hyper clients with streaming bodies.
//!
//! A retry layer that cannot retry real clients, or that turns an outage into a retry
//! storm, is worse than none. So:
//!
//! - **Backoff**: constant, linear or exponential ([`Backoff`]), capped, spread by a
//!   [`Jitter`] (none, full, equal, decorrelated, proportional).
//! - **A budget** ([`RetryBudget`], on by default and shared by every clone of the
//!   layer) bounds retries to a share of requests, Finagle-style. When it is spent the
//!   caller gets the last real response or error, not a new error hiding it.
//! - **What is retried**: a closure or a preset, [`HttpRetry`] (idempotent methods;
//!   429, 502, 503, 504; connection errors) or [`GrpcRetry`] (`UNAVAILABLE` by
//!   default). A [rejection](crate::rejection) from a layer below (an open circuit, a
//!   rate limit, any layer's) is retried only after its `retry_after`, never straight
//!   back into it ([`RetryPolicy::on_rejection`] says how; override it to change that).
//! - **Server hints**: `Retry-After` (seconds or HTTP-date) and
//!   `grpc-retry-pushback-ms` are the delay, replacing the backoff, which starts over
//!   after them (gRFC A6); a hint above
//!   [`max_server_delay`](RetryLayerBuilder::max_server_delay) means give up, not wait.
//! - **Requests**: `Clone` requests are cloned per attempt ([`CloneRequest`]);
//!   `http::Request`s with streaming bodies are replayed from a copy kept while the
//!   first attempt streams ([`ReplayBodies`], up to 64 KiB by default). Retries of gRPC
//!   requests carry `grpc-previous-rpc-attempts`.
//! - **Timeouts**: per attempt, and a deadline over the whole call.
//!
//! [`max_attempts`](RetryLayerBuilder::max_attempts) **counts the first attempt**:
//! `max_attempts(3)` is one call and at most two retries.
//!
//! **Live reload** (feature `serde`): [`RetryHandle::reload`] switches the layer to a new
//! [`RetryConfig`](crate::config::RetryConfig) for every request started from then on;
//! a request in flight keeps the options it started with, so its attempts and delays
//! all follow one configuration. The budget changes in place and keeps its balance.
//!
//! # Example
//!
//! ```
//! use palisade::retry::{Backoff, Jitter, RetryBudget, RetryLayer};
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::time::Duration;
//! use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let retry = RetryLayer::builder()
//!     .max_attempts(3)
//!     .backoff(Backoff::exponential(Duration::from_millis(1)).max(Duration::from_millis(10)).jitter(Jitter::Full))
//!     .budget(RetryBudget::new(Duration::from_secs(10), 10, 0.2))
//!     .retry_if(|result: &Result<&str, BoxError>| result.is_err())
//!     .build()?;
//! let handle = retry.handle();
//!
//! // Fails twice, then answers.
//! let calls = Arc::new(AtomicU32::new(0));
//! let flaky = service_fn(move |_request: ()| {
//!     let call = calls.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         if call < 2 { Err::<&str, BoxError>("connection reset".into()) } else { Ok("hello") }
//!     }
//! });
//!
//! let mut service = ServiceBuilder::new().layer(retry).service(flaky);
//! assert_eq!(service.ready().await?.call(()).await?, "hello");
//! assert_eq!(handle.metrics().success_with_retry, 1);
//! assert_eq!(handle.metrics().retries, 2);
//! # Ok(())
//! # }
//! ```

mod backoff;
mod body;
mod budget;
mod error;
mod future;
mod layer;
mod policy;
mod service;

pub use self::backoff::{Backoff, ExponentialBackoff, Jitter};
pub use self::body::{CloneRequest, Duplicate};
#[cfg(feature = "http")]
pub use self::body::{DEFAULT_REPLAY_LIMIT, HttpCopy, ReplayBodies, ReplayBody};
pub use self::budget::{RetryBudget, Withdrawal};
pub use self::error::AttemptTimedOut;
pub use self::future::ResponseFuture;
#[cfg(feature = "serde")]
pub(crate) use self::layer::Options;
pub use self::layer::{
    RetryConfigError, RetryEvent, RetryHandle, RetryLayer, RetryLayerBuilder, RetryMetrics,
};
pub use self::policy::{Decision, RetryErrors, RetryIf, RetryPolicy, RetryReason, retry_rejection};
#[cfg(feature = "http")]
pub use self::policy::{GrpcRetry, HttpRetry, parse_retry_after};
pub use self::service::RetryService;
/// Re-exported from [`crate::context`], where every layer that refuses a request past its
/// deadline finds it.
pub use crate::context::DeadlineExceeded;

#[cfg(all(test, not(loom)))]
mod tests;
