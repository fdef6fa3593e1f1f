//! The circuit breaker's core, reachable (as `palisade::__loom`) from the loom model checks in `tests/loom.rs`
//! (the token bucket and the retry budget are public already). Only built under
//! `--cfg loom`.

use super::config::Config;
use super::state::{Core, Observer, Permit};
use super::{OpenBackoff, SlidingWindow, State};
use crate::classify::Outcome;
use std::time::Duration;
use tokio::time::Instant;

/// A breaker core with the settings a model needs.
#[derive(Debug)]
pub struct Breaker(Core);

/// A call the breaker let through.
#[derive(Debug, Clone, Copy)]
pub struct Call(Permit);

impl Call {
    /// Whether the call holds a half-open probe slot.
    pub fn is_probe(&self) -> bool {
        self.0.is_probe()
    }
}

/// The settings of a model's breaker.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// The window.
    pub window: SlidingWindow,
    /// Calls needed before a verdict.
    pub minimum_calls: u64,
    /// The failure rate that trips.
    pub failure_rate: f64,
    /// The half-open probes.
    pub probes: u32,
    /// How long the breaker stays open.
    pub open_for: Duration,
}

impl Breaker {
    /// A closed breaker; `observer` sees every transition.
    pub fn new(settings: Settings, observer: Option<Observer>, now: Instant) -> Self {
        let config = Config {
            failure_rate: settings.failure_rate,
            minimum_calls: settings.minimum_calls,
            window: settings.window,
            slow: None,
            open: OpenBackoff::exponential(settings.open_for).max(settings.open_for),
            probes: settings.probes,
        }
        .validate()
        .expect("a valid model configuration");
        Self(Core::new(config, observer, now))
    }

    /// Lets a call through at `now`, or `None` when it is rejected.
    pub fn admit(&self, now: Instant) -> Option<Call> {
        self.0.admit(|| now).ok().map(Call)
    }

    /// Records a finished call.
    pub fn record(&self, call: Call, failure: bool, now: Instant) {
        let outcome = if failure {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        self.0.record(call.0, outcome, Duration::ZERO, || now);
    }

    /// Gives a call's permit back unrecorded (a dropped call).
    pub fn release(&self, call: Call) {
        self.0.release(call.0);
    }

    /// The state.
    pub fn state(&self) -> State {
        self.0.state()
    }

    /// `(calls, failures)` in the closed-state window at `now`.
    pub fn counts(&self, now: Instant) -> (u64, u64) {
        let metrics = self.0.metrics(now);
        (metrics.calls, metrics.failures)
    }
}
