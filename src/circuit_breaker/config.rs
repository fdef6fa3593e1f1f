//! The breaker's settings: the sliding window, slow calls and the open-time schedule.

use super::error::CircuitBreakerConfigError;
use super::window::{MAX_BUCKETS, MAX_COUNT_WINDOW, MIN_BUCKET_WIDTH};
use std::time::Duration;

/// Which recent calls the closed breaker judges the dependency by.
///
/// ```
/// use palisade::circuit_breaker::SlidingWindow;
/// use std::time::Duration;
///
/// let last_hundred_calls = SlidingWindow::count(100);
/// let last_minute = SlidingWindow::time(Duration::from_secs(60));
/// let last_minute_by_the_second = SlidingWindow::time(Duration::from_secs(60)).buckets(60);
/// # let _ = (last_hundred_calls, last_minute, last_minute_by_the_second);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlidingWindow {
    pub(crate) kind: WindowKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WindowKind {
    Count(usize),
    Time { span: Duration, buckets: u32 },
}

impl SlidingWindow {
    /// The last `calls` outcomes, exactly: a ring where each call replaces the oldest.
    /// At most 1 048 575 (4 MiB of slots, allocated at build time); more is a
    /// [`CircuitBreakerConfigError::WindowTooLarge`].
    pub const fn count(calls: usize) -> Self {
        Self {
            kind: WindowKind::Count(calls),
        }
    }

    /// The calls of the last `span`, kept in 10 buckets: the window slides by a tenth
    /// of `span` at a time. Each bucket must span at least a millisecond, and `span`
    /// at most 100 years.
    pub const fn time(span: Duration) -> Self {
        Self {
            kind: WindowKind::Time { span, buckets: 10 },
        }
    }

    /// Splits a time window into `buckets` buckets instead of 10: more buckets slide
    /// more smoothly and cost a few more loads per call. At most 1024 (more is a
    /// [`CircuitBreakerConfigError::TooManyBuckets`]). No effect on a count window.
    pub const fn buckets(self, buckets: u32) -> Self {
        match self.kind {
            WindowKind::Time { span, .. } => Self {
                kind: WindowKind::Time { span, buckets },
            },
            WindowKind::Count(_) => self,
        }
    }

    /// The most calls this window can hold, if it is bounded by count.
    fn capacity(&self) -> Option<usize> {
        match self.kind {
            WindowKind::Count(size) => Some(size),
            WindowKind::Time { .. } => None,
        }
    }

    fn validate(&self) -> Result<(), CircuitBreakerConfigError> {
        match self.kind {
            WindowKind::Count(0) => Err(CircuitBreakerConfigError::EmptyWindow),
            WindowKind::Count(size) if size > MAX_COUNT_WINDOW => {
                Err(CircuitBreakerConfigError::WindowTooLarge {
                    size,
                    max: MAX_COUNT_WINDOW,
                })
            }
            WindowKind::Count(_) => Ok(()),
            WindowKind::Time { buckets: 0, .. } => Err(CircuitBreakerConfigError::NoBuckets),
            WindowKind::Time { buckets, .. } if buckets > MAX_BUCKETS => {
                Err(CircuitBreakerConfigError::TooManyBuckets {
                    buckets,
                    max: MAX_BUCKETS,
                })
            }
            WindowKind::Time { span, .. } if span > MAX_DURATION => {
                Err(CircuitBreakerConfigError::WindowSpanTooLong {
                    span,
                    max: MAX_DURATION,
                })
            }
            WindowKind::Time { span, buckets } if span / buckets < MIN_BUCKET_WIDTH => {
                Err(CircuitBreakerConfigError::BucketTooShort { span, buckets })
            }
            WindowKind::Time { .. } => Ok(()),
        }
    }
}

/// How long the breaker stays open after it trips.
///
/// A fixed time ([`CircuitBreakerLayerBuilder::open_for`]), or one that grows with each
/// consecutive trip, that is each time half-open probes fail and the breaker opens
/// again: the `k`-th consecutive trip opens it for `initial × multiplierᵏ`, at most
/// `max`, shortened by a random fraction of at most `jitter` so that a fleet of
/// breakers does not probe a recovering dependency in lockstep. Closing the breaker
/// starts the count again.
///
/// ```
/// use palisade::circuit_breaker::OpenBackoff;
/// use std::time::Duration;
///
/// // 5 s, 10 s, 20 s, 40 s, 60 s, 60 s... each up to 20% shorter.
/// let backoff = OpenBackoff::exponential(Duration::from_secs(5))
///     .max(Duration::from_secs(60))
///     .jitter(0.2);
/// # let _ = backoff;
/// ```
///
/// [`CircuitBreakerLayerBuilder::open_for`]: super::CircuitBreakerLayerBuilder::open_for
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpenBackoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
}

impl OpenBackoff {
    /// Starts at `initial` and doubles on each consecutive trip, up to 32 times
    /// `initial` (at most 100 years), without jitter.
    pub fn exponential(initial: Duration) -> Self {
        Self {
            initial,
            max: initial.saturating_mul(32).min(MAX_DURATION),
            multiplier: 2.0,
            jitter: 0.0,
        }
    }

    /// Always `open`: what [`open_for`](super::CircuitBreakerLayerBuilder::open_for)
    /// sets.
    pub(crate) fn fixed(open: Duration) -> Self {
        Self {
            initial: open,
            max: open,
            multiplier: 1.0,
            jitter: 0.0,
        }
    }

