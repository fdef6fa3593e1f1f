//! The delay schedule between attempts: a sans-io core, driven by the retry future and
//! by the property tests.

use std::time::Duration;

/// How long to wait before each retry.
///
/// The schedule grows with the retry number (1 for the first retry), is capped by
/// [`max`](Backoff::max), and is then spread by a [`Jitter`]. Every delay lies within
/// the bounds documented on each [`Jitter`] variant and is never above the cap.
///
/// ```
/// use palisade::retry::{Backoff, Jitter};
/// use std::time::Duration;
///
/// let backoff = Backoff::exponential(Duration::from_millis(100))
///     .multiplier(2.0)
///     .max(Duration::from_secs(1))
///     .jitter(Jitter::None);
/// let delays: Vec<_> = (1..=5).map(|retry| backoff.delay(retry, Duration::ZERO, 0)).collect();
/// assert_eq!(delays, [100, 200, 400, 800, 1000].map(Duration::from_millis));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    growth: Growth,
    base: Duration,
    max: Option<Duration>,
    jitter: Jitter,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Growth {
    Constant,
    Linear,
    Exponential { multiplier: f64 },
}

/// How a delay is spread at random, so that clients that failed together do not retry
/// together. `d` is the capped schedule delay of this retry, `r` a uniform random number
/// in `[0, 1)`.
///
/// The first four are those of the AWS analysis "Exponential Backoff And Jitter";
/// [`Proportional`](Jitter::Proportional) is the `±x` spread gRPC uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Jitter {
    /// Exactly `d`.
    None,
    /// `r · d`: anywhere in `[0, d)`. Spreads retries the most.
    Full,
    /// `d/2 + r · d/2`: in `[d/2, d)`, never much sooner than the schedule.
    Equal,
    /// `base + r · (3 · previous − base)`, capped: in `[base, cap]`, where `previous`
    /// is the previous delay, or `base` before the first retry (so the first retry is
    /// in `[base, 3 · base]`). Grows from the previous delay rather than from the retry
    /// number, so the backoff's growth is ignored.
    Decorrelated,
    /// `d · (1 ± x)`, capped: in `[d · (1 − x), min(cap, d · (1 + x))]`. `x` must be in
    /// `[0, 1]`.
    Proportional(f64),
}

/// An exponential [`Backoff`] whose growth is being set: what [`Backoff::exponential`]
/// returns. The multiplier exists only here, so it cannot be set, and silently ignored,
/// on a constant or linear backoff:
///
/// ```compile_fail
/// # use palisade::retry::Backoff;
/// # use std::time::Duration;
/// let linear = Backoff::linear(Duration::from_millis(100)).multiplier(3.0);
/// ```
///
/// [`max`](ExponentialBackoff::max) and [`jitter`](ExponentialBackoff::jitter) finish
/// it into a `Backoff`, and `From` converts it as it is; the layer's
/// [`backoff`](super::RetryLayerBuilder::backoff) takes either.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExponentialBackoff {
    base: Duration,
    multiplier: f64,
}

impl ExponentialBackoff {
    /// Sets the growth factor (at least 1; `build()` rejects less, and NaN).
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// Caps every delay, jitter included; see [`Backoff::max`].
    pub fn max(self, cap: Duration) -> Backoff {
        Backoff::from(self).max(cap)
    }

    /// Sets the jitter; see [`Backoff::jitter`].
    pub fn jitter(self, jitter: Jitter) -> Backoff {
        Backoff::from(self).jitter(jitter)
    }
}

impl From<ExponentialBackoff> for Backoff {
    fn from(exponential: ExponentialBackoff) -> Self {
        Self::with_growth(
            Growth::Exponential {
                multiplier: exponential.multiplier,
            },
            exponential.base,
        )
    }
}

impl Backoff {
    /// The same delay before every retry.
    pub fn constant(delay: Duration) -> Self {
        Self::with_growth(Growth::Constant, delay)
    }

    /// `base`, `2 · base`, `3 · base`, … before the first, second, third retry.
    pub fn linear(base: Duration) -> Self {
        Self::with_growth(Growth::Linear, base)
    }

    /// `base`, `base · m`, `base · m²`, … with the
    /// [`multiplier`](ExponentialBackoff::multiplier) `m` (2 unless set).
    ///
    /// The multiplier is set on the [`ExponentialBackoff`] this returns, before
    /// [`max`](ExponentialBackoff::max) or [`jitter`](ExponentialBackoff::jitter) make
    /// it a `Backoff`; it converts with `.into()` where it is used as it is.
    pub fn exponential(base: Duration) -> ExponentialBackoff {
        ExponentialBackoff {
            base,
            multiplier: 2.0,
        }
    }

