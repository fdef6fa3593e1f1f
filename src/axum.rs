//! axum integration: one line turns every palisade rejection into the right answer.
//!
//! axum requires a layered router's errors to be handled; [`handle_error`] is the
//! handler to give `HandleErrorLayer`. It answers every [rejection](crate::rejection),
//! palisade's or another layer's, also wrapped inside another error: 503 with
//! `Retry-After` for an unavailable dependency or an overloaded server, 429 with
//! `Retry-After`, `RateLimit-Policy` and `RateLimit` for a rate limit, 504 for a
//! timed-out attempt or deadline, and 500 for anything else, without the inner error's
//! text (see [`rejection`](crate::rejection) for the full table).
//!
//! Every rejection type is also `IntoResponse`, and
//! [`CorrelationId`](crate::correlation::CorrelationId) is an extractor.
//!
//! # Example
//!
//! A router behind correlation IDs, a per-client rate limit and a circuit breaker; the
//! same stack on a single route with `MethodRouter::layer` (or on every route, but not
//! the fallback, with `Router::route_layer`).
//!
//! ```
//! use axum::{Router, error_handling::HandleErrorLayer, routing::get};
//! use palisade::ServiceBuilderExt;
//! use palisade::circuit_breaker::CircuitBreakerLayer;
//! use palisade::classify::ServerErrorsAsFailures;
//! use palisade::correlation::CorrelationId;
//! use palisade::rate_limit::{RateLimitLayer, key::Header};
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! async fn hello(id: CorrelationId) -> String {
//!     format!("hello, request {id}")
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let per_client = RateLimitLayer::builder()
//!     .capacity(2)
//!     .refill(1, Duration::from_secs(1))
//!     .keyed(Header::new(http::HeaderName::from_static("x-api-key")))
//!     .build()?;
//! let breaker = CircuitBreakerLayer::builder()
//!     .classify(ServerErrorsAsFailures) // axum answers errors with 5xx, never `Err`
//!     .build()?;
//! let app = Router::new().route("/", get(hello)).layer(
//!     ServiceBuilder::new()
//!         .correlation_id() // outside HandleErrorLayer: rejections carry the ID too
//!         .layer(HandleErrorLayer::new(palisade::axum::handle_error))
//!         .rate_limiter(per_client)
//!         .circuit_breaker(breaker),
//! );
//!
//! let call = |app: Router| {
//!     let request = http::Request::get("/")
//!         .header("x-api-key", "alice")
//!         .header("x-request-id", "trace-1")
//!         .body(axum::body::Body::empty());
//!     async move { app.oneshot(request?).await.map_err(tower::BoxError::from) }
//! };
//! assert_eq!(call(app.clone()).await?.status(), 200);
//! assert_eq!(call(app.clone()).await?.status(), 200);
//! let refused = call(app).await?;
//! assert_eq!(refused.status(), 429);
//! assert_eq!(refused.headers()["retry-after"], "1");
//! assert_eq!(refused.headers()["x-request-id"], "trace-1");
//!
//! // The same on one handler only.
//! let reports = RateLimitLayer::builder().capacity(100).refill(10, Duration::from_secs(1)).build()?;
//! let app: Router = Router::new().route(
//!     "/reports",
//!     get(|| async { "report" }).layer(
//!         ServiceBuilder::new()
//!             .layer(HandleErrorLayer::new(palisade::axum::handle_error))
//!             .rate_limiter(reports),
//!     ),
//! );
//! # let _ = app;
//! # Ok(())
//! # }
//! ```
//!
//! # What to know when composing
//!
//! - **Order.** `HandleErrorLayer` goes outside palisade's layers (it turns their
//!   `BoxError` into a response, which axum requires); the `CorrelationIdLayer` goes
//!   outside `HandleErrorLayer`, so that 429s and 503s carry the `x-request-id` too.
//!   Put the rate limiter outside the breaker, so that refused requests are not
//!   counted as calls.
//! - **Classify responses.** Inside `HandleErrorLayer` an axum router never returns
//!   `Err`: its failures are 5xx responses. A breaker with the default classifier
//!   (errors only) would never open; give it [`ServerErrorsAsFailures`].
//! - **Shared state.** axum clones the stack for every request (and every
//!   connection); every clone shares the layer's breaker and buckets, so the limits
//!   are exact. A second, independent limit needs a second layer.
//! - **Per-IP limits** with [`PeerIp`] need the peer address:
//!   serve with `app.into_make_service_with_connect_info::<SocketAddr>()`, or every
//!   request is refused with 400 ([`MissingKey`]).
//! - **`route_layer`** wraps matched routes only: an unknown path stays a 404 and
//!   costs no token.
//! - **Calling a layered service from a handler.** If rustc says "implementation of
//!   `From` is not general enough" for the handler, the innermost service is an
//!   `async` block whose error type is `BoxError` (tower's own layers do the same;
//!   a rustc limitation with higher-ranked lifetimes in async code). Give that service
//!   a concrete error type, or box the stack where it is built
//!   (`tower::util::BoxCloneSyncService::new(stack)`).
//!
//! [`ServerErrorsAsFailures`]: crate::classify::ServerErrorsAsFailures
//! [`PeerIp`]: crate::key::PeerIp
//! [`MissingKey`]: crate::rate_limit::MissingKey

use axum_core::response::Response;
use tower::BoxError;

use crate::rejection::http_response;

/// The error handler for `axum::error_handling::HandleErrorLayer`; see the
/// [module docs](self).
pub async fn handle_error(error: BoxError) -> Response {
    http_response(&error)
}
