//! The circuit breaker through its public API, on paused time.

use palisade::circuit_breaker::{
    CircuitBreakerConfigError, CircuitBreakerHandle, CircuitBreakerLayer,
    CircuitBreakerLayerBuilder, CircuitBreakerService, CircuitOpen, OpenBackoff, SlidingWindow,
    State, Transition, TransitionReason,
};
use palisade::classify::Outcome;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{advance, sleep};
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

/// What the backend does with a request.
#[derive(Debug, Clone, Copy)]
enum Call {
    Succeed,
    Fail,
    /// Answers after this many milliseconds, succeeding.
    Slow(u64),
    /// Gives an error the classifier in `ignoring_classifier` ignores.
    Ignore,
}

/// A backend that counts the calls that reach it.
fn backend(
    reached: Arc<AtomicUsize>,
) -> impl Service<Call, Response = &'static str, Error = BoxError, Future: Send> + Clone + Send {
    service_fn(move |call: Call| {
        reached.fetch_add(1, Ordering::SeqCst);
        async move {
            match call {
                Call::Succeed => Ok("ok"),
                Call::Fail => Err("backend failed".into()),
                Call::Slow(ms) => {
                    sleep(Duration::from_millis(ms)).await;
                    Ok("slow")
                }
                Call::Ignore => Err("not found".into()),
            }
        }
    })
}

/// A builder with a count window of `size` calls and `minimum_calls` (the default
/// failure rate threshold is 50%).
fn counting(minimum_calls: u64, size: usize) -> CircuitBreakerLayerBuilder {
    CircuitBreakerLayer::builder()
        .minimum_calls(minimum_calls)
        .sliding_window(SlidingWindow::count(size))
}

/// The layer's handle, and the layer around a backend nobody counts.
fn wire<C: Clone>(
    layer: CircuitBreakerLayer<C>,
) -> (
    CircuitBreakerHandle,
    CircuitBreakerService<impl Service<Call, Response = &'static str, Error = BoxError> + Clone, C>,
) {
    (layer.handle(), layer.layer(backend(Arc::default())))
}

async fn send<S>(service: &mut S, call: Call) -> Result<S::Response, BoxError>
where
    S: Service<Call, Error = BoxError>,
{
    service.ready().await?.call(call).await
}

/// The `retry_after` of a rejection, or `None` if the call was not rejected.
fn rejected<T>(result: &Result<T, BoxError>) -> Option<Duration> {
    result
        .as_ref()
        .err()
        .and_then(|error| error.downcast_ref::<CircuitOpen>())
        .map(CircuitOpen::retry_after)
}

/// Records every transition.
fn recorder() -> (
    Arc<Mutex<Vec<Transition>>>,
    impl Fn(&Transition) + Send + Sync + 'static,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    (seen, move |transition: &Transition| {
        sink.lock().expect("not poisoned").push(*transition)
    })
}