    fn with_growth(growth: Growth, base: Duration) -> Self {
        Self {
            growth,
            base,
            max: None,
            jitter: Jitter::None,
        }
    }

    /// Caps every delay, jitter included. Uncapped unless set; the cap must not be
    /// below the base.
    pub fn max(mut self, cap: Duration) -> Self {
        self.max = Some(cap);
        self
    }

    /// Sets the jitter ([`Jitter::None`] unless set).
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The first delay of the schedule.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The cap, [`Duration::MAX`] when none was set.
    pub fn cap(&self) -> Duration {
        self.max.unwrap_or(Duration::MAX)
    }

    pub(crate) fn validate(&self) -> Result<(), super::RetryConfigError> {
        use super::RetryConfigError;
        if let Growth::Exponential { multiplier } = self.growth {
            // NaN fails the range check too.
            if !(1.0..f64::INFINITY).contains(&multiplier) {
                return Err(RetryConfigError::Multiplier(multiplier));
            }
        }
        if self.cap() < self.base {
            return Err(RetryConfigError::CapBelowBase {
                base: self.base,
                cap: self.cap(),
            });
        }
        if let Jitter::Proportional(spread) = self.jitter
            && !(0.0..=1.0).contains(&spread)
        {
            return Err(RetryConfigError::Jitter(spread));
        }
        Ok(())
    }

    /// The schedule delay before retry number `retry` (1 for the first retry), capped,
    /// before jitter. A delay too large to represent saturates at the cap
    /// ([`Duration::MAX`] uncapped); a zero base stays zero however many retries.
    pub fn scheduled(&self, retry: u32) -> Duration {
        let retry = retry.max(1);
        let delay = match self.growth {
            Growth::Constant => Some(self.base),
            Growth::Linear => self.base.checked_mul(retry),
            // 0 · ∞ is NaN, which would read as an overflow: a zero base stays zero.
            Growth::Exponential { .. } if self.base.is_zero() => Some(Duration::ZERO),
            Growth::Exponential { multiplier } => {
                let exponent = i32::try_from(retry - 1).unwrap_or(i32::MAX);
                Duration::try_from_secs_f64(self.base.as_secs_f64() * multiplier.powi(exponent))
                    .ok()
            }
        };
        // An overflow is above any cap.
        delay.map_or(self.cap(), |delay| delay.min(self.cap()))
    }

    /// The delay before retry number `retry`, jitter included.
    ///
    /// `previous` is the delay before the previous retry (only
    /// [`Jitter::Decorrelated`] uses it; pass [`Duration::ZERO`] before the first, which
    /// reads as `base`).
    /// `random` is a uniformly random `u64`: the layer draws one per retry, tests pass
    /// their own.
    pub fn delay(&self, retry: u32, previous: Duration, random: u64) -> Duration {
        let unit = unit_interval(random);
        let scheduled = self.scheduled(retry);
        let delay = match self.jitter {
            Jitter::None => scheduled,
            Jitter::Full => scheduled.mul_f64(unit),
            Jitter::Equal => scheduled / 2 + (scheduled / 2).mul_f64(unit),
            Jitter::Decorrelated => {
                // AWS starts from `sleep = base`: the first retry is spread too.
                let ceiling = previous.max(self.base).saturating_mul(3);
                self.base
                    .saturating_add(ceiling.saturating_sub(self.base).mul_f64(unit))
            }
            Jitter::Proportional(spread) => {
                let factor = 1.0 - spread + 2.0 * spread * unit;
                Duration::try_from_secs_f64(scheduled.as_secs_f64() * factor)
                    .unwrap_or(Duration::MAX)
            }
        };
        delay.min(self.cap())
    }
}

/// Maps a random `u64` onto `[0, 1)` with the 53 bits a float holds.
fn unit_interval(random: u64) -> f64 {
    (random >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn unit_interval_spans_zero_to_one() {
        assert_eq!(unit_interval(0), 0.0);
        assert!(unit_interval(u64::MAX) < 1.0);
        assert!(unit_interval(u64::MAX) > 0.999_999);
    }

    #[test]
    fn huge_exponents_saturate_at_the_cap() {
        let backoff = Backoff::exponential(Duration::from_secs(1)).max(Duration::from_secs(60));
        assert_eq!(backoff.scheduled(u32::MAX), Duration::from_secs(60));
        let uncapped = Backoff::from(Backoff::exponential(Duration::from_secs(1)).multiplier(10.0));
        assert_eq!(uncapped.delay(500, Duration::ZERO, u64::MAX), Duration::MAX);
    }
}
