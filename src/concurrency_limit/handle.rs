use std::sync::Arc;

use super::fair::KeyCounts;
use super::limiter::Limiter;

/// Observes one concurrency limit; cheap to clone. Made by
/// [`ConcurrencyLimitLayer::handle`](super::ConcurrencyLimitLayer::handle).
///
/// Every read is a snapshot that the next request may change.
#[derive(Clone)]
pub struct ConcurrencyLimitHandle {
    limiter: Arc<Limiter>,
    keys: Option<Arc<dyn KeyCounts>>,
}

impl std::fmt::Debug for ConcurrencyLimitHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConcurrencyLimitHandle")
            .field("limiter", &self.limiter)
            .field("keyed", &self.keys.is_some())
            .finish()
    }
}

impl ConcurrencyLimitHandle {
    pub(crate) fn new(limiter: Arc<Limiter>, keys: Option<Arc<dyn KeyCounts>>) -> Self {
        Self { limiter, keys }
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

    /// The requests refused with [`Overloaded`](super::Overloaded) so far (none in
    /// shadow mode: see [`shadow_rejected`](Self::shadow_rejected)).
    pub fn rejected(&self) -> u64 {
        self.limiter.rejected()
    }

    /// Whether the limit runs in [shadow mode](super::ConcurrencyLimitLayerBuilder::shadow).
    pub fn is_shadow(&self) -> bool {
        self.limiter.is_shadow()
    }

    /// How many requests the limit in shadow mode let through that it would have
    /// refused with [`Overloaded`](super::Overloaded) (always 0 for an enforcing limit,
    /// whose refusals are in [`rejected`](Self::rejected)).
    pub fn shadow_rejected(&self) -> u64 {
        self.limiter.shadow_rejected()
    }

    /// A [keyed](super::ConcurrencyLimitLayerBuilder::keyed) limit: the keys holding at
    /// least one permit now (the requests without a key, and the keys beyond `max_keys`,
    /// counting as one). Zero for an unkeyed limit.
    pub fn active_keys(&self) -> u32 {
        self.keys.as_ref().map_or(0, |keys| keys.active_keys())
    }

    /// A keyed limit: the keys its table tracks now, at most `max_keys` (takes each
    /// shard's lock in turn). A key is dropped once it holds no permit and has not asked
    /// during contention for a window. Zero for an unkeyed limit.
    pub fn tracked_keys(&self) -> usize {
        self.keys.as_ref().map_or(0, |keys| keys.tracked_keys())
    }
}
