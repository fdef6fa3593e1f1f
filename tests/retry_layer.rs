//! The retry layer over in-process services, on tokio's paused clock.
#![cfg(feature = "http")]
use http::{HeaderValue, Method, Request, Response, StatusCode};
use palisade::retry::{
    AttemptTimedOut, Backoff, DeadlineExceeded, GrpcRetry, HttpRetry, Jitter, RetryBudget,
    RetryConfigError, RetryEvent, RetryLayer, RetryReason,
};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

const MS: Duration = Duration::from_millis(1);

/// Records when each call arrived, relative to the test's start.
#[derive(Clone)]
struct Calls {
    start: Instant,
    at: Arc<Mutex<Vec<Duration>>>,
}

impl Calls {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            at: Arc::default(),
        }
    }

    /// Records a call; returns its number, 1 for the first.
    fn record(&self) -> usize {
        let mut at = self.at.lock().expect("calls");
        at.push(self.start.elapsed());
        at.len()
    }

    fn times(&self) -> Vec<Duration> {
        self.at.lock().expect("calls").clone()
    }

    fn count(&self) -> usize {
        self.at.lock().expect("calls").len()
    }
}

fn no_jitter(delay: Duration) -> Backoff {
    Backoff::constant(delay)
}

/// Fails its first `failures` calls with "failure N", then answers "ok N".
fn flaky(
    calls: &Calls,
    failures: usize,
) -> impl Service<(), Response = String, Error = BoxError, Future: Send> + Clone + Send + use<> {
    let calls = calls.clone();
    service_fn(move |()| {
        let call = calls.record();
        async move {
            if call <= failures {
                Err::<String, BoxError>(format!("failure {call}").into())
            } else {
                Ok(format!("ok {call}"))
            }
        }
    })
}

