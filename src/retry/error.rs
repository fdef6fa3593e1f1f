use std::time::Duration;

use crate::rejection::{Rejection, RejectionKind};

/// An attempt ran longer than the [per-attempt
/// timeout](super::RetryLayerBuilder::per_attempt_timeout). The policy sees it like any
/// other error; the caller gets it if it is not retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("attempt timed out after {timeout:?}")]
pub struct AttemptTimedOut {
    timeout: Duration,
}

impl AttemptTimedOut {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self { timeout }
    }

    /// The per-attempt timeout that elapsed.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How this rejection describes itself: a
    /// [`DeadlineExceeded`](RejectionKind::DeadlineExceeded).
    pub fn rejection(&self) -> Rejection {
        Rejection::new(RejectionKind::DeadlineExceeded, "attempt timed out")
    }
}
