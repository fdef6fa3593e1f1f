//! The `metrics` feature: counters for what happens off the success path.
#![cfg(feature = "metrics")]

use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use palisade::circuit_breaker::{CircuitBreakerLayer, CircuitOpen, SlidingWindow};
use palisade::rate_limit::{RateLimitLayer, RateLimited};
use palisade::retry::{Backoff, RetryBudget, RetryLayer};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt, service_fn};

/// A counter's name, labels and count.
type Counter = (String, Vec<(String, String)>, u64);

/// The counters of a snapshot (taking one resets them), by name and labels.
fn counters(snapshotter: &Snapshotter) -> Vec<Counter> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| match value {
            DebugValue::Counter(count) => {
                let key = key.key();
                let labels = key
                    .labels()
                    .map(|label| (label.key().to_owned(), label.value().to_owned()))
                    .collect();
                Some((key.name().to_owned(), labels, count))
            }
            _ => None,
        })
        .collect()
}

fn counter(counters: &[Counter], name: &str, labels: &[(&str, &str)]) -> u64 {
    counters
        .iter()
        .filter(|(counter, counter_labels, _)| {
            counter == name
                && labels.iter().all(|(label, value)| {
                    counter_labels.iter().any(|(l, v)| l == label && v == value)
                })
        })
        .map(|(_, _, count)| count)
        .sum()
}

#[tokio::test(start_paused = true)]
async fn a_breaker_counts_its_transitions_and_rejections() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let layer = CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count(2))
        .minimum_calls(2)
        .open_for(Duration::from_secs(1))
        .build()
        .expect("a valid breaker");
    let mut service = layer.layer(service_fn(|fail: bool| async move {
        if fail {
            Err(BoxError::from("down"))
        } else {
            Ok(())
        }
    }));
    for _ in 0..2 {
        let _ = service.ready().await.expect("ready").call(true).await;
    }
    let rejected = service.ready().await.expect("ready").call(false).await;
    assert!(rejected.is_err_and(|error| error.is::<CircuitOpen>()));

    let counters = counters(&snapshotter);
    assert_eq!(
        counter(
            &counters,
            "palisade_circuit_breaker_transitions_total",
            &[("from", "closed"), ("to", "open")]
        ),
        1
    );
    assert_eq!(
        counter(&counters, "palisade_circuit_breaker_rejected_total", &[]),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn forcing_a_forced_breaker_again_counts_no_transition() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let handle = CircuitBreakerLayer::builder()
        .build()
        .expect("a valid breaker")
        .handle();
    handle.force_open();
    handle.force_open();
    handle.force_closed();
    handle.force_closed();

    let counters = counters(&snapshotter);
    let transitions = "palisade_circuit_breaker_transitions_total";
    assert_eq!(counter(&counters, transitions, &[]), 2);
    for state in ["forced_open", "forced_closed"] {
        assert_eq!(
            counter(&counters, transitions, &[("from", state), ("to", state)]),
            0,
            "{state}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_rate_limiter_counts_its_rejections() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let layer = RateLimitLayer::builder()
        .capacity(1)
        .refill(1, Duration::from_secs(1))
        .build()
        .expect("a valid limiter");
    let mut service = layer.layer(service_fn(|_: ()| async { Ok::<_, BoxError>(()) }));
    for _ in 0..3 {
        let _ = service.ready().await.expect("ready").call(()).await;
    }
    let refused = service.ready().await.expect("ready").call(()).await;
    assert!(refused.is_err_and(|error| error.is::<RateLimited>()));

    let counters = counters(&snapshotter);
    assert_eq!(
        counter(&counters, "palisade_rate_limit_rejected_total", &[]),
        3
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_layer_counts_retries_by_reason_and_budget_refusals() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    // Two retries in the budget, no deposits; retries go through a limiter of one
    // request per 100 ms, to a backend failing its first call.
    let retry = RetryLayer::builder()
        .max_attempts(3)
        .backoff(Backoff::constant(Duration::from_millis(1)))
        .budget(RetryBudget::new(Duration::from_secs(2), 1, 0.0))
        .build()
        .expect("a valid retry layer");
    let limiter = RateLimitLayer::builder()
        .capacity(1)
        .refill(1, Duration::from_millis(100))
        .build()
        .expect("a valid limiter");
    let calls = Arc::new(AtomicUsize::new(0));
    let backend = {
        let calls = calls.clone();
        service_fn(move |()| {
            let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if call == 1 {
                    Err(BoxError::from("down"))
                } else {
                    Ok(call)
                }
            }
        })
    };
    let mut service = ServiceBuilder::new()
        .layer(retry)
        .layer(limiter)
        .service(backend);

    // The backend fails (retry: "error"), the limiter refuses the retry (retry:
    // "rate_limited"), and the third attempt, a refill later, is answered.
    let answered = service.ready().await.expect("ready").call(()).await;
    assert_eq!(answered.expect("third attempt"), 2);
    // The budget is spent: the next failure is not retried.
    tokio::time::advance(Duration::from_millis(100)).await;
    calls.store(0, Ordering::SeqCst);
    let failed = service.ready().await.expect("ready").call(()).await;
    assert_eq!(failed.expect_err("not retried").to_string(), "down");

    let counters = counters(&snapshotter);
    let attempts = "palisade_retry_attempts_total";
    assert_eq!(counter(&counters, attempts, &[("reason", "error")]), 1);
    assert_eq!(
        counter(&counters, attempts, &[("reason", "rate_limited")]),
        1
    );
    assert_eq!(counter(&counters, attempts, &[]), 2);
    assert_eq!(
        counter(&counters, "palisade_retry_budget_exhausted_total", &[]),
        1
    );
}

/// The gauges of a snapshot, by name.
fn gauge(snapshotter: &Snapshotter, name: &str) -> Option<f64> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .find_map(|(key, _, _, value)| match value {
            DebugValue::Gauge(value) if key.key().name() == name => Some(value.into_inner()),
            _ => None,
        })
}

#[tokio::test(start_paused = true)]
async fn a_concurrency_limit_counts_its_rejections_and_reports_its_limit() {
    use palisade::concurrency_limit::{ConcurrencyLimitLayer, LimitAlgorithm, Overloaded, Sample};

    /// Drops to one after the first request.
    #[derive(Debug)]
    struct ToOne;
    impl LimitAlgorithm for ToOne {
        fn starting_limit(&self) -> u32 {
            2
        }
        fn update(&mut self, _: Sample) -> u32 {
            1
        }
    }

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let layer = ConcurrencyLimitLayer::builder()
        .algorithm(ToOne)
        .build()
        .unwrap();
    let mut service = layer.layer(service_fn(|wait: bool| async move {
        if wait {
            std::future::pending::<()>().await;
        }
        Ok::<_, BoxError>(())
    }));
    service.ready().await.unwrap().call(false).await.unwrap();
    assert_eq!(
        gauge(&snapshotter, "palisade_concurrency_limit_limit"),
        Some(1.0)
    );
    let _held = service.ready().await.unwrap().call(true);
    for _ in 0..2 {
        let refused = service.ready().await.unwrap().call(false).await;
        assert!(refused.is_err_and(|error| error.is::<Overloaded>()));
    }
    // One snapshot for both: taking one resets what it took.
    let (mut rejected, mut in_flight) = (0, None);
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        match (key.key().name(), value) {
            ("palisade_concurrency_limit_rejected_total", DebugValue::Counter(count)) => {
                rejected = count;
            }
            ("palisade_concurrency_limit_in_flight", DebugValue::Gauge(value)) => {
                in_flight = Some(value.into_inner());
            }
            _ => {}
        }
    }
    assert_eq!((rejected, in_flight), (2, Some(1.0)));
}

