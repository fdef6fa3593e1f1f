use super::keyed::KeyedBreakers;
#[cfg(feature = "serde")]
use super::lanes::CoreRefs;
use super::lanes::Published;
use super::state::{Core, Metrics, State, TransitionReason};
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use tokio::time::Instant;

/// Observes and controls one breaker; cheap to clone. Made by
/// [`CircuitBreakerLayer::handle`](super::CircuitBreakerLayer::handle).
#[derive(Clone)]
pub struct CircuitBreakerHandle {
    core: Arc<Core>,
    /// Where the breaker's calls find its policy: a reload publishes new lanes here.
    #[cfg_attr(not(feature = "serde"), allow(dead_code))]
    lanes: Published,
}

impl fmt::Debug for CircuitBreakerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerHandle")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl CircuitBreakerHandle {
    pub(crate) fn new(core: Arc<Core>, lanes: Published) -> Self {
        Self { core, lanes }
    }

    /// The current state. An open breaker whose open time has passed reads as open
    /// until the next call moves it to half-open.
    pub fn state(&self) -> State {
        self.core.state()
    }

    /// A snapshot: the state, the closed-state window, the current half-open episode
    /// and the calls rejected. Reading it never slows the breaker's calls down.
    pub fn metrics(&self) -> Metrics {
        self.core.metrics(Instant::now())
    }

    /// Whether the breaker runs in [shadow mode](super::CircuitBreakerLayerBuilder::shadow).
    pub fn is_shadow(&self) -> bool {
        self.core.is_shadow()
    }

    /// How many calls the breaker in shadow mode let through that it would have
    /// rejected, since it was built or last [reset](Self::reset) (0 for a breaker never
    /// in shadow mode); [`Metrics::shadow_rejected`] too.
    pub fn shadow_rejected(&self) -> u64 {
        self.core.shadow_rejected()
    }

    /// Rejects every call until [`force_closed`](Self::force_closed) or
    /// [`reset`](Self::reset). On a breaker already forced open it does nothing: no
    /// transition is reported and [`Metrics::last_transition`] stays.
    pub fn force_open(&self) {
        self.core.force(
            State::ForcedOpen,
            TransitionReason::ForcedOpen,
            Instant::now(),
        );
    }

    /// Lets every call through and records nothing until
    /// [`force_open`](Self::force_open) or [`reset`](Self::reset). On a breaker already
    /// forced closed it does nothing, like [`force_open`](Self::force_open) twice.
    pub fn force_closed(&self) {
        self.core.force(
            State::ForcedClosed,
            TransitionReason::ForcedClosed,
            Instant::now(),
        );
    }

    /// Closes the breaker with an empty window and forgets past trips.
    pub fn reset(&self) {
        self.core
            .force(State::Closed, TransitionReason::Reset, Instant::now());
    }

    /// Switches the breaker to `config`, atomically: every decision (to trip, to close,
    /// how long to stay open, whether to let a refused call through) is taken under the
    /// old configuration or the new one, never a mix of the two.
    ///
    /// `config` is validated as
    /// [`CircuitBreakerConfig::build`](crate::config::CircuitBreakerConfig::build)
    /// validates it, with the same [`ConfigError`](crate::config::ConfigError) (field
    /// path included); a refused configuration changes nothing. A `keyed` section is
    /// refused with [`NotReloadable`](crate::config::NotReloadable): a global breaker
    /// stays global. Everything else can change, [`shadow`](super::CircuitBreakerLayerBuilder::shadow)
    /// included, from the next call on. See [live reload](super#live-reload) for what
    /// carries over: in short, the state always, the window when its kind does.
    ///
    /// ```
    /// use palisade::circuit_breaker::State;
    /// use palisade::config::CircuitBreakerConfig;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config: CircuitBreakerConfig = toml::from_str("minimum_calls = 20")?;
    /// let handle = config.build()?.handle();
    ///
    /// handle.reload(&toml::from_str(
    ///     "failure_rate_threshold = 0.2\nminimum_calls = 10\nshadow = true",
    /// )?)?;
    /// assert!(handle.is_shadow()); // watching, from the next call on
    ///
    /// let refused = handle.reload(&toml::from_str("minimum_calls = 0")?);
    /// assert_eq!(refused.unwrap_err().path(), "minimum_calls");
    /// assert!(handle.is_shadow()); // the configuration in force stays
    /// assert_eq!(handle.state(), State::Closed);
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "serde")]
    #[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
    pub fn reload(
        &self,
        config: &crate::config::CircuitBreakerConfig,
    ) -> Result<(), crate::config::ConfigError> {
        let config = config.reload_config(None)?;
        self.core.reload(config, Instant::now(), |policy| {
            self.lanes
                .store(Arc::new(CoreRefs::with(&self.core, policy)));
        });
        Ok(())
    }
}

/// Observes and controls the breakers of a keyed layer; cheap to clone. Made by
/// [`KeyedCircuitBreakerLayer::handle`](super::KeyedCircuitBreakerLayer::handle).
///
/// A key the layer does not track has no breaker of its own yet: it reads as a fresh
/// breaker would (closed, or what the layer as a whole was forced into).
pub struct KeyedCircuitBreakerHandle<K> {
    breakers: Arc<KeyedBreakers<K>>,
}

impl<K> Clone for KeyedCircuitBreakerHandle<K> {
    fn clone(&self) -> Self {
        Self {
            breakers: Arc::clone(&self.breakers),
        }
    }
}

impl<K> fmt::Debug for KeyedCircuitBreakerHandle<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakerHandle")
            .field("breakers", &self.breakers)
            .finish()
    }
}

impl<K> KeyedCircuitBreakerHandle<K> {
    pub(crate) fn new(breakers: Arc<KeyedBreakers<K>>) -> Self {
        Self { breakers }
    }
}

