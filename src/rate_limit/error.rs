use std::time::Duration;

use super::bucket::Quota;
use crate::rejection::{RateLimitInfo, Rejection, RejectionKind};

/// The error a request gets when it is over the rate limit: the inner service was not
/// called.
///
/// Besides [`retry_after`](Self::retry_after) it carries the policy the request ran into,
/// which is what the IETF `RateLimit-Policy` and `RateLimit` fields advertise.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rate limited: retry after {retry_after:?}")]
pub struct RateLimited {
    retry_after: Duration,
    quota: Quota,
    remaining: u64,
}

impl RateLimited {
    pub(crate) fn new(retry_after: Duration, quota: Quota, remaining: u64) -> Self {
        Self {
            retry_after,
            quota,
            remaining,
        }
    }

    /// How long until a request of the same cost would be admitted.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The bucket's capacity: the most tokens a client can spend in a burst.
    pub fn limit(&self) -> u64 {
        self.quota.capacity()
    }

    /// The time an empty bucket takes to refill completely.
    pub fn period(&self) -> Duration {
        self.quota.period()
    }

    /// The tokens left in the bucket when the request was refused (fewer than it cost).
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// The quota the request ran into.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// How this rejection describes itself: [`RateLimited`](RejectionKind::RateLimited)
    /// until [`retry_after`](Self::retry_after), with the bucket's `RateLimit` fields.
    pub fn rejection(&self) -> Rejection {
        let fields = RateLimitInfo::new(
            self.limit(),
            self.period(),
            self.remaining,
            self.retry_after,
        );
        Rejection::new(RejectionKind::RateLimited, "rate limited")
            .with_retry_after(self.retry_after)
            .with_rate_limit(fields)
    }
}

/// A request that costs more tokens than the bucket can ever hold: waiting would not help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("request costs {cost} tokens but the rate limit's capacity is {capacity}")]
pub struct CostExceedsCapacity {
    pub(crate) cost: u64,
    pub(crate) capacity: u64,
}

impl CostExceedsCapacity {
    /// What the request cost.
    pub fn cost(&self) -> u64 {
        self.cost
    }

    /// The bucket's capacity.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// How this rejection describes itself: [`RateLimited`](RejectionKind::RateLimited)
    /// with no `retry_after`, since waiting cannot help.
    pub fn rejection(&self) -> Rejection {
        Rejection::new(
            RejectionKind::RateLimited,
            "request cost exceeds the rate limit",
        )
    }
}

/// A keyed limiter could not find the request's key (no peer address, no such header) and
/// is configured to refuse such requests ([`WhenKeyMissing::Reject`](super::WhenKeyMissing)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rate limit key missing from the request")]
pub struct MissingKey;

impl MissingKey {
    /// How this rejection describes itself: the request is
    /// [`Malformed`](RejectionKind::Malformed).
    pub fn rejection(&self) -> Rejection {
        Rejection::new(RejectionKind::Malformed, "rate limit key missing")
    }
}

/// An invalid rate limiter configuration, reported by `build()` and the handle's setters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RateLimitConfigError {
    /// The capacity (burst size) is zero: nothing could ever pass.
    #[error("rate limit capacity must be at least 1")]
    ZeroCapacity,
    /// The refill adds zero tokens per period.
    #[error("rate limit refill must add at least 1 token per period")]
    ZeroRefillTokens,
    /// The refill period is zero.
    #[error("rate limit refill period must be longer than zero")]
    ZeroRefillPeriod,
    /// More than one token per nanosecond: finer than the limiter's clock.
    #[error("rate limit refill is faster than one token per nanosecond")]
    RateTooHigh,
    /// The quota does not fit the bucket's exact arithmetic: its capacity times the
    /// refill interval, or `max_wait`, exceeds 2^57 of its time units (4.5 years when the
    /// interval is a whole number of nanoseconds), or the rate needs units finer than
    /// 2^-24 ns (see [`Quota`](super::Quota)); or a store cannot hold it.
    #[error("rate limit capacity times refill interval, or max_wait, is too large")]
    TooLarge,
    /// `max_keys` is zero: a keyed limiter needs room for at least one key (also a
    /// `RedisStore`'s `fallback_max_keys` and `lease_max_keys`, where they are used).
    #[error("rate limit max_keys must be at least 1")]
    ZeroMaxKeys,
    /// A `RedisStore` batch of zero requests.
    #[error("rate limit batch must be at least 1")]
    ZeroBatch,
}
