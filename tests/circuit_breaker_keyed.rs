//! Keyed circuit breakers through the public API: one breaker per key, the policy at the
//! cap and for requests without a key, the handle, keyed events and metrics, a million
//! fresh keys, and a dropped probe.

use palisade::circuit_breaker::{
    CircuitBreakerLayer, CircuitOpen, KeyedCircuitBreakerLayer, SlidingWindow, State, Transition,
};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

/// A request: its key (if any) and whether the upstream fails it.
type Request = (Option<u32>, bool);

const OPEN_FOR: Duration = Duration::from_secs(10);

fn key(request: &Request) -> Option<u32> {
    request.0
}

type Extractor = fn(&Request) -> Option<u32>;

/// Trips a key's breaker after two calls that both failed.
fn layer(max_keys: usize) -> KeyedCircuitBreakerLayer<Extractor, u32> {
    CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count(2))
        .minimum_calls(2)
        .open_for(OPEN_FOR)
        .half_open_probes(1)
        .keyed(key as Extractor)
        .max_keys(max_keys)
        .build()
        .expect("valid")
}

fn upstream()
-> impl Service<Request, Response = &'static str, Error = BoxError, Future: Send> + Clone {
    service_fn(|(_, fail): Request| async move {
        if fail {
            Err::<&'static str, BoxError>("upstream failed".into())
        } else {
            Ok("ok")
        }
    })
}

async fn send<S>(service: &mut S, key: Option<u32>, fail: bool) -> Result<(), BoxError>
where
    S: Service<Request, Error = BoxError>,
{
    service.ready().await?.call((key, fail)).await.map(drop)
}

fn is_open(result: Result<(), BoxError>) -> bool {
    result.is_err_and(|error| error.is::<CircuitOpen>())
}

