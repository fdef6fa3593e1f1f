//! Envoy's adaptive-concurrency gradient controller.

use std::time::Duration;
use tokio::time::Instant;

use super::{LimitAlgorithm, Sample, check_duration, check_limits};

/// The most latencies one window keeps: enough for a percentile, and a bound that no
/// setting can raise.
const MAX_SAMPLES: usize = 1024;

/// Consecutive windows at the minimum limit after which the minimum latency is measured
/// again (it may have been measured too low).
const MIN_LIMIT_WINDOWS: u32 = 5;

/// Envoy's adaptive-concurrency gradient controller: the limit follows the ratio of the
/// backend's latency without queueing (the minimum RTT, measured now and then at a low
/// limit) to its latency now.
///
/// - **Minimum RTT.** At the start, and every `min_rtt_interval`, the limit drops to
///   `min_limit` until `min_rtt_requests` requests admitted since then have finished;
///   the `percentile` of their latencies is the minimum RTT. The limit then goes back to
///   where it was (at the start: to `initial_limit`). So the backend is measured without
///   a queue even when it has been overloaded for a long time.
/// - **Every `interval`**, from the `percentile` of the latencies of the requests
///   finished in it (`sample_rtt`):
///   `gradient = clamp(min_rtt * (1 + buffer) / sample_rtt, 0.5, 2)`,
///   `limit = floor(limit * gradient + sqrt(limit * gradient))`, within
///   `min_limit..=max_limit`. Below the buffered minimum the limit grows (at most
///   doubling), above it it shrinks (at most halving); `sqrt` is headroom for bursts.
///   After five windows in a row at `min_limit` the minimum RTT is measured again.
/// - **Congestion.** A [congested](Sample::congested) request (a failure, a timeout, a
///   drop) counts as an endlessly slow one: when more than `1 - percentile` of a
///   window's requests are congested the limit halves. Congested requests are left out
///   of the minimum RTT.
///
/// Defaults (Envoy's): `min_limit` 3, `initial_limit` 3, `max_limit` 1000, `interval`
/// 100 ms, `percentile` 0.5, `buffer` 0.25, `min_rtt_interval` 60 s,
/// `min_rtt_requests` 50. Unlike Envoy, the window ends at the first request that
/// finishes after `interval` (no timer), the minimum-RTT interval has no jitter, and
/// at most 1024 latencies count per window. With the buffer `b` the limit settles where
/// the backend's latency is about `1 + b` times its minimum, plus the headroom.
///
/// ```
/// use palisade::concurrency_limit::{Gradient, LimitAlgorithm, Sample};
/// use std::time::Duration;
/// use tokio::time::Instant;
///
/// let ms = Duration::from_millis;
/// let mut gradient = Gradient::new().initial_limit(40).min_rtt_requests(2);
/// let start = Instant::now();
/// // The minimum RTT is measured first, at the minimum limit.
/// assert_eq!(gradient.starting_limit(), 3);
/// gradient.update(Sample::new(ms(10), 1, false, start + ms(10)));
/// assert_eq!(gradient.update(Sample::new(ms(10), 2, false, start + ms(10))), 40);
/// // A window later the latency is twice the minimum: the limit shrinks.
/// let limit = gradient.update(Sample::new(ms(20), 40, false, start + ms(120)));
/// assert_eq!(limit, 30); // 40 * 12.5 / 20 = 25, + sqrt(25)
/// ```
#[derive(Debug, Clone)]
pub struct Gradient {
    min_limit: u32,
    initial_limit: u32,
    max_limit: u32,
    interval: Duration,
    percentile: f64,
    buffer: f64,
    min_rtt_interval: Duration,
    min_rtt_requests: u32,
    limit: u32,
    phase: Phase,
    samples: Vec<Duration>,
    windows_at_min: u32,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Measuring the minimum RTT at the minimum limit, from requests admitted since
    /// `since`; then back to `restore`.
    Measuring {
        since: Option<Instant>,
        restore: u32,
    },
    Tracking {
        min_rtt: Duration,
        window_end: Instant,
        next_measurement: Instant,
    },
}

