//! Code the user hands to palisade (classifiers, key extractors, cost functions, keys,
//! retry policies, observers) may panic. What the caller sees, per layer:
//!
//! - The panic unwinds through the call that ran the user code: that caller's task (or
//!   `call`) panics, as with any panic in a tower service; palisade does not swallow it.
//! - Every other request, and every clone of the layer, carries on: nothing held by the
//!   panicking call (a half-open probe slot, a bucket's tokens, a budget withdrawal) is
//!   leaked, no lock stays poisoned, and the state the layer reports stays consistent.
//!
//! Each test runs the panicking requests in spawned tasks (a panicking task is a
//! `JoinError::is_panic()`), then checks the shared state through the layer's handle.
#![cfg(feature = "http")]

use palisade::circuit_breaker::{CircuitBreakerLayer, SlidingWindow, State};
use palisade::classify::Outcome;
use palisade::rate_limit::RateLimitLayer;
use palisade::retry::{Backoff, RetryBudget, RetryLayer};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::task::JoinError;
use tokio::time::advance;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

const SECOND: Duration = Duration::from_secs(1);

/// Sends `request` through a clone of `service` in a task of its own.
async fn send_in_task<S, Req>(
    service: &S,
    request: Req,
) -> Result<Result<S::Response, BoxError>, JoinError>
where
    S: Service<Req, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
    Req: Send + 'static,
{
    let service = service.clone();
    tokio::spawn(async move { service.oneshot(request).await }).await
}

fn panicked<T: std::fmt::Debug>(joined: Result<T, JoinError>) -> bool {
    match joined {
        Err(error) => error.is_panic(),
        Ok(result) => panic!("expected a panic, got {result:?}"),
    }
}

/// An inner service answering `Ok(request)` for "ok*"/"panic*" requests, `Err` for "fail".
fn echo() -> impl Service<&'static str, Response = &'static str, Error = BoxError, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(|request: &'static str| async move {
        if request == "fail" {
            Err::<_, BoxError>("backend failed".into())
        } else {
            Ok(request)
        }
    })
}

/// A classifier that panics on a "panic" response (a user bug) and otherwise counts
/// errors as failures.
fn panicking_classifier(result: &Result<&'static str, BoxError>) -> Outcome {
    match result {
        Ok(response) if response.starts_with("panic") => panic!("classifier bug"),
        Ok(_) => Outcome::Success,
        Err(_) => Outcome::Failure,
    }
}

/// Breaker: a classifier panic reaches only that caller; the call is not recorded, and
/// a half-open probe slot it held is given back (the report is dropped while unwinding).
#[tokio::test(start_paused = true)]
async fn a_panicking_classifier_leaks_no_probe_slot_and_records_nothing() {
    let layer = CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count(4))
        .minimum_calls(2)
        .open_for(SECOND)
        .half_open_probes(1)
        .classify(panicking_classifier)
        .build()
        .unwrap();
    let handle = layer.handle();
    let service = layer.layer(echo());

    // Closed: a panicking classification is not recorded; the others are.
    assert!(panicked(send_in_task(&service, "panic").await));
    assert!(send_in_task(&service, "ok").await.unwrap().is_ok());
    assert_eq!(handle.metrics().calls, 1);
    for _ in 0..2 {
        assert!(send_in_task(&service, "fail").await.unwrap().is_err());
    }
    assert_eq!(handle.state(), State::Open);

    // Half-open with one probe slot: the probe's classifier panics, twice over.
    advance(SECOND).await;
    for _ in 0..2 {
        assert!(panicked(send_in_task(&service, "panic").await));
        assert_eq!(handle.state(), State::HalfOpen);
    }
    // The slot came back each time: the next probe gets it and closes the breaker.
    assert_eq!(send_in_task(&service, "ok").await.unwrap().unwrap(), "ok");
    assert_eq!(handle.state(), State::Closed);
}

/// Breaker: an `on_transition` observer that panics on every transition. The panic
/// reaches the caller whose call made the transition; the transition itself, and its
/// bookkeeping (consecutive trips), are complete before the observer runs.
#[tokio::test(start_paused = true)]
async fn a_panicking_transition_observer_leaves_the_breaker_consistent() {
    let heard = Arc::new(AtomicUsize::new(0));
    let layer = CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count(2))
        .minimum_calls(2)
        .open_for(SECOND)
        .half_open_probes(1)
        .on_transition({
            let heard = heard.clone();
            move |transition| {
                heard.fetch_add(1, Ordering::SeqCst);
                panic!("observer bug on {:?}", transition.to)
            }
        })
        .build()
        .unwrap();
    let handle = layer.handle();
    let service = layer.layer(echo());

    assert!(send_in_task(&service, "fail").await.unwrap().is_err());
    // The second failure trips the breaker: its caller sees the observer's panic.
    assert!(panicked(send_in_task(&service, "fail").await));
    assert_eq!(handle.state(), State::Open);
    assert_eq!(handle.metrics().consecutive_trips, 1);
    assert!(
        send_in_task(&service, "ok").await.unwrap().is_err(),
        "open rejects"
    );

    // The first call after the open time half-opens it (and panics in `call`).
    advance(SECOND).await;
    assert!(panicked(send_in_task(&service, "ok").await));
    assert_eq!(handle.state(), State::HalfOpen);
    // The probe succeeds and closes it: its caller panics, the breaker is closed and
    // its trips are reset (the next trip opens for the initial time again).
    assert!(panicked(send_in_task(&service, "ok").await));
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(handle.metrics().consecutive_trips, 0);
    assert_eq!(heard.load(Ordering::SeqCst), 3);
    // Everyone else carries on.
    for _ in 0..10 {
        assert_eq!(send_in_task(&service, "ok").await.unwrap().unwrap(), "ok");
    }
}

