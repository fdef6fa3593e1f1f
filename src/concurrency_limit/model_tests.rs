//! The permit counter against a reference model: random sequences of admissions,
//! releases, waiters leaving the queue, limit changes and reloads (of the limit and the
//! queue), with and without a queue; and the adaptive algorithms' state carried over a
//! reload.

use super::algorithms::{Aimd, Gradient, LimitAlgorithm, Sample};
use super::limiter::{Admission, Algorithm, Limit, Limiter, Policy, Waiter};
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
    /// A reload to a static limit and a queue of this many places.
    Reload(u32, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Admit),
        3 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Leave),
        1 => (0u32..8).prop_map(Op::SetLimit),
        1 => (1u32..8, 0usize..4).prop_map(|(limit, waiters)| Op::Reload(limit, waiters)),
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
                Op::Reload(new, waiters) => {
                    model.limit = new;
                    model.capacity = waiters;
                    model.serve();
                    let policy = Policy { waiters, max_wait: Duration::from_secs(1), ..Policy::default() };
                    limiter.reload(Some(Limit::Fixed(new)), policy);
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

/// Valid AIMD settings: `min <= initial <= max`.
fn aimd() -> impl Strategy<Value = Aimd> {
    (1u32..40, 0u32..40, 0u32..40, 0.5f64..0.99).prop_map(|(min, above, span, ratio)| {
        let max = min + above.max(span);
        Aimd::new()
            .min_limit(min)
            .initial_limit(min + above.min(span))
            .max_limit(max)
            .backoff_ratio(ratio)
            .latency_threshold(Duration::from_millis(50))
    })
}

/// Valid gradient settings, measuring the minimum RTT over two requests.
fn gradient() -> impl Strategy<Value = Gradient> {
    (1u32..40, 0u32..40, 0u32..40, 0.0f64..2.0).prop_map(|(min, above, span, buffer)| {
        Gradient::new()
            .min_limit(min)
            .initial_limit(min + above.min(span))
            .max_limit(min + above.max(span))
            .buffer(buffer)
            .min_rtt_requests(2)
            .interval(Duration::from_millis(20))
    })
}

#[derive(Debug, Clone)]
enum Kind {
    Aimd(Aimd),
    Gradient(Gradient),
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        aimd().prop_map(Kind::Aimd),
        gradient().prop_map(Kind::Gradient)
    ]
}

impl Kind {
    fn limit(&self) -> Limit {
        Limit::Adaptive(match self.clone() {
            Kind::Aimd(aimd) => Algorithm::Aimd(aimd),
            Kind::Gradient(gradient) => Algorithm::Gradient(gradient),
        })
    }

    fn bounds(&self) -> (u32, u32) {
        match self {
            Kind::Aimd(aimd) => aimd.bounds(),
            Kind::Gradient(gradient) => gradient.bounds(),
        }
    }

    fn starting_limit(&self) -> u32 {
        match self {
            Kind::Aimd(aimd) => aimd.starting_limit(),
            Kind::Gradient(gradient) => gradient.starting_limit(),
        }
    }

    fn same_kind(&self, other: &Kind) -> bool {
        matches!(
            (self, other),
            (Kind::Aimd(_), Kind::Aimd(_)) | (Kind::Gradient(_), Kind::Gradient(_))
        )
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// An adaptive limit moved by random samples, then reloaded: the same kind of
    /// algorithm keeps the limit it reached, clamped into the new bounds (a gradient
    /// measuring its minimum RTT sits at the new minimum); another kind starts from its
    /// starting limit; a static limit is that limit. Every limit after stays in bounds.
    #[test]
    fn a_reload_clamps_the_estimate_or_starts_afresh(
        before in kind(),
        after in prop_oneof![kind().prop_map(Some), (1u32..60).prop_map(|_| None)],
        fixed in 1u32..60,
        samples in proptest::collection::vec((1u64..120, 1u32..60, prop::bool::weighted(0.2)), 0..80),
        more in proptest::collection::vec((1u64..120, 1u32..60, prop::bool::weighted(0.2)), 0..40),
    ) {
        let limiter = Limiter::new(before.limit(), Policy::default());
        let start = tokio::time::Instant::now();
        let mut now = start;
        let mut feed = |limiter: &Limiter, samples: &[(u64, u32, bool)]| {
            for &(ms, in_flight, congested) in samples {
                now += Duration::from_millis(ms);
                limiter.record(Sample::new(Duration::from_millis(ms), in_flight, congested, now));
            }
        };
        feed(&limiter, &samples);
        let reached = limiter.limit();
        let measuring = limiter.is_measuring();
        match &after {
            Some(after) => {
                limiter.reload(Some(after.limit()), Policy::default());
                let (min, max) = after.bounds();
                let expected = match (before.same_kind(after), measuring) {
                    (false, _) => after.starting_limit(),
                    (true, true) => min,
                    (true, false) => reached.clamp(min, max),
                };
                prop_assert_eq!(limiter.limit(), expected);
                prop_assert!(limiter.is_adaptive());
                for sample in &more {
                    feed(&limiter, std::slice::from_ref(sample));
                    prop_assert!((min..=max).contains(&limiter.limit()), "{} out of bounds", limiter.limit());
                }
            }
            None => {
                limiter.reload(Some(Limit::Fixed(fixed)), Policy::default());
                prop_assert_eq!(limiter.limit(), fixed);
                prop_assert!(!limiter.is_adaptive());
                // Samples of requests admitted before the switch change nothing.
                feed(&limiter, &more);
                prop_assert_eq!(limiter.limit(), fixed);
            }
        }
    }
}
