//! Many tasks on a multi-thread runtime sharing one breaker.

use palisade::circuit_breaker::{
    CircuitBreakerLayer, CircuitOpen, SlidingWindow, State, Transition,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

const TASKS: usize = 8;
const CALLS: usize = 5_000;

/// Every `fail_every`-th call of each task fails.
async fn hammer<S>(service: S, fail_every: usize)
where
    S: Service<bool, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let mut service = service.clone();
            tokio::spawn(async move {
                for call in 0..CALLS {
                    let fail = call % fail_every == fail_every - 1;
                    let _ = service.ready().await.expect("ready").call(fail).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
}

fn flaky() -> impl Service<bool, Response = (), Error = BoxError, Future: Send> + Clone + Send {
    service_fn(|fail: bool| async move {
        tokio::task::yield_now().await;
        if fail {
            Err(BoxError::from("failed"))
        } else {
            Ok(())
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counts_add_up_exactly_in_a_count_window() {
    // Room to spare: each thread reserves ring positions a block at a time, and the
    // blocks still open at the end would otherwise wrap onto the first calls.
    let layer = CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count(2 * TASKS * CALLS))
        .minimum_calls(1)
        .failure_rate_threshold(0.5)
        .build()
        .expect("valid");
    let handle = layer.handle();
    hammer(layer.layer(flaky()), 10).await;
    let metrics = handle.metrics();
    assert_eq!(metrics.state, State::Closed);
    assert_eq!(metrics.calls, (TASKS * CALLS) as u64);
    assert_eq!(metrics.failures, (TASKS * CALLS / 10) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_count_window_keeps_exactly_its_size() {
    let layer = CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count(1000))
        .minimum_calls(1000)
        .failure_rate_threshold(1.0)
        .build()
        .expect("valid");
    let handle = layer.handle();
    // Every call fails in half the tasks' slots: the ring wraps many times under
    // contention, and its running counts must still match its slots.
    hammer(layer.layer(flaky()), 2).await;
    let metrics = handle.metrics();
    assert_eq!(metrics.calls, 1000);
    assert!(metrics.failures > 0 && metrics.failures < 1000);
    handle.reset();
    assert_eq!(handle.metrics().calls, 0);
    assert_eq!(handle.metrics().failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counts_add_up_exactly_in_a_time_window() {
    let layer = CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::time(Duration::from_secs(3600)))
        .slow_calls(Duration::from_secs(3600), 1.0)
        .minimum_calls(1)
        .failure_rate_threshold(0.5)
        .build()
        .expect("valid");
    let handle = layer.handle();
    hammer(layer.layer(flaky()), 5).await;
    let metrics = handle.metrics();
    assert_eq!(metrics.calls, (TASKS * CALLS) as u64);
    assert_eq!(metrics.failures, (TASKS * CALLS / 5) as u64);
    assert_eq!(metrics.slow_calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_failures_trip_exactly_once() {
    let opened = Arc::new(AtomicUsize::new(0));
    let tripped_from_closed = Arc::new(AtomicUsize::new(0));
    let (opens, trips) = (Arc::clone(&opened), Arc::clone(&tripped_from_closed));
    let layer = CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count(50))
        .minimum_calls(10)
        // Rounded down to the millisecond, a nanosecond of open time has passed by the
        // next call (or the one after): the half-open phases race without waiting.
        .open_for(Duration::from_nanos(1))
        .half_open_probes(3)
        .on_transition(move |transition: &Transition| {
            if transition.to == State::Open {
                opens.fetch_add(1, Ordering::SeqCst);
            }
            if transition.from == State::Closed {
                trips.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .expect("valid");
    let handle = layer.handle();

    // Every call fails, from all tasks at once: the breaker trips once, and then every
    // half-open phase reopens it, each time exactly once.
    let backend = service_fn(|_: bool| async {
        tokio::task::yield_now().await;
        Err::<(), BoxError>("down".into())
    });
    let service = layer.layer(backend);
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let mut service = service.clone();
            tokio::spawn(async move {
                let mut rejected = 0;
                for _ in 0..2_000 {
                    let result = service.ready().await.expect("ready").call(true).await;
                    if result.is_err_and(|error| error.is::<CircuitOpen>()) {
                        rejected += 1;
                    }
                }
                rejected
            })
        })
        .collect();
    let mut rejected = 0;
    for task in tasks {
        rejected += task.await.expect("task");
    }
    assert!(rejected > 0);
    assert_eq!(tripped_from_closed.load(Ordering::SeqCst), 1);
    let trips = handle.metrics().consecutive_trips as usize;
    assert!(trips > 1, "half-open phases happened and failed");
    assert_eq!(opened.load(Ordering::SeqCst), trips);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_open_admits_at_most_the_probe_limit_concurrently() {
    const PROBES: usize = 3;
    const CALLERS: usize = 16;
    let layer = CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count(1))
        .minimum_calls(1)
        // Passed by the time the callers arrive (see concurrent_failures_trip_exactly_once).
        .open_for(Duration::from_nanos(1))
        .half_open_probes(PROBES as u32)
        .build()
        .expect("valid");
    let handle = layer.handle();
    // The probes are held in the backend until every other caller was turned away, so
    // the count of calls that got through depends on no scheduling.
    let (release, released) = watch::channel(false);
    let probes_started = Arc::new(AtomicUsize::new(0));
    let started = Arc::clone(&probes_started);
    let backend = service_fn(move |fail: bool| {
        let (started, mut released) = (Arc::clone(&started), released.clone());
        async move {
            if fail {
                return Err::<(), BoxError>("down".into());
            }
            started.fetch_add(1, Ordering::SeqCst);
            released
                .wait_for(|released| *released)
                .await
                .expect("sender kept");
            Ok(())
        }
    });
    let mut service = layer.layer(backend);
    service
        .ready()
        .await
        .expect("ready")
        .call(true)
        .await
        .unwrap_err();
    assert_eq!(handle.state(), State::Open);

    let (report, mut outcomes) = mpsc::unbounded_channel();
    for _ in 0..CALLERS {
        let mut service = service.clone();
        let report = report.clone();
        tokio::spawn(async move {
            let result = service.ready().await.expect("ready").call(false).await;
            report
                .send(result.map_err(|error| error.is::<CircuitOpen>()))
                .expect("receiver kept");
        });
    }
    for _ in 0..CALLERS - PROBES {
        let outcome = outcomes.recv().await.expect("a caller reports");
        assert_eq!(
            outcome,
            Err(true),
            "rejected by the breaker while the probes hang"
        );
    }
    assert_eq!(handle.state(), State::HalfOpen);
    assert_eq!(probes_started.load(Ordering::SeqCst), PROBES);

    release.send(true).expect("probes waiting");
    for _ in 0..PROBES {
        let outcome = outcomes.recv().await.expect("a probe reports");
        assert_eq!(outcome, Ok(()));
    }
    assert_eq!(probes_started.load(Ordering::SeqCst), PROBES);
    assert_eq!(handle.state(), State::Closed);
}
