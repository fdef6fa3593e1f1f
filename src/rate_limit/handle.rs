use std::sync::Arc;
use std::time::Duration;

use super::bucket::Quota;
use super::error::RateLimitConfigError;
use super::layer::Settings;
use super::shadow::Shadow;
use super::store::{LocalStore, Store};

/// Observes and controls the buckets of a [`RateLimitLayer`](super::RateLimitLayer):
/// cheap to clone, shared with every service the layer built.
pub struct RateLimitHandle<St = LocalStore> {
    store: Arc<St>,
    shadow: Option<Arc<Shadow>>,
    /// What the layer was built with.
    settings: Settings,
}

impl<St: Store> RateLimitHandle<St> {
    pub(crate) fn new(store: Arc<St>, shadow: Option<Arc<Shadow>>, settings: Settings) -> Self {
        Self {
            store,
            shadow,
            settings,
        }
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
    /// (To change the rate and the capacity together, atomically, use
    /// [`reload`](Self::reload): two calls are two changes, and a request between them
    /// sees the one without the other.)
    pub fn set_rate(&self, tokens: u64, period: Duration) -> Result<(), RateLimitConfigError> {
        self.store
            .update_quota(|quota| quota.with_refill(tokens, period))
    }

    /// Holds at most `capacity` tokens from now on. Each bucket stays as full as a
    /// fraction, whichever way the capacity moves: half full of 100 becomes half full of
    /// 10, or of 1000 (see [runtime changes](super#runtime-changes) for the rounding).
    pub fn set_capacity(&self, capacity: u64) -> Result<(), RateLimitConfigError> {
        self.store
            .update_quota(|quota| quota.with_capacity(capacity))
    }

    /// How many per-key buckets a keyed limiter tracks now (never more than `max_keys`).
    pub fn tracked_keys(&self) -> usize {
        self.store.tracked_keys()
    }
}

#[cfg(feature = "serde")]
impl<K> RateLimitHandle<LocalStore<K>>
where
    K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
{
    /// Switches the limiter to `config`'s capacity and refill rate, atomically: every
    /// request is decided under the old quota or the new one, never a mix of the two.
    ///
    /// `config` is validated as [`RateLimitConfig::build`](crate::config::RateLimitConfig::build)
    /// validates it, with the same [`ConfigError`](crate::config::ConfigError) (field path
    /// included); a refused configuration changes nothing. The options that shape the
    /// layer cannot change at run time and must be what it was built with (left out:
    /// their defaults): `keyed` (global or keyed), `keyed.max_keys`,
    /// `keyed.when_key_missing`, `max_wait`, `shadow`, and a `redis` section (an
    /// in-process limiter has none). A difference is refused with
    /// [`NotReloadable`](crate::config::NotReloadable) at that field; build a new layer
    /// to change them.
    ///
    /// The tokens carry over: a smaller capacity keeps each bucket as full *as a
    /// fraction* (a bucket of 100 holding 50 becomes one of 10 holding 5), a larger one
    /// keeps the tokens it holds (no free burst: the extra room fills at the new rate),
    /// and queued reservations keep their slots. The shared bucket moves at once; a
    /// keyed bucket moves on its next request (see [runtime changes](super#runtime-changes)).
    ///
    /// ```
    /// use palisade::config::RateLimitConfig;
    /// use palisade::rate_limit::RateLimitLayer;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config: RateLimitConfig = toml::from_str("capacity = 100\nrefill = \"50/s\"")?;
    /// let handle = config.build()?.handle();
    ///
    /// handle.reload(&toml::from_str("capacity = 10\nrefill = \"5/s\"")?)?;
    /// assert_eq!(handle.quota().capacity(), 10);
    /// assert_eq!(handle.available(), 10); // full stays full
    ///
    /// let refused = handle.reload(&toml::from_str("capacity = 0\nrefill = \"5/s\"")?);
    /// assert_eq!(refused.unwrap_err().path(), "capacity");
    /// assert_eq!(handle.quota().capacity(), 10); // the old policy holds
    /// # Ok(())
    /// # }
    /// ```
    pub fn reload(
        &self,
        config: &crate::config::RateLimitConfig,
    ) -> Result<(), crate::config::ConfigError> {
        let quota = config.reload_quota(&self.settings)?;
        // Cannot fail: the quota is checked, and a local store takes any quota.
        self.store
            .update_quota(|_| Ok(quota))
            .map_err(|error| crate::config::ConfigError::new("", error))
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
            settings: self.settings,
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
