//! The circuit breaker's configuration.

use super::KeyedConfig;
use super::error::{ConfigError, NotReloadable, PolicyMismatch};
use crate::circuit_breaker::{
    CircuitBreakerConfigError, CircuitBreakerLayer, CircuitBreakerLayerBuilder, Config,
    DEFAULT_MAX_KEYS, Keyed, KeyedCircuitBreakerLayer, OpenBackoff, SlidingWindow,
};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::hash::Hash;
use std::time::Duration;

/// A [`CircuitBreakerLayer`] as data: every field left out keeps the builder's default
/// (a 50% failure rate over the last 100 calls, at least 20 of them, 30 s open, 5
/// probes).
///
/// ```toml
/// failure_rate_threshold = 0.5
/// minimum_calls = 20
/// sliding_window = { count = 100 }          # or { time = "60s", buckets = 60 }
/// slow_calls = { threshold = "2s", rate = 0.8 }
/// open_for = "30s"                          # or open_backoff = { initial = "5s", max = "60s", multiplier = 2.0, jitter = 0.2 }
/// half_open_probes = 5
/// keyed = { max_keys = 1000 }               # one breaker per key (upstream, route, ...)
/// shadow = true                            # decide and count, reject nothing (default false)
/// ```
///
/// How results are classified is code, not data: build with
/// [`build_from`](Self::build_from) and a builder that has its
/// [`classify`](CircuitBreakerLayerBuilder::classify). A configuration with a `keyed`
/// section takes its key extractor in code too
/// ([`build_keyed`](Self::build_keyed)); [`build`](Self::build) refuses it, so that a
/// file and the code that reads it cannot disagree about it.
///
/// A breaker takes a new one at run time through its handle
/// ([`CircuitBreakerHandle::reload`](crate::circuit_breaker::CircuitBreakerHandle::reload)),
/// every field but `keyed`'s.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CircuitBreakerConfig {
    /// Trips when the failure rate reaches this, in `(0, 1]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate_threshold: Option<f64>,
    /// No verdict before the window holds this many calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_calls: Option<u64>,
    /// Which recent calls count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<SlidingWindowConfig>,
    /// Slow-call detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_calls: Option<SlowCallsConfig>,
    /// A fixed open time (excludes `open_backoff`).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub open_for: Option<Duration>,
    /// An open time growing with each consecutive trip (excludes `open_for`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_backoff: Option<OpenBackoffConfig>,
    /// Probe calls let through when half-open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half_open_probes: Option<u32>,
    /// One breaker per key, at most `max_keys` of them (the extractor is code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyed: Option<KeyedConfig>,
    /// [Shadow mode](crate::circuit_breaker::CircuitBreakerLayerBuilder::shadow): decide and count, refuse
    /// nothing (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<bool>,
}

/// [`SlidingWindow`] as data: `{ count = 100 }` or `{ time = "60s" }`, optionally with
/// `buckets` (default 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WindowFields", into = "WindowFields")]
pub enum SlidingWindowConfig {
    /// The last `n` calls.
    Count(usize),
    /// The calls of the last `span`.
    Time {
        /// How far back.
        span: Duration,
        /// How many buckets (default 10).
        buckets: Option<u32>,
    },
}

/// The window as it is written: exactly one of `count` and `time`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    count: Option<usize>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    time: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    buckets: Option<u32>,
}

impl TryFrom<WindowFields> for SlidingWindowConfig {
    type Error = &'static str;

    fn try_from(fields: WindowFields) -> Result<Self, Self::Error> {
        match fields {
            WindowFields {
                count: Some(count),
                time: None,
                buckets: None,
            } => Ok(Self::Count(count)),
            WindowFields {
                count: None,
                time: Some(span),
                buckets,
            } => Ok(Self::Time { span, buckets }),
            WindowFields {
                count: Some(_),
                time: None,
                buckets: Some(_),
            } => Err("`buckets` is for a time window only"),
            _ => Err("a sliding window has exactly one of `count` and `time`"),
        }
    }
}