#[tokio::test(start_paused = true)]
async fn each_key_has_a_breaker_of_its_own() {
    let layer = layer(100);
    let handle = layer.handle();
    let mut service = layer.layer(upstream());
    for _ in 0..2 {
        let _ = send(&mut service, Some(1), true).await;
    }
    assert_eq!(handle.state_for(&1), State::Open);
    assert!(is_open(send(&mut service, Some(1), false).await));
    // Key 2 never noticed.
    for _ in 0..10 {
        send(&mut service, Some(2), false)
            .await
            .expect("key 2 is closed");
    }
    assert_eq!(handle.state_for(&2), State::Closed);
    assert_eq!(handle.not_closed(), vec![(1, State::Open)]);
    let metrics = handle.metrics_for(&1).expect("tracked");
    assert_eq!((metrics.state, metrics.rejected), (State::Open, 1));
    assert_eq!(handle.metrics_for(&3), None, "never seen");

    // Key 1 recovers through its own probe.
    tokio::time::advance(OPEN_FOR).await;
    send(&mut service, Some(1), false).await.expect("the probe");
    assert_eq!(handle.state_for(&1), State::Closed);
    assert!(handle.not_closed().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_new_key_at_the_cap_and_a_request_without_a_key_share_one_breaker() {
    let layer = layer(1);
    let handle = layer.handle();
    let mut service = layer.layer(upstream());
    for _ in 0..2 {
        let _ = send(&mut service, Some(1), true).await;
    }
    assert_eq!(handle.state_for(&1), State::Open);
    // The table is full of an open breaker: key 2 is not tracked, and its failures go
    // to the shared breaker, which requests without a key use too.
    let _ = send(&mut service, Some(2), true).await;
    let _ = send(&mut service, None, true).await;
    assert_eq!(handle.tracked_keys(), 1);
    assert_eq!(handle.metrics_for(&2), None);
    assert_eq!(handle.shared_state(), State::Open);
    assert!(is_open(send(&mut service, None, false).await));
    assert!(is_open(send(&mut service, Some(3), false).await));
    assert_eq!(handle.state_for(&1), State::Open, "key 1 kept its breaker");

    // Once key 1 has recovered (only successes in its window), a new key may take its
    // place, with a fresh breaker.
    tokio::time::advance(OPEN_FOR).await;
    send(&mut service, Some(1), false).await.expect("the probe");
    send(&mut service, Some(4), false)
        .await
        .expect("key 4 has a breaker of its own");
    assert_eq!(handle.tracked_keys(), 1);
    assert!(handle.metrics_for(&4).is_some());
    assert_eq!(handle.metrics_for(&1), None, "the idle breaker was dropped");
}

#[tokio::test(start_paused = true)]
async fn a_million_fresh_keys_stay_under_the_cap_and_leave_an_open_breaker_open() {
    const MAX_KEYS: usize = 10_000;
    let layer = layer(MAX_KEYS);
    let handle = layer.handle();
    let mut service = layer.layer(upstream());
    for _ in 0..2 {
        let _ = send(&mut service, Some(0), true).await;
    }
    assert_eq!(handle.state_for(&0), State::Open);
    // Forced open by an operator: nothing in its window, but not idle either.
    const FORCED: u32 = u32::MAX;
    assert!(handle.force_open_for(&FORCED));
    for key in 1..=1_000_000u32 {
        // Every tenth fresh key fails once: its breaker is not idle and stays tracked
        // until the table is full of them; the others are dropped as they go idle.
        let _ = send(&mut service, Some(key), key % 10 == 0).await;
        if key % 10_000 == 0 {
            assert!(
                handle.tracked_keys() <= MAX_KEYS,
                "{} keys",
                handle.tracked_keys()
            );
        }
    }
    assert!(handle.tracked_keys() <= MAX_KEYS);
    assert_eq!(
        handle.state_for(&0),
        State::Open,
        "the flood did not reset it"
    );
    assert_eq!(handle.state_for(&FORCED), State::ForcedOpen);
    assert!(is_open(send(&mut service, Some(0), false).await));
}

/// An upstream whose calls never finish.
#[derive(Clone)]
struct Hanging;

impl Service<Request> for Hanging {
    type Response = &'static str;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<&'static str, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request) -> Self::Future {
        Box::pin(std::future::pending())
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_keyed_probe_gives_its_slot_back() {
    let layer = layer(10);
    let handle = layer.handle();
    let mut failing = layer.layer(upstream());
    for _ in 0..2 {
        let _ = send(&mut failing, Some(1), true).await;
    }
    tokio::time::advance(OPEN_FOR).await;
    let mut hanging = layer.layer(Hanging);
    let probe = hanging.ready().await.expect("ready").call((Some(1), false));
    assert_eq!(handle.state_for(&1), State::HalfOpen);
    assert!(
        is_open(send(&mut failing, Some(1), false).await),
        "the one slot is taken"
    );
    drop(probe);
    assert_eq!(handle.metrics_for(&1).expect("tracked").probes_in_flight, 0);
    send(&mut failing, Some(1), false)
        .await
        .expect("the slot came back");
    assert_eq!(handle.state_for(&1), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn the_handle_forces_one_key_or_all() {
    let layer = layer(2);
    let handle = layer.handle();
    let mut service = layer.layer(upstream());
    assert!(handle.force_open_for(&1));
    assert!(is_open(send(&mut service, Some(1), false).await));
    send(&mut service, Some(2), false)
        .await
        .expect("key 2 is closed");
    assert!(handle.force_closed_for(&2));
    for _ in 0..4 {
        let _ = send(&mut service, Some(2), true).await;
    }
    assert_eq!(handle.state_for(&2), State::ForcedClosed);
    // Both places are taken by forced breakers: a third key cannot be forced.
    assert!(!handle.force_open_for(&3));
    handle.reset_for(&1);
    assert_eq!(handle.state_for(&1), State::Closed);

    // Forcing all reaches the keys to come and the shared breaker.
    handle.force_open();
    assert_eq!(handle.state_for(&1), State::ForcedOpen);
    assert_eq!(handle.state_for(&2), State::ForcedOpen);
    assert_eq!(
        handle.state_for(&7),
        State::ForcedOpen,
        "a fresh key starts forced"
    );
    assert_eq!(handle.shared_state(), State::ForcedOpen);
    assert!(is_open(send(&mut service, None, false).await));
    handle.reset();
    assert_eq!(handle.state_for(&2), State::Closed);
    assert_eq!(handle.state_for(&7), State::Closed);
    send(&mut service, None, false)
        .await
        .expect("the shared breaker is closed");
}

#[tokio::test(start_paused = true)]
async fn transitions_carry_their_key() {
    /// The key and the move of each transition, as the observer saw them.
    type Seen = Mutex<Vec<(Option<u32>, State, State)>>;
    let seen: Arc<Seen> = Arc::default();
    let layer = CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count(2))
        .minimum_calls(2)
        .keyed(key as Extractor)
        .max_keys(1)
        .on_transition({
            let seen = Arc::clone(&seen);
            move |key: Option<&u32>, transition: &Transition| {
                seen.lock()
                    .expect("lock")
                    .push((key.copied(), transition.from, transition.to));
            }
        })
        .build()
        .expect("valid");
    let mut service = layer.layer(upstream());
    for key in [Some(5), Some(5), Some(6), Some(6)] {
        let _ = send(&mut service, key, true).await;
    }
    assert_eq!(
        *seen.lock().expect("lock"),
        vec![
            (Some(5), State::Closed, State::Open),
            (None, State::Closed, State::Open)
        ],
        "key 6 found the table full and went to the shared breaker"
    );
}

#[cfg(feature = "metrics")]
#[tokio::test(start_paused = true)]
async fn metrics_carry_the_key_only_when_asked() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let build = |labelled: bool| {
        let builder = CircuitBreakerLayer::builder()
            .sliding_window(SlidingWindow::count(2))
            .minimum_calls(2)
            .keyed(key as Extractor);
        let builder = if labelled {
            builder.key_in_metrics(|key: &u32| format!("upstream-{key}"))
        } else {
            builder
        };
        builder.build().expect("valid")
    };
    for labelled in [false, true] {
        let mut service = build(labelled).layer(upstream());
        for _ in 0..3 {
            let _ = send(&mut service, Some(8), true).await;
        }
    }
    let labels: Vec<(String, Vec<String>)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(_, _, _, value)| matches!(value, DebugValue::Counter(_)))
        .map(|(key, _, _, _)| {
            let key = key.key();
            let labels = key
                .labels()
                .map(|label| format!("{}={}", label.key(), label.value()));
            (key.name().to_owned(), labels.collect())
        })
        .collect();
    let with_key: Vec<_> = labels
        .iter()
        .filter(|(_, labels)| labels.iter().any(|label| label.starts_with("key=")))
        .collect();
    assert_eq!(with_key.len(), 2, "{labels:?}");
    assert!(
        with_key
            .iter()
            .all(|(_, labels)| labels.contains(&"key=upstream-8".to_owned()))
    );
    assert_eq!(
        labels.len(),
        4,
        "the unlabelled breaker counted without a key: {labels:?}"
    );
}

#[test]
fn max_keys_zero_is_a_configuration_error() {
    let error = CircuitBreakerLayer::builder()
        .keyed::<_, u32>(key as Extractor)
        .max_keys(0)
        .build()
        .expect_err("no room");
    assert_eq!(
        error,
        palisade::circuit_breaker::CircuitBreakerConfigError::ZeroMaxKeys
    );
}
