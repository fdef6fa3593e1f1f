//! The retry layer's configuration.

use super::error::ConfigError;
use crate::retry::{Backoff, Jitter, RetryBudget, RetryConfigError, RetryLayer, RetryLayerBuilder};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A [`RetryLayer`] as data: every field left out keeps the builder's default (3
/// attempts, exponential backoff from 100 ms to 5 s with full jitter, a budget of 10
/// retries a second plus 20% over 10 s, 30 s at most for a server's `Retry-After`).
///
/// ```toml
/// max_attempts = 3
/// backoff = { kind = "exponential", base = "50ms", multiplier = 2.0, max = "2s", jitter = "full" }
/// budget = { ttl = "10s", min_per_sec = 10, ratio = 0.2 }
/// per_attempt_timeout = "500ms"
/// deadline = "2s"
/// max_server_delay = "30s"
/// ```
///
/// A running layer takes a new configuration through
/// [`RetryHandle::reload`](crate::retry::RetryHandle::reload).
///
/// Which results are retried, and how a request is duplicated, are code: build with
/// [`build_from`](Self::build_from) and a builder that has its policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RetryConfig {
    /// Attempts in all, the first included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// The delay before each retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffConfig>,
    /// The retry budget shared by every service of the layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetConfig>,
    /// Each attempt's own timeout.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_attempt_timeout: Option<Duration>,
    /// The time all attempts together may take.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub deadline: Option<Duration>,
    /// Whether to leave retries to a caller that retries too (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defer_to_retrying_caller: Option<bool>,
    /// The longest server-requested delay honoured.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_server_delay: Option<Duration>,
}

/// A [`Backoff`] as data: `base` is required; the rest as the [`Backoff`] constructors
/// leave it (an exponential multiplier of 2, no cap, no jitter).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    /// How the delay grows (default `exponential`).
    #[serde(default)]
    pub kind: BackoffKind,
    /// The first delay.
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    /// The growth factor of an exponential backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
    /// The longest delay.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub max: Option<Duration>,
    /// How the delay is randomised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<JitterConfig>,
}

/// How a backoff grows: `"constant"`, `"linear"` or `"exponential"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackoffKind {
    /// Always `base`.
    Constant,
    /// `base × n`.
    Linear,
    /// `base × multiplierⁿ⁻¹`.
    #[default]
    Exponential,
}

/// [`Jitter`] as data: `"none"`, `"full"`, `"equal"`, `"decorrelated"` or
/// `{ proportional = 0.1 }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum JitterConfig {
    /// [`Jitter::None`].
    None,
    /// [`Jitter::Full`].
    Full,
    /// [`Jitter::Equal`].
    Equal,
    /// [`Jitter::Decorrelated`].
    Decorrelated,
    /// [`Jitter::Proportional`].
    Proportional(f64),
}

impl From<JitterConfig> for Jitter {
    fn from(jitter: JitterConfig) -> Self {
        match jitter {
            JitterConfig::None => Self::None,
            JitterConfig::Full => Self::Full,
            JitterConfig::Equal => Self::Equal,
            JitterConfig::Decorrelated => Self::Decorrelated,
            JitterConfig::Proportional(spread) => Self::Proportional(spread),
        }
    }
}

impl From<BackoffConfig> for Backoff {
    fn from(config: BackoffConfig) -> Self {
        let mut backoff = match config.kind {
            BackoffKind::Constant => Backoff::constant(config.base),
            BackoffKind::Linear => Backoff::linear(config.base),
            BackoffKind::Exponential => {
                let exponential = Backoff::exponential(config.base);
                match config.multiplier {
                    Some(multiplier) => exponential.multiplier(multiplier).into(),
                    None => exponential.into(),
                }
            }
        };
        if let Some(max) = config.max {
            backoff = backoff.max(max);
        }
        if let Some(jitter) = config.jitter {
            backoff = backoff.jitter(jitter.into());
        }
        backoff
    }
}

/// A [`RetryBudget`] as data: all three fields, as [`RetryBudget::new`] takes them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// How long deposits and withdrawals count (1 s to 60 s).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Retries allowed per second whatever the traffic.
    pub min_per_sec: u32,
    /// Retries allowed per request on top of that.
    pub ratio: f64,
}

impl RetryConfig {
    /// Sets this configuration's fields on `builder`, leaving the others as they are.
    pub fn apply<P, D>(&self, builder: RetryLayerBuilder<P, D>) -> RetryLayerBuilder<P, D> {
        let mut builder = builder;
        if let Some(attempts) = self.max_attempts {
            builder = builder.max_attempts(attempts);
        }
        if let Some(backoff) = self.backoff {
            builder = builder.backoff(Backoff::from(backoff));
        }
        if let Some(budget) = self.budget {
            builder = builder.budget(RetryBudget::new(
                budget.ttl,
                budget.min_per_sec,
                budget.ratio,
            ));
        }
        if let Some(timeout) = self.per_attempt_timeout {
            builder = builder.per_attempt_timeout(timeout);
        }
        if let Some(deadline) = self.deadline {
            builder = builder.deadline(deadline);
        }
        if let Some(defer) = self.defer_to_retrying_caller {
            builder = builder.defer_to_retrying_caller(defer);
        }
        if let Some(cap) = self.max_server_delay {
            builder = builder.max_server_delay(cap);
        }
        builder
    }

    /// The retry layer this configuration describes, retrying errors.
    pub fn build(&self) -> Result<RetryLayer, ConfigError> {
        self.build_from(RetryLayer::builder())
    }

    /// Applies this configuration to `builder` (with its policy) and builds it: the
    /// builder's validation, with its errors named by field.
    pub fn build_from<P, D>(
        &self,
        builder: RetryLayerBuilder<P, D>,
    ) -> Result<RetryLayer<P, D>, ConfigError> {
        self.apply(builder)
            .build()
            .map_err(|error| self.locate(error))
    }

    /// What a live reload to this configuration switches to: `build()`'s validation,
    /// over the builder's defaults. The options, and the budget's ttl, reserve rate
    /// and ratio.
    pub(crate) fn reload_options(
        &self,
    ) -> Result<(crate::retry::Options, (Duration, u32, f64)), ConfigError> {
        let builder = self.apply(RetryLayer::builder());
        let options = builder.options().map_err(|error| self.locate(error))?;
        Ok((options, builder.budget_settings()))
    }

    /// The field a builder error is about.
    fn locate(&self, error: RetryConfigError) -> ConfigError {
        use RetryConfigError as E;
        let path = match error {
            E::ZeroAttempts => "max_attempts",
            E::Multiplier(_) => "backoff.multiplier",
            E::CapBelowBase { .. } => "backoff.max",
            E::Jitter(_) => "backoff.jitter",
            E::BudgetTtl(_) => "budget.ttl",
            E::BudgetMinPerSec(_) => "budget.min_per_sec",
            E::BudgetRatio(_) => "budget.ratio",
            E::ZeroTimeout if self.per_attempt_timeout == Some(Duration::ZERO) => {
                "per_attempt_timeout"
            }
            E::ZeroTimeout => "deadline",
        };
        ConfigError::new(path, error)
    }
}
