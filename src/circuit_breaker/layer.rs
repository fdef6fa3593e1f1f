use super::config::{Config, OpenBackoff, SlidingWindow, SlowCalls};
use super::ejection::{EjectionGroup, EjectionLayer};
use super::error::CircuitBreakerConfigError;
use super::handle::{CircuitBreakerHandle, KeyedCircuitBreakerHandle};
use super::keyed::{KeyLabel, KeyedBreakers, KeyedObserver};
use super::lanes::{self, Lanes, Published};
use super::service::{CircuitBreakerService, KeyedCircuitBreakerService};
use super::state::{Core, Observer, Transition};
use crate::classify::ErrorsAsFailures;
use crate::key::Global;
use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tower_layer::Layer;

/// Wraps services in a circuit breaker.
///
/// The breaker's state is created once, here: every service this layer builds, and
/// every clone of them, shares it. Build a second layer for an independent breaker.
/// See the [module documentation](super) for the semantics.
#[must_use = "a layer or builder does nothing until it is used"]
pub struct CircuitBreakerLayer<C = ErrorsAsFailures> {
    core: Arc<Core>,
    lanes: Published,
    classify: C,
}

impl<C: Clone> Clone for CircuitBreakerLayer<C> {
    fn clone(&self) -> Self {
        Self {
            core: Arc::clone(&self.core),
            lanes: Arc::clone(&self.lanes),
            classify: self.classify.clone(),
        }
    }
}

impl<C> fmt::Debug for CircuitBreakerLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl CircuitBreakerLayer {
    /// A builder with the defaults: trips at a 50% failure rate over the last 100
    /// calls once at least 20 were recorded (or the whole window, for a count window
    /// of fewer than 20 calls), stays open 30 seconds, lets 5 probes through when
    /// half-open, no slow-call detection, every `Err` is a failure.
    pub fn builder() -> CircuitBreakerLayerBuilder {
        CircuitBreakerLayerBuilder {
            config: Config::default(),
            minimum_calls: None,
            classify: ErrorsAsFailures,
            observer: None,
            keys: Global,
            label: None,
            key: PhantomData,
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// A handle that observes and controls this breaker.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle::new(Arc::clone(&self.core), Arc::clone(&self.lanes))
    }

    /// This breaker for an endpoint inside a `tower::balance` pool: while it refuses
    /// calls the endpoint reports not-ready, so that the balancer sends its requests to
    /// the other endpoints of `group`, and when every endpoint of `group` refuses calls
    /// they all answer with [`CircuitOpen`](super::CircuitOpen) at once. See
    /// [`EjectionLayer`] for why this mode, unlike the default, works
    /// through `poll_ready`.
    pub fn ejecting(&self, group: &EjectionGroup) -> EjectionLayer<C>
    where
        C: Clone,
    {
        EjectionLayer::new(
            Arc::clone(&self.core),
            Arc::clone(&self.lanes),
            self.classify.clone(),
            group.clone(),
        )
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreakerService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService::new(inner, Lanes::new(&self.lanes), self.classify.clone())
    }
}

/// Configures a [`CircuitBreakerLayer`], or with [`keyed`](Self::keyed) a
/// [`KeyedCircuitBreakerLayer`]; made by [`CircuitBreakerLayer::builder`].
///
/// `X` is [`Global`] for one breaker, or [`Keyed`] once [`keyed`](Self::keyed) was
/// called; `K` is then the key type.
#[must_use = "a layer or builder does nothing until it is used"]
pub struct CircuitBreakerLayerBuilder<C = ErrorsAsFailures, X = Global, K = ()> {
    config: Config,
    /// `None` until set: the default is fitted to the window at build time.
    minimum_calls: Option<u64>,
    classify: C,
    observer: Option<KeyedObserver<K>>,
    keys: X,
    label: Option<KeyLabel<K>>,
    key: PhantomData<fn() -> K>,
}

/// The key settings of a keyed [`CircuitBreakerLayerBuilder`]: made by
/// [`keyed`](CircuitBreakerLayerBuilder::keyed).
#[derive(Clone)]
pub struct Keyed<X> {
    extractor: X,
    max_keys: usize,
}

// By hand: an extractor is usually a closure, which has no `Debug`.
impl<X> fmt::Debug for Keyed<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyed")
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

/// How many keys a keyed breaker tracks unless told otherwise.
pub(crate) const DEFAULT_MAX_KEYS: usize = 1_000;

impl<C, X: fmt::Debug, K> fmt::Debug for CircuitBreakerLayerBuilder<C, X, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayerBuilder")
            .field("config", &self.config)
            .field("minimum_calls", &self.minimum_calls)
            .field("observer", &self.observer.is_some())
            .field("keys", &self.keys)
            .field("key_in_metrics", &self.label.is_some())
            .finish_non_exhaustive()
    }
}

