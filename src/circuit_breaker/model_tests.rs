//! The sans-io core against a reference model written from the specification, on
//! random sequences of calls (some left in flight and finished or dropped later, so
//! that half-open probes overlap), time advances and manual control.

use super::config::{Config, OpenBackoff, SlidingWindow, SlowCalls};
use super::state::{Core, Permit, State, Timing};
use crate::classify::Outcome;
use proptest::prelude::*;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone)]
struct Setup {
    failure_rate: f64,
    slow: Option<(u64, f64)>,
    minimum_calls: u64,
    window: ModelWindow,
    open_ms: u64,
    multiplier: u64,
    probes: u32,
}

#[derive(Debug, Clone, Copy)]
enum ModelWindow {
    Count(usize),
    Time { width_ms: u64, buckets: u64 },
}

impl Setup {
    fn max_open_ms(&self) -> u64 {
        self.open_ms * 4
    }

    fn config(&self) -> Config {
        let window = match self.window {
            ModelWindow::Count(size) => SlidingWindow::count(size),
            ModelWindow::Time { width_ms, buckets } => {
                SlidingWindow::time(Duration::from_millis(width_ms * buckets))
                    .buckets(buckets as u32)
            }
        };
        Config {
            failure_rate: self.failure_rate,
            minimum_calls: self.minimum_calls,
            window,
            slow: self.slow.map(|(ms, rate)| SlowCalls {
                threshold: Duration::from_millis(ms),
                rate,
            }),
            open: OpenBackoff::exponential(Duration::from_millis(self.open_ms))
                .multiplier(self.multiplier as f64)
                .max(Duration::from_millis(self.max_open_ms())),
            probes: self.probes,
            shadow: false,
        }
        .validate()
        .expect("generated configurations are valid")
    }
}

fn setup() -> impl Strategy<Value = Setup> {
    let rate = prop::sample::select(vec![0.25, 0.5, 0.75, 1.0]);
    let window = prop_oneof![
        (1usize..=8).prop_map(ModelWindow::Count),
        (prop::sample::select(vec![10u64, 50]), 1u64..=4)
            .prop_map(|(width_ms, buckets)| ModelWindow::Time { width_ms, buckets }),
    ];
    (
        rate.clone(),
        prop::option::of((prop::sample::select(vec![20u64, 50]), rate)),
        window,
        1u64..=8,
        prop::sample::select(vec![100u64, 250]),
        1u64..=2,
        1u32..=3,
    )
        .prop_map(
            |(failure_rate, slow, window, minimum_calls, open_ms, multiplier, probes)| Setup {
                failure_rate,
                slow,
                minimum_calls: match window {
                    ModelWindow::Count(size) => minimum_calls.min(size as u64),
                    ModelWindow::Time { .. } => minimum_calls,
                },
                window,
                open_ms,
                multiplier,
                probes,
            },
        )
}

#[derive(Debug, Clone)]
enum Op {
    /// A call that completes after `ms`.
    Call(Outcome, u64),
    /// A call left in flight.
    Start,
    /// The in-flight call at this index (modulo their number) completes.
    Finish(usize, Outcome),
    /// The in-flight call at this index is dropped.
    Drop(usize),
    Advance(u64),
    ForceOpen,
    ForceClosed,
    Reset,
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        3 => Just(Outcome::Success),
        3 => Just(Outcome::Failure),
        1 => Just(Outcome::Ignored),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (outcome(), 0u64..=80).prop_map(|(outcome, ms)| Op::Call(outcome, ms)),
        3 => Just(Op::Start),
        3 => (any::<usize>(), outcome()).prop_map(|(index, outcome)| Op::Finish(index, outcome)),
        2 => any::<usize>().prop_map(Op::Drop),
        4 => (0u64..=300).prop_map(Op::Advance),
        1 => Just(Op::ForceOpen),
        1 => Just(Op::ForceClosed),
        1 => Just(Op::Reset),
    ]
}

/// The specification, as directly as it can be written.
#[derive(Debug)]
struct Model {
    setup: Setup,
    state: State,
    generation: u64,
    /// (epoch or sequence number, failed, slow), oldest first.
    window: VecDeque<(u64, bool, bool)>,
    open_until_ms: u64,
    consecutive_trips: u32,
    probes_taken: u32,
    probes_done: Vec<(bool, bool)>,
    /// Calls rejected since the start or the last reset.
    rejected: u64,
}

#[derive(Debug, Clone, Copy)]
struct ModelPermit {
    generation: u64,
    state: State,
}

