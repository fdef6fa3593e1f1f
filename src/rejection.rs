//! Every palisade rejection as the HTTP answer it stands for.
//!
//! | error | status | headers |
//! |---|---|---|
//! | [`CircuitOpen`] | 503 Service Unavailable | `Retry-After` |
//! | [`RateLimited`](crate::rate_limit::RateLimited) | 429 Too Many Requests | `Retry-After`, `RateLimit-Policy`, `RateLimit` |
//! | [`CostExceedsCapacity`](crate::rate_limit::CostExceedsCapacity) | 429 Too Many Requests | |
//! | [`MissingKey`](crate::rate_limit::MissingKey) | 400 Bad Request | |
//! | [`AttemptTimedOut`], [`DeadlineExceeded`], tower's `Elapsed` | 504 Gateway Timeout | |
//! | anything else | 500 Internal Server Error | |
//!
//! `Retry-After` is in whole seconds, rounded up. The body is empty: an inner error's
//! text is never sent to the client. The axum integration (`palisade::axum::handle_error`,
//! feature `axum`) is this function behind axum's `HandleErrorLayer`.
//!
//! # Example
//!
//! ```
//! use http::StatusCode;
//! use palisade::rejection::http_response;
//! use tower::BoxError;
//!
//! let error: BoxError = "connection reset by peer".into();
//! let response = http_response::<()>(&error);
//! assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
//! ```

use http::header::RETRY_AFTER;
use http::{HeaderValue, Response, StatusCode};
use tower::BoxError;

use crate::circuit_breaker::CircuitOpen;
use crate::rate_limit::headers::{error_response, whole_seconds};
use crate::retry::{AttemptTimedOut, DeadlineExceeded};

/// The HTTP answer to `error`; see the [module docs](self).
pub fn http_response<B: Default>(error: &BoxError) -> Response<B> {
    if let Some(open) = error.downcast_ref::<CircuitOpen>() {
        let mut response = empty(StatusCode::SERVICE_UNAVAILABLE);
        response.headers_mut().insert(
            RETRY_AFTER,
            HeaderValue::from(whole_seconds(open.retry_after())),
        );
        return response;
    }
    if let Some(response) = error_response(error) {
        return response;
    }
    if error.is::<AttemptTimedOut>()
        || error.is::<DeadlineExceeded>()
        || error.is::<tower::timeout::error::Elapsed>()
    {
        return empty(StatusCode::GATEWAY_TIMEOUT);
    }
    #[cfg(feature = "tracing")]
    tracing::error!(%error, "unhandled service error answered with 500");
    empty(StatusCode::INTERNAL_SERVER_ERROR)
}

fn empty<B: Default>(status: StatusCode) -> Response<B> {
    let mut response = Response::new(B::default());
    *response.status_mut() = status;
    response
}
