//! The `metrics` feature: counters for what happens off the success path.
#![cfg(feature = "metrics")]

use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use palisade::circuit_breaker::{CircuitBreakerLayer, CircuitOpen, SlidingWindow};
use palisade::rate_limit::{RateLimitLayer, RateLimited};
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

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