impl Model {
    fn new(setup: Setup) -> Self {
        Self {
            setup,
            state: State::Closed,
            generation: 0,
            window: VecDeque::new(),
            open_until_ms: 0,
            consecutive_trips: 0,
            probes_taken: 0,
            probes_done: Vec::new(),
            rejected: 0,
        }
    }

    fn enter(&mut self, state: State) {
        self.state = state;
        self.generation += 1;
    }

    fn admit(&mut self, now_ms: u64) -> Result<ModelPermit, Duration> {
        let admitted = self.admit_or_reject(now_ms);
        self.rejected += u64::from(admitted.is_err());
        admitted
    }

    fn admit_or_reject(&mut self, now_ms: u64) -> Result<ModelPermit, Duration> {
        if self.state == State::Open {
            if now_ms < self.open_until_ms {
                return Err(Duration::from_millis(self.open_until_ms - now_ms));
            }
            self.enter(State::HalfOpen);
            self.probes_taken = 0;
            self.probes_done.clear();
        }
        match self.state {
            State::ForcedOpen => return Err(Duration::from_millis(self.setup.open_ms)),
            State::HalfOpen if self.probes_taken == self.setup.probes => {
                let latest = self.nominal_open_ms(self.consecutive_trips.saturating_sub(1));
                return Err(Duration::from_millis(latest));
            }
            State::HalfOpen => self.probes_taken += 1,
            _ => {}
        }
        Ok(ModelPermit {
            generation: self.generation,
            state: self.state,
        })
    }

    fn current(&self, permit: ModelPermit) -> bool {
        permit.generation == self.generation && permit.state == self.state
    }

    fn release(&mut self, permit: ModelPermit) {
        if permit.state == State::HalfOpen && self.current(permit) {
            self.probes_taken -= 1;
        }
    }

    fn tripped(&self, calls: usize, failures: usize, slow: usize) -> bool {
        let calls = calls as f64;
        failures as f64 >= self.setup.failure_rate * calls
            || self
                .setup
                .slow
                .is_some_and(|(_, rate)| slow as f64 >= rate * calls)
    }

    fn nominal_open_ms(&self, trips: u32) -> u64 {
        let nominal = self.setup.open_ms * self.setup.multiplier.pow(trips.min(10));
        nominal.min(self.setup.max_open_ms())
    }

    fn open(&mut self, now_ms: u64) {
        self.open_until_ms = now_ms + self.nominal_open_ms(self.consecutive_trips);
        self.consecutive_trips += 1;
        self.enter(State::Open);
    }

    fn record(&mut self, permit: ModelPermit, outcome: Outcome, took_ms: u64, now_ms: u64) {
        if outcome == Outcome::Ignored {
            return self.release(permit);
        }
        if !self.current(permit) {
            return;
        }
        let failed = outcome == Outcome::Failure;
        let slow = self.setup.slow.is_some_and(|(ms, _)| took_ms > ms);
        match self.state {
            State::Closed => {
                let stamp = match self.setup.window {
                    ModelWindow::Count(size) => {
                        if self.window.len() == size {
                            self.window.pop_front();
                        }
                        0
                    }
                    ModelWindow::Time { width_ms, .. } => now_ms / width_ms,
                };
                self.window.push_back((stamp, failed, slow));
                let (calls, failures, slows) = self.counts(now_ms);
                if calls as u64 >= self.setup.minimum_calls && self.tripped(calls, failures, slows)
                {
                    self.open(now_ms);
                }
            }
            State::HalfOpen => {
                self.probes_done.push((failed, slow));
                if self.probes_done.len() == self.setup.probes as usize {
                    let failures = self.probes_done.iter().filter(|probe| probe.0).count();
                    let slows = self.probes_done.iter().filter(|probe| probe.1).count();
                    if self.tripped(self.probes_done.len(), failures, slows) {
                        self.open(now_ms);
                    } else {
                        self.window.clear();
                        self.consecutive_trips = 0;
                        self.enter(State::Closed);
                    }
                }
            }
            _ => {}
        }
    }

    fn counts(&self, now_ms: u64) -> (usize, usize, usize) {
        let live = |stamp: u64| match self.setup.window {
            ModelWindow::Count(_) => true,
            ModelWindow::Time { width_ms, buckets } => now_ms / width_ms - stamp < buckets,
        };
        let entries: Vec<_> = self.window.iter().filter(|entry| live(entry.0)).collect();
        (
            entries.len(),
            entries.iter().filter(|entry| entry.1).count(),
            entries.iter().filter(|entry| entry.2).count(),
        )
    }