/// A key whose equality panics when asked about a "poisoned" instance: the keyed
/// limiter compares keys while holding a shard's lock.
#[derive(Debug, Clone)]
struct TrickyKey {
    id: u32,
    panics: bool,
}

impl Hash for TrickyKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

impl PartialEq for TrickyKey {
    fn eq(&self, other: &Self) -> bool {
        assert!(!(self.panics || other.panics), "key comparison bug");
        self.id == other.id
    }
}

impl Eq for TrickyKey {}

/// Rate limiter: a key extractor, a cost function and a key's `Eq` that panic. No
/// tokens are taken for the panicking requests, the shard lock a panic poisoned keeps
/// serving, and other clients are unaffected.
#[tokio::test(start_paused = true)]
async fn panicking_extractors_costs_and_keys_take_no_tokens_and_poison_nothing() {
    let layer = RateLimitLayer::builder()
        .capacity(3)
        .refill(1, Duration::from_secs(60))
        .keyed(|request: &(u32, &'static str)| match request.1 {
            "extractor" => panic!("extractor bug"),
            "key" => Some(TrickyKey {
                id: request.0,
                panics: true,
            }),
            _ => Some(TrickyKey {
                id: request.0,
                panics: false,
            }),
        })
        .cost(|request: &(u32, &'static str)| {
            assert!(request.1 != "cost", "cost bug");
            1
        })
        .build()
        .unwrap();
    let handle = layer.handle();
    let service = layer.layer(service_fn(|request: (u32, &'static str)| async move {
        Ok::<_, BoxError>(request.0)
    }));
    let key = |id| TrickyKey { id, panics: false };

    assert_eq!(send_in_task(&service, (1, "ok")).await.unwrap().unwrap(), 1);
    for bug in ["extractor", "cost", "key"] {
        assert!(panicked(send_in_task(&service, (1, bug)).await), "{bug}");
        // Key 1 still has exactly the two tokens it had: nothing charged for the panic.
        assert_eq!(handle.available_for(&key(1)), 2, "after the {bug} panic");
    }
    // The "key" panic happened under the shard lock of key 1; the shard still serves.
    assert_eq!(send_in_task(&service, (1, "ok")).await.unwrap().unwrap(), 1);
    assert_eq!(send_in_task(&service, (1, "ok")).await.unwrap().unwrap(), 1);
    assert!(
        send_in_task(&service, (1, "ok")).await.unwrap().is_err(),
        "key 1 spent"
    );
    assert_eq!(handle.tracked_keys(), 1);
    // Other clients, in every shard, are unaffected.
    for id in 2..200 {
        assert_eq!(
            send_in_task(&service, (id, "ok")).await.unwrap().unwrap(),
            id
        );
    }
}

/// Retry: a `retry_if` policy and an `on_retry` observer that panic. The panicking
/// request's task goes down; a budget withdrawal it took for the retry is refunded when
/// its future is dropped while unwinding; other requests retry on the same budget.
#[tokio::test(start_paused = true)]
async fn panicking_retry_policy_and_observer_spend_no_budget() {
    let observer_panics = Arc::new(AtomicBool::new(false));
    let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.0);
    let layer = RetryLayer::builder()
        .max_attempts(2)
        .backoff(Backoff::constant(Duration::from_millis(10)))
        .budget(budget)
        .retry_if(|result: &Result<&'static str, BoxError>| match result {
            Ok(response) => {
                assert!(*response != "policy-panic", "retry policy bug");
                false
            }
            Err(_) => true,
        })
        .on_retry({
            let observer_panics = observer_panics.clone();
            move |_event| assert!(!observer_panics.load(Ordering::SeqCst), "observer bug")
        })
        .build()
        .unwrap();
    let handle = layer.handle();
    let available = handle.budget_available();
    assert_eq!(available, 10, "1 retry/s for 10 s");
    let service = layer.layer(echo());

    // The policy panics on the response: the task goes down, no retry was taken.
    assert!(panicked(send_in_task(&service, "policy-panic").await));
    assert_eq!(handle.budget_available(), available);

    // The observer panics just after the withdrawal for a retry: it is refunded.
    observer_panics.store(true, Ordering::SeqCst);
    assert!(panicked(send_in_task(&service, "fail").await));
    assert_eq!(
        handle.budget_available(),
        available,
        "the withdrawal came back"
    );

    // Others retry on the same budget: one retry spent per failing request.
    observer_panics.store(false, Ordering::SeqCst);
    assert!(send_in_task(&service, "fail").await.unwrap().is_err());
    assert_eq!(handle.budget_available(), available - 1);
    assert_eq!(send_in_task(&service, "ok").await.unwrap().unwrap(), "ok");
}
