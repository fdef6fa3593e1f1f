//! HTTP answers for rate limits: the 429 response and the IETF draft fields
//! (`draft-ietf-httpapi-ratelimit-headers`) on admitted responses.
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
//! long is never early. The fields are written by
//! [`insert_rate_limit_fields`], which
//! answers every rate limit of the [rejection contract](crate::rejection).

use http::Response;

use super::error::RateLimited;
use super::layer::{OnAdmitted, RateLimitStatus};
use crate::rejection::{RateLimitInfo, insert_rate_limit_fields};

/// Adds the `RateLimit-Policy` and `RateLimit` fields to admitted responses (see
/// [`Builder::headers_on_success`](super::Builder::headers_on_success)).
#[derive(Debug, Clone, Copy, Default)]
pub struct AddRateLimitFields;

impl<B> OnAdmitted<Response<B>> for AddRateLimitFields {
    type Status = Option<RateLimitStatus>;

    fn on_admitted(&self, response: &mut Response<B>, status: &RateLimitStatus) {
        insert_rate_limit_fields(response.headers_mut(), &RateLimitInfo::from(status));
    }
}

/// The 429 answer to `error`: `Retry-After` in whole seconds (rounded up) and the
/// `RateLimit-Policy` / `RateLimit` fields.
pub fn too_many_requests<B: Default>(error: &RateLimited) -> Response<B> {
    error.rejection().to_http_response()
}
