use std::sync::Arc;

use super::fair::KeyCounts;
use super::layer::Built;
use super::limiter::Limiter;

/// Observes one concurrency limit; cheap to clone. Made by
/// [`ConcurrencyLimitLayer::handle`](super::ConcurrencyLimitLayer::handle).
///
/// Every read is a snapshot that the next request may change.
#[derive(Clone)]
pub struct ConcurrencyLimitHandle {
    limiter: Arc<Limiter>,
    keys: Option<Arc<dyn KeyCounts>>,
    /// What the layer was built with that a reload cannot change.
    #[cfg_attr(not(feature = "serde"), allow(dead_code))]
    built: Built,
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
    pub(crate) fn new(
        limiter: Arc<Limiter>,
        keys: Option<Arc<dyn KeyCounts>>,
        built: Built,
    ) -> Self {
        Self {
            limiter,
            keys,
            built,
        }
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

    /// The requests refused with [`Overloaded`](super::Overloaded) so far (none while
    /// in shadow mode: see [`shadow_rejected`](Self::shadow_rejected)).
    pub fn rejected(&self) -> u64 {
        self.limiter.rejected()
    }

    /// Whether the limit runs in [shadow mode](super::ConcurrencyLimitLayerBuilder::shadow)
    /// now (a [reload](Self::reload) may switch it).
    pub fn is_shadow(&self) -> bool {
        self.limiter.is_shadow()
    }

    /// How many requests the limit in shadow mode let through that it would have
    /// refused with [`Overloaded`](super::Overloaded) (0 for a limit that never ran in
    /// shadow mode; its refusals are in [`rejected`](Self::rejected)). A limit switched
    /// in and out of shadow mode by reloads counts each request in one or the other.
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

    /// Switches the limit to `config`, atomically: each request is admitted, queued,
    /// refused or (in shadow mode) let through under the old configuration or the new
    /// one, never the limit of one with the options of the other. The next request
    /// sees it.
    ///
    /// `config` is validated as
    /// [`ConcurrencyLimitConfig::build`](crate::config::ConcurrencyLimitConfig::build)
    /// validates it, with the same [`ConfigError`](crate::config::ConfigError) (field
    /// path included); a refused configuration changes nothing. A field left out takes
    /// the builder's default, not what the code that built the layer set.
    ///
    /// - **A static limit** (`max_in_flight`) applies at once. Lowered, the permits held
    ///   stay held and new requests wait or are refused until fewer than the new limit
    ///   are in flight; raised, queued requests are let in up to it.
    /// - **The same algorithm** (`aimd` to `aimd`, `gradient` to `gradient`) takes the
    ///   new settings and keeps its state: the limit it has reached, clamped into the new
    ///   `min_limit..=max_limit` (`initial_limit` only counts when an algorithm starts).
    /// - **Another kind of limit** (static to adaptive, `aimd` to `gradient`, a custom
    ///   algorithm to either) starts afresh, from the new algorithm's starting limit (or
    ///   the new static one): one algorithm's state means nothing to another. Permits
    ///   held stay held.
    /// - **No limit** in `config` (none of `max_in_flight`, `aimd`, `gradient`) leaves
    ///   the limit and its algorithm as they are: a custom algorithm set in code stays.
    /// - **`shadow`** switches shadow mode for the next request, both ways.
    /// - **`queue`** (size and wait) applies to the requests queued from now on; the
    ///   queue can be added or removed. Requests already queued keep their place and
    ///   their wait (and if it runs out, the answer of the configuration they were queued
    ///   under).
    /// - **`retry_after`** applies to the next refusal.
    ///
    /// What shapes a keyed limit cannot change at run time, and must be what it was
    /// built with (left out: the default): `keyed` (keyed or not), `keyed.max_keys`,
    /// and for a keyed limit `retry_after`, the length of its fairness windows. A
    /// difference is refused with [`NotReloadable`](crate::config::NotReloadable) at
    /// that field.
    ///
    /// ```
    /// use palisade::config::ConcurrencyLimitConfig;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config: ConcurrencyLimitConfig = toml::from_str("max_in_flight = 64")?;
    /// let handle = config.build()?.handle();
    ///
    /// handle.reload(&toml::from_str("max_in_flight = 16\nshadow = true")?)?;
    /// assert_eq!((handle.limit(), handle.is_shadow()), (16, true));
    ///
    /// // An adaptive limit from now on, starting at its initial limit.
    /// handle.reload(&toml::from_str("aimd = { initial_limit = 20, max_limit = 100 }")?)?;
    /// assert_eq!(handle.limit(), 20);
    ///
    /// let refused = handle.reload(&toml::from_str("max_in_flight = 0")?);
    /// assert_eq!(refused.unwrap_err().path(), "max_in_flight");
    /// assert_eq!(handle.limit(), 20); // the old configuration holds
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "serde")]
    #[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
    pub fn reload(
        &self,
        config: &crate::config::ConcurrencyLimitConfig,
    ) -> Result<(), crate::config::ConfigError> {
        let plan = config.reload_plan(self.built)?;
        self.limiter.reload(plan.limit, plan.policy);
        Ok(())
    }
}
