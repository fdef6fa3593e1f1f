//! How a [`RedisStore`] names its keys and copes with a slow or absent Redis, and which
//! of those options are invalid.

use std::num::NonZeroU32;
use std::time::Duration;

#[cfg(doc)]
use super::{RedisStore, RedisUnavailable};
use crate::rate_limit::RateLimitConfigError;

/// The longest [`lease_for`](RedisOptions::lease_for): 2^57 ns, 4.5 years, like the
/// longest `max_wait`.
pub(super) const MAX_LEASE_FOR: Duration = Duration::from_nanos(1 << 57);

/// What a [`RedisStore`] does with a request when Redis does not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhenUnavailable {
    /// Admit it (fail open; the default): the limit lapses while Redis is away, the
    /// service does not.
    Admit,
    /// Refuse it with [`RedisUnavailable`] (fail closed).
    Reject,
    /// Decide in process, on buckets with the capacity and the rate divided by
    /// `replicas` (the capacity rounded up), so that the fleet as a whole keeps roughly
    /// its limit. Only requests decided while Redis is away touch these buckets (full
    /// at the first outage; later outages find them refilled since the last).
    Local {
        /// How many replicas share the limit.
        replicas: NonZeroU32,
    },
}

/// How a [`RedisStore`] names its keys and copes with a slow or absent Redis.
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisOptions {
    pub(super) prefix: Vec<u8>,
    pub(super) timeout: Duration,
    pub(super) recheck: Duration,
    pub(super) when_unavailable: WhenUnavailable,
    pub(super) fallback_max_keys: usize,
    pub(super) batch: u32,
    pub(super) lease_for: Option<Duration>,
    pub(super) lease_max_keys: usize,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            prefix: b"palisade:rl:".to_vec(),
            timeout: Duration::from_millis(5),
            recheck: Duration::from_millis(100),
            when_unavailable: WhenUnavailable::Admit,
            fallback_max_keys: 100_000,
            batch: 1,
            lease_for: None,
            lease_max_keys: 10_000,
        }
    }
}

impl RedisOptions {
    /// The start of every key of this limiter (default `palisade:rl:`).
    pub fn prefix(mut self, prefix: impl Into<Vec<u8>>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a request waits for Redis before the
    /// [`when_unavailable`](Self::when_unavailable) policy decides it (default 5 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// While Redis is down, how often one request asks it again (default 100 ms).
    pub fn recheck(mut self, recheck: Duration) -> Self {
        self.recheck = recheck;
        self
    }

    /// What to do with requests while Redis does not answer (default
    /// [`WhenUnavailable::Admit`]).
    pub fn when_unavailable(mut self, policy: WhenUnavailable) -> Self {
        self.when_unavailable = policy;
        self
    }

    /// The most keys the [local fallback](WhenUnavailable::Local) tracks (default
    /// 100,000; 0 is [`RateLimitConfigError::ZeroMaxKeys`]; see
    /// [`Builder::max_keys`](crate::rate_limit::Builder::max_keys)).
    pub fn fallback_max_keys(mut self, max_keys: usize) -> Self {
        self.fallback_max_keys = max_keys;
        self
    }

    /// Lease tokens `n` requests at a time (default 1: no batching, one round trip per
    /// request; 0 is [`RateLimitConfigError::ZeroBatch`]). See
    /// [local batching](RedisStore#local-batching).
    pub fn batch(mut self, n: u32) -> Self {
        self.batch = n;
        self
    }

    /// How long a [batch](Self::batch)'s unspent tokens stay usable (default: the time
    /// the bucket takes to refill a batch, `n` refill intervals, at most one second;
    /// above 4.5 years is [`RateLimitConfigError::TooLarge`]; zero: a lease expires at once).
    pub fn lease_for(mut self, lease_for: Duration) -> Self {
        self.lease_for = Some(lease_for);
        self
    }

    /// The most keys holding a [batch](Self::batch) at once (default 10,000; 0 is
    /// [`RateLimitConfigError::ZeroMaxKeys`]): beyond it, the requests of new keys go to Redis one
    /// by one until leases expire.
    pub fn lease_max_keys(mut self, max_keys: usize) -> Self {
        self.lease_max_keys = max_keys;
        self
    }
}

impl RedisOptions {
    /// The first option the local builder would refuse too (a value that is ignored, such
    /// as `lease_max_keys` without batching, is not checked).
    pub(super) fn invalid(&self) -> Option<RateLimitConfigError> {
        let batching = self.batch > 1;
        let local = matches!(self.when_unavailable, WhenUnavailable::Local { .. });
        if self.batch == 0 {
            Some(RateLimitConfigError::ZeroBatch)
        } else if (local && self.fallback_max_keys == 0) || (batching && self.lease_max_keys == 0) {
            Some(RateLimitConfigError::ZeroMaxKeys)
        } else if batching
            && self
                .lease_for
                .is_some_and(|lease_for| lease_for > MAX_LEASE_FOR)
        {
            Some(RateLimitConfigError::TooLarge)
        } else {
            None
        }
    }
}

#[cfg(feature = "serde")]
impl RedisOptions {
    /// The first option that differs from `other`: its field in a configuration's `redis`
    /// section, and this value as the configuration would write it.
    pub(crate) fn first_difference(&self, other: &RedisOptions) -> Option<(&'static str, String)> {
        self.as_written()
            .into_iter()
            .zip(other.as_written())
            .find(|(this, other)| this.1 != other.1)
            .map(|(this, _)| this)
    }

    /// Every option, by its field in a `redis` section, as the section writes it.
    fn as_written(&self) -> [(&'static str, String); 8] {
        let duration = |duration: Duration| {
            humantime_serde::re::humantime::format_duration(duration).to_string()
        };
        let when_unavailable = match self.when_unavailable {
            WhenUnavailable::Admit => "\"admit\"".to_owned(),
            WhenUnavailable::Reject => "\"reject\"".to_owned(),
            WhenUnavailable::Local { replicas } => {
                format!("{{ local = {{ replicas = {replicas} }} }}")
            }
        };
        [
            (
                "prefix",
                format!("{:?}", String::from_utf8_lossy(&self.prefix)),
            ),
            ("timeout", duration(self.timeout)),
            ("recheck", duration(self.recheck)),
            ("when_unavailable", when_unavailable),
            ("fallback_max_keys", self.fallback_max_keys.to_string()),
            ("batch", self.batch.to_string()),
            (
                "lease_for",
                self.lease_for
                    .map_or_else(|| "none (the default)".to_owned(), duration),
            ),
            ("lease_max_keys", self.lease_max_keys.to_string()),
        ]
    }
}