/// Answers each call with the next scripted response (the last one repeats).
fn scripted(
    calls: &Calls,
    script: Vec<(u16, Vec<(&'static str, String)>)>,
) -> impl Service<Request<()>, Response = Response<()>, Error = BoxError, Future: Send>
+ Clone
+ Send
+ use<> {
    let calls = calls.clone();
    let script = Arc::new(script);
    service_fn(move |_request: Request<()>| {
        let call = calls.record();
        let (status, headers) = script[(call - 1).min(script.len() - 1)].clone();
        async move {
            let mut response = Response::new(());
            *response.status_mut() = StatusCode::from_u16(status)?;
            for (name, value) in headers {
                response
                    .headers_mut()
                    .insert(name, HeaderValue::from_str(&value)?);
            }
            Ok::<_, BoxError>(response)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn constant_and_exponential_delays_separate_attempts() {
    let calls = Calls::new();
    let layer = RetryLayer::builder()
        .max_attempts(3)
        .backoff(no_jitter(100 * MS))
        .build()
        .expect("config");
    let answer = layer
        .layer(flaky(&calls, 2))
        .oneshot(())
        .await
        .expect("third attempt");
    assert_eq!(answer, "ok 3");
    assert_eq!(calls.times(), [Duration::ZERO, 100 * MS, 200 * MS]);

    let calls = Calls::new();
    let layer = RetryLayer::builder()
        .max_attempts(4)
        .backoff(
            Backoff::exponential(100 * MS)
                .multiplier(3.0)
                .jitter(Jitter::None),
        )
        .build()
        .expect("config");
    layer
        .layer(flaky(&calls, 3))
        .oneshot(())
        .await
        .expect("fourth attempt");
    assert_eq!(
        calls.times(),
        [Duration::ZERO, 100 * MS, 400 * MS, 1300 * MS]
    );
}

#[tokio::test(start_paused = true)]
async fn a_zero_exponential_backoff_retries_past_the_thousandth_retry() {
    // 0 · 2^1024 used to read as an overflow: uncapped, the 1025th retry never came.
    let calls = Calls::new();
    let layer = RetryLayer::builder()
        .max_attempts(1100)
        .backoff(Backoff::exponential(Duration::ZERO))
        .budget(RetryBudget::new(Duration::from_secs(60), 100, 0.0))
        .build()
        .expect("config");
    let answer = layer
        .layer(flaky(&calls, 1099))
        .oneshot(())
        .await
        .expect("the last attempt");
    assert_eq!(answer, "ok 1100");
    assert!(calls.times().iter().all(Duration::is_zero));
}

#[tokio::test(start_paused = true)]
async fn max_attempts_counts_the_first_and_returns_the_last_error() {
    let calls = Calls::new();
    let layer = RetryLayer::builder()
        .max_attempts(3)
        .backoff(no_jitter(MS))
        .build()
        .expect("config");
    let handle = layer.handle();
    let error = layer
        .layer(flaky(&calls, 10))
        .oneshot(())
        .await
        .expect_err("always fails");
    assert_eq!(error.to_string(), "failure 3");
    assert_eq!(calls.count(), 3);
    let metrics = handle.metrics();
    assert_eq!((metrics.failure_with_retry, metrics.retries), (1, 2));

    let calls = Calls::new();
    let once = RetryLayer::builder()
        .max_attempts(1)
        .build()
        .expect("config");
    once.layer(flaky(&calls, 10))
        .oneshot(())
        .await
        .expect_err("no retry");
    assert_eq!(calls.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn jittered_delays_stay_under_the_schedule() {
    let calls = Calls::new();
    let layer = RetryLayer::builder()
        .max_attempts(6)
        .backoff(
            Backoff::exponential(100 * MS)
                .max(250 * MS)
                .jitter(Jitter::Full),
        )
        .build()
        .expect("config");
    layer
        .layer(flaky(&calls, 5))
        .oneshot(())
        .await
        .expect("sixth attempt");
    let times = calls.times();
    let caps = [100, 200, 250, 250, 250].map(|millis| millis * MS);
    for (gap, cap) in times.windows(2).map(|pair| pair[1] - pair[0]).zip(caps) {
        assert!(gap <= cap, "{gap:?} > {cap:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_in_seconds_is_waited_for() {
    let calls = Calls::new();
    let layer = RetryLayer::builder()
        .backoff(no_jitter(10 * MS))
        .policy(HttpRetry::new())
        .build()
        .expect("config");
    let service = scripted(
        &calls,
        vec![(503, vec![("retry-after", "2".into())]), (200, vec![])],
    );
    let response = layer
        .layer(service)
        .oneshot(Request::new(()))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(calls.times(), [Duration::ZERO, 2000 * MS]);
}

#[tokio::test(start_paused = true)]
async fn retry_after_as_an_http_date_is_waited_for() {
    let calls = Calls::new();
    let layer = RetryLayer::builder()
        .backoff(no_jitter(10 * MS))
        .policy(HttpRetry::new())
        .build()
        .expect("config");
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3));
    let service = scripted(
        &calls,
        vec![(429, vec![("retry-after", date)]), (200, vec![])],
    );
    let response = layer
        .layer(service)
        .oneshot(Request::new(()))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    // The date has whole seconds and is read against the real clock, so the wait is
    // 3 s less the fraction of the current second less the time the test took to get
    // here: anywhere in (1 s, 3 s]. Far above the 10 ms backoff, so the date was honoured.
    let waited = calls.times()[1];
    assert!(waited > 1000 * MS && waited <= 3000 * MS, "{waited:?}");
}

#[tokio::test(start_paused = true)]
async fn a_hint_above_the_cap_returns_the_response_at_once() {
    let calls = Calls::new();
    let layer = RetryLayer::builder()
        .policy(HttpRetry::new())
        .max_server_delay(Duration::from_secs(30))
        .build()
        .expect("config");
    let service = scripted(
        &calls,
        vec![(503, vec![("retry-after", "120".into())]), (200, vec![])],
    );
    let started = Instant::now();
    let response = layer
        .layer(service)
        .oneshot(Request::new(()))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "120");
    assert_eq!(calls.count(), 1);
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn grpc_pushback_is_waited_for_and_a_negative_one_stops() {
    let grpc = |pushback: &str| {
        vec![
            (
                200,
                vec![
                    ("grpc-status", "14".to_owned()),
                    ("grpc-retry-pushback-ms", pushback.to_owned()),
                ],
            ),
            (200, vec![("grpc-status", "0".to_owned())]),
        ]
    };
    let layer = RetryLayer::builder()
        .backoff(no_jitter(10 * MS))
        .policy(GrpcRetry::new())
        .build()
        .expect("config");

    let calls = Calls::new();
    let response = layer
        .layer(scripted(&calls, grpc("750")))
        .oneshot(Request::new(()))
        .await
        .expect("response");
    assert_eq!(response.headers()["grpc-status"], "0");
    assert_eq!(calls.times(), [Duration::ZERO, 750 * MS]);

    let calls = Calls::new();
    let response = layer
        .layer(scripted(&calls, grpc("-1")))
        .oneshot(Request::new(()))
        .await
        .expect("response");
    assert_eq!(response.headers()["grpc-status"], "14");
    assert_eq!(calls.count(), 1);
}

/// A Trailers-Only gRPC answer with this status and optional pushback.
fn grpc_answer(status: &str, pushback: Option<&str>) -> (u16, Vec<(&'static str, String)>) {
    let mut headers = vec![("grpc-status", status.to_owned())];
    headers.extend(pushback.map(|millis| ("grpc-retry-pushback-ms", millis.to_owned())));
    (200, headers)
}

#[tokio::test(start_paused = true)]
async fn a_grpc_pushback_is_the_delay_and_the_backoff_restarts_after_it() {
    // gRFC A6: exponential 100 ms, a 250 ms pushback on the second answer: waits of
    // 100, 250, then 100 and 200 again.
    let calls = Calls::new();
    let layer = RetryLayer::builder()
        .max_attempts(5)
        .backoff(Backoff::exponential(100 * MS).jitter(Jitter::None))
        .policy(GrpcRetry::new())
        .budget(RetryBudget::new(Duration::from_secs(10), 10, 0.0))
        .build()
        .expect("config");
    let script = vec![
        grpc_answer("14", None),
        grpc_answer("14", Some("250")),
        grpc_answer("14", None),
        grpc_answer("14", None),
        grpc_answer("0", None),
    ];
    let response = layer
        .layer(scripted(&calls, script))
        .oneshot(Request::new(()))
        .await
        .expect("response");
    assert_eq!(response.headers()["grpc-status"], "0");
    assert_eq!(
        calls.times(),
        [0, 100, 350, 450, 650].map(|millis| millis * MS)
    );
}

#[tokio::test(start_paused = true)]
async fn a_zero_grpc_pushback_retries_at_once() {
    let calls = Calls::new();
    let layer = RetryLayer::builder()
        .backoff(no_jitter(100 * MS))
        .policy(GrpcRetry::new())
        .build()
        .expect("config");
    let script = vec![grpc_answer("14", Some("0")), grpc_answer("0", None)];
    let response = layer
        .layer(scripted(&calls, script))
        .oneshot(Request::new(()))
        .await
        .expect("response");
    assert_eq!(response.headers()["grpc-status"], "0");
    assert_eq!(calls.times(), [Duration::ZERO, Duration::ZERO]);
}

#[tokio::test(start_paused = true)]
async fn retry_after_replaces_the_backoff_which_restarts_after_it() {
    // Exponential 3 s: the backoff would wait 6 s before the third attempt, the server
    // says 2 s. Then the schedule starts over at 3 s.
    let calls = Calls::new();
    let layer = RetryLayer::builder()
        .max_attempts(4)
        .backoff(Backoff::exponential(Duration::from_secs(3)).jitter(Jitter::None))
        .policy(HttpRetry::new())
        .build()
        .expect("config");
    let service = scripted(
        &calls,
        vec![
            (503, vec![]),
            (503, vec![("retry-after", "2".into())]),
            (503, vec![]),
            (200, vec![]),
        ],
    );
    let response = layer
        .layer(service)
        .oneshot(Request::new(()))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(calls.times(), [0, 3, 5, 8].map(Duration::from_secs));
}

#[tokio::test(start_paused = true)]
async fn post_is_not_retried_by_the_http_preset_unless_opted_in() {
    let post = || {
        Request::builder()
            .method(Method::POST)
            .body(())
            .expect("request")
    };
    let calls = Calls::new();
    let layer = RetryLayer::builder()
        .policy(HttpRetry::new())
        .build()
        .expect("config");
    let response = layer
        .layer(scripted(&calls, vec![(503, vec![]), (200, vec![])]))
        .oneshot(post())
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls.count(), 1);

    let calls = Calls::new();
    let layer = RetryLayer::builder()
        .policy(HttpRetry::new().with_method(Method::POST))
        .build()
        .expect("config");
    let response = layer
        .layer(scripted(&calls, vec![(503, vec![]), (200, vec![])]))
        .oneshot(post())
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(calls.count(), 2);
}

/// Hangs for the calls listed in `hang`, answers the others at once.
fn hanging(
    calls: &Calls,
    hang: &'static [usize],
) -> impl Service<(), Response = usize, Error = BoxError, Future: Send> + Clone + Send + use<> {
    let calls = calls.clone();
    service_fn(move |()| {
        let call = calls.record();
        async move {
            if hang.contains(&call) {
                std::future::pending::<()>().await;
            }
            Ok::<_, BoxError>(call)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_hung_attempt_times_out_and_is_retried() {
    let calls = Calls::new();
    let layer = RetryLayer::builder()
        .backoff(no_jitter(10 * MS))
        .per_attempt_timeout(Duration::from_secs(1))
        .build()
        .expect("config");
    let call = layer
        .layer(hanging(&calls, &[1]))
        .oneshot(())
        .await
        .expect("second attempt");
    assert_eq!(call, 2);
    assert_eq!(calls.times(), [Duration::ZERO, 1010 * MS]);

    let calls = Calls::new();
    let error = layer
        .layer(hanging(&calls, &[1, 2, 3]))
        .oneshot(())
        .await
        .expect_err("all hang");
    let timeout = error
        .downcast_ref::<AttemptTimedOut>()
        .expect("attempt timeout");
    assert_eq!(timeout.timeout(), Duration::from_secs(1));
    assert_eq!(calls.count(), 3);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_bounds_attempts_and_delays() {
    // Each attempt fails after 400 ms; retries wait 100 ms; the deadline is 1 s. The
    // second attempt ends at 900 ms, and a third could not start before 1 s: the caller
    // gets the second attempt's error at 900 ms.
    let calls = Calls::new();
    let slow_failure = {
        let calls = calls.clone();
        service_fn(move |()| {
            let call = calls.record();
            async move {
                tokio::time::sleep(400 * MS).await;
                Err::<(), BoxError>(format!("failure {call}").into())
            }
        })
    };
    let layer = RetryLayer::builder()
        .max_attempts(10)
        .backoff(no_jitter(100 * MS))
        .deadline(Duration::from_secs(1))
        .build()
        .expect("config");
    let started = Instant::now();
    let error = layer
        .layer(slow_failure)
        .oneshot(())
        .await
        .expect_err("fails");
    assert_eq!(error.to_string(), "failure 2");
    assert_eq!(started.elapsed(), 900 * MS);

    // An attempt still running at the deadline is cut short.
    let calls = Calls::new();
    let started = Instant::now();
    let error = layer
        .layer(hanging(&calls, &[1]))
        .oneshot(())
        .await
        .expect_err("deadline");
    assert!(error.is::<DeadlineExceeded>(), "{error}");
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(calls.count(), 1);
}

/// Retries after a constant `delay`, on a budget of ten retries (1 a second for 10 s,
/// no deposits) so that every withdrawal and refund shows.
fn ten_retries_after(delay: Duration) -> RetryLayer {
    RetryLayer::builder()
        .backoff(no_jitter(delay))
        .budget(RetryBudget::new(Duration::from_secs(10), 1, 0.0))
        .build()
        .expect("config")
}

#[tokio::test(start_paused = true)]
async fn dropping_the_future_mid_delay_stops_and_refunds_the_budget() {
    let calls = Calls::new();
    let layer = ten_retries_after(Duration::from_secs(1));
    let handle = layer.handle();
    assert_eq!(handle.budget_available(), 10);
    let mut service = layer.layer(flaky(&calls, 10));
    let mut future = Box::pin(service.ready().await.expect("ready").call(()));
    // The first attempt fails at once and the retry is scheduled.
    assert!(futures_poll(future.as_mut()).is_pending());
    assert_eq!(handle.budget_available(), 9);
    drop(future);
    assert_eq!(handle.budget_available(), 10);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(calls.count(), 1, "no retry after the caller left");
    let metrics = handle.metrics();
    assert_eq!(
        metrics.failure_with_retry + metrics.failure_without_retry,
        0,
        "abandoned, not failed"
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_future_mid_attempt_cancels_it_and_keeps_the_budget_spent() {
    struct Flag(Arc<AtomicU32>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicU32::new(0));
    let calls = Calls::new();
    let inner = {
        let (calls, dropped) = (calls.clone(), dropped.clone());
        service_fn(move |()| {
            let call = calls.record();
            let flag = Flag(dropped.clone());
            async move {
                if call == 1 {
                    return Err::<(), BoxError>("first fails".into());
                }
                let _flag = flag;
                std::future::pending::<()>().await;
                Ok(())
            }
        })
    };
    let layer = ten_retries_after(10 * MS);
    let handle = layer.handle();
    let mut service = layer.layer(inner);
    let mut future = Box::pin(service.ready().await.expect("ready").call(()));
    assert!(futures_poll(future.as_mut()).is_pending());
    tokio::time::sleep(20 * MS).await;
    assert!(futures_poll(future.as_mut()).is_pending());
    assert_eq!(calls.count(), 2, "the retry is in flight");
    assert_eq!(handle.budget_available(), 9);
    let before = dropped.load(Ordering::SeqCst);
    drop(future);
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        before + 1,
        "the attempt was dropped"
    );
    // The retry reached the backend: its token stays spent, or a caller's timeout over
    // a hanging dependency would make every retry free.
    assert_eq!(handle.budget_available(), 9);
}

/// Ready for its first call, which fails; never ready again (a `Buffer`, a
/// `ConcurrencyLimit` or a pool whose slots never free up).
#[derive(Clone, Default)]
struct ReadyOnce {
    calls: Arc<AtomicUsize>,
}

impl Service<()> for ReadyOnce {
    type Response = ();
    type Error = BoxError;
    type Future = std::future::Ready<Result<(), BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.calls.load(Ordering::SeqCst) == 0 {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn call(&mut self, (): ()) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Err("first fails".into()))
    }
}

#[tokio::test(start_paused = true)]
async fn the_deadline_holds_while_the_service_is_not_ready() {
    let layer = RetryLayer::builder()
        .backoff(no_jitter(100 * MS))
        .deadline(Duration::from_secs(1))
        .budget(RetryBudget::new(Duration::from_secs(10), 1, 0.0))
        .build()
        .expect("config");
    let handle = layer.handle();
    let inner = ReadyOnce::default();
    let calls = inner.calls.clone();
    let mut service = layer.layer(inner);
    let started = Instant::now();
    let call = service.ready().await.expect("ready").call(());
    let error = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("the deadline ends the call")
        .expect_err("deadline");
    assert!(error.is::<DeadlineExceeded>(), "{error}");
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the retry was never sent");
    assert_eq!(handle.budget_available(), 10, "its withdrawal came back");
    assert_eq!(handle.metrics().failure_with_retry, 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_future_while_the_service_is_not_ready_refunds_the_budget() {
    let layer = ten_retries_after(10 * MS);
    let handle = layer.handle();
    let mut service = layer.layer(ReadyOnce::default());
    let mut future = Box::pin(service.ready().await.expect("ready").call(()));
    assert!(futures_poll(future.as_mut()).is_pending());
    tokio::time::sleep(20 * MS).await;
    // Past the delay, waiting for poll_ready: the retry is not sent yet.
    assert!(futures_poll(future.as_mut()).is_pending());
    assert_eq!(handle.budget_available(), 9);
    drop(future);
    assert_eq!(handle.budget_available(), 10);
}

fn futures_poll<F: Future>(future: Pin<&mut F>) -> Poll<F::Output> {
    let waker = std::task::Waker::noop();
    future.poll(&mut Context::from_waker(waker))
}

#[tokio::test(start_paused = true)]
async fn a_spent_budget_returns_the_last_real_response() {
    let calls = Calls::new();
    let layer = RetryLayer::builder()
        .policy(HttpRetry::new())
        .budget(RetryBudget::new(Duration::from_secs(10), 0, 0.0))
        .build()
        .expect("config");
    let handle = layer.handle();
    let service = scripted(
        &calls,
        vec![(502, vec![("x-origin", "backend".into())]), (200, vec![])],
    );
    let response = layer
        .layer(service)
        .oneshot(Request::new(()))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(response.headers()["x-origin"], "backend");
    assert_eq!(calls.count(), 1);
    let metrics = handle.metrics();
    assert_eq!(
        (metrics.budget_exhausted, metrics.failure_without_retry),
        (1, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn observer_and_metrics_see_every_retry() {
    let events = Arc::new(Mutex::new(Vec::<RetryEvent>::new()));
    let layer = RetryLayer::builder()
        .max_attempts(3)
        .backoff(Backoff::linear(50 * MS))
        .on_retry({
            let events = events.clone();
            move |event| events.lock().expect("events").push(*event)
        })
        .build()
        .expect("config");
    let handle = layer.handle();
    let calls = Calls::new();
    let service = layer.layer(flaky(&calls, 2));
    service.clone().oneshot(()).await.expect("third attempt");
    let events = events.lock().expect("events").clone();
    let seen: Vec<_> = events
        .iter()
        .map(|event| (event.attempt, event.delay, event.reason))
        .collect();
    assert_eq!(
        seen,
        [
            (2, 50 * MS, RetryReason::Error),
            (3, 100 * MS, RetryReason::Error)
        ]
    );

    service.clone().oneshot(()).await.expect("succeeds at once");
    layer
        .layer(flaky(&Calls::new(), 10))
        .oneshot(())
        .await
        .expect_err("fails");
    let metrics = handle.metrics();
    assert_eq!(metrics.success_with_retry, 1);
    assert_eq!(metrics.success_without_retry, 1);
    assert_eq!(metrics.failure_with_retry, 1);
    assert_eq!(metrics.retries, 4);
}

/// A service that insists on `poll_ready` before each `call`; a clone starts unready.
#[derive(Default)]
struct Strict {
    ready: bool,
    calls: Arc<AtomicUsize>,
}

impl Clone for Strict {
    fn clone(&self) -> Self {
        Self {
            ready: false,
            calls: self.calls.clone(),
        }
    }
}

impl Service<()> for Strict {
    type Response = ();
    type Error = BoxError;
    type Future = std::future::Ready<Result<(), BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (): ()) -> Self::Future {
        assert!(std::mem::take(&mut self.ready), "called without poll_ready");
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        std::future::ready(if call < 3 {
            Err("not yet".into())
        } else {
            Ok(())
        })
    }
}

#[tokio::test(start_paused = true)]
async fn each_attempt_calls_the_service_it_polled_ready() {
    let strict = Strict::default();
    let calls = strict.calls.clone();
    let layer = RetryLayer::builder()
        .backoff(no_jitter(MS))
        .build()
        .expect("config");
    let mut service = layer.layer(strict);
    service
        .ready()
        .await
        .expect("ready")
        .call(())
        .await
        .expect("third attempt");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_failures_costs_at_most_the_budget() {
    let calls = Arc::new(AtomicUsize::new(0));
    let always_failing = {
        let calls = calls.clone();
        service_fn(move |()| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), BoxError>("down".into()) }
        })
    };
    // 10 s ttl, 10 retries a second, 20 %: 100 + 0.2 · 1,000 = 300 retries at most.
    let layer = RetryLayer::builder()
        .max_attempts(3)
        .backoff(Backoff::constant(Duration::ZERO))
        .budget(RetryBudget::new(Duration::from_secs(10), 10, 0.2))
        .build()
        .expect("config");
    let handle = layer.handle();
    let service = layer.layer(always_failing);
    let tasks: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(service.clone().oneshot(())))
        .collect();
    for task in tasks {
        task.await.expect("task").expect_err("always fails");
    }
    let metrics = handle.metrics();
    let retries = calls.load(Ordering::SeqCst) - 1000;
    assert_eq!(retries as u64, metrics.retries);
    assert!(retries <= 300, "{retries} retries");
    assert!(
        retries >= 100,
        "the reserve alone allows 100, got {retries}"
    );
    assert!(metrics.budget_exhausted > 0);
    assert_eq!(
        metrics.failure_with_retry + metrics.failure_without_retry,
        1000
    );
}

#[test]
fn invalid_configurations_are_errors() {
    let err = |builder: palisade::retry::RetryLayerBuilder| builder.build().expect_err("invalid");
    assert_eq!(
        err(RetryLayer::builder().max_attempts(0)),
        RetryConfigError::ZeroAttempts
    );
    assert_eq!(
        err(RetryLayer::builder().backoff(Backoff::exponential(MS).multiplier(0.5))),
        RetryConfigError::Multiplier(0.5)
    );
    assert!(matches!(
        err(RetryLayer::builder().backoff(Backoff::exponential(MS).multiplier(f64::NAN))),
        RetryConfigError::Multiplier(_)
    ));
    assert_eq!(
        err(RetryLayer::builder().backoff(Backoff::constant(10 * MS).max(MS))),
        RetryConfigError::CapBelowBase {
            base: 10 * MS,
            cap: MS
        }
    );
    assert_eq!(
        err(RetryLayer::builder().backoff(Backoff::constant(MS).jitter(Jitter::Proportional(1.5)))),
        RetryConfigError::Jitter(1.5)
    );
    assert_eq!(
        err(RetryLayer::builder().budget(RetryBudget::new(Duration::ZERO, 1, 0.1))),
        RetryConfigError::BudgetTtl(Duration::ZERO)
    );
    assert_eq!(
        err(RetryLayer::builder().budget(RetryBudget::new(Duration::from_secs(1), 1, -0.1))),
        RetryConfigError::BudgetRatio(-0.1)
    );
    assert_eq!(
        err(RetryLayer::builder().per_attempt_timeout(Duration::ZERO)),
        RetryConfigError::ZeroTimeout
    );
    assert_eq!(
        err(RetryLayer::builder().deadline(Duration::ZERO)),
        RetryConfigError::ZeroTimeout
    );
}

#[test]
fn budgets_outside_the_bounds_are_errors() {
    let build = |ttl, min_per_sec, ratio| {
        RetryLayer::builder()
            .budget(RetryBudget::new(ttl, min_per_sec, ratio))
            .build()
            .map(drop)
    };
    let secs = Duration::from_secs;
    // Each of these used to build, then wrap the balance negative on the first deposit.
    assert_eq!(
        build(Duration::MAX, 1, 0.2),
        Err(RetryConfigError::BudgetTtl(Duration::MAX))
    );
    assert_eq!(
        build(secs(10), 10, 1e300),
        Err(RetryConfigError::BudgetRatio(1e300))
    );
    assert_eq!(
        build(secs(10), u32::MAX, 0.2),
        Err(RetryConfigError::BudgetMinPerSec(u32::MAX))
    );
    assert_eq!(
        build(secs(61), 1, 0.2),
        Err(RetryConfigError::BudgetTtl(secs(61)))
    );
    assert_eq!(
        build(999 * MS, 1, 0.2),
        Err(RetryConfigError::BudgetTtl(999 * MS))
    );
    assert_eq!(
        build(secs(10), 1, 1000.5),
        Err(RetryConfigError::BudgetRatio(1000.5))
    );
    assert_eq!(
        build(secs(10), 1, f64::INFINITY),
        Err(RetryConfigError::BudgetRatio(f64::INFINITY))
    );
    assert!(matches!(
        build(secs(10), 1, f64::NAN),
        Err(RetryConfigError::BudgetRatio(_))
    ));
    // The bounds themselves are accepted.
    assert_eq!(build(RetryBudget::MIN_TTL, 0, 0.0), Ok(()));
    assert_eq!(
        build(
            RetryBudget::MAX_TTL,
            RetryBudget::MAX_MIN_PER_SEC,
            RetryBudget::MAX_RATIO
        ),
        Ok(())
    );
}
