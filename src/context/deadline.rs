//! The one rejection for "a deadline passed".

use crate::rejection::{Rejection, RejectionKind};
use std::time::Duration;

/// A deadline passed, or too little of it was left to be worth trying: the retry layer's
/// [deadline](crate::retry::RetryLayerBuilder::deadline) of the whole call, the caller's
/// deadline on arrival (the server side of the request context), or the time left
/// before an outgoing call (its client side). Answered with 504 /
/// `DEADLINE_EXCEEDED`, and never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("deadline exceeded")]
pub struct DeadlineExceeded {
    timeout: Option<Duration>,
}

impl DeadlineExceeded {
    /// A deadline passed; `timeout` is the time the call had been given, when known.
    pub fn new(timeout: Option<Duration>) -> Self {
        Self { timeout }
    }

    /// The time the call had been given, when the layer that refused knows it (the
    /// retry layer's own deadline, the caller's timeout on arrival).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// How this rejection describes itself: a
    /// [`DeadlineExceeded`](RejectionKind::DeadlineExceeded).
    pub fn rejection(&self) -> Rejection {
        Rejection::new(RejectionKind::DeadlineExceeded, "deadline exceeded")
    }
}