impl<C, X, K> CircuitBreakerLayerBuilder<C, X, K> {
    /// The breaker trips when the failure rate in the window is at least `rate`, in
    /// `(0, 1]`.
    pub fn failure_rate_threshold(mut self, rate: f64) -> Self {
        self.config.failure_rate = rate;
        self
    }

    /// No verdict before the window holds this many calls: at least 1, and at most a
    /// count window's size (more is a [`CircuitBreakerConfigError::MinimumCallsAboveWindow`]). Unset,
    /// it is 20, or the size of a count window of fewer than 20 calls.
    pub fn minimum_calls(mut self, calls: u64) -> Self {
        self.minimum_calls = Some(calls);
        self
    }

    /// Which recent calls the verdict is based on.
    pub fn sliding_window(mut self, window: SlidingWindow) -> Self {
        self.config.window = window;
        self
    }

    /// A call that takes longer than `threshold` is slow, whatever its outcome; the
    /// breaker trips when the slow rate in the window reaches `rate`, in `(0, 1]`. A
    /// call's time runs until its outcome is known: for a gRPC call classified by its
    /// trailers, to the end of the response body.
    pub fn slow_calls(mut self, threshold: Duration, rate: f64) -> Self {
        self.config.slow = Some(SlowCalls { threshold, rate });
        self
    }

    /// Stays open for `duration` after each trip: above zero, at most 100 years.
    pub fn open_for(mut self, duration: Duration) -> Self {
        self.config.open = OpenBackoff::fixed(duration);
        self
    }

    /// Stays open longer after each consecutive trip.
    pub fn open_backoff(mut self, backoff: OpenBackoff) -> Self {
        self.config.open = backoff;
        self
    }

    /// How many probe calls a half-open breaker lets through (at most 4095); it
    /// decides once they have all completed.
    pub fn half_open_probes(mut self, probes: u32) -> Self {
        self.config.probes = probes;
        self
    }

    /// Shadow mode (default off): the breaker decides, counts, changes state, logs and
    /// reports its transitions exactly as it would, but a call it would reject is sent to
    /// the inner service instead (forced open too: a shadow breaker rejects nothing),
    /// and [`shadow_rejected`] counts it (the `metrics`
    /// counter `palisade_circuit_breaker_shadow_rejected_total` too). Rolls a new
    /// breaker out by watching it before it sheds anything.
    ///
    /// A call let through is not recorded: its outcome goes neither into the window nor
    /// into the probes, as an enforcing breaker never sees a call it rejected. So the
    /// shadow breaker opens, half-opens and closes exactly when an enforcing one would on
    /// the same traffic, as long as the dependency answers each call the same whether
    /// or not the shed calls reached it; one that recovers only once its load drops
    /// recovers later behind a shadow breaker, which does not drop it. Under
    /// [`ejecting`](CircuitBreakerLayer::ejecting), a shadow endpoint never leaves the
    /// pool. See the [module docs](super#shadow-mode). With the `serde` feature the switch
    /// flips at run time too, from the next call on ([live reload](super#live-reload)).
    ///
    /// [`shadow_rejected`]: super::CircuitBreakerHandle::shadow_rejected
    pub fn shadow(mut self, shadow: bool) -> Self {
        self.config.shadow = shadow;
        self
    }

    /// How results are judged: a preset from [`crate::classify`] or a closure
    /// `Fn(&Result<Res, E>) -> Outcome`.
    pub fn classify<D>(self, classify: D) -> CircuitBreakerLayerBuilder<D, X, K> {
        CircuitBreakerLayerBuilder {
            config: self.config,
            minimum_calls: self.minimum_calls,
            classify,
            observer: self.observer,
            keys: self.keys,
            label: self.label,
            key: PhantomData,
        }
    }

    /// The checked configuration.
    pub(crate) fn checked_config(&self) -> Result<Config, CircuitBreakerConfigError> {
        let mut config = self.config;
        config.minimum_calls = self
            .minimum_calls
            .unwrap_or_else(|| config.default_minimum_calls());
        config.validate()
    }
}

