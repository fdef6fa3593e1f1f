//! The permit counter against a reference model: random sequences of admissions,
//! releases, waiters leaving the queue and limit changes, with and without a queue.

use super::limiter::{Admission, Limit, Limiter, Policy, Waiter};
use proptest::prelude::*;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
enum Op {
    Admit,
    /// Gives back the permit of the `n`th holder (modulo their number).
    Release(usize),
    /// The `n`th waiter (modulo their number) gives up.
    Leave(usize),
    SetLimit(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Admit),
        3 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Leave),
        1 => (0u32..8).prop_map(Op::SetLimit),
    ]
}

/// The specification: a count, a limit, a FIFO of waiters served while there is room.
#[derive(Debug, Default)]
struct Model {
    limit: u32,
    in_flight: u32,
    capacity: usize,
    queue: VecDeque<usize>,
    rejected: u64,
}

impl Model {
    fn serve(&mut self) -> Vec<usize> {
        let mut granted = Vec::new();
        while self.in_flight < self.limit
            && let Some(waiter) = self.queue.pop_front()
        {
            self.in_flight += 1;
            granted.push(waiter);
        }
        granted
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_counter_follows_the_model(
        limit in 1u32..6,
        capacity in 0usize..4,
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let policy = Policy { waiters: capacity, max_wait: Duration::from_secs(1), ..Policy::default() };
        let limiter = Limiter::new(Limit::Fixed(limit), policy);
        let mut model = Model { limit, capacity, ..Model::default() };
        // Holders of a permit and queued waiters, by id, in the real limiter and the model.
        let mut holders: Vec<usize> = Vec::new();
        let mut waiters: Vec<(usize, Arc<Waiter>)> = Vec::new();
        for (id, op) in ops.into_iter().enumerate() {
            match op {
                Op::Admit => {
                    let expected = if model.queue.is_empty() && model.in_flight < model.limit {
                        model.in_flight += 1;
                        "admitted"
                    } else if model.queue.len() < model.capacity {
                        model.queue.push_back(id);
                        "queued"
                    } else {
                        model.rejected += 1;
                        "rejected"
                    };
                    match limiter.try_admit() {
                        Admission::Admitted(in_flight) => {
                            prop_assert_eq!(expected, "admitted");
                            prop_assert_eq!(in_flight, model.in_flight);
                            holders.push(id);
                        }
                        Admission::Queued { waiter, .. } => {
                            prop_assert_eq!(expected, "queued");
                            waiters.push((id, waiter));
                        }
                        Admission::Rejected(_) => prop_assert_eq!(expected, "rejected"),
                    }
                }
                Op::Release(n) if !holders.is_empty() => {
                    holders.remove(n % holders.len());
                    model.in_flight -= 1;
                    model.serve();
                    limiter.release();
                }
                Op::Leave(n) if !waiters.is_empty() => {
                    let (id, waiter) = waiters.remove(n % waiters.len());
                    let position = model.queue.iter().position(|&queued| queued == id);
                    let held = limiter.leave(&waiter);
                    prop_assert_eq!(held, position.is_none(), "granted exactly when the model served it");
                    match position {
                        Some(index) => {
                            model.queue.remove(index);
                        }
                        None => {
                            // Granted meanwhile: the permit it got goes back.
                            model.in_flight -= 1;
                            model.serve();
                            limiter.release();
                        }
                    }
                }
                Op::SetLimit(new) => {
                    model.limit = new.max(1);
                    model.serve();
                    limiter.set_limit(new);
                }
                Op::Release(_) | Op::Leave(_) => {}
            }
            // Waiters the model served are granted in the limiter too, and hold permits.
            let mut index = 0;
            while index < waiters.len() {
                let (id, waiter) = &waiters[index];
                let served = !model.queue.contains(id);
                prop_assert_eq!(waiter.is_granted(), served, "waiter {} granted", id);
                if served {
                    holders.push(*id);
                    waiters.remove(index);
                } else {
                    index += 1;
                }
            }
            prop_assert_eq!(limiter.in_flight(), model.in_flight);
            prop_assert_eq!(limiter.limit(), model.limit);
            prop_assert_eq!(limiter.queued(), model.queue.len());
            prop_assert_eq!(limiter.rejected(), model.rejected);
            prop_assert_eq!(holders.len() as u32, model.in_flight);
        }
    }
}

#[test]
fn the_word_holds_the_largest_limit_and_count() {
    let limiter = Limiter::fixed(super::limiter::MAX_LIMIT);
    assert_eq!(limiter.limit(), super::limiter::MAX_LIMIT);
    assert!(matches!(limiter.try_admit(), Admission::Admitted(1)));
    limiter.set_limit(1);
    assert!(matches!(limiter.try_admit(), Admission::Rejected(_)));
    limiter.set_limit(u32::MAX); // clamped
    assert_eq!(limiter.limit(), super::limiter::MAX_LIMIT);
    limiter.release();
    assert_eq!(limiter.in_flight(), 0);
}
