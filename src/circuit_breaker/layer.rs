use super::config::{Config, OpenBackoff, SlidingWindow, SlowCalls};
use super::ejection::{EjectionGroup, EjectionLayer};
use super::error::CircuitBreakerConfigError;
use super::handle::CircuitBreakerHandle;
use super::lanes::CoreRefs;
use super::service::CircuitBreakerService;
use super::state::{Core, Observer, Transition};
use crate::classify::ErrorsAsFailures;
use std::fmt;
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
    lanes: Arc<CoreRefs>,
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
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// A handle that observes and controls this breaker.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle::new(Arc::clone(&self.core))
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
        CircuitBreakerService::new(inner, Arc::clone(&self.lanes), self.classify.clone())
    }
}

/// Configures a [`CircuitBreakerLayer`]; made by [`CircuitBreakerLayer::builder`].
#[must_use = "a layer or builder does nothing until it is used"]
pub struct CircuitBreakerLayerBuilder<C = ErrorsAsFailures> {
    config: Config,
    /// `None` until set: the default is fitted to the window at build time.
    minimum_calls: Option<u64>,
    classify: C,
    observer: Option<Observer>,
}

impl<C> fmt::Debug for CircuitBreakerLayerBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayerBuilder")
            .field("config", &self.config)
            .field("minimum_calls", &self.minimum_calls)
            .field("observer", &self.observer.is_some())
            .finish_non_exhaustive()
    }
}

impl<C> CircuitBreakerLayerBuilder<C> {
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

    /// How results are judged: a preset from [`crate::classify`] or a closure
    /// `Fn(&Result<Res, E>) -> Outcome`.
    pub fn classify<D>(self, classify: D) -> CircuitBreakerLayerBuilder<D> {
        CircuitBreakerLayerBuilder {
            config: self.config,
            minimum_calls: self.minimum_calls,
            classify,
            observer: self.observer,
        }
    }

    /// Calls `observer` on every state change. It runs on the thread that made the
    /// change, inside a call: keep it short.
    pub fn on_transition(mut self, observer: impl Fn(&Transition) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// Checks the configuration and creates the breaker's state.
    pub fn build(self) -> Result<CircuitBreakerLayer<C>, CircuitBreakerConfigError> {
        let mut config = self.config;
        config.minimum_calls = self
            .minimum_calls
            .unwrap_or_else(|| config.default_minimum_calls());
        let config = config.validate()?;
        let core = Arc::new(Core::new(config, self.observer, Instant::now()));
        Ok(CircuitBreakerLayer {
            lanes: Arc::new(CoreRefs::new(&core)),
            core,
            classify: self.classify,
        })
    }
}
