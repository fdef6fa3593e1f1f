use std::sync::Arc;

use super::limiter::Limiter;

/// Observes one concurrency limit; cheap to clone. Made by
/// [`ConcurrencyLimitLayer::handle`](super::ConcurrencyLimitLayer::handle).
///
/// Every read is a snapshot that the next request may change.
#[derive(Debug, Clone)]
pub struct ConcurrencyLimitHandle {
    limiter: Arc<Limiter>,
}

impl ConcurrencyLimitHandle {
    pub(crate) fn new(limiter: Arc<Limiter>) -> Self {
        Self { limiter }
    }

    /// The limit in force: the static one, or where the algorithm has moved it.
    pub fn limit(&self) -> u32 {
        self.limiter.limit()
    }

    /// The requests holding a permit now (those whose response or body has not ended).
    /// Right after an adaptive limit falls it can be above [`limit`](Self::limit): no
    /// request is cut short, new ones wait for the excess to finish.
    pub fn in_flight(&self) -> u32 {
        self.limiter.in_flight()
    }

    /// The requests waiting in the queue for a permit (takes the queue's lock).
    pub fn queued(&self) -> usize {
        self.limiter.queued()
    }

    /// The requests refused with [`Overloaded`](super::Overloaded) so far.
    pub fn rejected(&self) -> u64 {
        self.limiter.rejected()
    }
}