impl Default for Gradient {
    fn default() -> Self {
        Self::new()
    }
}

impl Gradient {
    /// The defaults (see the type's documentation).
    pub fn new() -> Self {
        Self {
            min_limit: 3,
            initial_limit: 3,
            max_limit: 1000,
            interval: Duration::from_millis(100),
            percentile: 0.5,
            buffer: 0.25,
            min_rtt_interval: Duration::from_secs(60),
            min_rtt_requests: 50,
            limit: 3,
            phase: Phase::Measuring {
                since: None,
                restore: 3,
            },
            samples: Vec::new(),
            windows_at_min: 0,
        }
    }

    /// The limit once the first minimum RTT is measured, within
    /// `min_limit..=max_limit`.
    pub fn initial_limit(mut self, limit: u32) -> Self {
        self.initial_limit = limit;
        self.phase = Phase::Measuring {
            since: None,
            restore: limit,
        };
        self
    }

    /// The lowest limit, and the limit while the minimum RTT is measured: at least 1.
    pub fn min_limit(mut self, limit: u32) -> Self {
        self.min_limit = limit;
        self.limit = limit;
        self
    }

    /// The highest limit: at most 2^31 - 1.
    pub fn max_limit(mut self, limit: u32) -> Self {
        self.max_limit = limit;
        self
    }

    /// How often the limit moves: above zero, at most a day.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Which percentile of a window's latencies counts, in `(0, 1]`.
    pub fn percentile(mut self, percentile: f64) -> Self {
        self.percentile = percentile;
        self
    }

    /// How much above the minimum RTT the latency may rise before the limit shrinks, as
    /// a fraction of it, in `[0, 10]`.
    pub fn buffer(mut self, buffer: f64) -> Self {
        self.buffer = buffer;
        self
    }

    /// How often the minimum RTT is measured again: above zero, at most a day.
    pub fn min_rtt_interval(mut self, interval: Duration) -> Self {
        self.min_rtt_interval = interval;
        self
    }