    /// The longest the breaker stays open: at most 100 years.
    pub fn max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    /// The growth factor per consecutive trip (at least 1).
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// Shortens each open time by a random fraction in `[0, jitter]` (`jitter` in
    /// `[0, 1)`).
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// The open time before jitter for the `trip`-th consecutive trip (0 = first).
    /// Computed in whole nanoseconds so that integer multiples stay exact.
    pub(crate) fn nominal(&self, trip: u32) -> Duration {
        let factor = self.multiplier.powi(trip.min(i32::MAX as u32) as i32);
        let nominal = (self.initial.as_nanos() as f64 * factor).round();
        if nominal >= self.max.as_nanos() as f64 {
            self.max
        } else {
            Duration::from_nanos(nominal as u64)
        }
    }

    /// The open time for the `trip`-th consecutive trip, given a uniform random number
    /// in `[0, 1)`.
    pub(crate) fn duration(&self, trip: u32, random: f64) -> Duration {
        let nominal = self.nominal(trip);
        if self.jitter == 0.0 {
            return nominal;
        }
        let shortened = nominal.as_nanos() as f64 * (1.0 - self.jitter * random);
        Duration::from_nanos(shortened as u64)
    }

    /// The shortest open time: what a forced-open breaker suggests as `retry_after`.
    pub(crate) fn initial(&self) -> Duration {
        self.initial
    }

    fn validate(&self) -> Result<(), CircuitBreakerConfigError> {
        let too_long = |duration| CircuitBreakerConfigError::OpenDurationTooLong {
            duration,
            max: MAX_DURATION,
        };
        if self.initial.is_zero() {
            Err(CircuitBreakerConfigError::ZeroOpenDuration)
        } else if self.initial > MAX_DURATION {
            Err(too_long(self.initial))
        } else if self.max > MAX_DURATION {
            Err(too_long(self.max))
        } else if self.max < self.initial {
            Err(CircuitBreakerConfigError::MaxOpenBelowInitial {
                initial: self.initial,
                max: self.max,
            })
        } else if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            Err(CircuitBreakerConfigError::Multiplier(self.multiplier))
        } else if !(0.0..1.0).contains(&self.jitter) {
            Err(CircuitBreakerConfigError::Jitter(self.jitter))
        } else {
            Ok(())
        }
    }
}

/// Slow-call detection: a call that takes longer than `threshold` is slow, whatever
/// its outcome, and the breaker trips when the slow rate reaches `rate`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SlowCalls {
    pub(crate) threshold: Duration,
    pub(crate) rate: f64,
}

/// The longest open time and time-window span. Bounded so that open times and bucket
/// widths stay exact in 64-bit nanoseconds, and the instant the breaker opens until
/// fits the state word's milliseconds with centuries to spare for the process's uptime.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// The most half-open probes (the probe counters are 12 bits wide).
pub(crate) const MAX_PROBES: u32 = (1 << 12) - 1;

/// The `minimum_calls` of a breaker that does not set it, for a window that can hold
/// that many calls.
const DEFAULT_MINIMUM_CALLS: u64 = 20;

/// A validated configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Config {
    pub(crate) failure_rate: f64,
    pub(crate) minimum_calls: u64,
    pub(crate) window: SlidingWindow,
    pub(crate) slow: Option<SlowCalls>,
    pub(crate) open: OpenBackoff,
    pub(crate) probes: u32,
    /// Shadow mode: a refused call is sent, unrecorded, and counted.
    pub(crate) shadow: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            failure_rate: 0.5,
            minimum_calls: DEFAULT_MINIMUM_CALLS,
            window: SlidingWindow::count(100),
            slow: None,
            open: OpenBackoff::fixed(Duration::from_secs(30)),
            probes: 5,
            shadow: false,
        }
    }
}

impl Config {
    /// The default `minimum_calls`, fitted to the window: a value the user never set
    /// must not make the window they chose invalid. Never 0, so that an empty window is
    /// reported as such.
    pub(crate) fn default_minimum_calls(&self) -> u64 {
        self.window
            .capacity()
            .map_or(DEFAULT_MINIMUM_CALLS, |size| {
                DEFAULT_MINIMUM_CALLS.min(size as u64).max(1)
            })
    }

    pub(crate) fn validate(self) -> Result<Self, CircuitBreakerConfigError> {
        check_rate(self.failure_rate).map_err(CircuitBreakerConfigError::FailureRate)?;
        if let Some(slow) = self.slow {
            check_rate(slow.rate).map_err(CircuitBreakerConfigError::SlowCallRate)?;
            if slow.threshold.is_zero() {
                return Err(CircuitBreakerConfigError::ZeroSlowCallDuration);
            }
        }
        if self.minimum_calls == 0 {
            return Err(CircuitBreakerConfigError::ZeroMinimumCalls);
        }
        self.window.validate()?;
        if let Some(size) = self.window.capacity()
            && self.minimum_calls > size as u64
        {
            return Err(CircuitBreakerConfigError::MinimumCallsAboveWindow {
                minimum_calls: self.minimum_calls,
                window: size,
            });
        }
        self.open.validate()?;
        if self.probes == 0 || self.probes > MAX_PROBES {
            return Err(CircuitBreakerConfigError::Probes {
                probes: self.probes,
                max: MAX_PROBES,
            });
        }
        Ok(self)
    }
}

fn check_rate(rate: f64) -> Result<(), f64> {
    if rate > 0.0 && rate <= 1.0 {
        Ok(())
    } else {
        Err(rate)
    }
}
