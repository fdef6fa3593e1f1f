use super::state::{Core, Metrics, State, TransitionReason};
use std::sync::Arc;
use tokio::time::Instant;

/// Observes and controls one breaker; cheap to clone. Made by
/// [`CircuitBreakerLayer::handle`](super::CircuitBreakerLayer::handle).
#[derive(Debug, Clone)]
pub struct CircuitBreakerHandle {
    core: Arc<Core>,
}

impl CircuitBreakerHandle {
    pub(crate) fn new(core: Arc<Core>) -> Self {
        Self { core }
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
}
