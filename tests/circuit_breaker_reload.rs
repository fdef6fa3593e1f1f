//! Live reload of the circuit breaker: a new configuration applies atomically under load
//! (no trip judged by one policy's window and minimum with another's open time), the
//! state and the window carry over as documented (checked against a model), an open
//! breaker keeps its deadline, an invalid or unreloadable configuration is refused at
//! its field with the old policy still enforced, and the shadow switch flips both ways,
//! for the global, keyed and ejecting breakers.
#![cfg(feature = "serde")]

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use palisade::circuit_breaker::{
    CircuitBreakerConfigError, CircuitBreakerHandle, CircuitOpen, EjectionGroup, State,
};
use palisade::config::{CircuitBreakerConfig, ConfigError, NotReloadable, Policies};
use proptest::prelude::*;
use tokio::time::{Instant, advance};
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

fn config(text: &str) -> CircuitBreakerConfig {
    toml::from_str(text).unwrap_or_else(|error| panic!("{text}\n{error}"))
}

/// A dependency that fails the calls asked to fail.
fn dependency() -> impl Service<bool, Response = (), Error = BoxError, Future: Send> + Clone {
    service_fn(|fail: bool| async move {
        if fail {
            Err::<(), BoxError>("down".into())
        } else {
            Ok(())
        }
    })
}

/// What a call got: `Ok(true)` through and answered, `Ok(false)` through and failed,
/// `Err(retry_after)` rejected by the breaker.
async fn send<S>(service: &mut S, fail: bool) -> Result<bool, Duration>
where
    S: Service<bool, Error = BoxError>,
{
    let ready = service.ready().await.expect("ready");
    match ready.call(fail).await {
        Ok(_) => Ok(true),
        Err(error) => match error.downcast_ref::<CircuitOpen>() {
            Some(open) => Err(open.retry_after()),
            None => Ok(false),
        },
    }
}

const SECOND: Duration = Duration::from_secs(1);

