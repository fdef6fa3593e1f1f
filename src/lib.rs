//! Resilience middleware for [tower]: a circuit breaker, a token-bucket rate limiter
//! (global and per client), a retry layer with backoff, jitter and budgets, and
//! correlation-ID propagation.
//!
//! Each is an independent tower [`Layer`](tower_layer::Layer) that composes into any
//! tower, axum or tonic service. State lives in the layer behind an `Arc`, so every
//! service a layer builds, and every clone of those, shares one breaker, one bucket and
//! one budget. Rejections happen in `call`, not in `poll_ready`: the response future
//! resolves at once to a concrete error ([`CircuitOpen`](circuit_breaker::CircuitOpen),
//! [`RateLimited`](rate_limit::RateLimited)) that knows its `retry_after()`, and
//! the `rejection`, `axum` and `tonic` modules turn it into the right protocol answer.
//!
//! | module | layer | protects against |
//! |---|---|---|
//! | [`circuit_breaker`] | [`CircuitBreakerLayer`](circuit_breaker::CircuitBreakerLayer) | hammering a failing or slow dependency |
//! | [`rate_limit`] | [`RateLimitLayer`](rate_limit::RateLimitLayer) | too many requests overall, or from one client |
//! | [`retry`] | [`RetryLayer`](retry::RetryLayer) | transient failures, without retry storms |
//! | [`correlation`] | `CorrelationIdLayer`, `PropagateCorrelationIdLayer` | losing a request's trail across services |
//!
//! # Quick start
//!
//! ```
//! use palisade::ServiceBuilderExt;
//! use palisade::circuit_breaker::CircuitBreakerLayer;
//! use palisade::rate_limit::{RateLimitLayer, RateLimited};
//! use palisade::retry::RetryLayer;
//! use std::time::Duration;
//! use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let mut service = ServiceBuilder::new()
//!     .rate_limiter(RateLimitLayer::builder().capacity(2).refill(1, Duration::from_secs(1)).build()?)
//!     .circuit_breaker(CircuitBreakerLayer::builder().build()?)
//!     .retries(RetryLayer::builder().max_attempts(3).build()?)
//!     .service_fn(|name: &'static str| async move { Ok::<_, BoxError>(format!("hello, {name}")) });
//!
//! assert_eq!(service.ready().await?.call("alice").await?, "hello, alice");
//! assert_eq!(service.ready().await?.call("bob").await?, "hello, bob");
//! // The bucket held two tokens: the third request is refused at once, and says when to
//! // come back.
//! let refused = service.ready().await?.call("carol").await.unwrap_err();
//! let limited = refused.downcast_ref::<RateLimited>().expect("a rate limit");
//! assert!(limited.retry_after() <= Duration::from_secs(1));
//! # Ok(())
//! # }
//! ```
//!
//! # Feature flags
//!
//! - `http` (default): HTTP and gRPC classification, replayable request bodies, the
//!   correlation-ID layers, HTTP answers and key extractors.
//! - `tracing` (default): `tracing` events on transitions and retries, and the
//!   correlation ID in a span around each request.
//! - `axum`: `axum::handle_error` for `HandleErrorLayer`, `IntoResponse` for the
//!   rejections, the `CorrelationId` extractor and the peer-IP key.
//! - `tonic`: `tonic::RejectionsAsStatusLayer` and `tonic::into_channel_request`.
//! - `redis`: fleet-wide rate limits on Redis (`rate_limit::RedisStore`).
//! - `metrics`: counters through the `metrics` facade for breaker transitions and
//!   rejections, rate-limit rejections and retries.
//! - `serde`: every layer's configuration as plain data, from any serde format, and a
//!   document of named policies ([`config`]).
//! - `full`: all of the above.
//!
//! [tower]: https://docs.rs/tower
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, unreachable_pub, rust_2018_idioms)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod circuit_breaker;
pub mod classify;
pub mod concurrency_limit;
#[cfg(feature = "serde")]
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
pub mod config;
pub mod context;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod correlation;
pub mod key;
pub mod rate_limit;
pub mod retry;

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod axum;
pub mod rejection;
#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
pub mod tonic;

mod builder;
mod metrics;
mod rng;
mod sync;

// The loom model checks of the lock-free cores (`--cfg loom`; see scripts/test).
#[cfg(all(test, loom))]
mod loom_tests;

pub use self::builder::ServiceBuilderExt;

// The README's examples are compiled and run as doc tests.
#[cfg(all(doctest, feature = "full"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
