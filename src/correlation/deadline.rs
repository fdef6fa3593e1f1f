//! How the server side takes the caller's deadline.

use crate::context::DEFAULT_TIMEOUT_HEADER;
use http::header::HeaderName;
use std::time::Duration;

/// How [`CorrelationIdLayer`](super::CorrelationIdLayer) takes each request's deadline
/// (see [`accept_deadlines`](super::CorrelationIdLayer::accept_deadlines)): from
/// `grpc-timeout` on gRPC requests and from an HTTP header (`x-request-timeout-ms`,
/// whole milliseconds, unless set) on the others, bounded by a maximum, with an
/// optional default.
///
/// A malformed value counts as absent (the default applies), never as an error, and is
/// never echoed. Build it with [`IncomingDeadlines::builder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingDeadlines {
    header: HeaderName,
    max: Duration,
    default: Option<Duration>,
    min_left: Duration,
}

/// Builds [`IncomingDeadlines`]; see [`IncomingDeadlines::builder`].
#[derive(Debug, Clone)]
#[must_use = "a layer or builder does nothing until it is used"]
pub struct IncomingDeadlinesBuilder {
    deadlines: IncomingDeadlines,
}

/// An invalid [`IncomingDeadlinesBuilder`] configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeadlineConfigError {
    /// A zero maximum, which would refuse every request.
    #[error("the maximum deadline must be above zero")]
    ZeroMax,
    /// A default above the maximum.
    #[error("the default deadline {default:?} is above the maximum {max:?}")]
    DefaultAboveMax {
        /// The default.
        default: Duration,
        /// The maximum.
        max: Duration,
    },
    /// A minimum time left at or above the maximum, which would refuse every request.
    #[error("the minimum time left {min_left:?} is not below the maximum {max:?}")]
    MinLeftNotBelowMax {
        /// The minimum.
        min_left: Duration,
        /// The maximum.
        max: Duration,
    },
}

impl IncomingDeadlines {
    /// The defaults: the `x-request-timeout-ms` header, at most 60 s, no default (a
    /// request that brings no deadline has none), refused only when nothing is left.
    pub fn builder() -> IncomingDeadlinesBuilder {
        IncomingDeadlinesBuilder {
            deadlines: IncomingDeadlines {
                header: DEFAULT_TIMEOUT_HEADER,
                max: Duration::from_secs(60),
                default: None,
                min_left: Duration::ZERO,
            },
        }
    }

    /// The header the time left comes in on HTTP requests.
    pub(crate) fn header(&self) -> &HeaderName {
        &self.header
    }

    /// The time this request has, if any: the caller's `sent` time left (at most the
    /// maximum), else the default.
    pub(crate) fn timeout(&self, sent: Option<Duration>) -> Option<Duration> {
        sent.map(|timeout| timeout.min(self.max)).or(self.default)
    }

    /// Whether a request with `timeout` left is refused at once.
    pub(crate) fn refuses(&self, timeout: Duration) -> bool {
        timeout.is_zero() || timeout < self.min_left
    }
}

impl IncomingDeadlinesBuilder {
    /// The HTTP header holding the time left, in whole milliseconds (gRPC requests
    /// always use `grpc-timeout`).
    pub fn header(mut self, name: HeaderName) -> Self {
        self.deadlines.header = name;
        self
    }

    /// The longest deadline a caller can ask for; a longer one is cut to this.
    pub fn max(mut self, max: Duration) -> Self {
        self.deadlines.max = max;
        self
    }

    /// The deadline of a request that brings none (at the edge: what the gateway gives
    /// every request).
    pub fn default(mut self, timeout: Duration) -> Self {
        self.deadlines.default = Some(timeout);
        self
    }

    /// Refuses, at once, a request arriving with less than this left: not enough to do
    /// anything useful.
    pub fn min_left(mut self, min_left: Duration) -> Self {
        self.deadlines.min_left = min_left;
        self
    }

    /// Checks the configuration.
    pub fn build(self) -> Result<IncomingDeadlines, DeadlineConfigError> {
        let deadlines = self.deadlines;
        let max = deadlines.max;
        if max.is_zero() {
            return Err(DeadlineConfigError::ZeroMax);
        }
        if let Some(default) = deadlines.default.filter(|&default| default > max) {
            return Err(DeadlineConfigError::DefaultAboveMax { default, max });
        }
        if deadlines.min_left >= max {
            let min_left = deadlines.min_left;
            return Err(DeadlineConfigError::MinLeftNotBelowMax { min_left, max });
        }
        Ok(deadlines)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn invalid_configurations_are_errors() {
        let builder = IncomingDeadlines::builder;
        assert_eq!(
            builder().max(Duration::ZERO).build(),
            Err(DeadlineConfigError::ZeroMax)
        );
        assert!(matches!(
            builder()
                .max(Duration::from_secs(1))
                .default(Duration::from_secs(2))
                .build(),
            Err(DeadlineConfigError::DefaultAboveMax { .. })
        ));
        assert!(matches!(
            builder()
                .max(Duration::from_secs(1))
                .min_left(Duration::from_secs(1))
                .build(),
            Err(DeadlineConfigError::MinLeftNotBelowMax { .. })
        ));
        assert!(builder().default(Duration::from_secs(60)).build().is_ok());
    }
}