impl<C> CircuitBreakerLayerBuilder<C> {
    /// Calls `observer` on every state change. It runs on the thread that made the
    /// change, inside a call: keep it short.
    pub fn on_transition(mut self, observer: impl Fn(&Transition) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(move |_: Option<&()>, transition: &Transition| {
            observer(transition)
        }));
        self
    }

    /// One independent breaker per key: its own window, state, open-time growth and
    /// probes, all with this configuration. `extractor` is one of the
    /// [`key`](crate::key) extractors ([`key::Authority`](crate::key::Authority) for one
    /// breaker per upstream) or a closure `Fn(&Req) -> Option<K>`. See the
    /// [module docs](super#keyed-breakers) for the cap and for requests without a key.
    ///
    /// The key type `K` is inferred from the service the layer wraps; where nothing else
    /// pins it down, name it: `.keyed::<_, http::uri::Authority>(key::Authority)`.
    pub fn keyed<X, K>(self, extractor: X) -> CircuitBreakerLayerBuilder<C, Keyed<X>, K> {
        CircuitBreakerLayerBuilder {
            config: self.config,
            minimum_calls: self.minimum_calls,
            classify: self.classify,
            observer: self.observer.map(|observer| {
                Arc::new(move |_: Option<&K>, transition: &Transition| observer(None, transition))
                    as KeyedObserver<K>
            }),
            keys: Keyed {
                extractor,
                max_keys: DEFAULT_MAX_KEYS,
            },
            label: None,
            key: PhantomData,
        }
    }

    /// Checks the configuration and creates the breaker's state.
    pub fn build(self) -> Result<CircuitBreakerLayer<C>, CircuitBreakerConfigError> {
        let config = self.checked_config()?;
        let observer = self.observer.map(|observer| {
            Arc::new(move |transition: &Transition| observer(None, transition)) as Observer
        });
        let core = Arc::new(Core::new(config, observer, Instant::now()));
        Ok(CircuitBreakerLayer {
            lanes: lanes::publish(&core),
            core,
            classify: self.classify,
        })
    }
}

impl<C, X, K> CircuitBreakerLayerBuilder<C, Keyed<X>, K> {
    /// The most keys the breaker tracks (default 1,000; at least 1). Beyond, a new key
    /// shares the [shared breaker](super#keyed-breakers) until an idle key's breaker can
    /// be dropped.
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.keys.max_keys = max_keys;
        self
    }

    /// Calls `observer` on every state change of any key's breaker, with the key
    /// (`None` for the shared breaker). It runs on the thread that made the change,
    /// inside a call: keep it short.
    pub fn on_transition(
        mut self,
        observer: impl Fn(Option<&K>, &Transition) + Send + Sync + 'static,
    ) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// Labels the `metrics` counters (feature `metrics`) with each key, as `label`
    /// renders it (`"(shared)"` for the shared breaker). Off by default: a label per key
    /// is a time series per key, at most `max_keys` + 1 of them.
    pub fn key_in_metrics(mut self, label: impl Fn(&K) -> String + Send + Sync + 'static) -> Self {
        self.label = Some(Arc::new(label));
        self
    }

    /// Checks the configuration and creates the table of breakers.
    pub fn build(self) -> Result<KeyedCircuitBreakerLayer<X, K, C>, CircuitBreakerConfigError>
    where
        K: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    {
        let config = self.checked_config()?;
        if self.keys.max_keys == 0 {
            return Err(CircuitBreakerConfigError::ZeroMaxKeys);
        }
        let breakers = KeyedBreakers::new(
            config,
            self.keys.max_keys,
            self.observer,
            self.label,
            Instant::now(),
        );
        Ok(KeyedCircuitBreakerLayer {
            breakers: Arc::new(breakers),
            extractor: Arc::new(self.keys.extractor),
            classify: self.classify,
        })
    }
}

/// Wraps services in a keyed circuit breaker: one breaker per key. Made by
/// [`CircuitBreakerLayerBuilder::keyed`].
///
/// Like the global layer, the breakers live here: every service this layer builds, and
/// every clone of them, shares them. See the [module docs](super#keyed-breakers).
#[must_use = "a layer or builder does nothing until it is used"]
pub struct KeyedCircuitBreakerLayer<X, K, C = ErrorsAsFailures> {
    breakers: Arc<KeyedBreakers<K>>,
    extractor: Arc<X>,
    classify: C,
}

impl<X, K, C: Clone> Clone for KeyedCircuitBreakerLayer<X, K, C> {
    fn clone(&self) -> Self {
        Self {
            breakers: Arc::clone(&self.breakers),
            extractor: Arc::clone(&self.extractor),
            classify: self.classify.clone(),
        }
    }
}

impl<X, K, C> fmt::Debug for KeyedCircuitBreakerLayer<X, K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakerLayer")
            .field("breakers", &self.breakers)
            .finish_non_exhaustive()
    }
}

impl<X, K, C> KeyedCircuitBreakerLayer<X, K, C> {
    /// A handle that observes and controls every key's breaker.
    pub fn handle(&self) -> KeyedCircuitBreakerHandle<K> {
        KeyedCircuitBreakerHandle::new(Arc::clone(&self.breakers))
    }
}

impl<S, X, K, C: Clone> Layer<S> for KeyedCircuitBreakerLayer<X, K, C> {
    type Service = KeyedCircuitBreakerService<S, X, K, C>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedCircuitBreakerService::new(
            inner,
            Arc::clone(&self.breakers),
            Arc::clone(&self.extractor),
            self.classify.clone(),
        )
    }
}