impl From<SlidingWindowConfig> for WindowFields {
    fn from(window: SlidingWindowConfig) -> Self {
        match window {
            SlidingWindowConfig::Count(count) => Self {
                count: Some(count),
                time: None,
                buckets: None,
            },
            SlidingWindowConfig::Time { span, buckets } => Self {
                count: None,
                time: Some(span),
                buckets,
            },
        }
    }
}

impl From<SlidingWindowConfig> for SlidingWindow {
    fn from(window: SlidingWindowConfig) -> Self {
        match window {
            SlidingWindowConfig::Count(count) => SlidingWindow::count(count),
            SlidingWindowConfig::Time { span, buckets } => {
                let window = SlidingWindow::time(span);
                buckets.map_or(window, |buckets| window.buckets(buckets))
            }
        }
    }
}

/// Slow-call detection: calls slower than `threshold` are slow; trip at `rate` of them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowCallsConfig {
    /// A call slower than this is slow.
    #[serde(with = "humantime_serde")]
    pub threshold: Duration,
    /// Trips when the slow rate reaches this, in `(0, 1]`.
    pub rate: f64,
}

/// [`OpenBackoff`] as data: `initial` is required; `max` (default 32 × `initial`),
/// `multiplier` (default 2) and `jitter` (default 0) as [`OpenBackoff::exponential`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenBackoffConfig {
    /// The first open time.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// The longest open time.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub max: Option<Duration>,
    /// The growth per consecutive trip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
    /// Shortens each open time by up to this fraction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
}

impl From<OpenBackoffConfig> for OpenBackoff {
    fn from(config: OpenBackoffConfig) -> Self {
        let mut backoff = OpenBackoff::exponential(config.initial);
        if let Some(max) = config.max {
            backoff = backoff.max(max);
        }
        if let Some(multiplier) = config.multiplier {
            backoff = backoff.multiplier(multiplier);
        }
        if let Some(jitter) = config.jitter {
            backoff = backoff.jitter(jitter);
        }
        backoff
    }
}

impl CircuitBreakerConfig {
    /// Sets this configuration's fields on `builder` (global or keyed; the `keyed`
    /// section's `max_keys` goes through [`build_keyed_from`](Self::build_keyed_from)),
    /// leaving the others as they are.
    pub fn apply<C, X, K>(
        &self,
        builder: CircuitBreakerLayerBuilder<C, X, K>,
    ) -> CircuitBreakerLayerBuilder<C, X, K> {
        let mut builder = builder;
        if let Some(rate) = self.failure_rate_threshold {
            builder = builder.failure_rate_threshold(rate);
        }
        if let Some(calls) = self.minimum_calls {
            builder = builder.minimum_calls(calls);
        }
        if let Some(window) = self.sliding_window {
            builder = builder.sliding_window(window.into());
        }
        if let Some(slow) = self.slow_calls {
            builder = builder.slow_calls(slow.threshold, slow.rate);
        }
        if let Some(open) = self.open_for {
            builder = builder.open_for(open);
        }
        if let Some(backoff) = self.open_backoff {
            builder = builder.open_backoff(backoff.into());
        }
        if let Some(probes) = self.half_open_probes {
            builder = builder.half_open_probes(probes);
        }
        if let Some(shadow) = self.shadow {
            builder = builder.shadow(shadow);
        }
        builder
    }

    /// The breaker this configuration describes, counting every `Err` as a failure.
    pub fn build(&self) -> Result<CircuitBreakerLayer, ConfigError> {
        self.build_from(CircuitBreakerLayer::builder())
    }

    /// The keyed breakers this configuration describes (one per key, every `Err` a
    /// failure), with `extractor` (a closure `Fn(&Req) -> Option<K>` or one of the
    /// [`key`](crate::key) extractors); the configuration must have a `keyed` section.
    pub fn build_keyed<X, K>(
        &self,
        extractor: X,
    ) -> Result<KeyedCircuitBreakerLayer<X, K>, ConfigError>
    where
        K: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    {
        self.build_keyed_from(CircuitBreakerLayer::builder().keyed(extractor))
    }

