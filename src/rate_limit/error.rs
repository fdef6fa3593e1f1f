use std::time::Duration;

/// The error a request gets when it is over the rate limit: the inner service was not
/// called.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rate limited: retry after {retry_after:?}")]
pub struct RateLimited {
    retry_after: Duration,
}

impl RateLimited {
    #[allow(dead_code)] // constructed by the layer, which is being written
    pub(crate) fn new(retry_after: Duration) -> Self {
        Self { retry_after }
    }

    /// How long until a request of the same cost would be admitted.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }
}
