//! axum integration: one line turns every palisade rejection into the right answer.
//!
//! axum requires a layered router's errors to be handled; [`handle_error`] is the
//! handler to give `HandleErrorLayer`. It answers 503 with `Retry-After` for an open
//! circuit, 429 with `Retry-After`, `RateLimit-Policy` and `RateLimit` for a rate limit,
//! 504 for a timed-out attempt or deadline, and 500 for anything else, without the inner
//! error's text (see [`rejection`](crate::rejection) for the full table).
//!
//! [`CircuitOpen`] and [`RateLimited`] are also `IntoResponse`, and
//! [`CorrelationId`](crate::correlation::CorrelationId) is an extractor.
//!
//! # Example
//!
//! ```
//! use axum::{Router, error_handling::HandleErrorLayer, routing::get};
//! use palisade::ServiceBuilderExt;
//! use palisade::circuit_breaker::CircuitBreakerLayer;
//! use palisade::rate_limit::RateLimitLayer;
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//!
//! # fn main() -> Result<(), tower::BoxError> {
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(
//!         ServiceBuilder::new()
//!             .layer(HandleErrorLayer::new(palisade::axum::handle_error))
//!             .rate_limiter(RateLimitLayer::builder().capacity(100).refill(50, Duration::from_secs(1)).build()?)
//!             .circuit_breaker(CircuitBreakerLayer::builder().build()?),
//!     );
//! # let _ = app;
//! # Ok(())
//! # }
//! ```

use axum_core::response::{IntoResponse, Response};
use tower::BoxError;

use crate::circuit_breaker::CircuitOpen;
use crate::rate_limit::RateLimited;
use crate::rejection::http_response;

/// The error handler for `axum::error_handling::HandleErrorLayer`; see the
/// [module docs](self).
pub async fn handle_error(error: BoxError) -> Response {
    http_response(&error)
}

impl IntoResponse for CircuitOpen {
    fn into_response(self) -> Response {
        http_response(&BoxError::from(self))
    }
}

impl IntoResponse for RateLimited {
    fn into_response(self) -> Response {
        http_response(&BoxError::from(self))
    }
}
