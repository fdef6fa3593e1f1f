//! The keyed table of breakers against a reference model: a map of independent
//! reference breakers (the global core, itself checked against the specification in
//! `model_tests`), one per key, plus one for the shared breaker. Random keys, outcomes,
//! calls left in flight, time and manual control; the table is small, so keys are
//! swept and refused all the time.

use super::*;
use crate::circuit_breaker::config::{OpenBackoff, SlidingWindow};
use crate::circuit_breaker::state::Permit;
use crate::classify::Outcome;
use proptest::prelude::*;
use std::collections::{HashMap, VecDeque};

const MAX_KEYS: usize = 3;

fn config() -> Config {
    Config {
        failure_rate: 0.5,
        minimum_calls: 2,
        window: SlidingWindow::count(4),
        slow: None,
        open: OpenBackoff::fixed(Duration::from_millis(100)),
        probes: 2,
        shadow: false,
    }
    .validate()
    .expect("valid")
}

#[derive(Debug, Clone)]
enum Op {
    /// A call of `key` (`None`: a request without a key) that ends at once.
    Call {
        key: Option<u8>,
        outcome: u8,
    },
    /// A call of `key` left in flight.
    Hold {
        key: u8,
    },
    /// The oldest call in flight ends (0: success, 1: failure, 2: dropped).
    Finish {
        outcome: u8,
    },
    Advance {
        ms: u64,
    },
    /// 0: force open, 1: force closed, 2: reset.
    Force {
        key: u8,
        how: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (proptest::option::weighted(0.9, 0u8..6), 0u8..3)
            .prop_map(|(key, outcome)| Op::Call { key, outcome }),
        2 => (0u8..6).prop_map(|key| Op::Hold { key }),
        2 => (0u8..3).prop_map(|outcome| Op::Finish { outcome }),
        2 => (0u64..150).prop_map(|ms| Op::Advance { ms }),
        1 => (0u8..6, 0u8..3).prop_map(|(key, how)| Op::Force { key, how }),
    ]
}

/// A call in flight: the real breaker and permit, the reference and its permit.
struct InFlight {
    real: Arc<KeyedBreaker>,
    real_permit: Permit,
    reference: Arc<Core>,
    reference_permit: Permit,
}

struct Model {
    breakers: KeyedBreakers<u8>,
    references: HashMap<u8, Arc<Core>>,
    shared: Arc<Core>,
    in_flight: VecDeque<InFlight>,
    now: Instant,
}

impl Model {
    fn new(now: Instant) -> Self {
        Self {
            breakers: KeyedBreakers::new(config(), MAX_KEYS, None, None, now),
            references: HashMap::new(),
            shared: Arc::new(Core::new(config(), None, now)),
            in_flight: VecDeque::new(),
            now,
        }
    }

    /// The real breaker of `key` and the reference it must behave like.
    fn route(&mut self, key: Option<u8>) -> (Arc<KeyedBreaker>, Arc<Core>) {
        let now = self.now;
        let real = self.breakers.breaker(key.as_ref(), || now);
        if self.breakers.is_shared(&real) {
            if let Some(key) = key {
                assert!(
                    !self.references.contains_key(&key),
                    "a tracked key {key} went to the shared breaker"
                );
                assert_eq!(self.breakers.len(), MAX_KEYS, "refused a key below the cap");
            }
            return (real, Arc::clone(&self.shared));
        }
        let key = key.expect("a request without a key shares");
        let reference = self
            .references
            .entry(key)
            .or_insert_with(|| Arc::new(Core::new(config(), None, now)));
        (real, Arc::clone(reference))
    }

    fn admit(&mut self, key: Option<u8>) -> Option<InFlight> {
        let (real, reference) = self.route(key);
        let now = self.now;
        let (got, expected) = (real.core.admit(|| now), reference.admit(|| now));
        match (got, expected) {
            (Ok(real_permit), Ok(reference_permit)) => Some(InFlight {
                real,
                real_permit,
                reference,
                reference_permit,
            }),
            (Err(got), Err(expected)) => {
                assert_eq!(got.retry_after(), expected.retry_after());
                None
            }
            (got, expected) => panic!("key {key:?}: got {got:?}, expected {expected:?}"),
        }
    }

