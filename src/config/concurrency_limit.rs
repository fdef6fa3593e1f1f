//! The concurrency limit's configuration.

use super::KeyedConfig;
use super::error::{ConfigError, NotReloadable, PolicyMismatch};
use crate::concurrency_limit::{
    Aimd, Built, ConcurrencyLimitConfigError, ConcurrencyLimitLayer, ConcurrencyLimitLayerBuilder,
    Gradient, Plan,
};
use serde::{Deserialize, Serialize};
use std::hash::Hash;
use std::time::Duration;

/// A [`ConcurrencyLimitLayer`] as data: exactly one of `max_in_flight`, `aimd` and
/// `gradient`; the rest keeps the builder's defaults (no queue).
///
/// ```toml
/// max_in_flight = 64                   # or aimd = { .. } or gradient = { .. }
/// queue = { waiters = 100, max_wait = "50ms" }   # not with `keyed`
/// retry_after = "1s"
/// keyed = { max_keys = 10000 }                    # fair per client
/// shadow = true                                  # decide and count, refuse nothing (default false)
/// ```
///
/// A running limit takes a new configuration through
/// [`ConcurrencyLimitHandle::reload`](crate::concurrency_limit::ConcurrencyLimitHandle::reload).
///
/// How results are classified and when a permit is released are code: build with
/// [`build_from`](Self::build_from) and a builder that has them. A policy with a
/// `keyed` section takes its key extractor in code ([`build_keyed`](Self::build_keyed));
/// [`build`](Self::build) refuses it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ConcurrencyLimitConfig {
    /// A static limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// An adaptive limit: additive increase, multiplicative decrease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aimd: Option<AimdConfig>,
    /// An adaptive limit following the latency gradient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient: Option<GradientConfig>,
    /// Requests that may wait for a permit, and for how long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueConfig>,
    /// What a refused request is told to wait.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_after: Option<Duration>,
    /// Fair per client; the extractor comes from code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyed: Option<KeyedConfig>,
    /// [Shadow mode](crate::concurrency_limit::ConcurrencyLimitLayerBuilder::shadow): decide and count, refuse
    /// nothing (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<bool>,
}

/// The `queue` section of a [`ConcurrencyLimitConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// How many requests may wait.
    pub waiters: usize,
    /// How long each may wait.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
}

/// [`Aimd`] as data, each field left out at [`Aimd::new`]'s default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AimdConfig {
    /// The limit to start from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_limit: Option<u32>,
    /// The lowest limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_limit: Option<u32>,
    /// The highest limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_limit: Option<u32>,
    /// The factor a decrease multiplies the limit by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ratio: Option<f64>,
    /// A call slower than this counts as a drop.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub latency_threshold: Option<Duration>,
}

/// [`Gradient`] as data, each field left out at [`Gradient::new`]'s default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct GradientConfig {
    /// The limit to start from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_limit: Option<u32>,
    /// The lowest limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_limit: Option<u32>,
    /// The highest limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_limit: Option<u32>,
    /// How often the limit is adjusted.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub interval: Option<Duration>,
    /// The latency percentile compared with the minimum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentile: Option<f64>,
    /// The queueing tolerated above the minimum latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer: Option<f64>,
    /// How often the minimum latency is measured again.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub min_rtt_interval: Option<Duration>,
    /// How many requests a minimum-latency measurement takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_rtt_requests: Option<u32>,
}

impl From<AimdConfig> for Aimd {
    fn from(config: AimdConfig) -> Self {
        let mut aimd = Aimd::new();
        // min before initial: the algorithm's setters each move its current limit.
        if let Some(limit) = config.min_limit {
            aimd = aimd.min_limit(limit);
        }
        if let Some(limit) = config.initial_limit {
            aimd = aimd.initial_limit(limit);
        }
        if let Some(limit) = config.max_limit {
            aimd = aimd.max_limit(limit);
        }
        if let Some(ratio) = config.backoff_ratio {
            aimd = aimd.backoff_ratio(ratio);
        }
        if let Some(threshold) = config.latency_threshold {
            aimd = aimd.latency_threshold(threshold);
        }
        aimd
    }
}