#[tokio::test(start_paused = true)]
async fn shadow_breakers_and_concurrency_limits_count_what_they_would_have_refused() {
    use palisade::concurrency_limit::ConcurrencyLimitLayer;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let breaker = CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count(2))
        .minimum_calls(2)
        .shadow(true)
        .build()
        .expect("a valid breaker");
    let mut service = breaker.layer(service_fn(|_: ()| async {
        Err::<(), _>(BoxError::from("down"))
    }));
    for _ in 0..5 {
        let error = service.ready().await.unwrap().call(()).await.unwrap_err();
        assert!(!error.is::<CircuitOpen>(), "let through");
    }
    let limit = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .shadow(true)
        .build()
        .expect("a valid limit");
    let mut service = limit.layer(service_fn(|n: u32| async move { Ok::<_, BoxError>(n) }));
    let held = service.ready().await.unwrap().call(1);
    assert_eq!(service.ready().await.unwrap().call(2).await.unwrap(), 2);
    assert_eq!(held.await.unwrap(), 1);

    let counters = counters(&snapshotter);
    let count = |name| counter(&counters, name, &[]);
    assert_eq!(count("palisade_circuit_breaker_shadow_rejected_total"), 3);
    assert_eq!(count("palisade_circuit_breaker_rejected_total"), 0);
    assert_eq!(count("palisade_concurrency_limit_shadow_rejected_total"), 1);
    assert_eq!(count("palisade_concurrency_limit_rejected_total"), 0);
}
