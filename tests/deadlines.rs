//! The request context's deadline and trace context, in paused time: the server side
//! takes them, the client side sends them on, the retry layer and the breaker obey them.
#![cfg(feature = "http")]

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use palisade::circuit_breaker::CircuitBreakerLayer;
use palisade::context::{self, DeadlineExceeded, RequestContext, TraceContext};
use palisade::correlation::{CorrelationIdLayer, IncomingDeadlines, PropagateCorrelationIdLayer};
use palisade::rejection::{Rejection, RejectionKind};
use palisade::retry::{Backoff, RetryLayer};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{Instant, advance, sleep};
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt, service_fn};

const MS: Duration = Duration::from_millis(1);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn deadlines() -> IncomingDeadlines {
    IncomingDeadlines::builder()
        .max(Duration::from_secs(10))
        .default(Duration::from_secs(2))
        .min_left(Duration::from_millis(20))
        .build()
        .unwrap()
}

/// A handler that answers with the time it had left, in ms, after `work`.
fn server(
    work: Duration,
) -> impl Service<Request<()>, Response = Response<String>, Error = BoxError> + Clone {
    CorrelationIdLayer::new()
        .accept_deadlines(deadlines())
        .layer(service_fn(move |_request: Request<()>| async move {
            let left = context::time_left().expect("a deadline");
            sleep(work).await;
            Ok::<_, BoxError>(Response::new(left.as_millis().to_string()))
        }))
}