    fn finish(&self, call: InFlight, outcome: u8) {
        let now = self.now;
        let outcome = match outcome {
            0 => Outcome::Success,
            1 => Outcome::Failure,
            _ => {
                call.real.core.release(call.real_permit);
                call.reference.release(call.reference_permit);
                return;
            }
        };
        call.real
            .core
            .record(call.real_permit, outcome, None, || now);
        call.reference
            .record(call.reference_permit, outcome, None, || now);
    }

    fn force(&mut self, key: u8, how: u8) {
        let (state, reason) = match how {
            0 => (State::ForcedOpen, TransitionReason::ForcedOpen),
            1 => (State::ForcedClosed, TransitionReason::ForcedClosed),
            _ => (State::Closed, TransitionReason::Reset),
        };
        let tracked = self.breakers.force_one(&key, state, reason, self.now);
        match self.references.get(&key) {
            Some(reference) => {
                assert!(tracked);
                reference.force(state, reason, self.now);
            }
            None if reason == TransitionReason::Reset => assert!(tracked),
            None if tracked => {
                let reference = Arc::new(Core::new(config(), None, self.now));
                reference.force(state, reason, self.now);
                self.references.insert(key, reference);
            }
            None => assert_eq!(self.breakers.len(), MAX_KEYS, "refused below the cap"),
        }
    }

    /// Every key the table dropped was idle, and its reference starts afresh; every
    /// tracked key behaves like its reference.
    fn check(&mut self) {
        let now = self.now;
        let breakers = &self.breakers;
        self.references
            .retain(|key, reference| match breakers.tracked(key) {
                Some(real) => {
                    assert_eq!(real.core.state(), reference.state(), "key {key}");
                    let (got, expected) = (real.core.metrics(now), reference.metrics(now));
                    assert_eq!(
                        (got.calls, got.failures, got.consecutive_trips),
                        (
                            expected.calls,
                            expected.failures,
                            expected.consecutive_trips
                        ),
                        "key {key}"
                    );
                    true
                }
                None => {
                    // Written from the policy, not with `Core::is_idle`: closed, nothing but
                    // successes in the window, no call in flight.
                    let metrics = reference.metrics(now);
                    let idle = metrics.state == State::Closed
                        && metrics.failures == 0
                        && metrics.slow_calls == 0
                        && Arc::strong_count(reference) == 1;
                    assert!(
                        idle,
                        "key {key} was dropped while live: {:?}",
                        reference.metrics(now)
                    );
                    false
                }
            });
        assert!(self.breakers.len() <= MAX_KEYS);
        assert_eq!(self.breakers.shared().state(), self.shared.state());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn keyed_breakers_behave_like_independent_breakers(ops in proptest::collection::vec(op(), 1..120)) {
        let mut model = Model::new(Instant::now());
        for op in ops {
            match op {
                Op::Call { key, outcome } => {
                    if let Some(call) = model.admit(key) {
                        model.finish(call, outcome);
                    }
                }
                Op::Hold { key } => {
                    if let Some(call) = model.admit(Some(key)) {
                        model.in_flight.push_back(call);
                    }
                }
                Op::Finish { outcome } => {
                    if let Some(call) = model.in_flight.pop_front() {
                        model.finish(call, outcome);
                    }
                }
                Op::Advance { ms } => model.now += Duration::from_millis(ms),
                Op::Force { key, how } => model.force(key, how),
            }
            model.check();
        }
    }
}

#[test]
fn a_flood_of_fresh_keys_at_the_cap_leaves_an_open_breaker_open() {
    let now = Instant::now();
    let breakers = KeyedBreakers::new(config(), 2, None, None, now);
    for _ in 0..2 {
        let breaker = breakers.breaker(Some(&0u32), || now);
        let permit = breaker.core.admit(|| now).expect("closed");
        breaker.core.record(permit, Outcome::Failure, None, || now);
    }
    assert_eq!(
        breakers.tracked(&0).expect("tracked").core.state(),
        State::Open
    );
    let mut later = now;
    for key in 1..100_000u32 {
        later += Duration::from_millis(1);
        let breaker = breakers.breaker(Some(&key), || later);
        if let Ok(permit) = breaker.core.admit(|| later) {
            breaker
                .core
                .record(permit, Outcome::Success, None, || later);
        }
        assert!(breakers.len() <= 2);
    }
    // The open time passed long ago, but no call of key 0 came: it is still open, and
    // still its own.
    assert_eq!(
        breakers.tracked(&0).expect("still tracked").core.state(),
        State::Open
    );
}
