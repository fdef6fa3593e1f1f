use std::time::Duration;

use crate::rejection::{Rejection, RejectionKind};

/// The error a call gets when the circuit is open (or half-open with every probe slot
/// taken): the inner service was not called.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("circuit open: retry after {retry_after:?}")]
pub struct CircuitOpen {
    retry_after: Duration,
}

impl CircuitOpen {
    pub(crate) fn new(retry_after: Duration) -> Self {
        Self { retry_after }
    }

    /// How long until the breaker lets a probe through. Hints rather than promises
    /// when no time is set: when it is half-open with every probe slot taken, as long
    /// as it was last open (the probes may end sooner, or hang); when it was forced
    /// open by hand, the configured (initial) open time.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// How this rejection describes itself: the dependency is
    /// [`Unavailable`](RejectionKind::Unavailable) until [`retry_after`](Self::retry_after).
    pub fn rejection(&self) -> Rejection {
        Rejection::new(RejectionKind::Unavailable, "circuit open")
            .with_retry_after(self.retry_after)
    }
}

/// Why [`CircuitBreakerLayerBuilder::build`](super::CircuitBreakerLayerBuilder::build)
/// refused a configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CircuitBreakerConfigError {
    /// A keyed breaker's `max_keys` is zero: it needs room for at least one key.
    #[error("circuit breaker max_keys must be at least 1")]
    ZeroMaxKeys,
    /// The failure rate threshold is outside `(0, 1]`.
    #[error("failure rate threshold must be in (0, 1], got {0}")]
    FailureRate(f64),
    /// The slow-call rate threshold is outside `(0, 1]`.
    #[error("slow-call rate threshold must be in (0, 1], got {0}")]
    SlowCallRate(f64),
    /// The slow-call duration is zero: every call would be slow.
    #[error("slow-call duration must be above zero")]
    ZeroSlowCallDuration,
    /// `minimum_calls` is zero.
    #[error("minimum_calls must be at least 1")]
    ZeroMinimumCalls,
    /// `minimum_calls` exceeds what the count window can hold, so it could never trip.
    #[error("minimum_calls ({minimum_calls}) exceeds the count window ({window} calls)")]
    MinimumCallsAboveWindow {
        /// The configured minimum.
        minimum_calls: u64,
        /// The window size.
        window: usize,
    },
    /// A count window of zero calls.
    #[error("the sliding window must hold at least one call")]
    EmptyWindow,
    /// A count window above the supported size.
    #[error("a count window holds at most {max} calls, got {size}")]
    WindowTooLarge {
        /// The requested size.
        size: usize,
        /// The largest supported size.
        max: usize,
    },
    /// A time window spanning more than the supported maximum.
    #[error("a time window spans at most {max:?}, got {span:?}")]
    WindowSpanTooLong {
        /// The requested span.
        span: Duration,
        /// The longest supported span.
        max: Duration,
    },
    /// A time window with zero buckets.
    #[error("a time window needs at least one bucket")]
    NoBuckets,
    /// A time window split into more buckets than supported: each is memory allocated
    /// at build time and work on every call.
    #[error("a time window has at most {max} buckets, got {buckets}")]
    TooManyBuckets {
        /// The requested number.
        buckets: u32,
        /// The largest supported number.
        max: u32,
    },
    /// A time window whose buckets would be shorter than a millisecond.
    #[error("a time window of {span:?} in {buckets} buckets has buckets under 1ms")]
    BucketTooShort {
        /// The window span.
        span: Duration,
        /// The number of buckets.
        buckets: u32,
    },
    /// The open time is zero.
    #[error("the open duration must be above zero")]
    ZeroOpenDuration,
    /// An open time (fixed, or the backoff's initial time or cap) above the supported
    /// maximum.
    #[error("the open duration is at most {max:?}, got {duration:?}")]
    OpenDurationTooLong {
        /// The requested open time.
        duration: Duration,
        /// The longest supported open time.
        max: Duration,
    },
    /// The backoff's cap is below its initial open time.
    #[error("the maximum open duration {max:?} is below the initial {initial:?}")]
    MaxOpenBelowInitial {
        /// The initial open time.
        initial: Duration,
        /// The cap.
        max: Duration,
    },
    /// The backoff multiplier is below 1 or not finite.
    #[error("the open backoff multiplier must be a finite number >= 1, got {0}")]
    Multiplier(f64),
    /// The jitter is outside `[0, 1)`.
    #[error("the open backoff jitter must be in [0, 1), got {0}")]
    Jitter(f64),
    /// Zero half-open probes (the breaker could never close), or too many.
    #[error("half_open_probes must be in 1..={max}, got {probes}")]
    Probes {
        /// The requested number.
        probes: u32,
        /// The largest supported number.
        max: u32,
    },
}
