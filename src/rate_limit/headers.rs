//! HTTP answers for rate limits: the 429 response and the IETF draft fields
//! (`draft-ietf-httpapi-ratelimit-headers`), for the layer and for the axum and tonic
//! integrations to reuse.
//!
//! ```text
//! HTTP/1.1 429 Too Many Requests
//! retry-after: 3
//! ratelimit-policy: "default";q=100;w=10
//! ratelimit: "default";r=0;t=3
//! ```
//!
//! `q` is the bucket's capacity and `w` the seconds an empty bucket takes to refill; `r`
//! is the tokens left and `t` the seconds until the bucket is full again (on a refusal:
//! until the request would pass). Seconds are rounded up, so a client that waits that
//! long is never early.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header::RETRY_AFTER};
use tower::BoxError;

use super::bucket::Quota;
use super::error::{CostExceedsCapacity, MissingKey, RateLimited};
use super::layer::{OnAdmitted, RateLimitStatus};

/// The `RateLimit-Policy` field name.
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// The `RateLimit` field name.
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Adds the `RateLimit-Policy` and `RateLimit` fields to admitted responses (see
/// [`Builder::headers_on_success`](super::Builder::headers_on_success)).
#[derive(Debug, Clone, Copy, Default)]
pub struct AddRateLimitFields;

impl<B> OnAdmitted<Response<B>> for AddRateLimitFields {
    const ACTIVE: bool = true;

    fn on_admitted(&self, response: &mut Response<B>, status: &RateLimitStatus) {
        insert_rate_limit_fields(response.headers_mut(), status);
    }
}

/// Whole seconds, rounded up: never zero for a positive wait, so a client that waits
/// this long is never early. Saturates at `u64::MAX`.
pub fn whole_seconds(wait: Duration) -> u64 {
    wait.as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0))
}

/// Inserts `RateLimit-Policy` and `RateLimit` describing `status`.
pub fn insert_rate_limit_fields(headers: &mut HeaderMap, status: &RateLimitStatus) {
    headers.insert(
        RATELIMIT_POLICY.clone(),
        HeaderValue::from(PolicyField(&status.quota)),
    );
    headers.insert(RATELIMIT.clone(), HeaderValue::from(LimitField(status)));
}

struct PolicyField<'a>(&'a Quota);

impl From<PolicyField<'_>> for HeaderValue {
    fn from(PolicyField(quota): PolicyField<'_>) -> Self {
        let value = format!(
            "\"default\";q={};w={}",
            quota.capacity(),
            whole_seconds(quota.period())
        );
        // Digits, quotes and ASCII punctuation only: always a valid header value.
        HeaderValue::try_from(value).unwrap_or_else(|_| HeaderValue::from_static("\"default\""))
    }
}

struct LimitField<'a>(&'a RateLimitStatus);

impl From<LimitField<'_>> for HeaderValue {
    fn from(LimitField(status): LimitField<'_>) -> Self {
        let value = format!(
            "\"default\";r={};t={}",
            status.remaining,
            whole_seconds(status.reset)
        );
        HeaderValue::try_from(value).unwrap_or_else(|_| HeaderValue::from_static("\"default\""))
    }
}

/// The 429 answer to `error`: `Retry-After` in whole seconds (rounded up) and the
/// `RateLimit-Policy` / `RateLimit` fields.
pub fn too_many_requests<B: Default>(error: &RateLimited) -> Response<B> {
    let mut response = Response::new(B::default());
    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let headers = response.headers_mut();
    headers.insert(
        RETRY_AFTER,
        HeaderValue::from(whole_seconds(error.retry_after())),
    );
    insert_rate_limit_fields(headers, &RateLimitStatus::from(error));
    response
}

/// The HTTP answer to a rate limiter's error, if it is one: 429 for [`RateLimited`] (see
/// [`too_many_requests`]) and for [`CostExceedsCapacity`] (without `Retry-After`:
/// retrying cannot help), 400 for [`MissingKey`]. `None` for any other error.
pub fn error_response<B: Default>(error: &BoxError) -> Option<Response<B>> {
    if let Some(limited) = error.downcast_ref::<RateLimited>() {
        return Some(too_many_requests(limited));
    }
    let status = if error.is::<CostExceedsCapacity>() {
        StatusCode::TOO_MANY_REQUESTS
    } else if error.is::<MissingKey>() {
        StatusCode::BAD_REQUEST
    } else {
        return None;
    };
    let mut response = Response::new(B::default());
    *response.status_mut() = status;
    Some(response)
}