    /// Applies this configuration, `keyed` section included, to a keyed `builder` (with
    /// its classifier, observer and metrics labels) and builds it.
    pub fn build_keyed_from<C, X, K>(
        &self,
        builder: CircuitBreakerLayerBuilder<C, Keyed<X>, K>,
    ) -> Result<KeyedCircuitBreakerLayer<X, K, C>, ConfigError>
    where
        K: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    {
        let Some(keyed) = &self.keyed else {
            return Err(ConfigError::new("", PolicyMismatch::NotKeyed));
        };
        self.check_open_time()?;
        let mut builder = self.apply(builder);
        if let Some(max_keys) = keyed.max_keys {
            builder = builder.max_keys(max_keys);
        }
        builder.build().map_err(|error| self.locate(error))
    }

    /// Applies this configuration to `builder` (with its classifier and observer) and
    /// builds it: the builder's validation, with its errors named by field.
    pub fn build_from<C>(
        &self,
        builder: CircuitBreakerLayerBuilder<C>,
    ) -> Result<CircuitBreakerLayer<C>, ConfigError> {
        if self.keyed.is_some() {
            return Err(ConfigError::new("keyed", PolicyMismatch::NeedsExtractor));
        }
        self.check_open_time()?;
        self.apply(builder)
            .build()
            .map_err(|error| self.locate(error))
    }

    /// The configuration a live reload to this one puts in force in a breaker built
    /// global (`max_keys` `None`) or keyed with `max_keys`: `build()`'s validation, with
    /// the options that cannot change at run time as the layer was built.
    pub(crate) fn reload_config(&self, max_keys: Option<usize>) -> Result<Config, ConfigError> {
        NotReloadable::check_keyed(self.keyed.is_some(), max_keys.is_some(), "breaker")?;
        if let (Some(keyed), Some(built)) = (&self.keyed, max_keys)
            && keyed.max_keys.unwrap_or(DEFAULT_MAX_KEYS) != built
        {
            return Err(NotReloadable::at("keyed.max_keys", built));
        }
        self.check_open_time()?;
        self.apply(CircuitBreakerLayer::builder())
            .checked_config()
            .map_err(|error| self.locate(error))
    }

    fn check_open_time(&self) -> Result<(), ConfigError> {
        if self.open_for.is_some() && self.open_backoff.is_some() {
            return Err(ConfigError::new(
                "open_backoff",
                PolicyMismatch::Exclusive("open_for", "open_backoff"),
            ));
        }
        Ok(())
    }

    /// The field a builder error is about.
    fn locate(&self, error: CircuitBreakerConfigError) -> ConfigError {
        use CircuitBreakerConfigError as E;
        let backoff = self.open_backoff.is_some();
        let path = match &error {
            E::FailureRate(_) => "failure_rate_threshold",
            E::SlowCallRate(_) => "slow_calls.rate",
            E::ZeroSlowCallDuration => "slow_calls.threshold",
            E::ZeroMinimumCalls | E::MinimumCallsAboveWindow { .. } => "minimum_calls",
            E::EmptyWindow | E::WindowTooLarge { .. } => "sliding_window.count",
            E::NoBuckets | E::TooManyBuckets { .. } => "sliding_window.buckets",
            // The span and the bucket count together.
            E::BucketTooShort { .. } => "sliding_window",
            E::WindowSpanTooLong { .. } => "sliding_window.time",
            E::ZeroOpenDuration | E::OpenDurationTooLong { .. } if !backoff => "open_for",
            E::OpenDurationTooLong { duration, .. }
                if self.open_backoff.is_some_and(|b| b.max == Some(*duration)) =>
            {
                "open_backoff.max"
            }
            E::ZeroOpenDuration | E::OpenDurationTooLong { .. } => "open_backoff.initial",
            E::MaxOpenBelowInitial { .. } => "open_backoff.max",
            E::Multiplier(_) => "open_backoff.multiplier",
            E::Jitter(_) => "open_backoff.jitter",
            E::Probes { .. } => "half_open_probes",
            E::ZeroMaxKeys => "keyed.max_keys",
        };
        ConfigError::new(path, error)
    }
}