    /// Probes in flight, succeeded, failed and slow in the current half-open episode.
    fn episode(&self) -> (u32, u32, u32, u32) {
        if self.state != State::HalfOpen {
            return (0, 0, 0, 0);
        }
        let count = |which: fn(&(bool, bool)) -> bool| {
            self.probes_done.iter().filter(|probe| which(probe)).count() as u32
        };
        (
            self.probes_taken - self.probes_done.len() as u32,
            count(|probe| !probe.0),
            count(|probe| probe.0),
            count(|probe| probe.1),
        )
    }

    fn force(&mut self, state: State) {
        if state == State::Closed {
            self.window.clear();
            self.consecutive_trips = 0;
            self.rejected = 0;
        } else if state == self.state {
            return;
        }
        self.enter(state);
    }
}

struct InFlight {
    permit: Permit,
    model: ModelPermit,
    started_ms: u64,
}

fn run(setup: Setup, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let base = Instant::now();
    let core = Core::new(setup.config(), None, base);
    let mut model = Model::new(setup);
    let mut now_ms = 0u64;
    let mut in_flight: Vec<InFlight> = Vec::new();
    let at = |ms: u64| base + Duration::from_millis(ms);

    for op in ops {
        match op {
            Op::Call(outcome, took_ms) => {
                let real = core.admit(|| at(now_ms));
                let expected = model.admit(now_ms);
                prop_assert_eq!(
                    real.as_ref().err().map(|open| open.retry_after()),
                    expected.err()
                );
                let started_ms = now_ms;
                now_ms += took_ms;
                if let (Ok(permit), Ok(model_permit)) = (real, expected) {
                    let timing = Timing::new(at(started_ms), at(now_ms));
                    core.record(permit, outcome, Some(timing), || at(now_ms));
                    model.record(model_permit, outcome, took_ms, now_ms);
                }
            }
            Op::Start => {
                let real = core.admit(|| at(now_ms));
                let expected = model.admit(now_ms);
                prop_assert_eq!(
                    real.as_ref().err().map(|open| open.retry_after()),
                    expected.err()
                );
                if let (Ok(permit), Ok(model)) = (real, expected) {
                    in_flight.push(InFlight {
                        permit,
                        model,
                        started_ms: now_ms,
                    });
                }
            }
            Op::Finish(index, outcome) if !in_flight.is_empty() => {
                let call = in_flight.swap_remove(index % in_flight.len());
                let took_ms = now_ms - call.started_ms;
                let timing = Timing::new(at(call.started_ms), at(now_ms));
                core.record(call.permit, outcome, Some(timing), || at(now_ms));
                model.record(call.model, outcome, took_ms, now_ms);
            }
            Op::Drop(index) if !in_flight.is_empty() => {
                let call = in_flight.swap_remove(index % in_flight.len());
                core.release(call.permit);
                model.release(call.model);
            }
            Op::Finish(..) | Op::Drop(_) => {}
            Op::Advance(ms) => now_ms += ms,
            Op::ForceOpen => {
                core.force(
                    State::ForcedOpen,
                    super::TransitionReason::ForcedOpen,
                    at(now_ms),
                );
                model.force(State::ForcedOpen);
            }
            Op::ForceClosed => {
                core.force(
                    State::ForcedClosed,
                    super::TransitionReason::ForcedClosed,
                    at(now_ms),
                );
                model.force(State::ForcedClosed);
            }
            Op::Reset => {
                core.force(State::Closed, super::TransitionReason::Reset, at(now_ms));
                model.force(State::Closed);
            }
        }
        prop_assert_eq!(core.state(), model.state);
        let metrics = core.metrics(at(now_ms));
        let (calls, failures, slow) = model.counts(now_ms);
        prop_assert_eq!(
            (metrics.calls, metrics.failures, metrics.slow_calls),
            (calls as u64, failures as u64, slow as u64)
        );
        prop_assert_eq!(metrics.consecutive_trips, model.consecutive_trips);
        prop_assert_eq!(
            metrics.minimum_calls_reached,
            calls as u64 >= model.setup.minimum_calls
        );
        prop_assert_eq!(
            (
                metrics.probes_in_flight,
                metrics.probe_successes,
                metrics.probe_failures,
                metrics.probe_slow_calls
            ),
            model.episode()
        );
        prop_assert_eq!(metrics.rejected, model.rejected);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn core_agrees_with_the_model(setup in setup(), ops in prop::collection::vec(op(), 1..120)) {
        run(setup, ops)?;
    }
}