    /// How many requests a minimum-RTT measurement takes, in `1..=1024`.
    pub fn min_rtt_requests(mut self, requests: u32) -> Self {
        self.min_rtt_requests = requests;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), &'static str> {
        check_limits(self.min_limit, self.initial_limit, self.max_limit)?;
        check_duration(
            self.interval,
            "interval must be above zero and at most a day",
        )?;
        check_duration(
            self.min_rtt_interval,
            "min_rtt_interval must be above zero and at most a day",
        )?;
        if !(self.percentile > 0.0 && self.percentile <= 1.0) {
            return Err("percentile must be in (0, 1]");
        }
        if !(0.0..=10.0).contains(&self.buffer) {
            return Err("buffer must be in [0, 10]");
        }
        if self.min_rtt_requests == 0 || self.min_rtt_requests as usize > MAX_SAMPLES {
            return Err("min_rtt_requests must be in 1..=1024");
        }
        Ok(())
    }

    #[cfg(any(test, feature = "serde"))]
    /// Takes `new`'s settings and keeps the state: the minimum RTT, the window and the
    /// latencies gathered. The limit in force is clamped into the new bounds (while the
    /// minimum RTT is measured, it is the new `min_limit`, and the limit to go back to
    /// is clamped); the current window and the next measurement end on the new
    /// `interval` and `min_rtt_interval`, counted from when they began. (`initial_limit`
    /// only matters at the start.) Returns the limit.
    pub(crate) fn reconfigure(&mut self, new: &Self) -> u32 {
        let shift = |at: Instant, old: Duration, new: Duration| {
            at.checked_sub(old)
                .and_then(|began| began.checked_add(new))
                .unwrap_or(at)
        };
        let (old_interval, old_min_rtt_interval) = (self.interval, self.min_rtt_interval);
        self.min_limit = new.min_limit;
        self.initial_limit = new.initial_limit;
        self.max_limit = new.max_limit;
        self.interval = new.interval;
        self.percentile = new.percentile;
        self.buffer = new.buffer;
        self.min_rtt_interval = new.min_rtt_interval;
        self.min_rtt_requests = new.min_rtt_requests;
        let (min, max) = (self.min_limit, self.max_limit);
        match &mut self.phase {
            Phase::Measuring { restore, .. } => {
                *restore = (*restore).clamp(min, max);
                self.limit = min;
            }
            Phase::Tracking {
                window_end,
                next_measurement,
                ..
            } => {
                *window_end = shift(*window_end, old_interval, self.interval);
                *next_measurement = shift(
                    *next_measurement,
                    old_min_rtt_interval,
                    self.min_rtt_interval,
                );
                self.limit = self.limit.clamp(min, max);
            }
        }
        if self.limit == min {
            self.windows_at_min = self.windows_at_min.min(MIN_LIMIT_WINDOWS - 1);
        } else {
            self.windows_at_min = 0;
        }
        self.limit
    }

    /// `(min_limit, max_limit)`.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn bounds(&self) -> (u32, u32) {
        (self.min_limit, self.max_limit)
    }

    /// Whether the minimum RTT is being measured.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn is_measuring(&self) -> bool {
        matches!(self.phase, Phase::Measuring { .. })
    }

    fn measure(&mut self, now: Instant) {
        self.phase = Phase::Measuring {
            since: Some(now),
            restore: self.limit,
        };
        self.limit = self.min_limit;
        self.samples.clear();
        self.windows_at_min = 0;
    }

    fn percentile_of_samples(&mut self) -> Duration {
        self.samples.sort_unstable();
        let count = self.samples.len() as f64;
        // ceil(p * n) - 1, within the samples: the nearest-rank percentile.
        let rank = ((self.percentile * count).ceil() as usize).clamp(1, self.samples.len());
        self.samples[rank - 1]
    }

    fn next_limit(&self, min_rtt: Duration, sample_rtt: Duration) -> u32 {
        let buffered = min_rtt.as_secs_f64() * (1.0 + self.buffer);
        let sample = sample_rtt.as_secs_f64();
        let gradient = if sample > 0.0 {
            (buffered / sample).clamp(0.5, 2.0)
        } else {
            2.0
        };
        let scaled = f64::from(self.limit) * gradient;
        // A hair above, so that a whole number computed a rounding error below itself
        // (`40 * 0.625`) stays whole. The cast saturates.
        let limit = (scaled + scaled.sqrt() + 1e-9).floor() as u32;
        limit.clamp(self.min_limit, self.max_limit)
    }

    fn keep(&mut self, latency: Duration) {
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(latency);
        }
    }
}

impl LimitAlgorithm for Gradient {
    fn starting_limit(&self) -> u32 {
        self.min_limit
    }

    fn update(&mut self, sample: Sample) -> u32 {
        match self.phase {
            Phase::Measuring { since, restore } => {
                let admitted_since = since.is_none_or(|since| sample.started() >= since);
                if sample.congested || !admitted_since {
                    return self.limit;
                }
                self.keep(sample.rtt);
                if self.samples.len() >= self.min_rtt_requests as usize {
                    let min_rtt = self.percentile_of_samples();
                    self.samples.clear();
                    self.limit = restore;
                    self.phase = Phase::Tracking {
                        min_rtt,
                        window_end: sample.now + self.interval,
                        next_measurement: sample.now + self.min_rtt_interval,
                    };
                }
            }
            Phase::Tracking {
                min_rtt,
                window_end,
                next_measurement,
            } => {
                if sample.now >= next_measurement {
                    self.measure(sample.now);
                    return self.limit;
                }
                self.keep(if sample.congested {
                    Duration::MAX
                } else {
                    sample.rtt
                });
                if sample.now >= window_end {
                    let sample_rtt = self.percentile_of_samples();
                    self.samples.clear();
                    self.limit = self.next_limit(min_rtt, sample_rtt);
                    self.phase = Phase::Tracking {
                        min_rtt,
                        window_end: sample.now + self.interval,
                        next_measurement,
                    };
                    self.windows_at_min = if self.limit == self.min_limit {
                        self.windows_at_min + 1
                    } else {
                        0
                    };
                    if self.windows_at_min >= MIN_LIMIT_WINDOWS {
                        self.measure(sample.now);
                    }
                }
            }
        }
        self.limit
    }
}