/// Many tasks call a breaker whose every call fails while a reloader flips it between
/// `a` and `b` (`pause` yields between reloads) and a checker, at each trip, reads the
/// window the trip left and the open time it chose and hands them to `judge` (true: the
/// trip was judged under `b`), which asserts they belong to one policy. Returns how many
/// trips each policy judged.
async fn flip_under_load(
    a: &str,
    b: &str,
    pause: usize,
    judge: fn(u64, Duration) -> bool,
) -> (u32, u32) {
    let breaker = config(a).build().unwrap();
    let handle = breaker.handle();
    let service = breaker.layer(dependency());
    let (a, b) = (config(a), config(b));
    let done = Arc::new(AtomicBool::new(false));
    // Held by the reloader for each reload, and by the checker while it reads a trip:
    // a reload while open empties a resized window, and the checker must see the
    // window the trip left.
    let turn = Arc::new(tokio::sync::Mutex::new(()));
    let reloader = {
        let (done, turn, handle) = (done.clone(), turn.clone(), handle.clone());
        tokio::spawn(async move {
            let mut reloads = 0u64;
            while !done.load(Ordering::Relaxed) {
                let next = if reloads.is_multiple_of(2) { &b } else { &a };
                let held = turn.lock().await;
                handle.reload(next).expect("a valid configuration");
                reloads += 1;
                drop(held);
                for _ in 0..pause {
                    tokio::task::yield_now().await;
                }
            }
            reloads
        })
    };
    // Set once the checker has judged a few trips under each policy: on a loaded
    // machine the interleavings that trip under one of them can be rare, so the
    // clients go on (up to a cap) until both have been seen.
    let judged_both = Arc::new(AtomicBool::new(false));
    let checker = {
        let (done, turn, handle) = (done.clone(), turn.clone(), handle.clone());
        let judged_both = judged_both.clone();
        let mut probe = service.clone();
        tokio::spawn(async move {
            let (mut under_a, mut under_b) = (0u32, 0u32);
            while !done.load(Ordering::Relaxed) {
                if handle.state() != State::Open {
                    tokio::task::yield_now().await;
                    continue;
                }
                let held = turn.lock().await;
                let calls = handle.metrics().calls;
                let retry_after = send(&mut probe, true).await.expect_err("open");
                handle.reset();
                drop(held);
                // Zero: a reload came between the trip and the checker and emptied a
                // resized window (the breaker was not closed): nothing to judge.
                if calls == 0 {
                    continue;
                }
                if judge(calls, retry_after) {
                    under_b += 1;
                } else {
                    under_a += 1;
                }
                if under_a >= 3 && under_b >= 3 {
                    judged_both.store(true, Ordering::Relaxed);
                }
            }
            (under_a, under_b)
        })
    };
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let mut service = service.clone();
            let judged_both = judged_both.clone();
            tokio::spawn(async move {
                for call in 0..100_000 {
                    if call >= 3_000 && judged_both.load(Ordering::Relaxed) {
                        break;
                    }
                    let _ = send(&mut service, true).await;
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    for client in clients {
        client.await.expect("no client panicked");
    }
    done.store(true, Ordering::Relaxed);
    let reloads = reloader.await.unwrap();
    let trips = checker.await.expect("no trip saw a torn policy");
    assert!(reloads > 50, "{reloads} reloads");
    trips
}

/// A trip under B opens for 200 s, under A for 100 s.
fn opened_by_b(retry_after: Duration) -> bool {
    retry_after > 150 * SECOND
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_concurrent_load_never_tears_the_policy() {
    // Every reload resizes the window. Under A a trip needs the whole window of 4 and
    // opens for 100 s; under B it needs 8 of a window of 16 and opens for 200 s. A's
    // minimum with B's window would trip on 4 to 7 calls; B's minimum can never be met
    // in A's window.
    let (under_a, under_b) = flip_under_load(
        "sliding_window = { count = 4 }\nminimum_calls = 4\nopen_for = \"100s\"",
        "sliding_window = { count = 16 }\nminimum_calls = 8\nopen_for = \"200s\"",
        1,
        |calls, retry_after| {
            if opened_by_b(retry_after) {
                assert!(
                    (8..=16).contains(&calls),
                    "B's open time after {calls} calls"
                );
                true
            } else {
                assert_eq!(calls, 4, "A's open time after {calls} calls");
                false
            }
        },
    )
    .await;
    assert!(
        under_a > 0 && under_b > 0,
        "{under_a} trips judged under A, {under_b} under B"
    );

    // The same window, kept across every reload, so that every trip is read: B's open
    // time with A's minimum would show as a trip on fewer than B's 12 calls.
    let (under_a, under_b) = flip_under_load(
        "sliding_window = { count = 16 }\nminimum_calls = 4\nopen_for = \"100s\"",
        "sliding_window = { count = 16 }\nminimum_calls = 12\nopen_for = \"200s\"",
        8,
        |calls, retry_after| {
            if opened_by_b(retry_after) {
                assert!(
                    (12..=16).contains(&calls),
                    "B's open time after {calls} calls"
                );
                true
            } else {
                assert!(
                    (4..=16).contains(&calls),
                    "A's open time after {calls} calls"
                );
                false
            }
        },
    )
    .await;
    assert!(
        under_a > 0 && under_b > 0,
        "{under_a} trips judged under A, {under_b} under B"
    );
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_keeps_its_deadline_and_the_next_trip_takes_the_new_open_time() {
    let base = "sliding_window = { count = 2 }\nminimum_calls = 2\nhalf_open_probes = 1";
    let breaker = config(&format!("{base}\nopen_for = \"10s\""))
        .build()
        .unwrap();
    let handle = breaker.handle();
    let mut service = breaker.layer(dependency());
    for _ in 0..2 {
        assert_eq!(send(&mut service, true).await, Ok(false));
    }
    assert_eq!(handle.state(), State::Open);
    advance(4 * SECOND).await;
    handle
        .reload(&config(&format!("{base}\nopen_for = \"60s\"")))
        .unwrap();
    // The current open period ends when it was going to.
    assert_eq!(send(&mut service, false).await, Err(6 * SECOND));
    advance(6 * SECOND).await;
    // The probe fails: the next open period is the new one.
    assert_eq!(send(&mut service, true).await, Ok(false));
    assert_eq!(send(&mut service, false).await, Err(60 * SECOND));
}

#[tokio::test(start_paused = true)]
async fn a_new_threshold_and_minimum_judge_the_window_kept_from_the_next_call_on() {
    let breaker = config("sliding_window = { count = 10 }\nminimum_calls = 10")
        .build()
        .unwrap();
    let handle = breaker.handle();
    let mut service = breaker.layer(dependency());
    for fail in [true, false, false, false] {
        send(&mut service, fail).await.unwrap();
    }
    // A quarter failed: nothing under a minimum of 10 and a threshold of 50%.
    handle
        .reload(&config(
            "sliding_window = { count = 10 }\nminimum_calls = 5\nfailure_rate_threshold = 0.4",
        ))
        .unwrap();
    assert_eq!(
        handle.state(),
        State::Closed,
        "a reload never moves the state"
    );
    assert_eq!(
        handle.metrics().calls,
        4,
        "the same window kind and size: kept"
    );
    // 2 of 5 failed: 40% over the new minimum.
    assert_eq!(send(&mut service, true).await, Ok(false));
    assert_eq!(handle.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn a_half_open_episode_keeps_its_probe_count() {
    let base = "sliding_window = { count = 2 }\nminimum_calls = 2\nopen_for = \"1s\"";
    let breaker = config(&format!("{base}\nhalf_open_probes = 3"))
        .build()
        .unwrap();
    let handle = breaker.handle();
    let slow = service_fn(|wait: u64| async move {
        tokio::time::sleep(Duration::from_millis(wait)).await;
        Ok::<_, BoxError>(())
    });
    let failing = breaker.layer(dependency());
    let service = breaker.layer(slow);
    let mut failing = failing;
    for _ in 0..2 {
        send(&mut failing, true).await.unwrap();
    }
    advance(SECOND).await;
    // Two probes of three in flight, then the count drops to one.
    let probes: Vec<_> = (0..2)
        .map(|_| tokio::spawn(service.clone().oneshot(100)))
        .collect();
    tokio::task::yield_now().await;
    assert_eq!(handle.state(), State::HalfOpen);
    handle
        .reload(&config(&format!("{base}\nhalf_open_probes = 1")))
        .unwrap();
    // This episode still admits its third probe and decides after all three.
    let third = tokio::spawn(service.clone().oneshot(100));
    tokio::task::yield_now().await;
    assert_eq!(handle.metrics().probes_in_flight, 3);
    advance(Duration::from_millis(100)).await;
    for probe in probes.into_iter().chain([third]) {
        probe.await.unwrap().expect("a probe");
    }
    assert_eq!(handle.state(), State::Closed);
    // The next episode has one probe.
    for _ in 0..2 {
        send(&mut failing, true).await.unwrap();
    }
    advance(SECOND).await;
    let probe = tokio::spawn(service.clone().oneshot(100));
    tokio::task::yield_now().await;
    assert!(send(&mut failing, false).await.is_err(), "one slot, taken");
    advance(Duration::from_millis(100)).await;
    probe.await.unwrap().expect("the probe");
    assert_eq!(handle.state(), State::Closed);
}

fn not_reloadable(error: &ConfigError) -> &NotReloadable {
    error
        .error()
        .downcast_ref::<NotReloadable>()
        .unwrap_or_else(|| panic!("not a NotReloadable: {error}"))
}

/// Every rule `build()` enforces, at its field: a reload refuses each with the error
/// building it gives.
const INVALID: [(&str, &str); 18] = [
    ("failure_rate_threshold = 0.0", "failure_rate_threshold"),
    (
        "slow_calls = { threshold = \"1s\", rate = 1.5 }",
        "slow_calls.rate",
    ),
    (
        "slow_calls = { threshold = \"0s\", rate = 0.5 }",
        "slow_calls.threshold",
    ),
    ("minimum_calls = 0", "minimum_calls"),
    (
        "sliding_window = { count = 5 }\nminimum_calls = 6",
        "minimum_calls",
    ),
    ("sliding_window = { count = 0 }", "sliding_window.count"),
    (
        "sliding_window = { count = 2000000 }",
        "sliding_window.count",
    ),
    (
        "sliding_window = { time = \"10s\", buckets = 0 }",
        "sliding_window.buckets",
    ),
    (
        "sliding_window = { time = \"10s\", buckets = 5000 }",
        "sliding_window.buckets",
    ),
    (
        "sliding_window = { time = \"5ms\", buckets = 10 }",
        "sliding_window",
    ),
    (
        "sliding_window = { time = \"200years\" }",
        "sliding_window.time",
    ),
    ("open_for = \"0s\"", "open_for"),
    (
        "open_backoff = { initial = \"0s\" }",
        "open_backoff.initial",
    ),
    (
        "open_backoff = { initial = \"10s\", max = \"1s\" }",
        "open_backoff.max",
    ),
    (
        "open_backoff = { initial = \"1s\", multiplier = 0.5 }",
        "open_backoff.multiplier",
    ),
    (
        "open_backoff = { initial = \"1s\", jitter = 1.0 }",
        "open_backoff.jitter",
    ),
    ("half_open_probes = 0", "half_open_probes"),
    (
        "open_for = \"1s\"\nopen_backoff = { initial = \"1s\" }",
        "open_backoff",
    ),
];

#[tokio::test(start_paused = true)]
async fn an_invalid_reload_is_refused_at_its_field_and_the_old_policy_holds() {
    let original = "sliding_window = { count = 2 }\nminimum_calls = 2\nopen_for = \"5s\"";
    let breaker = config(original).build().unwrap();
    let handle = breaker.handle();
    let mut service = breaker.layer(dependency());
    for (text, path) in INVALID {
        let refused = handle.reload(&config(text)).unwrap_err();
        let built = config(text).build().unwrap_err();
        assert_eq!(refused.path(), path, "{text}");
        assert_eq!(refused.to_string(), built.to_string(), "{text}");
        if path != "open_backoff" {
            assert!(refused.error().is::<CircuitBreakerConfigError>(), "{text}");
        }
    }
    // The original policy: two failures trip it for five seconds.
    for _ in 0..2 {
        send(&mut service, true).await.unwrap();
    }
    assert_eq!(send(&mut service, false).await, Err(5 * SECOND));
}

#[tokio::test(start_paused = true)]
async fn options_fixed_at_build_time_are_refused_at_their_field() {
    let global = config("minimum_calls = 2").build().unwrap().handle();
    let keyed = config("keyed = { max_keys = 10 }\nshadow = true")
        .build_keyed::<_, u32>(|request: &u32| Some(*request))
        .unwrap()
        .handle();
    let refused = global.reload(&config("keyed = {}")).unwrap_err();
    assert_eq!(refused.path(), "keyed");
    assert_eq!(
        not_reloadable(&refused).was,
        "no `keyed` section (a global breaker)"
    );
    let refused = keyed.reload(&config("shadow = false")).unwrap_err();
    assert_eq!(refused.path(), "keyed");
    for (text, was) in [("keyed = {}", "10"), ("keyed = { max_keys = 0 }", "10")] {
        let refused = keyed.reload(&config(text)).unwrap_err();
        assert_eq!(refused.path(), "keyed.max_keys", "{text}");
        assert_eq!(not_reloadable(&refused).was, was);
    }
    // An invalid value in a keyed reload is the builder's error, at its field.
    let refused = keyed
        .reload(&config("keyed = { max_keys = 10 }\nminimum_calls = 0"))
        .unwrap_err();
    assert_eq!(refused.path(), "minimum_calls");
    // Nothing changed; the same fixed options are taken.
    assert!(keyed.is_shadow());
    keyed
        .reload(&config("keyed = { max_keys = 10 }\nshadow = false"))
        .unwrap();
    assert!(!keyed.is_shadow());
}

#[tokio::test(start_paused = true)]
async fn the_shadow_switch_flips_both_ways_from_the_next_call() {
    let enforcing = "sliding_window = { count = 2 }\nminimum_calls = 2\nopen_for = \"30s\"";
    let watching = format!("{enforcing}\nshadow = true");
    let breaker = config(enforcing).build().unwrap();
    let handle = breaker.handle();
    let mut service = breaker.layer(dependency());
    for _ in 0..2 {
        send(&mut service, true).await.unwrap();
    }
    assert!(send(&mut service, false).await.is_err());
    handle.reload(&config(&watching)).unwrap();
    // Through, answered by the dependency, and counted as a shadow rejection.
    assert_eq!(send(&mut service, false).await, Ok(true));
    assert_eq!(send(&mut service, true).await, Ok(false));
    assert_eq!(handle.shadow_rejected(), 2);
    assert_eq!(handle.metrics().rejected, 1);
    assert_eq!(handle.state(), State::Open, "shadow calls are not recorded");
    handle.reload(&config(enforcing)).unwrap();
    assert!(send(&mut service, false).await.is_err());
    let metrics = handle.metrics();
    assert_eq!((metrics.rejected, metrics.shadow_rejected), (2, 2));
}

#[tokio::test(start_paused = true)]
async fn a_keyed_reload_reaches_existing_and_new_keys() {
    let before = "sliding_window = { count = 4 }\nminimum_calls = 4\nkeyed = { max_keys = 10 }";
    let breaker = config(before)
        .build_keyed::<_, u32>(|request: &(u32, bool)| Some(request.0))
        .unwrap();
    let handle = breaker.handle();
    let mut service = breaker.layer(service_fn(|(_, fail): (u32, bool)| async move {
        if fail {
            Err::<(), BoxError>("down".into())
        } else {
            Ok(())
        }
    }));
    let mut call = async |key: u32, fail: bool| {
        let ready = service.ready().await.unwrap();
        match ready.call((key, fail)).await {
            Err(error) => error.downcast_ref::<CircuitOpen>().is_none(),
            Ok(()) => true,
        }
    };
    // Key 1 holds two failures of four; key 2 is open.
    for fail in [true, true] {
        call(1, fail).await;
    }
    for _ in 0..4 {
        call(2, true).await;
    }
    assert_eq!(handle.state_for(&2), State::Open);
    let after = "sliding_window = { count = 4 }\nminimum_calls = 3\nshadow = true\nkeyed = { max_keys = 10 }";
    let policies: Policies = toml::from_str(&format!("[breakers.upstreams]\n{after}")).unwrap();
    policies
        .reload_keyed_circuit_breaker("upstreams", &handle)
        .unwrap();
    // Key 1 keeps its window, judged by the new minimum: the third failure trips it.
    assert_eq!(handle.metrics_for(&1).unwrap().calls, 2);
    call(1, true).await;
    assert_eq!(handle.state_for(&1), State::Open);
    // Key 2 stays open, and in shadow mode its calls go through.
    assert_eq!(handle.state_for(&2), State::Open);
    assert!(call(2, false).await, "let through");
    // Key 3 is new: three failures trip it.
    for _ in 0..3 {
        call(3, true).await;
    }
    assert_eq!(handle.state_for(&3), State::Open);
    assert!(call(3, false).await, "let through");
    assert_eq!(handle.shadow_rejected(), 2);

    let bad: Policies = toml::from_str(
        "[breakers.upstreams]\nminimum_calls = 9\nsliding_window = { count = 4 }\nkeyed = { max_keys = 10 }",
    )
    .unwrap();
    let refused = bad
        .reload_keyed_circuit_breaker("upstreams", &handle)
        .unwrap_err();
    assert_eq!(refused.path(), "breakers.upstreams.minimum_calls");
    let missing = bad
        .reload_keyed_circuit_breaker("gone", &handle)
        .unwrap_err();
    assert_eq!(missing.to_string(), "breakers.gone: no such policy");
}

#[tokio::test(start_paused = true)]
async fn a_document_reloads_a_global_breaker_and_its_errors_name_their_place() {
    let policies: Policies =
        toml::from_str("[breakers.payments]\nminimum_calls = 2\nsliding_window = { count = 2 }")
            .unwrap();
    let handle = policies.circuit_breaker("payments").unwrap().handle();
    let bad: Policies =
        toml::from_str("[breakers.payments]\nfailure_rate_threshold = 2.0").unwrap();
    let refused = bad.reload_circuit_breaker("payments", &handle).unwrap_err();
    assert_eq!(refused.path(), "breakers.payments.failure_rate_threshold");
    let good: Policies = toml::from_str("[breakers.payments]\nshadow = true").unwrap();
    good.reload_circuit_breaker("payments", &handle).unwrap();
    assert!(handle.is_shadow());
}

/// A waker that remembers it was woken.
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn an_ejecting_endpoint_rejoins_the_pool_in_shadow_mode_and_leaves_it_again() {
    let enforcing = "sliding_window = { count = 2 }\nminimum_calls = 2\nopen_for = \"30s\"";
    let group = EjectionGroup::new();
    let (down, up) = (
        config(enforcing).build().unwrap(),
        config(enforcing).build().unwrap(),
    );
    let handle = down.handle();
    let mut endpoint = down.ejecting(&group).layer(dependency());
    let _healthy = up.ejecting(&group).layer(dependency());
    for _ in 0..2 {
        send(&mut endpoint, true).await.unwrap();
    }
    assert_eq!(handle.state(), State::Open);
    let flag = Arc::new(Flag(AtomicBool::new(false)));
    let waker = Waker::from(flag.clone());
    let mut cx = Context::from_waker(&waker);
    // Open, with a healthy endpoint beside it: not ready, so the balancer looks elsewhere.
    assert!(endpoint.poll_ready(&mut cx).is_pending());
    handle
        .reload(&config(&format!("{enforcing}\nshadow = true")))
        .unwrap();
    assert!(
        flag.0.load(Ordering::SeqCst),
        "the reload woke the endpoint"
    );
    assert!(matches!(endpoint.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    assert!(endpoint.call(false).await.is_ok(), "let through");
    assert_eq!(handle.shadow_rejected(), 1);
    handle.reload(&config(enforcing)).unwrap();
    assert!(endpoint.poll_ready(&mut cx).is_pending());
}

// The model of the window a breaker keeps across reloads: outcomes with the instant
// they count from (for a time window), and the breaker's state.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    Count(usize),
    Time { width_ms: u64, buckets: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Policy {
    shape: Shape,
    rate: f64,
    minimum: u64,
}

impl Policy {
    fn toml(&self) -> String {
        let window = match self.shape {
            Shape::Count(size) => format!("{{ count = {size} }}"),
            Shape::Time { width_ms, buckets } => {
                format!(
                    "{{ time = \"{}ms\", buckets = {buckets} }}",
                    width_ms * buckets
                )
            }
        };
        format!(
            "sliding_window = {window}\nminimum_calls = {}\nfailure_rate_threshold = {}\nopen_for = \"1h\"",
            self.minimum, self.rate
        )
    }
}

#[derive(Debug, Clone)]
enum Step {
    Call(bool),
    Advance(u64),
    Reload(Policy),
    Reset,
}

fn policy() -> impl Strategy<Value = Policy> {
    let shape = prop_oneof![
        (3usize..=8).prop_map(Shape::Count),
        (prop::sample::select(vec![10u64, 30, 50]), 1u64..=4)
            .prop_map(|(width_ms, buckets)| Shape::Time { width_ms, buckets }),
    ];
    (shape, prop::sample::select(vec![0.5, 1.0]), 1u64..=3).prop_map(|(shape, rate, minimum)| {
        Policy {
            shape,
            rate,
            minimum,
        }
    })
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        6 => prop::bool::weighted(0.3).prop_map(Step::Call),
        2 => (0u64..80).prop_map(Step::Advance),
        2 => policy().prop_map(Step::Reload),
        1 => Just(Step::Reset),
    ];
    prop::collection::vec(step, 1..80)
}

/// The breaker as the documentation describes it.
struct Model {
    policy: Policy,
    /// (nanoseconds since the breaker was built, failed), oldest first.
    outcomes: VecDeque<(u64, bool)>,
    open: bool,
}

impl Model {
    fn live(&self, now: u64) -> impl Iterator<Item = &(u64, bool)> {
        let shape = self.policy.shape;
        self.outcomes.iter().filter(move |(at, _)| match shape {
            Shape::Count(_) => true,
            Shape::Time { width_ms, buckets } => {
                let width = width_ms * 1_000_000;
                now / width - at / width < buckets
            }
        })
    }

    fn counts(&self, now: u64) -> (u64, u64) {
        self.live(now)
            .fold((0, 0), |(calls, failures), (_, failed)| {
                (calls + 1, failures + u64::from(*failed))
            })
    }

    fn call(&mut self, failed: bool, now: u64) {
        if self.open {
            return;
        }
        let mut changed = true;
        if let Shape::Count(size) = self.policy.shape {
            // Replacing an identical outcome changes no count: no verdict.
            if self.outcomes.len() == size {
                let (_, evicted) = self.outcomes.pop_front().expect("full");
                changed = evicted != failed;
            }
        }
        self.outcomes.push_back((now, failed));
        let (calls, failures) = self.counts(now);
        if changed
            && calls >= self.policy.minimum
            && failures as f64 >= self.policy.rate * calls as f64
        {
            self.open = true;
        }
    }

    fn reload(&mut self, to: Policy, now: u64) {
        let from = self.policy.shape;
        self.policy = to;
        if from == to.shape {
            return;
        }
        match (from, to.shape) {
            (_, _) if self.open => self.outcomes.clear(),
            (Shape::Count(_), Shape::Count(size)) => {
                while self.outcomes.len() > size {
                    self.outcomes.pop_front();
                }
            }
            (Shape::Time { width_ms, buckets }, Shape::Time { .. }) => {
                let width = width_ms * 1_000_000;
                self.outcomes
                    .retain(|(at, _)| now / width - at / width < buckets);
                // Placed where its old bucket started; kept while the new span covers it.
                for (at, _) in &mut self.outcomes {
                    *at = *at / width * width;
                }
                self.outcomes = self.live(now).copied().collect();
            }
            _ => self.outcomes.clear(),
        }
    }
}

async fn run(first: Policy, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let start = Instant::now();
    let breaker = config(&first.toml()).build().unwrap();
    let handle: CircuitBreakerHandle = breaker.handle();
    let mut service = breaker.layer(dependency());
    let mut model = Model {
        policy: first,
        outcomes: VecDeque::new(),
        open: false,
    };
    let reached = AtomicU64::new(0);
    for (index, step) in steps.into_iter().enumerate() {
        let now = || Instant::now().duration_since(start).as_nanos() as u64;
        match step {
            Step::Call(fail) => {
                if send(&mut service, fail).await.is_ok() {
                    reached.fetch_add(1, Ordering::Relaxed);
                }
                model.call(fail, now());
            }
            Step::Advance(ms) => advance(Duration::from_millis(ms)).await,
            Step::Reload(policy) => {
                handle.reload(&config(&policy.toml())).unwrap();
                model.reload(policy, now());
            }
            Step::Reset => {
                handle.reset();
                model.outcomes.clear();
                model.open = false;
            }
        }
        let metrics = handle.metrics();
        let expected = if model.open {
            State::Open
        } else {
            State::Closed
        };
        prop_assert_eq!(metrics.state, expected, "after step {}", index);
        prop_assert_eq!(
            (metrics.calls, metrics.failures),
            model.counts(now()),
            "after step {}",
            index
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Calls, time, reloads to other windows, thresholds and minimums, and resets: the
    /// breaker's state and window are the model's after every step.
    #[test]
    fn the_state_and_window_carry_over_as_the_model_says(first in policy(), steps in steps()) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(run(first, steps))?;
    }
}
