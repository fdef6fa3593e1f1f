use std::time::Duration;

use crate::rejection::{Rejection, RejectionKind};

/// The error a request gets when the limit is reached (and the queue, if any, is full
/// or its wait ran out): the inner service was not called.
///
/// It describes itself as [`RejectionKind::Overloaded`] with a `retry_after`, so it is
/// answered with 503 and `Retry-After` over HTTP, and `UNAVAILABLE` with
/// `grpc-retry-pushback-ms` over gRPC; the retry layer waits `retry_after` (or its
/// backoff, whichever is longer) before trying again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("overloaded: {limit} requests in flight; retry after {retry_after:?}")]
pub struct Overloaded {
    retry_after: Duration,
    limit: u32,
}

impl Overloaded {
    pub(crate) fn new(retry_after: Duration, limit: u32) -> Self {
        Self { retry_after, limit }
    }

    /// How long the client is asked to wait: the layer's
    /// [`retry_after`](super::ConcurrencyLimitLayerBuilder::retry_after). A hint: a
    /// permit may come back sooner.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The limit in force when the request was refused.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// How this rejection describes itself: [`Overloaded`](RejectionKind::Overloaded)
    /// until [`retry_after`](Self::retry_after).
    pub fn rejection(&self) -> Rejection {
        Rejection::new(RejectionKind::Overloaded, "overloaded").with_retry_after(self.retry_after)
    }
}

/// Why [`ConcurrencyLimitLayerBuilder::build`](super::ConcurrencyLimitLayerBuilder::build)
/// refused a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConcurrencyLimitConfigError {
    /// Neither a static limit nor an algorithm was given.
    #[error("a concurrency limit needs max_in_flight(n) or an algorithm")]
    NoLimit,
    /// A static limit of zero, or above the largest supported.
    #[error("max_in_flight must be in 1..={max}, got {limit}")]
    Limit {
        /// The requested limit.
        limit: u32,
        /// The largest supported limit.
        max: u32,
    },
    /// A zero `retry_after`, or one above a day.
    #[error("retry_after must be above zero and at most a day, got {0:?}")]
    RetryAfter(Duration),
    /// A queue of zero places, or above the largest supported.
    #[error("the queue holds 1..={max} waiters, got {waiters}")]
    QueueSize {
        /// The requested number of places.
        waiters: usize,
        /// The largest supported number.
        max: usize,
    },
    /// A zero `max_wait`, or one above a day.
    #[error("max_wait must be above zero and at most a day, got {0:?}")]
    MaxWait(Duration),
    /// A [keyed](super::ConcurrencyLimitLayerBuilder::keyed) limit with `max_keys` zero:
    /// it needs room for at least one key.
    #[error("a keyed concurrency limit needs max_keys of at least 1")]
    ZeroMaxKeys,
    /// A keyed limit with a [queue](super::ConcurrencyLimitLayerBuilder::queue). The
    /// queue hands each released permit to its oldest waiter, whoever's it is, so a
    /// flooding client's waiters would take the slots that fairness keeps for the
    /// others; a fair queue (one per key, served in turn) is a different structure.
    #[error(
        "a keyed concurrency limit cannot have a queue: it would hand permits out by arrival, not by share"
    )]
    KeyedQueue,
    /// An adaptive algorithm's settings are out of range.
    #[error("{algorithm}: {reason}")]
    Algorithm {
        /// `"Aimd"` or `"Gradient"`.
        algorithm: &'static str,
        /// Which setting, and its range.
        reason: &'static str,
    },
}
