//! Adaptive limits: algorithms that move the concurrency limit from what finished
//! requests measured.
//!
//! Two come with palisade, [`Aimd`] and [`Gradient`]; any type implementing
//! [`LimitAlgorithm`] can be given to
//! [`ConcurrencyLimitLayerBuilder::algorithm`](super::ConcurrencyLimitLayerBuilder::algorithm).
//! Each is a plain state machine that takes the time as an argument (in the
//! [`Sample`]), so it can be driven and tested without a runtime.

mod aimd;
mod gradient;

use std::time::Duration;
use tokio::time::Instant;

pub use self::aimd::Aimd;
pub use self::gradient::Gradient;

/// What one finished request tells an algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Sample {
    /// From admission to the outcome: the response (or the error), or for a classifier
    /// that reads the end of the body (gRPC trailers), the end of the body.
    pub rtt: Duration,
    /// The requests in flight when this one was admitted, itself included.
    pub in_flight: u32,
    /// Whether the request is a sign of overload: classified as a failure (an error, a
    /// timeout, a 5xx or `UNAVAILABLE` with the matching classifier), or dropped before
    /// its outcome was known.
    pub congested: bool,
    /// When the outcome was known.
    pub now: Instant,
}

impl Sample {
    /// A sample: `rtt` long, admitted with `in_flight` in flight, ended at `now`.
    pub const fn new(rtt: Duration, in_flight: u32, congested: bool, now: Instant) -> Self {
        Self {
            rtt,
            in_flight,
            congested,
            now,
        }
    }

    /// When the request was admitted (`now - rtt`, or `now` if that is before the
    /// clock's start).
    pub fn started(&self) -> Instant {
        self.now.checked_sub(self.rtt).unwrap_or(self.now)
    }
}

/// An algorithm that sets the concurrency limit.
///
/// The layer calls [`update`](Self::update) once per finished request, under a lock of
/// its own (the algorithm needs no synchronisation), on the thread that finished the
/// request: keep it short, and do not panic (it may run in a drop).
///
/// ```
/// use palisade::concurrency_limit::{LimitAlgorithm, Sample};
///
/// /// Halves on congestion, otherwise creeps up by one, between 1 and 64.
/// #[derive(Debug)]
/// struct Halving(u32);
///
/// impl LimitAlgorithm for Halving {
///     fn starting_limit(&self) -> u32 {
///         self.0
///     }
///
///     fn update(&mut self, sample: Sample) -> u32 {
///         self.0 = if sample.congested { (self.0 / 2).max(1) } else { (self.0 + 1).min(64) };
///         self.0
///     }
/// }
///
/// # fn main() -> Result<(), palisade::concurrency_limit::ConcurrencyLimitConfigError> {
/// let layer = palisade::concurrency_limit::ConcurrencyLimitLayer::builder()
///     .algorithm(Halving(8))
///     .build()?;
/// assert_eq!(layer.handle().limit(), 8);
/// # Ok(())
/// # }
/// ```
pub trait LimitAlgorithm: Send + 'static {
    /// The limit before any request has finished.
    fn starting_limit(&self) -> u32;

    /// Learns from a finished request and returns the limit from now on. The layer
    /// clamps it to at least 1.
    fn update(&mut self, sample: Sample) -> u32;
}

/// Checks `1 <= min <= initial <= max <= 2^31 - 1`.
pub(crate) fn check_limits(min: u32, initial: u32, max: u32) -> Result<(), &'static str> {
    if min == 0 {
        return Err("min_limit must be at least 1");
    }
    if max > super::limiter::MAX_LIMIT {
        return Err("max_limit must be at most 2^31 - 1");
    }
    if !(min <= initial && initial <= max) {
        return Err("the limits must be min_limit <= initial_limit <= max_limit");
    }
    Ok(())
}

/// Checks a duration setting: above zero and at most a day.
pub(crate) fn check_duration(value: Duration, message: &'static str) -> Result<(), &'static str> {
    if value.is_zero() || value > Duration::from_secs(86_400) {
        return Err(message);
    }
    Ok(())
}
