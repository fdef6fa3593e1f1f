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

/// The [deadline](super::RetryLayerBuilder::deadline) of the whole call passed during an
/// attempt, or while a retry waited for the service to be ready. Never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("retry deadline of {deadline:?} exceeded")]
pub struct DeadlineExceeded {
    deadline: Duration,
}

impl DeadlineExceeded {
    pub(crate) fn new(deadline: Duration) -> Self {
        Self { deadline }
    }

    /// The deadline that passed.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// How this rejection describes itself: a
    /// [`DeadlineExceeded`](RejectionKind::DeadlineExceeded).
    pub fn rejection(&self) -> Rejection {
        Rejection::new(RejectionKind::DeadlineExceeded, "deadline exceeded")
    }
}
