//! Every palisade rejection as the HTTP answer it stands for.
//!
//! | error | status | headers |
//! |---|---|---|
//! | [`CircuitOpen`] | 503 Service Unavailable | `Retry-After` |
//! | `RedisUnavailable` (feature `redis`: the Redis store fails closed) | 503 Service Unavailable | `Retry-After` |
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

use std::time::Duration;

use http::header::RETRY_AFTER;
use http::{HeaderValue, Response, StatusCode};
use tower::BoxError;

use crate::circuit_breaker::CircuitOpen;
use crate::rate_limit::headers::{error_response, whole_seconds};
use crate::retry::{AttemptTimedOut, DeadlineExceeded};

/// The HTTP answer to `error`; see the [module docs](self).
pub fn http_response<B: Default>(error: &BoxError) -> Response<B> {
    if let Some(open) = error.downcast_ref::<CircuitOpen>() {
        return unavailable(open.retry_after());
    }
    #[cfg(feature = "redis")]
    if let Some(store_down) = error.downcast_ref::<crate::rate_limit::RedisUnavailable>() {
        return unavailable(store_down.retry_after());
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

/// 503 with `Retry-After`: the server cannot take the request now, but may soon.
fn unavailable<B: Default>(retry_after: Duration) -> Response<B> {
    let mut response = empty(StatusCode::SERVICE_UNAVAILABLE);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(whole_seconds(retry_after)));
    response
}

fn empty<B: Default>(status: StatusCode) -> Response<B> {
    let mut response = Response::new(B::default());
    *response.status_mut() = status;
    response
}

#[cfg(all(test, feature = "redis"))]
pub(crate) mod tests {
    use super::*;

    /// The error a fail-closed Redis store gives when nothing answers on its port; its
    /// `retry_after()` is the store's recheck interval, `recheck`.
    pub(crate) async fn redis_unavailable(recheck: Duration) -> BoxError {
        use crate::rate_limit::{RateLimitLayer, RedisOptions, RedisStore, WhenUnavailable};
        use redis::aio::{ConnectionManager, ConnectionManagerConfig};
        use tower::{Layer, ServiceExt, service_fn};

        // A port that was free a moment ago: connecting to it is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("url");
        let config = ConnectionManagerConfig::new().set_number_of_retries(0);
        let connection =
            ConnectionManager::new_lazy_with_config(client, config).expect("lazy manager");
        let options = RedisOptions::default()
            .timeout(Duration::from_secs(1))
            .recheck(recheck)
            .when_unavailable(WhenUnavailable::Reject);
        let layer = RateLimitLayer::builder()
            .capacity(10)
            .refill(1, Duration::from_secs(1))
            .build_with(|quota| RedisStore::new(connection, quota, options))
            .expect("config");
        let service = layer.layer(service_fn(|()| async { Ok::<_, BoxError>(()) }));
        service.oneshot(()).await.expect_err("no Redis: refused")
    }

    #[tokio::test]
    async fn a_fail_closed_redis_store_is_503_with_retry_after() {
        let error = redis_unavailable(Duration::from_millis(2500)).await;
        assert!(error.is::<crate::rate_limit::RedisUnavailable>(), "{error}");
        let response = http_response::<()>(&error);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "3");
    }
}