impl From<GradientConfig> for Gradient {
    fn from(config: GradientConfig) -> Self {
        let mut gradient = Gradient::new();
        if let Some(limit) = config.min_limit {
            gradient = gradient.min_limit(limit);
        }
        if let Some(limit) = config.initial_limit {
            gradient = gradient.initial_limit(limit);
        }
        if let Some(limit) = config.max_limit {
            gradient = gradient.max_limit(limit);
        }
        if let Some(interval) = config.interval {
            gradient = gradient.interval(interval);
        }
        if let Some(percentile) = config.percentile {
            gradient = gradient.percentile(percentile);
        }
        if let Some(buffer) = config.buffer {
            gradient = gradient.buffer(buffer);
        }
        if let Some(interval) = config.min_rtt_interval {
            gradient = gradient.min_rtt_interval(interval);
        }
        if let Some(requests) = config.min_rtt_requests {
            gradient = gradient.min_rtt_requests(requests);
        }
        gradient
    }
}

impl ConcurrencyLimitConfig {
    /// A static limit of `limit` requests in flight.
    pub fn max_in_flight(limit: u32) -> Self {
        Self {
            max_in_flight: Some(limit),
            ..Self::default()
        }
    }

    /// Sets this configuration's fields on `builder` (perhaps already
    /// [`keyed`](ConcurrencyLimitLayerBuilder::keyed)), leaving the others as they are.
    pub fn apply<C, H, X, K>(
        &self,
        builder: ConcurrencyLimitLayerBuilder<C, H, X, K>,
    ) -> ConcurrencyLimitLayerBuilder<C, H, X, K> {
        let mut builder = builder;
        if let Some(max_keys) = self.keyed.as_ref().and_then(|keyed| keyed.max_keys) {
            builder = builder.max_keys(max_keys);
        }
        if let Some(limit) = self.max_in_flight {
            builder = builder.max_in_flight(limit);
        }
        if let Some(aimd) = self.aimd {
            builder = builder.aimd(aimd.into());
        }
        if let Some(gradient) = self.gradient {
            builder = builder.gradient(gradient.into());
        }
        if let Some(queue) = self.queue {
            builder = builder.queue(queue.waiters, queue.max_wait);
        }
        if let Some(retry_after) = self.retry_after {
            builder = builder.retry_after(retry_after);
        }
        if let Some(shadow) = self.shadow {
            builder = builder.shadow(shadow);
        }
        builder
    }

    /// The limit this configuration describes, counting every `Err` as a failure and
    /// releasing its permit with the response.
    pub fn build(&self) -> Result<ConcurrencyLimitLayer, ConfigError> {
        if self.keyed.is_some() {
            return Err(ConfigError::new("keyed", PolicyMismatch::NeedsExtractor));
        }
        self.build_from(ConcurrencyLimitLayer::builder())
    }

    /// The keyed (fair per client) limit this configuration describes, with `extractor`
    /// (a closure `Fn(&Req) -> Option<K>` or one of the [`key`](crate::key) extractors);
    /// the configuration must have a `keyed` section.
    pub fn build_keyed<X, K>(&self, extractor: X) -> Result<KeyedLayer<X, K>, ConfigError>
    where
        X: Send + Sync + 'static,
        K: Hash + Eq + Clone + Send + Sync + 'static,
    {
        if self.keyed.is_none() {
            return Err(ConfigError::new("", PolicyMismatch::NotKeyed));
        }
        self.build_from(ConcurrencyLimitLayer::builder().keyed(extractor))
    }

    /// Applies this configuration to `builder` (with its classifier and release, keyed
    /// or not: the `keyed` section's `max_keys` applies to a keyed one) and builds it:
    /// the builder's validation, with its errors named by field.
    pub fn build_from<C, H, X, K>(
        &self,
        builder: ConcurrencyLimitLayerBuilder<C, H, X, K>,
    ) -> Result<ConcurrencyLimitLayer<C, H, X, K>, ConfigError>
    where
        X: Send + Sync + 'static,
        K: Hash + Eq + Clone + Send + Sync + 'static,
    {
        self.check_exclusive()?;
        self.apply(builder)
            .build()
            .map_err(|error| self.locate(error))
    }

