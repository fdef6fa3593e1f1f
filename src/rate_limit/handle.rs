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
    shadow: Arc<Shadow>,
    /// What the layer was built with.
    settings: Settings,
}

impl<St: Store> RateLimitHandle<St> {
    pub(crate) fn new(store: Arc<St>, shadow: Arc<Shadow>, settings: Settings) -> Self {
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
impl<St: Store> RateLimitHandle<St> {
    /// Switches the limiter to `config`'s capacity, refill rate and shadow switch: every
    /// request gets the outcome of the old policy or of the new one, never a mix (the
    /// capacity of one with the rate of the other, or one's quota with the other's
    /// switch). The next request is decided by the new policy.
    ///
    /// `config` is validated as [`RateLimitConfig::build`](crate::config::RateLimitConfig::build)
    /// validates it, with the same [`ConfigError`](crate::config::ConfigError) (field path
    /// included); a refused configuration changes nothing. The options that shape the
    /// layer cannot change at run time and must be what it was built with (left out:
    /// their defaults): `keyed` (global or keyed), `keyed.max_keys`,
    /// `keyed.when_key_missing`, `max_wait`, and the store's own options, checked by
    /// [`Store::check_reload`]: an in-process limiter has no `redis` section, and one on
    /// Redis (`RedisStore`, feature `redis`) keeps every field of its `redis` section
    /// (`redis.prefix`, `redis.timeout`, ...). A difference is refused with
    /// [`NotReloadable`](crate::config::NotReloadable) at that field; build a new layer
    /// to change them.
    ///
    /// `shadow` switches [shadow mode](super::Builder::shadow) on or off (left out: off)
    /// from the next request on; the count of [`shadow_rejected`](Self::shadow_rejected)
    /// carries on.
    ///
    /// The tokens carry over: each bucket stays as full *as a fraction* (a bucket of 100
    /// holding 50 becomes one of 10 holding 5, or one of 1000 holding 500), and queued
    /// reservations keep their slots. The shared bucket moves at once; a keyed bucket
    /// moves on its next request (see [runtime changes](super#runtime-changes), and the
    /// `RedisStore` docs for buckets on Redis, which keep the time until they are full).
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
    ///
    /// // Watch a tighter limit before it enforces, then enforce it.
    /// handle.reload(&toml::from_str("capacity = 5\nrefill = \"1/s\"\nshadow = true")?)?;
    /// assert!(handle.is_shadow());
    /// handle.reload(&toml::from_str("capacity = 5\nrefill = \"1/s\"")?)?;
    /// assert!(!handle.is_shadow());
    /// # Ok(())
    /// # }
    /// ```
    pub fn reload(
        &self,
        config: &crate::config::RateLimitConfig,
    ) -> Result<(), crate::config::ConfigError> {
        let quota = config.reload_quota(&self.settings)?;
        self.store.check_reload(config, quota)?;
        let shadow = config.shadow.unwrap_or(false);
        // Cannot fail for palisade's stores: `check_reload` accepted the quota.
        self.shadow
            .switch(shadow, || self.store.update_quota(|_| Ok(quota)))
            .map_err(|error| crate::config::ConfigError::new("capacity", error))
    }
}

impl<St> RateLimitHandle<St> {
    /// Whether the limiter runs in [shadow mode](super::Builder::shadow) now.
    pub fn is_shadow(&self) -> bool {
        self.shadow.is_on()
    }

    /// Turns [shadow mode](super::Builder::shadow) on or off, from the next request on
    /// (what [`reload`](Self::reload) does with a configuration's `shadow`; the quota
    /// stays). Buckets are charged the same way in both modes, so they carry on as they
    /// are.
    pub fn set_shadow(&self, shadow: bool) {
        let _ = self
            .shadow
            .switch(shadow, || Ok::<(), std::convert::Infallible>(()));
    }

    /// How many requests the limiter let through in shadow mode that it would have
    /// refused, since it was built (whenever shadow mode was on; an enforcing limiter
    /// counts none).
    pub fn shadow_rejected(&self) -> u64 {
        self.shadow.would_reject()
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
