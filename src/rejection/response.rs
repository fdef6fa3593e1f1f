//! Every rejection as the HTTP answer it stands for (feature `http`); the table is in
//! the [module docs](super#http-and-grpc). `Retry-After` is in whole seconds, rounded
//! up. The body is empty: an inner error's text is never sent to the client.

use std::time::Duration;

use http::header::RETRY_AFTER;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use tower::BoxError;

use super::{RateLimitInfo, Rejection, RejectionKind};

/// The `RateLimit-Policy` field name.
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// The `RateLimit` field name.
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The HTTP answer to any error: a [rejection](super)'s (see [`rejection_response`]),
/// else 500 without the error's text.
///
/// ```
/// use http::StatusCode;
/// use palisade::rejection::http_response;
/// use tower::BoxError;
///
/// let error: BoxError = "connection reset by peer".into();
/// let response = http_response::<()>(&error);
/// assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
/// ```
pub fn http_response<B: Default>(error: &BoxError) -> Response<B> {
    rejection_response(error).unwrap_or_else(|| {
        #[cfg(feature = "tracing")]
        tracing::error!(%error, "unhandled service error answered with 500");
        empty(StatusCode::INTERNAL_SERVER_ERROR)
    })
}

/// The HTTP answer to `error` if it, or an error in its `source()` chain, is a
/// rejection ([`Rejection::find`]); `None` for any other error.
pub fn rejection_response<B: Default>(error: &BoxError) -> Option<Response<B>> {
    Rejection::find(&**error).map(|rejection| rejection.to_http_response())
}

impl Rejection {
    /// The HTTP answer to this rejection (feature `http`); see the
    /// [module docs](super#http-and-grpc).
    pub fn to_http_response<B: Default>(&self) -> Response<B> {
        answer(self)
    }
}

fn answer<B: Default>(rejection: &Rejection) -> Response<B> {
    let status = match rejection.kind() {
        RejectionKind::Unavailable | RejectionKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        RejectionKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        RejectionKind::Malformed => StatusCode::BAD_REQUEST,
        RejectionKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
    };
    let mut response = empty(status);
    let headers = response.headers_mut();
    if let Some(retry_after) = rejection.retry_after() {
        headers.insert(RETRY_AFTER, HeaderValue::from(whole_seconds(retry_after)));
    }
    if let Some(rate_limit) = rejection.rate_limit() {
        insert_rate_limit_fields(headers, rate_limit);
    }
    response
}

/// Whole seconds, rounded up: never zero for a positive wait, so a client that waits
/// this long is never early. Saturates at `u64::MAX`.
pub fn whole_seconds(wait: Duration) -> u64 {
    wait.as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0))
}

/// Inserts the IETF `RateLimit-Policy` and `RateLimit` fields
/// (`draft-ietf-httpapi-ratelimit-headers`) describing `rate_limit`:
///
/// ```text
/// ratelimit-policy: "default";q=100;w=10
/// ratelimit: "default";r=0;t=3
/// ```
///
/// Seconds are rounded up, so a client that waits that long is never early.
pub fn insert_rate_limit_fields(headers: &mut HeaderMap, rate_limit: &RateLimitInfo) {
    let policy = format!(
        "\"default\";q={};w={}",
        rate_limit.limit,
        whole_seconds(rate_limit.window)
    );
    let limit = format!(
        "\"default\";r={};t={}",
        rate_limit.remaining,
        whole_seconds(rate_limit.reset)
    );
    headers.insert(RATELIMIT_POLICY.clone(), field_value(policy));
    headers.insert(RATELIMIT.clone(), field_value(limit));
}

fn field_value(value: String) -> HeaderValue {
    // Digits, quotes and ASCII punctuation only: always a valid header value.
    HeaderValue::try_from(value).unwrap_or_else(|_| HeaderValue::from_static("\"default\""))
}

fn empty<B: Default>(status: StatusCode) -> Response<B> {
    let mut response = Response::new(B::default());
    *response.status_mut() = status;
    response
}

#[cfg(all(test, not(loom), feature = "redis"))]
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
