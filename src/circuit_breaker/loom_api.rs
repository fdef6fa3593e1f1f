//! The circuit breaker's core, as the loom model checks in `src/loom_tests.rs` drive it
//! (the token bucket and the retry budget are public already). Only built for
//! them (`--cfg loom`, tests).

use super::config::Config;
use super::keyed::{KeyedBreaker, KeyedBreakers};
use super::state::{Core, Observer, Permit};
use super::{OpenBackoff, SlidingWindow, State};
use crate::classify::Outcome;
use crate::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A breaker core with the settings a model needs.
#[derive(Debug)]
pub(crate) struct Breaker(Core);

/// A call the breaker let through.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Call(Permit);

impl Call {
    /// Whether the call holds a half-open probe slot.
    pub(crate) fn is_probe(&self) -> bool {
        self.0.is_probe()
    }
}

/// The settings of a model's breaker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// The window.
    pub(crate) window: SlidingWindow,
    /// Calls needed before a verdict.
    pub(crate) minimum_calls: u64,
    /// The failure rate that trips.
    pub(crate) failure_rate: f64,
    /// The half-open probes.
    pub(crate) probes: u32,
    /// How long the breaker stays open.
    pub(crate) open_for: Duration,
}

impl Settings {
    fn config(&self) -> Config {
        Config {
            failure_rate: self.failure_rate,
            minimum_calls: self.minimum_calls,
            window: self.window,
            slow: None,
            open: OpenBackoff::exponential(self.open_for).max(self.open_for),
            probes: self.probes,
            shadow: false,
        }
        .validate()
        .expect("a valid model configuration")
    }
}

impl Breaker {
    /// A closed breaker; `observer` sees every transition.
    pub(crate) fn new(settings: Settings, observer: Option<Observer>, now: Instant) -> Self {
        Self(Core::new(settings.config(), observer, now))
    }

    /// Lets a call through at `now`, or `None` when it is rejected.
    pub(crate) fn admit(&self, now: Instant) -> Option<Call> {
        self.0.admit(|| now).ok().map(Call)
    }

    /// Records a finished call.
    pub(crate) fn record(&self, call: Call, failure: bool, now: Instant) {
        let outcome = if failure {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        self.0.record(call.0, outcome, None, || now);
    }

    /// Switches the breaker to `settings` at `now` (a live reload).
    pub(crate) fn reload(&self, settings: Settings, now: Instant) {
        self.0.reload(settings.config(), now, |_| {});
    }

    /// Gives a call's permit back unrecorded (a dropped call).
    pub(crate) fn release(&self, call: Call) {
        self.0.release(call.0);
    }

    /// The state.
    pub(crate) fn state(&self) -> State {
        self.0.state()
    }

    /// `(calls, failures)` in the closed-state window at `now`.
    pub(crate) fn counts(&self, now: Instant) -> (u64, u64) {
        let metrics = self.0.metrics(now);
        (metrics.calls, metrics.failures)
    }
}

/// The breakers of a keyed layer, keyed by `u32`, as a model drives them.
#[derive(Debug)]
pub(crate) struct KeyedModel(KeyedBreakers<u32>);

/// A call a keyed breaker let through, holding its breaker.
#[derive(Debug)]
pub(crate) struct KeyedCall {
    breaker: Arc<KeyedBreaker>,
    permit: Permit,
    shared: bool,
}

impl KeyedCall {
    /// Whether the call went through the shared breaker (its key was not tracked).
    pub(crate) fn is_shared(&self) -> bool {
        self.shared
    }
}

impl KeyedModel {
    /// Breakers for at most `max_keys` keys, plus the shared one.
    pub(crate) fn new(settings: Settings, max_keys: usize, now: Instant) -> Self {
        Self(KeyedBreakers::new(
            settings.config(),
            max_keys,
            None,
            None,
            now,
        ))
    }

    /// Looks `key`'s breaker up (tracking the key if there is room) and lets a call
    /// through at `now`, or `None` when it is rejected.
    pub(crate) fn admit(&self, key: u32, now: Instant) -> Option<KeyedCall> {
        let breaker = self.0.breaker(Some(&key), || now);
        let shared = self.0.is_shared(&breaker);
        let permit = breaker.core.admit(|| now).ok()?;
        Some(KeyedCall {
            breaker,
            permit,
            shared,
        })
    }

    /// Records a finished call (and lets go of its breaker).
    pub(crate) fn record(&self, call: KeyedCall, failure: bool, now: Instant) {
        let outcome = if failure {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        call.breaker.core.record(call.permit, outcome, None, || now);
    }

    /// The state of `key`'s breaker, if the table tracks the key.
    pub(crate) fn state_for(&self, key: u32) -> Option<State> {
        self.0.tracked(&key).map(|breaker| breaker.core.state())
    }

    /// The state of the shared breaker.
    pub(crate) fn shared_state(&self) -> State {
        self.0.shared().state()
    }

    /// How many keys the table tracks.
    pub(crate) fn tracked(&self) -> usize {
        self.0.len()
    }
}
