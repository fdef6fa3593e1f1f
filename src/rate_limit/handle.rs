use std::sync::Arc;
use std::time::Duration;

use super::bucket::Quota;
use super::error::RateLimitConfigError;
use super::store::{LocalStore, Store};

/// Observes and controls the buckets of a [`RateLimitLayer`](super::RateLimitLayer):
/// cheap to clone, shared with every service the layer built.
pub struct RateLimitHandle<St = LocalStore> {
    store: Arc<St>,
}

impl<St: Store> RateLimitHandle<St> {
    pub(crate) fn new(store: Arc<St>) -> Self {
        Self { store }
    }

    /// The tokens the shared bucket holds now: the global limiter's bucket, or a keyed
    /// limiter's fallback and overflow bucket.
    pub fn available(&self) -> u64 {
        self.store.available(None)
    }

    /// The tokens `key`'s bucket holds now. For a key not tracked: the bucket its next
    /// request would be charged, a full one if the table has room for the key, else the
    /// shared overflow bucket (see [at the cap](super#at-the-cap)). (A full table is
    /// scanned for a full bucket a sweep would free: this costs a shard's length.)
    pub fn available_for(&self, key: &St::Key) -> u64 {
        self.store.available(Some(key))
    }

    /// The quota in force.
    pub fn quota(&self) -> Quota {
        self.store.quota()
    }

    /// Refills `tokens` per `period` from now on. Buckets keep the tokens they hold.
    pub fn set_rate(&self, tokens: u64, period: Duration) -> Result<(), RateLimitConfigError> {
        self.store
            .update_quota(|quota| quota.with_refill(tokens, period))
    }

    /// Holds at most `capacity` tokens from now on. Buckets keep the tokens they hold,
    /// up to the new capacity: raising it does not hand out a free burst, the extra
    /// tokens accrue at the refill rate.
    pub fn set_capacity(&self, capacity: u64) -> Result<(), RateLimitConfigError> {
        self.store
            .update_quota(|quota| quota.with_capacity(capacity))
    }

    /// How many per-key buckets a keyed limiter tracks now (never more than `max_keys`).
    pub fn tracked_keys(&self) -> usize {
        self.store.tracked_keys()
    }
}

impl<St> Clone for RateLimitHandle<St> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
        }
    }
}

impl<St: std::fmt::Debug> std::fmt::Debug for RateLimitHandle<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitHandle")
            .field("store", &self.store)
            .finish()
    }
}
