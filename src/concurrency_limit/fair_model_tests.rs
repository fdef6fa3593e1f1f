//! The fair-share admission against a reference model: random requests of a few keys
//! (and of none), releases, a moving limit and time passing, with a table of one to four
//! keys, checked verdict by verdict against the policy as the module docs state it.

use super::fair::{FairAdmission, FairShares, KeyCell};
use super::limiter::Limiter;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The window (the layer's `retry_after`) in the model's milliseconds.
const W: u64 = 1000;

#[derive(Debug, Clone)]
enum Op {
    /// A request of key `Some(k)` or of none.
    Ask(Option<u8>),
    /// The `n`th permit (modulo their number) is given back.
    Release(usize),
    SetLimit(u32),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => proptest::option::weighted(0.9, 0u8..5).prop_map(Op::Ask),
        4 => any::<usize>().prop_map(Op::Release),
        1 => (1u32..9).prop_map(Op::SetLimit),
        2 => prop_oneof![0u64..50, 0u64..2500].prop_map(Op::Advance),
    ]
}

/// Who holds a permit: a tracked key, or the overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Holder {
    Key(u8),
    Overflow,
}

/// The policy, written plainly: sets and counts, no atomics.
#[derive(Debug, Default)]
struct Model {
    limit: u32,
    in_flight: u32,
    max_keys: usize,
    tracked: BTreeSet<u8>,
    held: BTreeMap<Holder, u32>,
    /// The windows in which each holder asked while contended.
    counted: BTreeMap<Holder, BTreeSet<u64>>,
    contended_until: u64,
    next_full_sweep: Option<u64>,
}

impl Model {
    fn held(&self, holder: Holder) -> u32 {
        self.held.get(&holder).copied().unwrap_or(0)
    }

    fn counted_in(&self, holder: Holder, window: u64) -> bool {
        self.counted
            .get(&holder)
            .is_some_and(|windows| windows.contains(&window))
    }

    fn live(&self, holder: Holder, window: u64) -> bool {
        self.held(holder) > 0
            || self.counted_in(holder, window)
            || (window > 0 && self.counted_in(holder, window - 1))
    }

    /// Where key `k` is counted: tracked if the table has or finds room for it.
    fn holder(&mut self, key: Option<u8>, window: u64) -> Holder {
        let Some(key) = key else {
            return Holder::Overflow;
        };
        if self.tracked.contains(&key) {
            return Holder::Key(key);
        }
        if self.tracked.len() >= self.max_keys {
            if self.next_full_sweep.is_some_and(|at| window < at) {
                return Holder::Overflow;
            }
            let idle: Vec<u8> = self
                .tracked
                .iter()
                .copied()
                .filter(|&k| !self.live(Holder::Key(k), window))
                .collect();
            for k in idle {
                self.tracked.remove(&k);
                self.counted.remove(&Holder::Key(k));
            }
            if self.tracked.len() >= self.max_keys {
                self.next_full_sweep = Some(window + 1);
                return Holder::Overflow;
            }
        }
        self.tracked.insert(key);
        Holder::Key(key)
    }

    fn competing(&self, window: u64) -> u32 {
        let count = |w: u64| self.counted.values().filter(|ws| ws.contains(&w)).count();
        let previous = if window > 0 { count(window - 1) } else { 0 };
        u32::try_from(count(window).max(previous).max(1)).unwrap()
    }

    /// The verdict for a request of `key` at `now` (ms): its holder if admitted.
    fn ask(&mut self, key: Option<u8>, now: u64) -> Option<Holder> {
        let window = now / W;
        let holder = self.holder(key, window);
        if now < self.contended_until {
            self.counted.entry(holder).or_default().insert(window);
            let share = self.limit.div_ceil(self.competing(window));
            if self.held(holder) >= share {
                return None;
            }
        }
        if self.in_flight >= self.limit {
            self.contended_until = self.contended_until.max(now + 2 * W);
            self.counted.entry(holder).or_default().insert(window);
            return None;
        }
        self.in_flight += 1;
        *self.held.entry(holder).or_default() += 1;
        Some(holder)
    }

    fn active(&self) -> u32 {
        u32::try_from(self.held.values().filter(|&&held| held > 0).count()).unwrap()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn fair_admission_follows_the_model(
        limit in 1u32..9,
        max_keys in 1usize..5,
        ops in proptest::collection::vec(op(), 1..150),
    ) {
        let base = Instant::now();
        let limiter = Arc::new(Limiter::fixed(limit));
        let shares = FairShares::<u8>::new(max_keys, Duration::from_millis(W), base);
        let mut model = Model { limit, max_keys, ..Model::default() };
        let mut now = 0u64;
        let mut permits: Vec<(Holder, Arc<KeyCell>)> = Vec::new();
        for op in ops {
            match op {
                Op::Ask(key) => {
                    let expected = model.ask(key, now);
                    let at = base + Duration::from_millis(now);
                    match shares.admit(&limiter, key.as_ref(), at) {
                        FairAdmission::Admitted(in_flight, cell) => {
                            let holder = expected.ok_or_else(|| {
                                TestCaseError::fail(format!("{key:?} admitted, the model refuses"))
                            })?;
                            prop_assert_eq!(in_flight, model.in_flight);
                            permits.push((holder, cell));
                        }
                        FairAdmission::Rejected(_) => {
                            prop_assert!(expected.is_none(), "{:?} refused, the model admits", key);
                        }
                    }
                }
                Op::Release(n) if !permits.is_empty() => {
                    let (holder, cell) = permits.remove(n % permits.len());
                    cell.unhold();
                    limiter.release();
                    model.in_flight -= 1;
                    *model.held.entry(holder).or_default() -= 1;
                }
                Op::Release(_) => {}
                Op::SetLimit(new) => {
                    limiter.set_limit(new);
                    model.limit = new;
                }
                Op::Advance(ms) => now += ms,
            }
            prop_assert_eq!(limiter.in_flight(), model.in_flight);
            prop_assert_eq!(shares.active_keys(), model.active());
            prop_assert_eq!(shares.tracked_keys(), model.tracked.len());
            for (holder, cell) in &permits {
                prop_assert_eq!(cell.held(), model.held(*holder), "{:?}", holder);
            }
        }
    }
}