impl<K> KeyedCircuitBreakerHandle<K>
where
    K: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
{
    /// Whether the layer runs in [shadow mode](super::CircuitBreakerLayerBuilder::shadow).
    pub fn is_shadow(&self) -> bool {
        self.breakers.is_shadow()
    }

    /// How many calls the layer in shadow mode let through that one of its breakers
    /// would have rejected, since it was built or last [reset](Self::reset) (always 0
    /// for an enforcing layer). Each breaker's share is in its
    /// [`Metrics::shadow_rejected`].
    pub fn shadow_rejected(&self) -> u64 {
        self.breakers.shadow_rejected()
    }

    /// The state of `key`'s breaker (see [`CircuitBreakerHandle::state`]).
    pub fn state_for(&self, key: &K) -> State {
        self.breakers.tracked(key).map_or_else(
            || self.breakers.fresh_state(),
            |breaker| breaker.core.state(),
        )
    }

    /// A snapshot of `key`'s breaker, or `None` when the layer does not track the key.
    pub fn metrics_for(&self, key: &K) -> Option<Metrics> {
        let breaker = self.breakers.tracked(key)?;
        Some(breaker.core.metrics(Instant::now()))
    }

    /// Every tracked key whose breaker is not closed (open, half-open or forced), with
    /// its state: what an operator wants to see. The shards are read one after the
    /// other while calls go on.
    pub fn not_closed(&self) -> Vec<(K, State)> {
        self.breakers.not_closed()
    }

    /// How many keys have a breaker of their own now (never more than `max_keys`).
    pub fn tracked_keys(&self) -> usize {
        self.breakers.len()
    }

    /// The state of the shared breaker: the one requests without a key, and new keys
    /// beyond `max_keys`, go through.
    pub fn shared_state(&self) -> State {
        self.breakers.shared().state()
    }

    /// A snapshot of the shared breaker.
    pub fn shared_metrics(&self) -> Metrics {
        self.breakers.shared().metrics(Instant::now())
    }

    /// Forces `key`'s breaker open (see [`CircuitBreakerHandle::force_open`]), tracking
    /// the key if it is new. False when the key is new and the table is full of live
    /// breakers: nothing changed.
    pub fn force_open_for(&self, key: &K) -> bool {
        self.breakers.force_one(
            key,
            State::ForcedOpen,
            TransitionReason::ForcedOpen,
            Instant::now(),
        )
    }

    /// Forces `key`'s breaker closed, like [`force_open_for`](Self::force_open_for).
    pub fn force_closed_for(&self, key: &K) -> bool {
        self.breakers.force_one(
            key,
            State::ForcedClosed,
            TransitionReason::ForcedClosed,
            Instant::now(),
        )
    }

    /// Closes `key`'s breaker with an empty window and forgets its past trips. A key
    /// the layer does not track has a fresh breaker already.
    pub fn reset_for(&self, key: &K) {
        self.breakers
            .force_one(key, State::Closed, TransitionReason::Reset, Instant::now());
    }

    /// Forces every breaker open, the shared one too, and starts the breakers of keys
    /// that appear afterwards forced open, until [`reset`](Self::reset) or
    /// [`force_closed`](Self::force_closed).
    pub fn force_open(&self) {
        self.breakers.force_all(
            State::ForcedOpen,
            TransitionReason::ForcedOpen,
            Instant::now(),
        );
    }

    /// Forces every breaker closed, like [`force_open`](Self::force_open).
    pub fn force_closed(&self) {
        self.breakers.force_all(
            State::ForcedClosed,
            TransitionReason::ForcedClosed,
            Instant::now(),
        );
    }

    /// Resets every breaker (the shared one too) to closed with an empty window, and
    /// lets new keys start closed again.
    pub fn reset(&self) {
        self.breakers
            .force_all(State::Closed, TransitionReason::Reset, Instant::now());
    }

    /// Switches every breaker of the layer to `config`: the shared one, each tracked
    /// key's, and those of keys that appear afterwards. Each breaker switches
    /// atomically, as [`CircuitBreakerHandle::reload`] describes, and keeps its own
    /// state and (when the window's kind is unchanged) its window.
    ///
    /// `config` is validated as [`build_keyed`](crate::config::CircuitBreakerConfig::build_keyed)
    /// validates it; it must have a `keyed` section with the `max_keys` the layer was
    /// built with (left out: the default), else it is refused with
    /// [`NotReloadable`](crate::config::NotReloadable) at `keyed` or `keyed.max_keys`. A
    /// refused configuration changes nothing.
    ///
    /// ```
    /// use palisade::config::CircuitBreakerConfig;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config: CircuitBreakerConfig = toml::from_str("keyed = { max_keys = 100 }")?;
    /// let layer = config.build_keyed::<_, String>(|host: &String| Some(host.clone()))?;
    /// let handle = layer.handle();
    ///
    /// handle.reload(&toml::from_str("shadow = true\nkeyed = { max_keys = 100 }")?)?;
    /// assert!(handle.is_shadow());
    ///
    /// let refused = handle.reload(&toml::from_str("keyed = { max_keys = 5 }")?).unwrap_err();
    /// assert_eq!(
    ///     refused.to_string(),
    ///     "keyed.max_keys: cannot change at run time (the layer was built with 100): build a new layer to change it",
    /// );
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "serde")]
    #[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
    pub fn reload(
        &self,
        config: &crate::config::CircuitBreakerConfig,
    ) -> Result<(), crate::config::ConfigError> {
        let config = config.reload_config(Some(self.breakers.max_keys()))?;
        self.breakers.reload(config, Instant::now());
        Ok(())
    }
}
