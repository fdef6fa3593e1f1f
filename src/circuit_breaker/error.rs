use std::time::Duration;

/// The error a call gets when the circuit is open (or half-open with every probe slot
/// taken): the inner service was not called.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("circuit open: retry after {retry_after:?}")]
pub struct CircuitOpen {
    retry_after: Duration,
}

impl CircuitOpen {
    #[allow(dead_code)] // constructed by the layer, which is being written
    pub(crate) fn new(retry_after: Duration) -> Self {
        Self { retry_after }
    }

    /// How long until the breaker lets a probe through: zero when it is half-open and
    /// only waiting for a probe slot.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }
}
