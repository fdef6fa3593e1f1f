//! Resilience middleware for [tower]: a circuit breaker, a token-bucket rate limiter
//! (global and per client), a retry layer with backoff, jitter and budgets, and
//! correlation-ID propagation.
//!
//! Each is an independent tower [`Layer`](tower_layer::Layer) that composes into any
//! tower, axum or tonic service. State lives in the layer behind an `Arc`, so every
//! service a layer builds, and every clone of those, shares one breaker, one bucket and
//! one budget.
//!
//! [tower]: https://docs.rs/tower
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, unreachable_pub, rust_2018_idioms)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod circuit_breaker;
pub mod classify;
pub mod correlation;
pub mod rate_limit;
pub mod retry;

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod axum;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod rejection;
#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
pub mod tonic;

mod builder;
mod sync;

// The lock-free cores as the loom model checks in tests/loom.rs drive them.
#[cfg(loom)]
#[doc(hidden)]
pub mod __loom {
    pub use crate::circuit_breaker::loom_api::*;
}

pub use self::builder::ServiceBuilderExt;