fn request(headers: &[(&str, &str)]) -> Request<()> {
    let mut request = Request::new(());
    for (name, value) in headers {
        request.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    request
}

async fn answer(headers: &[(&str, &str)], work: Duration) -> Response<String> {
    server(work).oneshot(request(headers)).await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_server_takes_the_callers_time_bounded_and_defaulted() {
    let http = answer(&[("x-request-timeout-ms", "750")], Duration::ZERO).await;
    assert_eq!(http.body(), "750");
    let grpc = [
        ("content-type", "application/grpc"),
        ("grpc-timeout", "1500000u"),
    ];
    assert_eq!(answer(&grpc, Duration::ZERO).await.body(), "1500");
    // Above the maximum: cut to it. None, or malformed: the default.
    let long = answer(&[("x-request-timeout-ms", "99999999")], Duration::ZERO).await;
    assert_eq!(long.body(), "10000");
    assert_eq!(answer(&[], Duration::ZERO).await.body(), "2000");
    let hostile = answer(&[("x-request-timeout-ms", "-5 ms\t\u{ff}")], Duration::ZERO).await;
    assert_eq!(hostile.body(), "2000");
}

#[tokio::test(start_paused = true)]
async fn too_little_left_on_arrival_is_refused_with_the_id_echoed() {
    for left in ["0", "19"] {
        let refused = answer(
            &[("x-request-timeout-ms", left), ("x-request-id", "order-1")],
            Duration::ZERO,
        )
        .await;
        assert_eq!(refused.status(), StatusCode::GATEWAY_TIMEOUT, "{left}");
        assert_eq!(refused.headers()["x-request-id"], "order-1");
        assert_eq!(refused.body(), "");
    }
    assert_eq!(
        answer(&[("x-request-timeout-ms", "20")], Duration::ZERO)
            .await
            .body(),
        "20"
    );
    let grpc = [("content-type", "application/grpc"), ("grpc-timeout", "5m")];
    let refused = answer(&grpc, Duration::ZERO).await;
    assert_eq!(refused.status(), StatusCode::OK);
    assert_eq!(refused.headers()["grpc-status"], "4");
}

/// Notes that it was dropped.
struct DropFlag(Arc<AtomicU32>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn a_handler_still_running_at_the_deadline_is_stopped() {
    let dropped = Arc::new(AtomicU32::new(0));
    let flag = Arc::clone(&dropped);
    let service = CorrelationIdLayer::new()
        .accept_deadlines(deadlines())
        .layer(service_fn(move |_request: Request<()>| {
            let guard = DropFlag(Arc::clone(&flag));
            async move {
                let _guard = guard;
                sleep(Duration::from_secs(5)).await;
                Ok::<_, BoxError>(Response::new(String::from("late")))
            }
        }));
    let started = Instant::now();
    let response = service
        .oneshot(request(&[("x-request-timeout-ms", "300")]))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(started.elapsed(), 300 * MS);
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
}

/// A downstream that answers with the headers it got.
fn echo() -> impl Service<Request<()>, Response = Response<HeaderMap>, Error = BoxError> + Clone {
    service_fn(|request: Request<()>| async move {
        Ok::<_, BoxError>(Response::new(request.headers().clone()))
    })
}

#[tokio::test(start_paused = true)]
async fn the_client_sends_the_time_left_less_the_margin_and_refuses_too_little() {
    let client = PropagateCorrelationIdLayer::new()
        .deadline_margin(10 * MS)
        .min_time_left(5 * MS)
        .layer(echo());
    let context = RequestContext::new().with_timeout(Duration::from_millis(500));
    let sent = context
        .clone()
        .scope(async {
            sleep(120 * MS).await;
            let http = client.clone().oneshot(request(&[])).await.unwrap();
            let grpc = client
                .clone()
                .oneshot(request(&[("content-type", "application/grpc")]))
                .await
                .unwrap();
            // A shorter timeout the caller set itself is kept.
            let own = client
                .clone()
                .oneshot(request(&[("x-request-timeout-ms", "40")]))
                .await
                .unwrap();
            (http.into_body(), grpc.into_body(), own.into_body())
        })
        .await;
    assert_eq!(sent.0["x-request-timeout-ms"], "370");
    assert_eq!(sent.1["grpc-timeout"], "370000u");
    assert_eq!(sent.2["x-request-timeout-ms"], "40");

    let refused = context
        .scope(async {
            sleep(486 * MS).await; // 14 ms left, 4 after the margin
            client.clone().oneshot(request(&[])).await
        })
        .await
        .unwrap_err();
    assert!(refused.is::<DeadlineExceeded>());
    let rejection = Rejection::find(&*refused).unwrap();
    assert_eq!(rejection.kind(), RejectionKind::DeadlineExceeded);
    // Outside any deadline nothing is sent, nothing refused.
    let free = client.oneshot(request(&[])).await.unwrap();
    assert!(!free.body().contains_key("x-request-timeout-ms"));
}

#[tokio::test(start_paused = true)]
async fn the_deadline_shrinks_across_a_hop_by_the_time_spent() {
    // Hop 2 reports the time it got; hop 1 works 200 ms before calling it.
    let hop2 = server(Duration::ZERO);
    let client = PropagateCorrelationIdLayer::new().layer(hop2);
    let hop1 = CorrelationIdLayer::new()
        .accept_deadlines(deadlines())
        .layer(service_fn(move |_request: Request<()>| {
            let client = client.clone();
            async move {
                sleep(200 * MS).await;
                client.oneshot(Request::new(())).await
            }
        }));
    let response = hop1
        .oneshot(request(&[("x-request-timeout-ms", "1000")]))
        .await
        .unwrap();
    assert_eq!(response.body(), "800");
}

/// Fails every call after `work`, counting them.
fn failing(
    calls: &Arc<AtomicU32>,
    work: Duration,
) -> impl Service<(), Response = (), Error = BoxError> + Clone {
    let calls = Arc::clone(calls);
    service_fn(move |()| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            sleep(work).await;
            Err::<(), BoxError>("unavailable".into())
        }
    })
}

fn retry(attempts: u32) -> RetryLayer {
    RetryLayer::builder()
        .max_attempts(attempts)
        .backoff(Backoff::constant(100 * MS))
        .per_attempt_timeout(Duration::from_secs(1))
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn retries_never_outlive_the_callers_deadline() {
    let calls = Arc::new(AtomicU32::new(0));
    let service = retry(10).layer(failing(&calls, 50 * MS));
    let started = Instant::now();
    let error = RequestContext::new()
        .with_timeout(Duration::from_millis(400))
        .scope(service.oneshot(()))
        .await
        .unwrap_err();
    // Attempts at 0, 150 and 300 ms; the next would start at 450, past the deadline.
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(error.to_string(), "unavailable");
    assert_eq!(started.elapsed(), 350 * MS);
}

#[tokio::test(start_paused = true)]
async fn the_per_attempt_timeout_is_capped_by_the_deadline() {
    let calls = Arc::new(AtomicU32::new(0));
    let service = retry(3).layer(failing(&calls, Duration::from_secs(30)));
    let started = Instant::now();
    let error = RequestContext::new()
        .with_timeout(Duration::from_millis(250))
        .scope(service.oneshot(()))
        .await
        .unwrap_err();
    let exceeded = error
        .downcast_ref::<DeadlineExceeded>()
        .expect("the deadline");
    assert_eq!(exceeded.timeout(), Some(250 * MS));
    assert_eq!(started.elapsed(), 250 * MS);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn nothing_is_attempted_or_counted_after_the_deadline() {
    let calls = Arc::new(AtomicU32::new(0));
    let breaker = CircuitBreakerLayer::builder()
        .minimum_calls(1)
        .build()
        .unwrap();
    let handle = breaker.handle();
    let service = ServiceBuilder::new()
        .layer(retry(3))
        .layer(breaker)
        .service(failing(&calls, Duration::ZERO));
    let context = RequestContext::new().with_timeout(10 * MS);
    advance(20 * MS).await;
    let error = context
        .clone()
        .scope(service.clone().oneshot(()))
        .await
        .unwrap_err();
    assert!(error.is::<DeadlineExceeded>(), "{error}");
    // The breaker alone refuses without counting, too.
    let breaker_only = CircuitBreakerLayer::builder().build().unwrap();
    let breaker_handle = breaker_only.handle();
    let alone = breaker_only.layer(failing(&calls, Duration::ZERO));
    let error = context.scope(alone.oneshot(())).await.unwrap_err();
    assert!(error.is::<DeadlineExceeded>(), "{error}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(handle.metrics().calls, 0);
    assert_eq!(breaker_handle.metrics().calls, 0);
}

#[tokio::test(start_paused = true)]
async fn a_hop_does_not_retry_what_its_caller_retries() {
    let calls = Arc::new(AtomicU32::new(0));
    let deferring = retry(3).layer(failing(&calls, Duration::ZERO));
    let retried = RequestContext::new().with_previous_attempts(1);
    retried
        .clone()
        .scope(deferring.clone().oneshot(()))
        .await
        .unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // A first attempt is retried as configured.
    RequestContext::new()
        .scope(deferring.oneshot(()))
        .await
        .unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    // Off: retried like any other.
    let eager = RetryLayer::builder()
        .max_attempts(3)
        .backoff(Backoff::constant(MS))
        .defer_to_retrying_caller(false)
        .build()
        .unwrap()
        .layer(failing(&calls, Duration::ZERO));
    retried.scope(eager.oneshot(())).await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 7);
}

#[tokio::test(start_paused = true)]
async fn the_attempt_count_reaches_the_next_hop() {
    let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
    let log = Arc::clone(&seen);
    // The next hop: notes the caller's earlier attempts, fails with 503.
    let next_hop = CorrelationIdLayer::new().layer(service_fn(move |_request: Request<_>| {
        log.lock().unwrap().push(context::previous_attempts());
        async {
            let mut response = Response::new(String::new());
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            Ok::<_, BoxError>(response)
        }
    }));
    let client = ServiceBuilder::new()
        .layer(
            RetryLayer::builder()
                .max_attempts(3)
                .backoff(Backoff::constant(MS))
                .policy(palisade::retry::HttpRetry::default())
                .replay_bodies()
                .build()
                .unwrap(),
        )
        .layer(PropagateCorrelationIdLayer::new())
        .service(next_hop);
    let request = Request::new(http_body_util::Full::new(bytes::Bytes::new()));
    let response = client.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(*seen.lock().unwrap(), [0, 1, 2]);
    // Inside a request that is itself a retry, even the first attempt says so.
    seen.lock().unwrap().clear();
    let request = Request::new(http_body_util::Full::new(bytes::Bytes::new()));
    RequestContext::new()
        .with_previous_attempts(4)
        .scope(client.oneshot(request))
        .await
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), [4]);
}

#[tokio::test]
async fn the_trace_continues_with_a_fresh_parent_per_call() {
    let client = PropagateCorrelationIdLayer::new().layer(echo());
    let server = CorrelationIdLayer::new().layer(service_fn(move |request: Request<()>| {
        let client = client.clone();
        async move {
            let extension = request.extensions().get::<TraceContext>().cloned();
            assert_eq!(extension, context::trace_context());
            let first = client.clone().oneshot(Request::new(())).await?.into_body();
            let second = client.oneshot(Request::new(())).await?.into_body();
            Ok::<_, BoxError>(Response::new([first, second]))
        }
    }));
    let response = server
        .clone()
        .oneshot(request(&[
            ("traceparent", TRACEPARENT),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("tracestate", "rojo=00f067aa0ba902b7"),
        ]))
        .await
        .unwrap();
    let [first, second] = response.into_body();
    let parent = |headers: &HeaderMap| {
        TraceContext::parse(headers["traceparent"].as_bytes()).expect("a valid traceparent")
    };
    let (a, b) = (parent(&first), parent(&second));
    assert_eq!(a.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(a.trace_id(), b.trace_id());
    assert_ne!(a.parent_id().to_string(), "00f067aa0ba902b7");
    assert_ne!(a.parent_id(), b.parent_id());
    assert!(a.is_sampled());
    assert_eq!(
        first["tracestate"],
        "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    );

    // A repeated traceparent is invalid: no context, nothing sent on.
    let repeated = server
        .oneshot(request(&[
            ("traceparent", TRACEPARENT),
            ("traceparent", TRACEPARENT),
        ]))
        .await
        .unwrap();
    let [first, _] = repeated.into_body();
    assert!(!first.contains_key("traceparent"));
}

#[tokio::test]
async fn a_trace_can_be_started_when_none_came() {
    let client = PropagateCorrelationIdLayer::new()
        .start_trace_when_absent(true)
        .layer(echo());
    let sent = client.oneshot(request(&[])).await.unwrap().into_body();
    let started = TraceContext::parse(sent["traceparent"].as_bytes()).unwrap();
    assert!(started.is_sampled());
    assert!(!sent.contains_key("tracestate"));
}
