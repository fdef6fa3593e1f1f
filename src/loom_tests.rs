//! loom model checks of the lock-free cores: every interleaving (up to the preemption
//! bound) of a few threads driving the breaker's window and state machine, the token
//! bucket and the retry budget.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_tests` (scripts/test
//! does, with a target directory of its own). They live inside the crate, so that they
//! drive the private cores directly (through the small adapters in each module's
//! `loom_api.rs`) and the public API carries no test hooks.

use crate::circuit_breaker::loom_api::{Breaker, KeyedModel, Settings};
use crate::circuit_breaker::{SlidingWindow, State, Transition};
use crate::rate_limit::{Quota, Shadow, Switch, TokenBucket, Verdict};
use crate::retry::RetryBudget;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;
use std::time::Duration;
use tokio::time::Instant;

const OPEN_FOR: Duration = Duration::from_secs(10);

/// Every interleaving with at most `bound` preemptions (all of them for `None`).
fn model(bound: Option<usize>, body: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = bound;
    builder.check(body);
}

/// A breaker counting its transitions into `opened` (to Open) and `closed` (to Closed).
fn breaker(settings: Settings, now: Instant) -> (Arc<Breaker>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let opened = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let observer = {
        let (opened, closed) = (opened.clone(), closed.clone());
        std::sync::Arc::new(move |transition: &Transition| match transition.to {
            State::Open => {
                opened.fetch_add(1, Ordering::SeqCst);
            }
            State::Closed => {
                closed.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        })
    };
    (
        Arc::new(Breaker::new(settings, Some(observer), now)),
        opened,
        closed,
    )
}

fn count_window(size: usize, probes: u32) -> Settings {
    Settings {
        window: SlidingWindow::count(size),
        minimum_calls: size as u64,
        failure_rate: 0.5,
        probes,
        open_for: OPEN_FOR,
    }
}

fn join_all(handles: Vec<thread::JoinHandle<()>>) {
    for handle in handles {
        handle.join().unwrap();
    }
}

/// Three threads record outcomes into a count window of two while the breaker trips:
/// it opens exactly once, and the counts stay consistent with what was recorded.
#[test]
fn count_window_trips_exactly_once() {
    model(Some(3), || {
        let now = Instant::now();
        let (breaker, opened, _) = breaker(count_window(2, 1), now);
        let threads = [true, true, false]
            .into_iter()
            .map(|failure| {
                let breaker = breaker.clone();
                thread::spawn(move || {
                    if let Some(call) = breaker.admit(now) {
                        breaker.record(call, failure, now);
                    }
                })
            })
            .collect();
        join_all(threads);
        let opens = opened.load(Ordering::SeqCst);
        assert!(opens <= 1, "opened {opens} times");
        let (calls, failures) = breaker.counts(now);
        assert!(
            calls <= 2 && failures <= calls,
            "{calls} calls, {failures} failures"
        );
        // Whatever the order, two failures out of a window of two were recorded at
        // some point unless the success came last and displaced one: then the window
        // holds one failure and one success, which also trips at 50%.
        assert_eq!(opens, 1, "the breaker must trip");
        assert_eq!(breaker.state(), State::Open);
        assert!(breaker.admit(now).is_none());
    });
}

/// Two threads race failures into a time window (two buckets) across a bucket
/// boundary: at most one trip, and the window never counts more calls than recorded.
#[test]
fn time_window_counts_across_a_bucket_boundary() {
    model(Some(3), || {
        let now = Instant::now();
        let settings = Settings {
            window: SlidingWindow::time(Duration::from_secs(2)).buckets(2),
            minimum_calls: 2,
            failure_rate: 1.0,
            probes: 1,
            open_for: OPEN_FOR,
        };
        let (breaker, opened, _) = breaker(settings, now);
        let threads = [now, now + Duration::from_secs(1)]
            .into_iter()
            .map(|at| {
                let breaker = breaker.clone();
                thread::spawn(move || {
                    let call = breaker.admit(at).expect("closed");
                    breaker.record(call, true, at);
                })
            })
            .collect();
        join_all(threads);
        let later = now + Duration::from_secs(1);
        let opens = opened.load(Ordering::SeqCst);
        assert!(opens <= 1, "opened {opens} times");
        if opens == 0 {
            // The one interleaving without a verdict: the call that read the clock
            // first recorded last, and judged the window as of its own (older) epoch,
            // which does not see the newer bucket. Both failures are in the window,
            // so the next recorded call trips it.
            assert_eq!(breaker.counts(later), (2, 2));
            let call = breaker.admit(later).expect("still closed");
            breaker.record(call, true, later);
        }
        assert_eq!(opened.load(Ordering::SeqCst), 1);
        assert_eq!(breaker.state(), State::Open);
    });
}

/// Trips a fresh breaker and lets the open time pass: the next admit half-opens it.
fn half_open(probes: u32) -> (Arc<Breaker>, Arc<AtomicUsize>, Arc<AtomicUsize>, Instant) {
    let start = Instant::now();
    let (breaker, opened, closed) = breaker(count_window(1, probes), start);
    let call = breaker.admit(start).expect("closed");
    breaker.record(call, true, start);
    assert_eq!(breaker.state(), State::Open);
    (breaker, opened, closed, start + OPEN_FOR)
}

/// Three threads race for two probe slots; each either reports success or drops its
/// call. Probes held at once never exceed the slots, the breaker closes at most once,
/// and no slot is leaked: afterwards a half-open breaker grants exactly its slots.
#[test]
fn half_open_admission_never_exceeds_the_slots() {
    model(Some(2), || {
        const PROBES: u32 = 2;
        let (breaker, opened, closed, later) = half_open(PROBES);
        let held = Arc::new(AtomicUsize::new(0));
        let completed = Arc::new(AtomicUsize::new(0));
        let threads = [false, true, false]
            .into_iter()
            .map(|drops| {
                let (breaker, held) = (breaker.clone(), held.clone());
                let completed = completed.clone();
                thread::spawn(move || {
                    let Some(call) = breaker.admit(later) else {
                        return;
                    };
                    if call.is_probe() {
                        let now_held = held.fetch_add(1, Ordering::SeqCst) + 1;
                        assert!(now_held <= PROBES as usize, "{now_held} probes at once");
                        held.fetch_sub(1, Ordering::SeqCst);
                    }
                    if drops {
                        breaker.release(call);
                    } else {
                        if call.is_probe() {
                            completed.fetch_add(1, Ordering::SeqCst);
                        }
                        breaker.record(call, false, later);
                    }
                })
            })
            .collect();
        join_all(threads);
        assert_eq!(opened.load(Ordering::SeqCst), 1, "only the setup trip");
        let closes = closed.load(Ordering::SeqCst);
        assert!(closes <= 1, "closed {closes} times");
        match breaker.state() {
            State::Closed => assert_eq!(closes, 1),
            State::HalfOpen => {
                assert_eq!(closes, 0);
                // A completed probe keeps its slot for the phase; a dropped one gives it
                // back. So exactly the slots not completed are free, then a rejection.
                let free = PROBES - completed.load(Ordering::SeqCst) as u32;
                let calls: Vec<_> = (0..free)
                    .map(|_| breaker.admit(later).expect("a free probe slot"))
                    .collect();
                assert!(calls.iter().all(|call| call.is_probe()));
                assert!(breaker.admit(later).is_none(), "more probes than slots");
            }
            state => panic!("unexpected state {state:?}"),
        }
    });
}

/// Two probes report a failure and a success at once while a third thread asks in:
/// the breaker re-opens exactly once and the late caller is never a fourth probe.
#[test]
fn failed_probe_reopens_exactly_once() {
    model(Some(2), || {
        let (breaker, opened, closed, later) = half_open(2);
        let first = breaker.admit(later).expect("probe");
        let second = breaker.admit(later).expect("probe");
        let reporters = [(first, true), (second, false)]
            .into_iter()
            .map(|(call, failure)| {
                let breaker = breaker.clone();
                thread::spawn(move || breaker.record(call, failure, later))
            });
        let asker = {
            let breaker = breaker.clone();
            thread::spawn(move || {
                if let Some(call) = breaker.admit(later) {
                    panic!("admitted while the probes were out or after re-opening: {call:?}");
                }
            })
        };
        join_all(reporters.chain([asker]).collect());
        assert_eq!(
            opened.load(Ordering::SeqCst),
            2,
            "the setup trip and one re-open"
        );
        assert_eq!(closed.load(Ordering::SeqCst), 0);
        assert_eq!(breaker.state(), State::Open);
    });
}

/// A reload that resizes the window of a closed breaker races the breaker tripping,
/// half-opening and closing again: whatever the order, the closed breaker's window never
/// keeps the failure that tripped it (the reload carries the old window only from a
/// closed state it saw, and looks again after publishing; the close looks for a window
/// published meanwhile), and the recovery is seen exactly once.
#[test]
fn a_resize_racing_a_trip_and_a_recovery_keeps_no_stale_failure() {
    model(Some(3), || {
        let start = Instant::now();
        let later = start + OPEN_FOR;
        let (breaker, opened, closed) = breaker(count_window(2, 1), start);
        let call = breaker.admit(start).expect("closed");
        breaker.record(call, false, start);
        let reloader = {
            let breaker = breaker.clone();
            thread::spawn(move || {
                let wider = Settings {
                    window: SlidingWindow::count(3),
                    ..count_window(2, 1)
                };
                breaker.reload(wider, start);
            })
        };
        let caller = {
            let breaker = breaker.clone();
            thread::spawn(move || {
                let call = breaker.admit(start).expect("closed");
                breaker.record(call, true, start);
                let probe = breaker.admit(later).expect("the probe");
                breaker.record(probe, false, later);
            })
        };
        join_all(vec![reloader, caller]);
        assert_eq!(opened.load(Ordering::SeqCst), 1);
        assert_eq!(closed.load(Ordering::SeqCst), 1);
        assert_eq!(breaker.state(), State::Closed);
        assert_eq!(
            breaker.counts(later),
            (0, 0),
            "a stale outcome survived the close"
        );
    });
}

/// Three threads take one token each from a bucket of two at the same instant: exactly
/// two get one. A fourth thread's reservation (handed back) never lets a third through.
#[test]
fn token_bucket_never_over_admits() {
    model(Some(3), || {
        let now = Instant::now();
        let quota = Quota::new(2, 1, Duration::from_secs(1)).unwrap();
        let bucket = Arc::new(TokenBucket::new(quota, now));
        let admitted = Arc::new(AtomicUsize::new(0));
        let threads = (0..3)
            .map(|_| {
                let (bucket, admitted) = (bucket.clone(), admitted.clone());
                thread::spawn(move || {
                    if bucket.acquire(1, now).is_ok() {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        join_all(threads);
        assert_eq!(admitted.load(Ordering::SeqCst), 2);
        assert_eq!(bucket.available(now), 0);
        assert!(bucket.acquire(1, now).is_err());
    });
}

/// Reservations and cancellations race an acquisition: whatever the order, the tokens
/// handed out by `now + 1s` never exceed capacity plus one refill, and a cancelled
/// reservation that was the last one gives its token back.
#[test]
fn token_bucket_reservations_and_cancellations() {
    model(Some(3), || {
        let now = Instant::now();
        let second = now + Duration::from_secs(1);
        let quota = Quota::new(1, 1, Duration::from_secs(1)).unwrap();
        let bucket = Arc::new(TokenBucket::new(quota, now));
        let granted = Arc::new(AtomicUsize::new(0));
        let canceller = {
            let bucket = bucket.clone();
            thread::spawn(move || {
                if let Ok(reservation) = bucket.reserve(1, Duration::from_secs(1), now) {
                    bucket.cancel(reservation);
                }
            })
        };
        let takers: Vec<_> = (0..2)
            .map(|_| {
                let (bucket, granted) = (bucket.clone(), granted.clone());
                thread::spawn(move || {
                    if let Ok(reservation) = bucket.reserve(1, Duration::from_secs(1), now) {
                        assert!(reservation.wait() <= Duration::from_secs(1));
                        granted.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        join_all(std::iter::once(canceller).chain(takers).collect());
        let granted = granted.load(Ordering::SeqCst);
        // Capacity 1 now plus one refill by `second`: at most two kept reservations.
        assert!((1..=2).contains(&granted), "{granted} reservations kept");
        // Nothing beyond capacity + refill by `second` either way.
        let more = usize::from(bucket.acquire(1, second).is_ok());
        assert!(
            granted + more <= 2,
            "{granted} + {more} tokens by one second"
        );
    });
}

/// A quota change (capacity and rate at once, as a reload makes it) races two
/// acquisitions: each is decided under the old quota or the new one, never a mix, and
/// the tokens carried over never hand out more than the old bucket held.
#[test]
fn token_bucket_quota_change_is_atomic() {
    model(Some(3), || {
        let now = Instant::now();
        let old = Quota::new(2, 1, Duration::from_secs(1)).unwrap();
        let new = Quota::new(1, 2, Duration::from_secs(1)).unwrap();
        let bucket = Arc::new(TokenBucket::new(old, now));
        let admitted = Arc::new(AtomicUsize::new(0));
        let reloader = {
            let bucket = bucket.clone();
            thread::spawn(move || bucket.set_quota(new, now))
        };
        let takers: Vec<_> = (0..2)
            .map(|_| {
                let (bucket, admitted) = (bucket.clone(), admitted.clone());
                thread::spawn(move || {
                    let (verdict, _) = bucket.take(1, Duration::ZERO, bucket.nanos(now));
                    if let Verdict::Admit { quota, .. } = verdict {
                        assert!(quota == old || quota == new, "torn quota {quota:?}");
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        join_all(std::iter::once(reloader).chain(takers).collect());
        // Two before the change, or one and then half of the one left (rounded down).
        let admitted = admitted.load(Ordering::SeqCst);
        assert!((1..=2).contains(&admitted), "{admitted} admitted");
        assert_eq!(bucket.quota(), new);
        assert_eq!(bucket.available(now), 0);
    });
}

/// A reload that turns shadow mode on (or off) and changes the quota races a request,
/// which reads the switch as the rate limiter's service does (before the bucket decides,
/// and again on a refusal): its outcome is the old policy's or the new one's. The
/// enforcing policy's quota admits the request (a cost of 2, capacity 2) and the shadow
/// policy's refuses it (capacity 1), so both policies let it through, and a refusal
/// could only come from one's quota with the other's switch.
#[test]
fn rate_limit_shadow_switch_never_mixes_policies() {
    for turning_on in [true, false] {
        model(None, move || {
            let now = Instant::now();
            let second = Duration::from_secs(1);
            let (admits, refuses) = (
                Quota::new(2, 1, second).unwrap(),
                Quota::new(1, 1, second).unwrap(),
            );
            let (old, new) = if turning_on {
                (admits, refuses)
            } else {
                (refuses, admits)
            };
            let bucket = Arc::new(TokenBucket::new(old, now));
            let shadow = Arc::new(Shadow::new(!turning_on));
            let reloader = {
                let (bucket, shadow) = (bucket.clone(), shadow.clone());
                thread::spawn(move || {
                    let reload = || {
                        bucket.set_quota(new, now);
                        Ok::<(), ()>(())
                    };
                    shadow.switch(turning_on, reload).unwrap();
                })
            };
            let request = thread::spawn(move || {
                let switch = Switch::before(&shadow);
                let (verdict, _) = bucket.take(2, Duration::ZERO, bucket.nanos(now));
                if let Verdict::Deny(denied) = verdict {
                    assert!(
                        switch.on().is_some(),
                        "refused ({denied:?}) by one policy's quota and the other's switch"
                    );
                }
            });
            reloader.join().unwrap();
            request.join().unwrap();
        });
    }
}

/// Concurrent withdrawals against a reserve of one retry and one deposit: successful
/// withdrawals never exceed what was put in, and the balance never goes negative.
#[test]
fn retry_budget_never_overspends() {
    model(Some(3), || {
        let now = Instant::now();
        // ttl 1 s, 1 retry/s reserve (= 1 retry), ratio 1: each deposit adds one retry.
        let budget = Arc::new(RetryBudget::new(Duration::from_secs(1), 1, 1.0));
        let spent = Arc::new(AtomicUsize::new(0));
        let depositor = {
            let budget = budget.clone();
            thread::spawn(move || budget.deposit(now))
        };
        let spenders: Vec<_> = (0..2)
            .map(|_| {
                let (budget, spent) = (budget.clone(), spent.clone());
                thread::spawn(move || {
                    // A withdrawal that is not refunded is spent.
                    if budget.withdraw(now).is_some() {
                        spent.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        join_all(std::iter::once(depositor).chain(spenders).collect());
        let spent = spent.load(Ordering::SeqCst) as u64;
        // At least the reserve was there for the first spender.
        assert!(
            (1..=2).contains(&spent),
            "{spent} withdrawals from 2 retries"
        );
        assert_eq!(budget.available(now), 2 - spent);
        // And the rest is exactly withdrawable, no more.
        for _ in spent..2 {
            assert!(budget.withdraw(now).is_some());
        }
        assert!(budget.withdraw(now).is_none());
    });
}

/// A refund races a withdrawal and a slice expiry: the budget ends exactly where the
/// arithmetic says, and a withdrawal never succeeds on money that is not there.
#[test]
fn retry_budget_refund_races_withdrawal_and_expiry() {
    model(Some(3), || {
        let now = Instant::now();
        // No reserve; each deposit is one retry; ten slices of 100 ms.
        let budget = Arc::new(RetryBudget::new(Duration::from_secs(1), 0, 1.0));
        budget.deposit(now);
        let first = budget.withdraw(now).expect("one deposited retry");
        assert!(budget.withdraw(now).is_none());
        let refunder = {
            let budget = budget.clone();
            thread::spawn(move || budget.refund(first, now))
        };
        let spender = {
            let budget = budget.clone();
            thread::spawn(move || budget.withdraw(now).is_some())
        };
        // A third thread moves the window into the next slice (nothing expires yet).
        let mover = {
            let budget = budget.clone();
            thread::spawn(move || {
                budget.available(now + Duration::from_millis(150));
            })
        };
        refunder.join().unwrap();
        mover.join().unwrap();
        let spent = spender.join().unwrap();
        let later = now + Duration::from_millis(150);
        assert_eq!(budget.available(later), u64::from(!spent));
        // After the ttl, every deposit and withdrawal has expired: back to zero.
        assert_eq!(budget.available(now + Duration::from_secs(3)), 0);
    });
}

/// A reload (to a reserve of two retries) races a deposit and a withdrawal, and a third
/// thread moving the window into the next slice: whatever the interleaving, the reserve
/// lands in the balance exactly once and nothing deposited or withdrawn is lost.
#[test]
fn retry_budget_reconfiguration_races_deposits_withdrawals_and_the_window() {
    model(Some(2), || {
        let now = Instant::now();
        // A reserve of one retry; each deposit is one retry.
        let budget = Arc::new(RetryBudget::new(Duration::from_secs(1), 1, 1.0));
        let reloader = {
            let budget = budget.clone();
            thread::spawn(move || budget.reconfigure(Duration::from_secs(1), 2, 1.0, now))
        };
        let spender = {
            let budget = budget.clone();
            thread::spawn(move || {
                budget.deposit(now);
                budget.withdraw(now).is_some()
            })
        };
        let mover = {
            let budget = budget.clone();
            thread::spawn(move || {
                budget.available(now + Duration::from_millis(150));
            })
        };
        reloader.join().unwrap();
        mover.join().unwrap();
        assert!(spender.join().unwrap(), "a reserve was there either way");
        // The new reserve (2), plus the deposit (1), minus the withdrawal (1).
        assert_eq!(budget.available(now + Duration::from_millis(150)), 2);
        // A ttl later only the new reserve is left.
        assert_eq!(budget.available(now + Duration::from_secs(3)), 2);
    });
}

mod concurrency_limit {
    use super::{join_all, model};
    use crate::concurrency_limit::loom_api::{Admit, Permits};
    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicUsize, Ordering};
    use loom::thread;

    /// Three threads take and give back permits of a limit of two: never more than two
    /// are held at once, and every one comes back.
    #[test]
    fn admit_and_release_never_exceed_the_limit() {
        model(Some(3), || {
            let permits = Arc::new(Permits::new(2, 0));
            let held = Arc::new(AtomicUsize::new(0));
            let threads = (0..3)
                .map(|_| {
                    let (permits, held) = (permits.clone(), held.clone());
                    thread::spawn(move || {
                        if let Admit::Permit = permits.admit() {
                            assert!(held.fetch_add(1, Ordering::SeqCst) < 2, "over the limit");
                            held.fetch_sub(1, Ordering::SeqCst);
                            permits.release();
                        }
                    })
                })
                .collect();
            join_all(threads);
            assert_eq!(permits.in_flight(), 0);
            assert!(
                matches!(permits.admit(), Admit::Permit),
                "a free permit is taken"
            );
        });
    }

    /// A holder releases while another request queues for its permit: the permit is
    /// either taken at once or handed to the waiter, never lost.
    #[test]
    fn a_release_racing_a_new_waiter_hands_the_permit_over() {
        model(None, || {
            let permits = Arc::new(Permits::new(1, 1));
            assert!(matches!(permits.admit(), Admit::Permit));
            let releaser = {
                let permits = permits.clone();
                thread::spawn(move || permits.release())
            };
            let outcome = permits.admit();
            releaser.join().unwrap();
            match outcome {
                Admit::Permit => {}
                Admit::Queued(place) => assert!(place.is_granted(), "the released permit was lost"),
                Admit::Rejected => panic!("the queue had room"),
            }
            assert_eq!((permits.in_flight(), permits.queued()), (1, 0));
            permits.release();
            assert!(
                matches!(permits.admit(), Admit::Permit),
                "the queue flag was left set"
            );
        });
    }

    /// A waiter gives up (its future dropped) while the holder releases: whichever wins,
    /// the permit comes back and the queue is empty.
    #[test]
    fn a_waiter_dropped_during_a_release_leaks_nothing() {
        model(None, || {
            let permits = Arc::new(Permits::new(1, 1));
            assert!(matches!(permits.admit(), Admit::Permit));
            let Admit::Queued(place) = permits.admit() else {
                panic!("queued");
            };
            let releaser = {
                let permits = permits.clone();
                thread::spawn(move || permits.release())
            };
            if permits.leave(&place) {
                permits.release();
            }
            releaser.join().unwrap();
            assert_eq!((permits.in_flight(), permits.queued()), (0, 0));
            assert!(matches!(permits.admit(), Admit::Permit));
        });
    }

    /// A newcomer arrives while the holder releases with a request already queued: the
    /// permit goes to the waiter, and the newcomer queues behind it (no overtaking).
    #[test]
    fn a_newcomer_racing_a_release_never_overtakes_a_waiter() {
        model(None, || {
            let permits = Arc::new(Permits::new(1, 2));
            assert!(matches!(permits.admit(), Admit::Permit));
            let Admit::Queued(waiter) = permits.admit() else {
                panic!("queued");
            };
            let releaser = {
                let permits = permits.clone();
                thread::spawn(move || permits.release())
            };
            let newcomer = permits.admit();
            releaser.join().unwrap();
            assert!(waiter.is_granted(), "the waiter got the permit");
            match newcomer {
                Admit::Queued(place) => assert!(!place.is_granted()),
                other => panic!("the newcomer overtook the waiter: {other:?}"),
            }
            assert_eq!((permits.in_flight(), permits.queued()), (1, 1));
        });
    }

    /// The limit rises while a request waits: the waiter is let in.
    #[test]
    fn a_higher_limit_admits_a_waiter() {
        model(None, || {
            let permits = Arc::new(Permits::new(1, 1));
            assert!(matches!(permits.admit(), Admit::Permit));
            let raiser = {
                let permits = permits.clone();
                thread::spawn(move || permits.set_limit(2))
            };
            let outcome = permits.admit();
            raiser.join().unwrap();
            match outcome {
                Admit::Permit => {}
                Admit::Queued(place) => assert!(place.is_granted(), "still waiting with room"),
                Admit::Rejected => panic!("the queue had room"),
            }
            assert_eq!((permits.in_flight(), permits.queued()), (2, 0));
        });
    }

    /// A request arrives with `held` of `limit` permits taken while a reload sets the
    /// limit to `reloaded` and `retry_after` from 1 s to 2 s: it is admitted (holding
    /// `held + 1`), or refused under exactly one of the two policies, the one `refusal`
    /// names, never one policy's limit with the other's answer.
    fn a_refusal_racing_a_reload(limit: u32, held: u32, reloaded: u32, refusal: (u32, u64)) {
        use std::time::Duration;
        let refusal = (refusal.0, Duration::from_secs(refusal.1));
        model(None, move || {
            let permits = Arc::new(Permits::with_retry_after(limit, Duration::from_secs(1)));
            for _ in 0..held {
                assert!(permits.admit_or_refusal().is_ok());
            }
            let reloader = {
                let permits = permits.clone();
                thread::spawn(move || permits.reload(reloaded, Duration::from_secs(2)))
            };
            let outcome = permits.admit_or_refusal();
            reloader.join().unwrap();
            match outcome {
                Ok(()) => assert_eq!(permits.in_flight(), held + 1),
                Err(answer) => assert_eq!(answer, refusal, "a torn policy"),
            }
        });
    }

    /// Raised (1 to 2) with the one permit held: a refusal can only be the old policy's.
    #[test]
    fn a_refusal_racing_a_raising_reload_is_answered_under_one_policy() {
        a_refusal_racing_a_reload(1, 1, 2, (1, 1));
    }

    /// Lowered (3 to 2) with two permits held: a refusal can only be the new policy's.
    #[test]
    fn a_refusal_racing_a_lowering_reload_is_answered_under_one_policy() {
        a_refusal_racing_a_reload(3, 2, 2, (2, 2));
    }

    /// Two reloads in a row (to 2 and 2 s, then back to 1 and 3 s) race a request with
    /// the one permit held: a reader that started on the first reload's numbers and
    /// reads slots the second overwrites never mixes them up.
    #[test]
    fn a_refusal_racing_two_reloads_is_answered_under_one_policy() {
        use std::time::Duration;
        model(Some(3), || {
            let permits = Arc::new(Permits::with_retry_after(1, Duration::from_secs(1)));
            assert!(permits.admit_or_refusal().is_ok());
            let reloader = {
                let permits = permits.clone();
                thread::spawn(move || {
                    permits.reload(2, Duration::from_secs(2));
                    permits.reload(1, Duration::from_secs(3));
                })
            };
            let outcome = permits.admit_or_refusal();
            reloader.join().unwrap();
            if let Err((limit, retry_after)) = outcome {
                assert_eq!(limit, 1);
                assert!(
                    [1, 3].map(Duration::from_secs).contains(&retry_after),
                    "a torn policy: {retry_after:?} with a limit of 1"
                );
            }
        });
    }

    /// Keyed: three requests of two keys race for a limit of two, each giving its
    /// permit back at once. Never more than two in flight, and every key's count and
    /// the count of active keys come back to zero, so a key can be admitted again.
    #[test]
    fn keyed_admit_and_release_leave_every_count_at_zero() {
        use crate::concurrency_limit::loom_api::FairPermits;
        model(Some(2), || {
            let permits = Arc::new(FairPermits::new(2, 4));
            let threads = [1u8, 1, 2]
                .into_iter()
                .map(|key| {
                    let permits = permits.clone();
                    thread::spawn(move || {
                        if let Some(permit) = permits.admit(key) {
                            assert!(permits.in_flight() <= 2, "over the limit");
                            drop(permit);
                        }
                    })
                })
                .collect();
            join_all(threads);
            assert_eq!(permits.in_flight(), 0);
            assert_eq!(permits.active_keys(), 0);
            assert!(permits.admit(1).is_some(), "a free permit is taken");
        });
    }

    /// Keyed, contended (key 1 holds both permits and key 2 was refused: a share is
    /// one): key 1 gives a permit back while it asks for another and key 2 asks. Key 1
    /// never gets more than its share, whatever the interleaving, and the counts add up.
    #[test]
    fn a_key_at_its_share_racing_its_own_release_gets_no_more() {
        use crate::concurrency_limit::loom_api::FairPermits;
        model(Some(2), || {
            let permits = Arc::new(FairPermits::new(2, 4));
            let first = permits.admit(1).expect("free");
            let second = permits.admit(1).expect("free");
            assert!(permits.admit(2).is_none(), "full: contended from now on");
            let releaser = thread::spawn(move || drop(first));
            let again = {
                let permits = permits.clone();
                thread::spawn(move || permits.admit(1).is_some())
            };
            let other = {
                let permits = permits.clone();
                thread::spawn(move || permits.admit(2))
            };
            releaser.join().unwrap();
            assert!(
                !again.join().unwrap(),
                "key 1 holds its share of one already"
            );
            let other = other.join().unwrap();
            assert_eq!(permits.in_flight(), 1 + u32::from(other.is_some()));
            assert_eq!(permits.active_keys(), 1 + u32::from(other.is_some()));
            drop((second, other));
            assert_eq!((permits.in_flight(), permits.active_keys()), (0, 0));
        });
    }
}

/// Two keys race for the one place of a keyed table: key 1's call fails (tripping
/// whichever breaker it went through), key 2's succeeds. Whatever the interleaving of
/// lookup, insert, sweep and record, the table never holds more than one key, and the
/// breaker key 1's failure tripped is still open afterwards: a tracked breaker with a
/// call in flight or a failure recorded is never dropped for a new key.
#[test]
fn keyed_insert_evict_and_lookup_never_drop_a_live_breaker() {
    model(Some(3), || {
        let now = Instant::now();
        let keyed = Arc::new(KeyedModel::new(count_window(1, 1), 1, now));
        let failing = {
            let keyed = keyed.clone();
            thread::spawn(move || {
                let call = keyed.admit(1, now)?;
                let shared = call.is_shared();
                keyed.record(call, true, now);
                Some(shared)
            })
        };
        let succeeding = {
            let keyed = keyed.clone();
            thread::spawn(move || {
                if let Some(call) = keyed.admit(2, now) {
                    keyed.record(call, false, now);
                }
            })
        };
        let failed_on_shared = failing.join().expect("no panic");
        succeeding.join().expect("no panic");
        assert!(keyed.tracked() <= 1);
        match failed_on_shared {
            Some(true) => assert_eq!(keyed.shared_state(), State::Open),
            Some(false) => assert_eq!(keyed.state_for(1), Some(State::Open)),
            // Rejected: key 2's success cannot have opened anything, so key 1 found
            // no breaker open.
            None => panic!("key 1's call was rejected"),
        }
    });
}
