use std::sync::Arc;
use std::time::Duration;

use super::bucket::Quota;
use super::error::RateLimitConfigError;
use super::shadow::Shadow;
use super::store::{LocalStore, Store};

/// Observes and controls the buckets of a [`RateLimitLayer`](super::RateLimitLayer):
/// cheap to clone, shared with every service the layer built.
pub struct RateLimitHandle<St = LocalStore> {
    store: Arc<St>,
    shadow: Option<Arc<Shadow>>,
}

impl<St: Store> RateLimitHandle<St> {
    pub(crate) fn new(store: Arc<St>, shadow: Option<Arc<Shadow>>) -> Self {
        Self { store, shadow }
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

impl<St> RateLimitHandle<St> {
    /// Whether the limiter runs in [shadow mode](super::Builder::shadow).
    pub fn is_shadow(&self) -> bool {
        self.shadow.is_some()
    }

    /// How many requests the limiter in shadow mode let through that it would have
    /// refused (always 0 for an enforcing limiter).
    pub fn shadow_rejected(&self) -> u64 {
        self.shadow
            .as_ref()
            .map_or(0, |shadow| shadow.would_reject())
    }
}

impl<St> Clone for RateLimitHandle<St> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            shadow: self.shadow.clone(),
        }
    }
}

impl<St: std::fmt::Debug> std::fmt::Debug for RateLimitHandle<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitHandle")
            .field("store", &self.store)
            .field("shadow_rejected", &self.shadow_rejected())
            .finish()
    }
}