    /// At most one of `max_in_flight`, `aimd` and `gradient`.
    fn check_exclusive(&self) -> Result<(), ConfigError> {
        let chosen = [
            ("max_in_flight", self.max_in_flight.is_some()),
            ("aimd", self.aimd.is_some()),
            ("gradient", self.gradient.is_some()),
        ];
        let mut set = chosen.iter().filter(|(_, set)| *set).map(|(name, _)| *name);
        if let (Some(first), Some(second)) = (set.next(), set.next()) {
            return Err(ConfigError::new(
                second,
                PolicyMismatch::Exclusive(first, second),
            ));
        }
        Ok(())
    }

    /// What a live reload to this configuration switches a layer built with `built` to:
    /// `build()`'s validation (over the builder's defaults), and the options that cannot
    /// change left as they are.
    pub(crate) fn reload_plan(&self, built: Built) -> Result<Plan, ConfigError> {
        self.check_exclusive()?;
        match (&self.keyed, built.max_keys) {
            (Some(_), None) => {
                return Err(NotReloadable::at(
                    "keyed",
                    "no `keyed` section (one limit for all)",
                ));
            }
            (None, Some(_)) => {
                return Err(NotReloadable::at(
                    "keyed",
                    "a `keyed` section (fair per client)",
                ));
            }
            _ => {}
        }
        let builder = ConcurrencyLimitLayer::builder();
        let plan = if built.max_keys.is_some() {
            self.apply(builder.keyed::<(), ()>(())).plan()
        } else {
            self.apply(builder).plan()
        }
        .map_err(|error| self.locate(error))?;
        if built.max_keys.is_some() {
            NotReloadable::unless_same(
                "keyed.max_keys",
                &plan.built.max_keys,
                &built.max_keys,
                |was| format!("{}", was.unwrap_or_default()),
            )?;
            // A keyed limit's fairness windows are `retry_after` long.
            NotReloadable::unless_same(
                "retry_after",
                &plan.built.retry_after,
                &built.retry_after,
                |was| humantime_serde::re::humantime::format_duration(*was).to_string(),
            )?;
        }
        Ok(plan)
    }

    /// The field a builder error is about.
    fn locate(&self, error: ConcurrencyLimitConfigError) -> ConfigError {
        use ConcurrencyLimitConfigError as E;
        let path = match &error {
            E::NoLimit | E::Limit { .. } => "max_in_flight".to_owned(),
            E::RetryAfter(_) => "retry_after".to_owned(),
            E::QueueSize { .. } => "queue.waiters".to_owned(),
            E::MaxWait(_) => "queue.max_wait".to_owned(),
            E::ZeroMaxKeys => "keyed.max_keys".to_owned(),
            E::KeyedQueue => "queue".to_owned(),
            E::Algorithm { algorithm, reason } => {
                // The reason starts with the setting's name ("backoff_ratio must be..."),
                // unless it is about several ("the limits must be...").
                let table = algorithm.to_ascii_lowercase();
                match reason.split_whitespace().next() {
                    Some(field) if ALGORITHM_FIELDS.contains(&field) => format!("{table}.{field}"),
                    _ => table,
                }
            }
        };
        ConfigError::new(path, error)
    }
}

/// A keyed concurrency limit with the default classifier and release.
pub(crate) type KeyedLayer<X, K> = ConcurrencyLimitLayer<
    crate::classify::ErrorsAsFailures,
    crate::concurrency_limit::ReleaseOnResponse,
    X,
    K,
>;

/// The settings of [`AimdConfig`] and [`GradientConfig`].
const ALGORITHM_FIELDS: &[&str] = &[
    "initial_limit",
    "min_limit",
    "max_limit",
    "backoff_ratio",
    "latency_threshold",
    "interval",
    "percentile",
    "buffer",
    "min_rtt_interval",
    "min_rtt_requests",
];
