//! The incoming deadlines' configuration.

#[cfg(feature = "http")]
use super::error::ConfigError;
#[cfg(feature = "http")]
use crate::correlation::{DeadlineConfigError, IncomingDeadlines};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `IncomingDeadlines` (feature `http`) as data: every field left out keeps the builder's default (the
/// `x-request-timeout-ms` header, at most 60 s, no default, no minimum).
///
/// ```toml
/// header = "x-request-timeout-ms"
/// max = "30s"
/// default = "10s"
/// min_left = "5ms"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DeadlinesConfig {
    /// The HTTP header holding the time left, in whole milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The longest deadline a caller can ask for.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub max: Option<Duration>,
    /// The deadline of a request that brings none.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub default: Option<Duration>,
    /// Requests arriving with less than this left are refused at once.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub min_left: Option<Duration>,
}

#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
impl DeadlinesConfig {
    /// The deadlines this configuration describes, for
    /// [`CorrelationIdLayer::accept_deadlines`](crate::correlation::CorrelationIdLayer::accept_deadlines).
    pub fn build(&self) -> Result<IncomingDeadlines, ConfigError> {
        let mut builder = IncomingDeadlines::builder();
        if let Some(header) = &self.header {
            let name = http::HeaderName::try_from(header.as_str())
                .map_err(|error| ConfigError::new("header", error))?;
            builder = builder.header(name);
        }
        if let Some(max) = self.max {
            builder = builder.max(max);
        }
        if let Some(default) = self.default {
            builder = builder.default(default);
        }
        if let Some(min_left) = self.min_left {
            builder = builder.min_left(min_left);
        }
        builder.build().map_err(|error| {
            let path = match error {
                DeadlineConfigError::ZeroMax => "max",
                DeadlineConfigError::DefaultAboveMax { .. } => "default",
                DeadlineConfigError::MinLeftNotBelowMax { .. } => "min_left",
            };
            ConfigError::new(path, error)
        })
    }
}
