//! Additive increase, multiplicative decrease.

use std::time::Duration;
use tokio::time::Instant;

use super::{LimitAlgorithm, Sample, check_duration, check_limits};

/// Additive increase, multiplicative decrease, as TCP's congestion avoidance: one more
/// per round of good requests, and the limit times the backoff ratio for a round with
/// a congested or slow one.
///
/// - **Increase**: by one, up to `max_limit`, once `limit` good requests (neither
///   congested nor slower than the latency threshold) have finished since the limit
///   last moved: about one per round trip, so that the limit probes upwards without
///   overshooting by a round's worth of requests. Only requests admitted with at least
///   half the limit in flight count (an idle layer says nothing about the backend's
///   capacity, so the limit does not grow while traffic is light).
/// - **Decrease**: to `floor(limit * backoff_ratio)`, down to `min_limit`, for a request
///   that was [congested](Sample::congested) or took longer than `latency_threshold`;
///   at most once per round: a request admitted before the last decrease ran under the
///   old limit and does not decrease it again (as TCP backs off once per round trip).
///
/// Defaults: initial limit 20, between 1 and 1000, backoff ratio 0.9, latency threshold
/// 5 seconds. Set the threshold a little above the backend's latency at its capacity:
/// AIMD sees queueing only through it.
///
/// ```
/// use palisade::concurrency_limit::{Aimd, LimitAlgorithm, Sample};
/// use std::time::Duration;
/// use tokio::time::Instant;
///
/// let mut aimd = Aimd::new().initial_limit(10).latency_threshold(Duration::from_millis(100));
/// let now = Instant::now();
/// let fast = Sample::new(Duration::from_millis(20), 10, false, now);
/// for _ in 0..9 {
///     assert_eq!(aimd.update(fast), 10);
/// }
/// assert_eq!(aimd.update(fast), 11); // a round of 10 good requests
/// let slow = Sample::new(Duration::from_millis(150), 10, false, now);
/// assert_eq!(aimd.update(slow), 9); // floor(11 * 0.9)
/// ```
#[derive(Debug, Clone)]
pub struct Aimd {
    initial_limit: u32,
    min_limit: u32,
    max_limit: u32,
    backoff_ratio: f64,
    latency_threshold: Duration,
    limit: u32,
    /// Good requests since the limit last moved.
    good: u32,
    last_decrease: Option<Instant>,
}

impl Default for Aimd {
    fn default() -> Self {
        Self::new()
    }
}

impl Aimd {
    /// The defaults (see the type's documentation).
    pub fn new() -> Self {
        Self {
            initial_limit: 20,
            min_limit: 1,
            max_limit: 1000,
            backoff_ratio: 0.9,
            latency_threshold: Duration::from_secs(5),
            limit: 20,
            good: 0,
            last_decrease: None,
        }
    }

    /// The limit to start at, within `min_limit..=max_limit`.
    pub fn initial_limit(mut self, limit: u32) -> Self {
        self.initial_limit = limit;
        self.limit = limit;
        self
    }

    /// The lowest the limit goes: at least 1.
    pub fn min_limit(mut self, limit: u32) -> Self {
        self.min_limit = limit;
        self
    }

    /// The highest the limit goes: at most 2^31 - 1.
    pub fn max_limit(mut self, limit: u32) -> Self {
        self.max_limit = limit;
        self
    }

    /// What a decrease multiplies the limit by, in `[0.5, 1)`.
    pub fn backoff_ratio(mut self, ratio: f64) -> Self {
        self.backoff_ratio = ratio;
        self
    }

    /// A request slower than this is congested: above zero, at most a day.
    pub fn latency_threshold(mut self, threshold: Duration) -> Self {
        self.latency_threshold = threshold;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), &'static str> {
        check_limits(self.min_limit, self.initial_limit, self.max_limit)?;
        if !(0.5..1.0).contains(&self.backoff_ratio) {
            return Err("backoff_ratio must be in [0.5, 1)");
        }
        check_duration(
            self.latency_threshold,
            "latency_threshold must be above zero and at most a day",
        )
    }

    #[cfg(any(test, feature = "serde"))]
    /// Takes `new`'s settings and keeps the state: the limit in force, clamped into the
    /// new bounds, the round of good requests and the last decrease. (`initial_limit`
    /// only matters at the start.) Returns the limit.
    pub(crate) fn reconfigure(&mut self, new: &Self) -> u32 {
        self.initial_limit = new.initial_limit;
        self.min_limit = new.min_limit;
        self.max_limit = new.max_limit;
        self.backoff_ratio = new.backoff_ratio;
        self.latency_threshold = new.latency_threshold;
        self.limit = self.limit.clamp(self.min_limit, self.max_limit);
        self.limit
    }

    /// `(min_limit, max_limit)`.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn bounds(&self) -> (u32, u32) {
        (self.min_limit, self.max_limit)
    }

    fn decrease(&mut self, now: Instant) {
        // `limit * ratio` is below 2^31 and exact enough in an f64; the cast saturates.
        let reduced = (f64::from(self.limit) * self.backoff_ratio).floor() as u32;
        self.limit = reduced.max(self.min_limit);
        self.good = 0;
        self.last_decrease = Some(now);
    }
}

impl LimitAlgorithm for Aimd {
    fn starting_limit(&self) -> u32 {
        self.initial_limit
    }

    fn update(&mut self, sample: Sample) -> u32 {
        if sample.congested || sample.rtt > self.latency_threshold {
            let ran_under_old_limit = self
                .last_decrease
                .is_some_and(|decreased| sample.started() < decreased);
            if !ran_under_old_limit {
                self.decrease(sample.now);
            }
        } else if sample.in_flight.saturating_mul(2) >= self.limit {
            self.good += 1;
            if self.good >= self.limit {
                self.limit = self.limit.saturating_add(1).min(self.max_limit);
                self.good = 0;
            }
        }
        self.limit
    }
}