fn reasons(seen: &Mutex<Vec<Transition>>) -> Vec<(State, State, TransitionReason)> {
    seen.lock()
        .expect("not poisoned")
        .iter()
        .map(|t| (t.from, t.to, t.reason))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn trips_on_failure_rate_rejects_half_opens_and_closes() {
    let (seen, observer) = recorder();
    let layer = counting(4, 10)
        .open_for(Duration::from_secs(10))
        .half_open_probes(2)
        .on_transition(observer)
        .build()
        .expect("valid");
    let handle = layer.handle();
    let reached = Arc::new(AtomicUsize::new(0));
    let mut service = layer.layer(backend(reached.clone()));

    // Closed: below minimum_calls nothing trips, however bad.
    send(&mut service, Call::Succeed).await.expect("ok");
    send(&mut service, Call::Fail).await.unwrap_err();
    send(&mut service, Call::Succeed).await.expect("ok");
    assert_eq!(handle.state(), State::Closed);
    // The fourth call brings the window to 2 failures in 4: 50% trips.
    send(&mut service, Call::Fail).await.unwrap_err();
    assert_eq!(handle.state(), State::Open);

    // Open: rejected at once, the backend is not reached, retry_after counts down.
    let before = reached.load(Ordering::SeqCst);
    let result = send(&mut service, Call::Succeed).await;
    assert_eq!(rejected(&result), Some(Duration::from_secs(10)));
    advance(Duration::from_secs(4)).await;
    let result = send(&mut service, Call::Succeed).await;
    assert_eq!(rejected(&result), Some(Duration::from_secs(6)));
    assert_eq!(reached.load(Ordering::SeqCst), before);

    // Half-open after the open time: two probes in flight, a third call is turned away
    // and told the open time, as a hint.
    advance(Duration::from_secs(6)).await;
    let probe_a = tokio::spawn(service.clone().oneshot(Call::Slow(100)));
    let probe_b = tokio::spawn(service.clone().oneshot(Call::Slow(200)));
    tokio::task::yield_now().await;
    assert_eq!(handle.state(), State::HalfOpen);
    let result = send(&mut service, Call::Succeed).await;
    assert_eq!(rejected(&result), Some(Duration::from_secs(10)));
    probe_a.await.expect("joined").expect("probe ok");
    assert_eq!(handle.state(), State::HalfOpen);
    probe_b.await.expect("joined").expect("probe ok");
    assert_eq!(handle.state(), State::Closed);

    // Closed again with an empty window: the old failures do not count.
    assert_eq!(handle.metrics().calls, 0);
    send(&mut service, Call::Fail).await.unwrap_err();
    assert_eq!(handle.state(), State::Closed);

    assert_eq!(
        reasons(&seen),
        [
            (State::Closed, State::Open, TransitionReason::FailureRate),
            (
                State::Open,
                State::HalfOpen,
                TransitionReason::OpenTimeElapsed
            ),
            (
                State::HalfOpen,
                State::Closed,
                TransitionReason::ProbesSucceeded
            ),
        ]
    );
    assert!(handle.metrics().last_transition.is_some());
}

#[tokio::test(start_paused = true)]
async fn failed_probes_reopen_for_longer_each_time_up_to_the_cap() {
    let (seen, observer) = recorder();
    let layer = counting(1, 1)
        .open_backoff(OpenBackoff::exponential(Duration::from_secs(1)).max(Duration::from_secs(5)))
        .half_open_probes(1)
        .on_transition(observer)
        .build()
        .expect("valid");
    let (handle, mut service) = wire(layer);

    send(&mut service, Call::Fail).await.unwrap_err();
    let mut open_times = Vec::new();
    for _ in 0..5 {
        let open_for = rejected(&send(&mut service, Call::Succeed).await).expect("open");
        open_times.push(open_for.as_secs());
        advance(open_for).await;
        // The single probe fails: open again, for longer.
        send(&mut service, Call::Fail).await.unwrap_err();
        assert_eq!(handle.state(), State::Open);
    }
    assert_eq!(open_times, [1, 2, 4, 5, 5]);
    assert_eq!(handle.metrics().consecutive_trips, 6);

    // A successful probe closes the breaker and starts the schedule again.
    advance(Duration::from_secs(5)).await;
    send(&mut service, Call::Succeed).await.expect("probe ok");
    assert_eq!(handle.state(), State::Closed);
    send(&mut service, Call::Fail).await.unwrap_err();
    let open_for = rejected(&send(&mut service, Call::Succeed).await).expect("open");
    assert_eq!(open_for, Duration::from_secs(1));
    assert!(reasons(&seen).contains(&(
        State::HalfOpen,
        State::Open,
        TransitionReason::ProbesFailed
    )));
}

#[tokio::test(start_paused = true)]
async fn jitter_shortens_the_open_time_within_its_bounds() {
    let layer = counting(1, 1)
        .open_backoff(
            OpenBackoff::exponential(Duration::from_secs(8))
                .max(Duration::from_secs(8))
                .jitter(0.5),
        )
        .half_open_probes(1)
        .build()
        .expect("valid");
    let mut service = layer.layer(backend(Arc::default()));
    let mut open_times = Vec::new();
    send(&mut service, Call::Fail).await.unwrap_err();
    for _ in 0..20 {
        let open_for = rejected(&send(&mut service, Call::Succeed).await).expect("open");
        // The open-until time is kept in whole milliseconds, rounded down (documented:
        // the breaker may half-open up to a millisecond early), so a jittered open time
        // just above the lower bound can read as up to a millisecond below it.
        let lowest = Duration::from_secs(4) - Duration::from_millis(1);
        assert!(open_for > lowest && open_for <= Duration::from_secs(8));
        open_times.push(open_for);
        advance(open_for).await;
        send(&mut service, Call::Fail).await.unwrap_err();
    }
    open_times.sort();
    open_times.dedup();
    assert!(open_times.len() > 10, "jitter varies: {open_times:?}");
}

#[tokio::test(start_paused = true)]
async fn count_window_slides_so_failures_after_many_successes_trip_within_the_window() {
    let layer = counting(20, 100).build().expect("valid");
    let (handle, mut service) = wire(layer);
    for _ in 0..1000 {
        send(&mut service, Call::Succeed).await.expect("ok");
    }
    assert_eq!(handle.metrics().calls, 100);
    let mut failures = 0;
    while handle.state() == State::Closed {
        send(&mut service, Call::Fail).await.unwrap_err();
        failures += 1;
        assert!(
            failures <= 100,
            "a window of 100 must trip within 100 failures"
        );
    }
    // The 50th failure makes 50 of the last 100 calls failures.
    assert_eq!(failures, 50);
}

#[tokio::test(start_paused = true)]
async fn minimum_calls_below_the_window_size_trips_early() {
    let layer = counting(10, 100).build().expect("valid");
    let (handle, mut service) = wire(layer);
    for _ in 0..9 {
        send(&mut service, Call::Fail).await.unwrap_err();
    }
    assert_eq!(handle.state(), State::Closed);
    send(&mut service, Call::Fail).await.unwrap_err();
    assert_eq!(handle.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn the_default_minimum_calls_fits_a_smaller_count_window() {
    let layer = CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count(10))
        .build()
        .expect("a default minimum_calls of 20 is fitted to a window of 10");
    let (handle, mut service) = wire(layer);
    for _ in 0..9 {
        send(&mut service, Call::Fail).await.unwrap_err();
    }
    assert_eq!(handle.state(), State::Closed, "9 calls are no verdict");
    send(&mut service, Call::Fail).await.unwrap_err();
    assert_eq!(handle.state(), State::Open, "the whole window is");
    assert_eq!(
        CircuitBreakerLayer::builder()
            .sliding_window(SlidingWindow::count(0))
            .build()
            .map(|_| ())
            .unwrap_err(),
        CircuitBreakerConfigError::EmptyWindow
    );
}

#[tokio::test(start_paused = true)]
async fn time_window_forgets_calls_older_than_its_span() {
    let layer = CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .minimum_calls(4)
        .sliding_window(SlidingWindow::time(Duration::from_secs(10)))
        .build()
        .expect("valid");
    let (handle, mut service) = wire(layer);
    for _ in 0..3 {
        send(&mut service, Call::Fail).await.unwrap_err();
    }
    advance(Duration::from_secs(11)).await;
    assert_eq!(handle.metrics().calls, 0);
    send(&mut service, Call::Fail).await.unwrap_err();
    assert_eq!(handle.state(), State::Closed, "the old failures slid out");
    for _ in 0..3 {
        send(&mut service, Call::Fail).await.unwrap_err();
    }
    assert_eq!(handle.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn slow_calls_trip_the_breaker_and_a_slow_probe_reopens_it() {
    let (seen, observer) = recorder();
    let layer = CircuitBreakerLayer::builder()
        .minimum_calls(4)
        .sliding_window(SlidingWindow::time(Duration::from_secs(60)))
        .slow_calls(Duration::from_millis(100), 0.5)
        .open_for(Duration::from_secs(5))
        .half_open_probes(1)
        .on_transition(observer)
        .build()
        .expect("valid");
    let (handle, mut service) = wire(layer);
    send(&mut service, Call::Slow(100)).await.expect("ok");
    send(&mut service, Call::Slow(150)).await.expect("ok");
    send(&mut service, Call::Succeed).await.expect("ok");
    assert_eq!(
        handle.metrics().slow_calls,
        1,
        "100ms is not slower than 100ms"
    );
    assert_eq!(handle.state(), State::Closed);
    send(&mut service, Call::Slow(150)).await.expect("ok");
    assert_eq!(handle.state(), State::Open);

    advance(Duration::from_secs(5)).await;
    send(&mut service, Call::Slow(500))
        .await
        .expect("a slow success");
    assert_eq!(handle.state(), State::Open);
    assert_eq!(
        reasons(&seen),
        [
            (State::Closed, State::Open, TransitionReason::SlowCallRate),
            (
                State::Open,
                State::HalfOpen,
                TransitionReason::OpenTimeElapsed
            ),
            (State::HalfOpen, State::Open, TransitionReason::ProbesSlow),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn ignored_outcomes_count_for_nothing() {
    let layer = counting(1, 10)
        .half_open_probes(1)
        .open_for(Duration::from_secs(1))
        .classify(|result: &Result<&'static str, BoxError>| match result {
            Ok(_) => Outcome::Success,
            Err(error) if error.to_string() == "not found" => Outcome::Ignored,
            Err(_) => Outcome::Failure,
        })
        .build()
        .expect("valid");
    let (handle, mut service) = wire(layer);
    for _ in 0..20 {
        send(&mut service, Call::Ignore).await.unwrap_err();
    }
    assert_eq!(handle.metrics().calls, 0);
    assert_eq!(handle.state(), State::Closed);

    // An ignored probe gives its slot back: the next call is a probe too.
    send(&mut service, Call::Fail).await.unwrap_err();
    advance(Duration::from_secs(1)).await;
    send(&mut service, Call::Ignore).await.unwrap_err();
    assert_eq!(handle.state(), State::HalfOpen);
    send(&mut service, Call::Succeed).await.expect("probe");
    assert_eq!(handle.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn dropped_probes_give_their_slots_back_and_the_breaker_recovers() {
    let layer = counting(1, 5)
        .open_for(Duration::from_secs(1))
        .half_open_probes(2)
        .build()
        .expect("valid");
    let handle = layer.handle();
    let reached = Arc::new(AtomicUsize::new(0));
    let mut service = layer.layer(backend(reached.clone()));
    send(&mut service, Call::Fail).await.unwrap_err();
    advance(Duration::from_secs(1)).await;
    let window_before = handle.metrics();

    for _ in 0..3 {
        // Two probes that hang, then are abandoned (a client gone, an outer timeout).
        let mut hanging: Vec<_> = (0..2)
            .map(|_| Box::pin(service.clone().oneshot(Call::Slow(60_000))))
            .collect();
        for probe in &mut hanging {
            assert!(futures_poll_once(probe).await.is_none(), "still in flight");
        }
        let result = send(&mut service, Call::Succeed).await;
        assert_eq!(
            rejected(&result),
            Some(Duration::from_secs(1)),
            "both slots taken: the open time as the hint"
        );
        drop(hanging);
    }
    assert_eq!(handle.state(), State::HalfOpen);
    assert_eq!(
        handle.metrics().calls,
        window_before.calls,
        "abandoned probes recorded nothing"
    );

    send(&mut service, Call::Succeed).await.expect("probe");
    send(&mut service, Call::Succeed).await.expect("probe");
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(reached.load(Ordering::SeqCst), 1 + 6 + 2);
}

#[tokio::test(start_paused = true)]
async fn metrics_show_the_verdict_the_half_open_episode_and_the_rejections() {
    let layer = counting(4, 4)
        .open_for(Duration::from_secs(1))
        .half_open_probes(3)
        .build()
        .expect("valid");
    let (handle, mut service) = wire(layer);
    for _ in 0..3 {
        send(&mut service, Call::Fail).await.unwrap_err();
    }
    let metrics = handle.metrics();
    assert_eq!(metrics.failure_rate, 1.0);
    assert!(
        !metrics.minimum_calls_reached,
        "3 calls of 4 are no verdict"
    );
    send(&mut service, Call::Fail).await.unwrap_err();
    assert_eq!(handle.state(), State::Open);
    assert!(handle.metrics().minimum_calls_reached);
    for _ in 0..2 {
        assert!(rejected(&send(&mut service, Call::Succeed).await).is_some());
    }
    assert_eq!(handle.metrics().rejected, 2);

    advance(Duration::from_secs(1)).await;
    // The backend is always ready, so calls can be started without `ready` in between.
    let mut call = |call| service.call(call);
    let (succeeding, failing, dropped) =
        (call(Call::Succeed), call(Call::Fail), call(Call::Succeed));
    assert!(rejected(&call(Call::Succeed).await).is_some(), "slots full");
    let episode = |metrics: palisade::circuit_breaker::Metrics| {
        (
            metrics.probes_in_flight,
            metrics.probe_successes,
            metrics.probe_failures,
            metrics.rejected,
        )
    };
    assert_eq!(handle.state(), State::HalfOpen);
    assert_eq!(episode(handle.metrics()), (3, 0, 0, 3));
    succeeding.await.expect("probe");
    failing.await.unwrap_err();
    assert_eq!(episode(handle.metrics()), (1, 1, 1, 3));
    drop(dropped);
    assert_eq!(episode(handle.metrics()), (0, 1, 1, 3));
    call(Call::Succeed).await.expect("the last probe");
    assert_eq!(handle.state(), State::Closed, "one failure in three probes");
    assert_eq!(
        episode(handle.metrics()),
        (0, 0, 0, 3),
        "the episode is over"
    );

    handle.reset();
    assert_eq!(handle.metrics().rejected, 0);
}

#[tokio::test(start_paused = true)]
async fn calls_rejected_behind_hung_probes_are_told_the_latest_open_time() {
    let layer = counting(1, 5)
        .open_backoff(OpenBackoff::exponential(Duration::from_secs(1)))
        .half_open_probes(1)
        .build()
        .expect("valid");
    let (handle, mut service) = wire(layer);
    send(&mut service, Call::Fail).await.unwrap_err();
    for open_for in [1, 2, 4].map(Duration::from_secs) {
        advance(open_for).await;
        let mut hung = Box::pin(service.clone().oneshot(Call::Slow(3_600_000)));
        assert!(
            futures_poll_once(&mut hung).await.is_none(),
            "still in flight"
        );
        assert_eq!(handle.state(), State::HalfOpen);
        for _ in 0..3 {
            let result = send(&mut service, Call::Succeed).await;
            assert_eq!(rejected(&result), Some(open_for));
        }
        drop(hung);
        send(&mut service, Call::Fail).await.unwrap_err();
        assert_eq!(handle.state(), State::Open, "the probe failed");
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_closed_call_records_nothing() {
    let layer = CircuitBreakerLayer::builder().build().expect("valid");
    let (handle, mut service) = wire(layer);
    let mut call = Box::pin(service.ready().await.expect("ready").call(Call::Slow(1000)));
    assert!(futures_poll_once(&mut call).await.is_none());
    drop(call);
    assert_eq!(handle.metrics().calls, 0);
    send(&mut service, Call::Succeed).await.expect("ok");
    assert_eq!(handle.metrics().calls, 1);
}

/// Polls a future once: `Some` if it completed.
async fn futures_poll_once<F: Future + Unpin>(future: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut *future).poll(cx) {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn the_handle_forces_and_resets() {
    let (seen, observer) = recorder();
    let layer = counting(2, 4)
        .open_for(Duration::from_secs(7))
        .on_transition(observer)
        .build()
        .expect("valid");
    let handle = layer.handle();
    let reached = Arc::new(AtomicUsize::new(0));
    let mut service = layer.layer(backend(reached.clone()));

    send(&mut service, Call::Fail).await.unwrap_err();
    handle.force_open();
    assert_eq!(handle.state(), State::ForcedOpen);
    advance(Duration::from_secs(3600)).await;
    let result = send(&mut service, Call::Succeed).await;
    assert!(rejected(&result).is_some(), "forced open stays open");
    assert_eq!(reached.load(Ordering::SeqCst), 1);

    handle.force_closed();
    for _ in 0..10 {
        send(&mut service, Call::Fail).await.unwrap_err();
    }
    assert_eq!(handle.state(), State::ForcedClosed, "records nothing");
    assert_eq!(handle.metrics().calls, 1, "the window from before is kept");

    handle.reset();
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(handle.metrics().calls, 0);
    send(&mut service, Call::Fail).await.unwrap_err();
    assert_eq!(
        handle.state(),
        State::Closed,
        "the failure before the reset is gone"
    );
    send(&mut service, Call::Fail).await.unwrap_err();
    assert_eq!(handle.state(), State::Open);

    assert_eq!(
        reasons(&seen)
            .into_iter()
            .map(|(_, _, reason)| reason)
            .collect::<Vec<_>>(),
        [
            TransitionReason::ForcedOpen,
            TransitionReason::ForcedClosed,
            TransitionReason::Reset,
            TransitionReason::FailureRate,
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn forcing_the_state_a_breaker_is_forced_into_is_not_a_transition() {
    let (seen, observer) = recorder();
    let layer = counting(2, 4)
        .on_transition(observer)
        .build()
        .expect("valid");
    let handle = layer.handle();
    for (force, state) in [
        (
            CircuitBreakerHandle::force_open as fn(&CircuitBreakerHandle),
            State::ForcedOpen,
        ),
        (CircuitBreakerHandle::force_closed, State::ForcedClosed),
    ] {
        force(&handle);
        let forced_at = handle.metrics().last_transition;
        advance(Duration::from_secs(1)).await;
        force(&handle);
        assert_eq!(handle.state(), state);
        assert_eq!(handle.metrics().last_transition, forced_at, "{state:?}");
    }
    assert_eq!(
        reasons(&seen),
        [
            (
                State::Closed,
                State::ForcedOpen,
                TransitionReason::ForcedOpen
            ),
            (
                State::ForcedOpen,
                State::ForcedClosed,
                TransitionReason::ForcedClosed
            ),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn every_service_and_clone_shares_one_breaker() {
    let layer = counting(2, 2).build().expect("valid");
    let handle = layer.handle();
    let mut first = layer.layer(backend(Arc::default()));
    let mut second = layer.clone().layer(backend(Arc::default()));
    send(&mut first, Call::Fail).await.unwrap_err();
    send(&mut second.clone(), Call::Fail).await.unwrap_err();
    assert_eq!(handle.state(), State::Open);
    assert!(rejected(&send(&mut first, Call::Succeed).await).is_some());
    assert!(rejected(&send(&mut second, Call::Succeed).await).is_some());
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_stays_ready_and_rejects_in_call() {
    let layer = counting(1, 1).build().expect("valid");
    let mut service = layer.layer(backend(Arc::default()));
    send(&mut service, Call::Fail).await.unwrap_err();
    // poll_ready is the inner service's: a rejection must not poison a Buffer.
    let mut buffered = tower::buffer::Buffer::new(service, 8);
    for _ in 0..3 {
        let result = send(&mut buffered, Call::Succeed).await;
        assert!(rejected(&result).is_some());
    }
}

/// The longest open time and time-window span `build` accepts: 100 years of 365 days.
const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

#[tokio::test(start_paused = true)]
async fn the_longest_open_time_and_window_span_work() {
    let layer = CircuitBreakerLayer::builder()
        .minimum_calls(1)
        .sliding_window(SlidingWindow::time(CENTURY))
        .open_backoff(OpenBackoff::exponential(CENTURY))
        .half_open_probes(1)
        .build()
        .expect("the longest open time and span are valid");
    let (handle, mut service) = wire(layer);
    for _ in 0..2 {
        send(&mut service, Call::Fail).await.unwrap_err();
        assert_eq!(handle.state(), State::Open);
        let result = send(&mut service, Call::Succeed).await;
        assert_eq!(
            rejected(&result),
            Some(CENTURY),
            "the backoff is capped at 100 years"
        );
        advance(CENTURY - Duration::from_millis(1)).await;
        assert!(rejected(&send(&mut service, Call::Succeed).await).is_some());
        advance(Duration::from_millis(1)).await;
        send(&mut service, Call::Fail).await.unwrap_err();
        assert_eq!(handle.state(), State::Open, "the probe failed");
        assert_eq!(handle.metrics().consecutive_trips, 2);
        let result = send(&mut service, Call::Succeed).await;
        assert_eq!(rejected(&result), Some(CENTURY), "doubled, then capped");
        advance(CENTURY).await;
        send(&mut service, Call::Succeed).await.expect("probe");
        assert_eq!(handle.state(), State::Closed);
    }
    send(&mut service, Call::Succeed).await.expect("closed");
    assert_eq!(handle.metrics().calls, 1);
    advance(CENTURY / 2).await;
    assert_eq!(handle.metrics().calls, 1, "the window still holds the call");
}

/// Nothing `build` accepts allocates in proportion to an unbounded number: a time
/// window of `u32::MAX` buckets used to try to allocate 103 GB and abort.
#[test]
fn window_sizes_are_bounded_at_build() {
    let time = |buckets| {
        CircuitBreakerLayer::builder()
            .sliding_window(SlidingWindow::time(CENTURY).buckets(buckets))
            .build()
            .map(|_| ())
    };
    assert_eq!(time(1024), Ok(()), "the documented maximum");
    // Asserted from the smallest up, so that before the bound existed the test failed
    // on a size it could afford to build.
    for buckets in [1025, 10_000_000, u32::MAX] {
        assert_eq!(
            time(buckets),
            Err(CircuitBreakerConfigError::TooManyBuckets { buckets, max: 1024 })
        );
    }
    let count = |size| {
        CircuitBreakerLayer::builder()
            .minimum_calls(1)
            .sliding_window(SlidingWindow::count(size))
            .build()
            .map(|_| ())
    };
    let max = (1 << 20) - 1;
    assert_eq!(count(max), Ok(()), "the documented maximum");
    for size in [max + 1, u32::MAX as usize, usize::MAX] {
        assert_eq!(
            count(size),
            Err(CircuitBreakerConfigError::WindowTooLarge { size, max })
        );
    }
}

#[test]
fn build_rejects_every_invalid_configuration() {
    let builder = CircuitBreakerLayer::builder;
    let cases: Vec<(
        Result<_, CircuitBreakerConfigError>,
        CircuitBreakerConfigError,
    )> = vec![
        (
            builder().failure_rate_threshold(0.0).build(),
            CircuitBreakerConfigError::FailureRate(0.0),
        ),
        (
            builder().failure_rate_threshold(1.5).build(),
            CircuitBreakerConfigError::FailureRate(1.5),
        ),
        (
            builder().slow_calls(Duration::from_secs(1), -0.1).build(),
            CircuitBreakerConfigError::SlowCallRate(-0.1),
        ),
        (
            builder().slow_calls(Duration::ZERO, 0.5).build(),
            CircuitBreakerConfigError::ZeroSlowCallDuration,
        ),
        (
            builder().minimum_calls(0).build(),
            CircuitBreakerConfigError::ZeroMinimumCalls,
        ),
        (
            builder()
                .minimum_calls(11)
                .sliding_window(SlidingWindow::count(10))
                .build(),
            CircuitBreakerConfigError::MinimumCallsAboveWindow {
                minimum_calls: 11,
                window: 10,
            },
        ),
        (
            builder()
                .minimum_calls(1)
                .sliding_window(SlidingWindow::count(0))
                .build(),
            CircuitBreakerConfigError::EmptyWindow,
        ),
        (
            builder()
                .sliding_window(SlidingWindow::count(1 << 24))
                .build(),
            CircuitBreakerConfigError::WindowTooLarge {
                size: 1 << 24,
                max: (1 << 20) - 1,
            },
        ),
        (
            builder()
                .sliding_window(SlidingWindow::time(Duration::from_secs(1)).buckets(0))
                .build(),
            CircuitBreakerConfigError::NoBuckets,
        ),
        (
            builder()
                .sliding_window(SlidingWindow::time(Duration::from_millis(5)))
                .build(),
            CircuitBreakerConfigError::BucketTooShort {
                span: Duration::from_millis(5),
                buckets: 10,
            },
        ),
        (
            builder().open_for(Duration::ZERO).build(),
            CircuitBreakerConfigError::ZeroOpenDuration,
        ),
        (
            builder()
                .open_backoff(
                    OpenBackoff::exponential(Duration::from_secs(2)).max(Duration::from_secs(1)),
                )
                .build(),
            CircuitBreakerConfigError::MaxOpenBelowInitial {
                initial: Duration::from_secs(2),
                max: Duration::from_secs(1),
            },
        ),
        (
            builder()
                .open_backoff(OpenBackoff::exponential(Duration::from_secs(1)).multiplier(0.5))
                .build(),
            CircuitBreakerConfigError::Multiplier(0.5),
        ),
        (
            builder()
                .open_backoff(OpenBackoff::exponential(Duration::from_secs(1)).jitter(1.0))
                .build(),
            CircuitBreakerConfigError::Jitter(1.0),
        ),
        (
            builder().open_for(Duration::MAX).build(),
            CircuitBreakerConfigError::OpenDurationTooLong {
                duration: Duration::MAX,
                max: CENTURY,
            },
        ),
        (
            builder()
                .open_for(CENTURY + Duration::from_nanos(1))
                .build(),
            CircuitBreakerConfigError::OpenDurationTooLong {
                duration: CENTURY + Duration::from_nanos(1),
                max: CENTURY,
            },
        ),
        (
            builder()
                .open_backoff(OpenBackoff::exponential(Duration::from_secs(1)).max(Duration::MAX))
                .build(),
            CircuitBreakerConfigError::OpenDurationTooLong {
                duration: Duration::MAX,
                max: CENTURY,
            },
        ),
        (
            builder()
                .open_backoff(OpenBackoff::exponential(2 * CENTURY))
                .build(),
            CircuitBreakerConfigError::OpenDurationTooLong {
                duration: 2 * CENTURY,
                max: CENTURY,
            },
        ),
        (
            builder()
                .sliding_window(SlidingWindow::time(Duration::MAX))
                .build(),
            CircuitBreakerConfigError::WindowSpanTooLong {
                span: Duration::MAX,
                max: CENTURY,
            },
        ),
        (
            builder()
                .sliding_window(SlidingWindow::time(CENTURY + Duration::from_millis(1)))
                .build(),
            CircuitBreakerConfigError::WindowSpanTooLong {
                span: CENTURY + Duration::from_millis(1),
                max: CENTURY,
            },
        ),
        (
            builder().half_open_probes(0).build(),
            CircuitBreakerConfigError::Probes {
                probes: 0,
                max: 4095,
            },
        ),
        (
            builder().half_open_probes(5000).build(),
            CircuitBreakerConfigError::Probes {
                probes: 5000,
                max: 4095,
            },
        ),
    ];
    for (result, expected) in cases {
        assert_eq!(result.map(|_| ()).unwrap_err(), expected);
    }
    assert!(builder().failure_rate_threshold(f64::NAN).build().is_err());
    assert!(builder().failure_rate_threshold(1.0).build().is_ok());
}
