//! Behaviour of the correlation layers on in-process services: which ID wins, what is
//! echoed, what reaches the handler and its outgoing calls, spawned tasks, and hostile
//! input.
#![cfg(feature = "http")]

use http::{HeaderMap, HeaderValue, Request, Response};
use palisade::correlation::{
    CorrelationId, CorrelationIdLayer, Generator, PropagateCorrelationIdLayer, WithCorrelationId,
};
use palisade::retry::RetryLayer;
use proptest::prelude::*;
use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt, service_fn};

/// What the handler saw.
#[derive(Debug, Clone, Default)]
struct Seen {
    headers: HeaderMap,
    extension: Option<CorrelationId>,
    current: Option<CorrelationId>,
}

/// A handler that answers with what it saw, and sets its own `x-request-id`, which the
/// layer must overwrite.
fn recorder()
-> impl Service<Request<()>, Response = Response<Seen>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(|request: Request<()>| async move {
        tokio::task::yield_now().await; // the scope must survive a suspension
        let seen = Seen {
            headers: request.headers().clone(),
            extension: request.extensions().get::<CorrelationId>().cloned(),
            current: CorrelationId::current(),
        };
        let mut response = Response::new(seen);
        let handler_value = HeaderValue::from_static("set-by-handler");
        response.headers_mut().insert("x-request-id", handler_value);
        Ok(response)
    })
}

async fn handle(layer: &CorrelationIdLayer, request: Request<()>) -> (String, Seen) {
    let response = layer.layer(recorder()).oneshot(request).await.unwrap();
    let echoed = response
        .headers()
        .get("x-request-id")
        .or_else(|| response.headers().get("x-correlation-id"))
        .expect("an ID is always echoed");
    (echoed.to_str().unwrap().to_owned(), response.into_body())
}

fn request_with(headers: &[(&str, &str)]) -> Request<()> {
    let mut request = Request::builder();
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(()).unwrap()
}

fn assert_seen_everywhere(echoed: &str, seen: &Seen) {
    assert_eq!(seen.extension.as_ref().unwrap(), echoed);
    assert_eq!(seen.current.as_ref().unwrap(), echoed);
}

fn uuid_version(id: &str) -> usize {
    uuid::Uuid::parse_str(id).expect("a UUID").get_version_num()
}

#[tokio::test]
async fn a_valid_id_is_accepted_scoped_and_echoed_over_the_handlers_value() {
    let layer = CorrelationIdLayer::new();
    let (echoed, seen) = handle(&layer, request_with(&[("x-request-id", "abc-123")])).await;
    assert_eq!(echoed, "abc-123");
    assert_seen_everywhere("abc-123", &seen);
    assert_eq!(seen.headers["x-request-id"], "abc-123");
    assert_eq!(
        CorrelationId::current(),
        None,
        "the scope ends with the request"
    );
}

#[tokio::test]
async fn a_missing_or_invalid_id_is_replaced_by_a_uuid_v4_in_the_request_too() {
    let layer = CorrelationIdLayer::new();
    for request in [
        request_with(&[]),
        request_with(&[("x-request-id", "")]),
        request_with(&[("x-request-id", "has space")]),
        request_with(&[("x-request-id", "a,b")]),
        request_with(&[("x-request-id", &"a".repeat(129))]),
    ] {
        let (echoed, seen) = handle(&layer, request).await;
        assert_eq!(uuid_version(&echoed), 4);
        assert_seen_everywhere(&echoed, &seen);
        let values: Vec<_> = seen.headers.get_all("x-request-id").iter().collect();
        assert_eq!(values, [echoed.as_str()], "the invalid value is gone");
    }
}

#[tokio::test]
async fn the_first_valid_of_several_headers_wins_and_is_echoed_in_its_header() {
    let layer = CorrelationIdLayer::new().also_accept("x-correlation-id".parse().unwrap());
    let both = request_with(&[("x-request-id", "primary"), ("x-correlation-id", "second")]);
    assert_eq!(handle(&layer, both).await.0, "primary");

    let request = request_with(&[
        ("x-request-id", "bad value"),
        ("x-correlation-id", "second"),
    ]);
    let response = layer.layer(recorder()).oneshot(request).await.unwrap();
    assert_eq!(response.headers()["x-correlation-id"], "second");
    assert_seen_everywhere("second", response.body());
    let primary: Vec<_> = response
        .body()
        .headers
        .get_all("x-request-id")
        .iter()
        .collect();
    assert_eq!(
        primary,
        ["second"],
        "the invalid primary value never reaches the handler"
    );
}

#[tokio::test]
async fn only_the_settled_id_reaches_the_handler_when_the_header_repeats() {
    let layer = CorrelationIdLayer::new();
    let request = request_with(&[
        ("x-request-id", "first"),
        ("x-request-id", "a second, hostile value"),
    ]);
    let (echoed, seen) = handle(&layer, request).await;
    assert_eq!(echoed, "first");
    let values: Vec<_> = seen.headers.get_all("x-request-id").iter().collect();
    assert_eq!(values, ["first"]);
}

#[tokio::test]
async fn a_custom_primary_header_is_read_written_and_echoed() {
    let layer = CorrelationIdLayer::new().header("x-correlation-id".parse().unwrap());
    let request = request_with(&[("x-request-id", "ignored"), ("x-correlation-id", "mine")]);
    let response = layer.layer(recorder()).oneshot(request).await.unwrap();
    assert_eq!(response.headers()["x-correlation-id"], "mine");

    let response = layer
        .layer(recorder())
        .oneshot(request_with(&[]))
        .await
        .unwrap();
    let minted = response.headers()["x-correlation-id"].to_str().unwrap();
    assert_eq!(response.body().headers["x-correlation-id"], minted);
}

#[tokio::test]
async fn generators_v7_and_custom_are_used_when_minting() {
    let v7 = CorrelationIdLayer::new().generator(Generator::uuid_v7());
    let (echoed, _) = handle(&v7, request_with(&[])).await;
    assert_eq!(uuid_version(&echoed), 7);

    let fixed = Generator::custom(|| CorrelationId::parse("from-my-fn").unwrap());
    let custom = CorrelationIdLayer::new().generator(fixed);
    assert_eq!(handle(&custom, request_with(&[])).await.0, "from-my-fn");
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test]
async fn traceparent_is_used_only_when_trusted_valid_and_no_header_id() {
    let trusting = CorrelationIdLayer::new().trust_traceparent(true);
    let (echoed, seen) = handle(&trusting, request_with(&[("traceparent", TRACEPARENT)])).await;
    assert_eq!(echoed, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_seen_everywhere(&echoed, &seen);

    let both = request_with(&[("traceparent", TRACEPARENT), ("x-request-id", "explicit")]);
    assert_eq!(handle(&trusting, both).await.0, "explicit");

    let uppercase = TRACEPARENT.to_uppercase();
    let invalid = request_with(&[("traceparent", &uppercase)]);
    assert_eq!(uuid_version(&handle(&trusting, invalid).await.0), 4);

    let default = CorrelationIdLayer::new();
    let untrusted = request_with(&[("traceparent", TRACEPARENT)]);
    assert_eq!(uuid_version(&handle(&default, untrusted).await.0), 4);
}

#[tokio::test]
async fn a_repeated_traceparent_is_ignored_as_w3c_requires() {
    let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let trusting = CorrelationIdLayer::new().trust_traceparent(true);
    for second in [other, TRACEPARENT, "not a traceparent"] {
        let twice = request_with(&[("traceparent", TRACEPARENT), ("traceparent", second)]);
        let (echoed, seen) = handle(&trusting, twice).await;
        // The example trace-id happens to parse as a v4 UUID too: check the hyphens.
        assert_eq!(echoed.len(), 36, "minted, not taken from {second:?}");
        assert_eq!(uuid_version(&echoed), 4);
        assert_seen_everywhere(&echoed, &seen);
    }

    let with_header = request_with(&[
        ("traceparent", TRACEPARENT),
        ("traceparent", other),
        ("x-request-id", "explicit"),
    ]);
    assert_eq!(handle(&trusting, with_header).await.0, "explicit");
}

#[tokio::test]
async fn applying_the_layer_twice_keeps_one_id() {
    let layer = CorrelationIdLayer::new();
    let twice = layer.layer(layer.layer(recorder()));
    let response = twice.oneshot(request_with(&[])).await.unwrap();
    let echoed = response.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(response.body().headers["x-request-id"], echoed);
    assert_seen_everywhere(echoed, response.body());
}

#[tokio::test]
async fn the_id_is_current_in_the_inner_call_too() {
    // Middleware that rejects or logs in `call`, before any future runs, sees the ID.
    struct CapturesInCall(Option<CorrelationId>);
    impl Service<Request<()>> for CapturesInCall {
        type Response = Response<Option<CorrelationId>>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Request<()>) -> Self::Future {
            self.0 = CorrelationId::current();
            std::future::ready(Ok(Response::new(self.0.clone())))
        }
    }
    let service = CorrelationIdLayer::new().layer(CapturesInCall(None));
    let request = request_with(&[("x-request-id", "in-call")]);
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.body().as_ref().unwrap(), "in-call");
}

#[tokio::test]
async fn a_dropped_response_future_leaves_no_id_behind() {
    let layer = CorrelationIdLayer::new();
    let never =
        service_fn(|_: Request<()>| std::future::pending::<Result<Response<()>, Infallible>>());
    let mut service = layer.layer(never);
    let request = request_with(&[("x-request-id", "abandoned")]);
    let mut future = Box::pin(service.call(request));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(future.as_mut().poll(&mut cx).is_pending());
    assert_eq!(CorrelationId::current(), None);
    drop(future);
    assert_eq!(CorrelationId::current(), None);
}

#[test]
fn nested_scopes_restore_the_outer_id() {
    let outer = CorrelationId::parse("outer").unwrap();
    let inner = CorrelationId::parse("inner").unwrap();
    let future = CorrelationId::scope(outer, async move {
        let before = CorrelationId::current();
        let nested = CorrelationId::scope(inner, async { CorrelationId::current() }).await;
        (before, nested, CorrelationId::current())
    });
    let mut cx = Context::from_waker(Waker::noop());
    let Poll::Ready((before, nested, after)) = pin!(future).poll(&mut cx) else {
        panic!("the future does not wait on anything");
    };
    assert_eq!(before.unwrap(), "outer");
    assert_eq!(nested.unwrap(), "inner");
    assert_eq!(after.unwrap(), "outer");
    assert_eq!(CorrelationId::current(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_tasks_keep_the_id_with_the_helper_and_lose_it_without() {
    let id = CorrelationId::parse("spawning-request").unwrap();
    let (kept, lost, explicit) = CorrelationId::scope(id, async {
        let kept = tokio::spawn(
            async {
                tokio::task::yield_now().await;
                CorrelationId::current()
            }
            .with_current_correlation_id(),
        );
        let lost = tokio::spawn(async { CorrelationId::current() });
        let other = CorrelationId::parse("other").unwrap();
        let explicit = tokio::spawn(async { CorrelationId::current() }.with_correlation_id(other));
        (
            kept.await.unwrap(),
            lost.await.unwrap(),
            explicit.await.unwrap(),
        )
    })
    .await;
    assert_eq!(kept.unwrap(), "spawning-request");
    assert_eq!(lost, None, "task-local scope does not cross tokio::spawn");
    assert_eq!(explicit.unwrap(), "other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_one_layer_never_see_each_others_ids() {
    let service = CorrelationIdLayer::new().layer(recorder());
    let tasks: Vec<_> = (0..200)
        .map(|n| {
            let service = service.clone();
            tokio::spawn(async move {
                let id = format!("req-{n}");
                let request = request_with(&[("x-request-id", &id)]);
                let response = service.oneshot(request).await.unwrap();
                (id, response)
            })
        })
        .collect();
    for task in tasks {
        let (id, response) = task.await.unwrap();
        assert_eq!(response.headers()["x-request-id"], id.as_str());
        assert_seen_everywhere(&id, response.body());
    }
}

/// An outgoing-call stub answering with the `x-request-id` it received.
fn downstream()
-> impl Service<Request<()>, Response = Option<HeaderValue>, Error = Infallible> + Clone {
    service_fn(|request: Request<()>| async move {
        let values: Vec<_> = request.headers().get_all("x-request-id").iter().collect();
        assert!(values.len() <= 1, "never a second value");
        Ok(values.first().map(|v| (*v).clone()))
    })
}

#[tokio::test]
async fn the_client_layer_sends_extension_then_current_and_keeps_explicit_headers() {
    let client = PropagateCorrelationIdLayer::new().layer(downstream());
    let current = CorrelationId::parse("current").unwrap();

    let (explicit, extension, from_scope) = CorrelationId::scope(current, async {
        let explicit = request_with(&[("x-request-id", "explicit")]);
        let mut with_extension = request_with(&[]);
        with_extension
            .extensions_mut()
            .insert(CorrelationId::parse("extension").unwrap());
        (
            client.clone().oneshot(explicit).await.unwrap(),
            client.clone().oneshot(with_extension).await.unwrap(),
            client.clone().oneshot(request_with(&[])).await.unwrap(),
        )
    })
    .await;
    assert_eq!(explicit.unwrap(), "explicit");
    assert_eq!(extension.unwrap(), "extension");
    assert_eq!(from_scope.unwrap(), "current");

    assert_eq!(client.oneshot(request_with(&[])).await.unwrap(), None);
}

#[tokio::test]
async fn the_client_layer_mints_outside_a_scope_only_when_asked() {
    let header = "x-correlation-id".parse().unwrap();
    let minting = PropagateCorrelationIdLayer::new()
        .header(header)
        .mint_when_absent(Generator::uuid_v7());
    let service = service_fn(|request: Request<()>| async move {
        Ok::<_, Infallible>(request.headers().get("x-correlation-id").cloned())
    });
    let sent = minting
        .layer(service)
        .oneshot(request_with(&[]))
        .await
        .unwrap();
    assert_eq!(uuid_version(sent.unwrap().to_str().unwrap()), 7);
}

/// An upstream that fails its first two attempts and answers the third, noting the
/// `x-request-id` each attempt carried.
#[derive(Clone, Default)]
struct FlakyUpstream(Arc<Mutex<Vec<Option<HeaderValue>>>>);

impl FlakyUpstream {
    fn service(&self) -> impl Service<Request<()>, Response = (), Error = BoxError> + Clone {
        let sent = Arc::clone(&self.0);
        service_fn(move |request: Request<()>| {
            let sent = Arc::clone(&sent);
            async move {
                let mut sent = sent.lock().unwrap();
                sent.push(request.headers().get("x-request-id").cloned());
                if sent.len() < 3 {
                    return Err(BoxError::from("connection reset"));
                }
                Ok(())
            }
        })
    }

    /// The distinct IDs the attempts carried, after checking there were three, each
    /// with an ID.
    fn distinct_ids(&self) -> HashSet<HeaderValue> {
        let sent = self.0.lock().unwrap();
        assert_eq!(sent.len(), 3, "two failures, then the answer");
        sent.iter()
            .map(|id| id.clone().expect("every attempt carries an ID"))
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn minting_above_the_retry_layer_gives_every_attempt_one_id() {
    let retry = RetryLayer::builder().max_attempts(3).build().unwrap();
    let mint = PropagateCorrelationIdLayer::new().mint_when_absent(Generator::uuid_v4());

    let upstream = FlakyUpstream::default();
    let documented = ServiceBuilder::new()
        .layer(mint.clone())
        .layer(retry.clone())
        .service(upstream.service());
    documented.oneshot(request_with(&[])).await.unwrap();
    let ids = upstream.distinct_ids();
    assert_eq!(ids.len(), 1, "one ID for all attempts: {ids:?}");
    let id = ids.into_iter().next().unwrap();
    assert_eq!(uuid_version(id.to_str().unwrap()), 4);

    // The other order, as documented on `mint_when_absent`: one ID per attempt.
    let upstream = FlakyUpstream::default();
    let below = ServiceBuilder::new()
        .layer(retry)
        .layer(mint)
        .service(upstream.service());
    below.oneshot(request_with(&[])).await.unwrap();
    assert_eq!(upstream.distinct_ids().len(), 3);
}

#[tokio::test]
async fn a_repeated_header_counts_by_its_first_value_only() {
    let layer = CorrelationIdLayer::new().also_accept("x-correlation-id".parse().unwrap());
    let first_invalid = request_with(&[
        ("x-request-id", "bad value"),
        ("x-request-id", "valid-but-second"),
        ("x-correlation-id", "fallback"),
        ("x-correlation-id", "fallback-second"),
    ]);
    let response = layer
        .layer(recorder())
        .oneshot(first_invalid)
        .await
        .unwrap();
    assert_eq!(response.headers()["x-correlation-id"], "fallback");
    let primary: Vec<_> = response
        .body()
        .headers
        .get_all("x-request-id")
        .iter()
        .collect();
    assert_eq!(primary, ["fallback"]);

    let only_invalid_first = request_with(&[("x-request-id", "a b"), ("x-request-id", "valid")]);
    let (echoed, _) = handle(&CorrelationIdLayer::new(), only_invalid_first).await;
    assert_eq!(uuid_version(&echoed), 4, "the second value is not used");
}

/// Slow-ish in debug builds only: `http`'s `HeaderMap` checks its links with a
/// quadratic `debug_assert!` when the 10,000 values are replaced.
#[tokio::test]
async fn ten_thousand_repeated_hostile_headers_are_replaced() {
    let layer = CorrelationIdLayer::new().also_accept("x-correlation-id".parse().unwrap());
    let mut request = request_with(&[]);
    let huge = HeaderValue::from_bytes(&vec![b'a'; 1 << 20]).unwrap();
    let headers = request.headers_mut();
    for n in 0..10_000 {
        let value = match n % 3 {
            0 => HeaderValue::from_static("a,b"),
            1 => HeaderValue::from_bytes(b"\xff\xfe caf\xc3\xa9").unwrap(),
            _ => huge.clone(),
        };
        headers.append("x-request-id", value.clone());
        headers.append("x-correlation-id", value);
    }
    let (echoed, seen) = handle(&layer, request).await;
    assert_eq!(uuid_version(&echoed), 4);
    assert_seen_everywhere(&echoed, &seen);
    assert_eq!(seen.headers.get_all("x-request-id").iter().count(), 1);
}

/// Arbitrary header bytes, some huge, most invalid. CR, LF, NUL and other control bytes
/// cannot exist in an `http::HeaderValue` (hyper refuses them while parsing), so those
/// are exercised against `CorrelationId::parse` below and filtered out here.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
        proptest::collection::vec(
            prop::sample::select(b"ab1-,\r\n\0\t :;\xff".to_vec()),
            0..60
        ),
        (0usize..3).prop_map(|n| vec![b'z'; [128, 129, 100_000][n]]),
        "[a-zA-Z0-9._~+/=:-]{1,130}".prop_map(String::into_bytes),
        Just(TRACEPARENT.as_bytes().to_vec()),
    ]
}

fn hostile_value() -> impl Strategy<Value = HeaderValue> {
    hostile_bytes().prop_filter_map("not a header value", |bytes| {
        HeaderValue::from_bytes(&bytes).ok()
    })
}

fn is_valid_id(bytes: &[u8]) -> bool {
    (1..=128).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=:".contains(b))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn parse_accepts_exactly_the_safe_set(bytes in hostile_bytes()) {
        let parsed = CorrelationId::parse(&bytes);
        prop_assert_eq!(parsed.is_ok(), is_valid_id(&bytes));
        if let Ok(id) = parsed {
            prop_assert_eq!(id.as_bytes(), bytes.as_slice());
            prop_assert_eq!(id.as_str().as_bytes(), bytes.as_slice());
        }
    }

    #[test]
    fn hostile_headers_never_panic_and_only_valid_ids_come_back(
        request_ids in proptest::collection::vec(hostile_value(), 0..4),
        correlation_ids in proptest::collection::vec(hostile_value(), 0..3),
        traceparents in proptest::collection::vec(hostile_value(), 0..3),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let layer = CorrelationIdLayer::new()
            .also_accept("x-correlation-id".parse().unwrap())
            .trust_traceparent(true);
        let mut request = request_with(&[]);
        for value in &request_ids {
            request.headers_mut().append("x-request-id", value.clone());
        }
        for value in &correlation_ids {
            request.headers_mut().append("x-correlation-id", value.clone());
        }
        for value in &traceparents {
            request.headers_mut().append("traceparent", value.clone());
        }

        let response = runtime.block_on(layer.layer(recorder()).oneshot(request)).unwrap();

        // Reference model: the first value of each header in order, if valid, echoed in
        // that header; else the trace-id of a valid traceparent sent once, else a minted
        // UUID, both echoed in the primary header.
        let first_valid = [("x-request-id", request_ids.first()), ("x-correlation-id", correlation_ids.first())]
            .into_iter()
            .filter_map(|(name, value)| Some((name, value?.as_bytes())))
            .find(|(_, bytes)| is_valid_id(bytes));
        let echo_header = first_valid.map_or("x-request-id", |(name, _)| name);
        let echoed: Vec<_> = response.headers().get_all(echo_header).iter().collect();
        prop_assert_eq!(echoed.len(), 1, "exactly one ID is echoed");
        let echoed = echoed[0].as_bytes();
        prop_assert!(is_valid_id(echoed));
        match first_valid {
            Some((_, expected)) => prop_assert_eq!(echoed, expected),
            None if traceparents.len() == 1 && traceparents[0] == TRACEPARENT => {
                prop_assert_eq!(echoed, &TRACEPARENT.as_bytes()[3..35]);
            }
            None => {
                let minted = std::str::from_utf8(echoed).unwrap();
                // Hyphenated: the example trace-id parses as a v4 UUID as well.
                prop_assert_eq!(minted.len(), 36);
                prop_assert_eq!(uuid_version(minted), 4);
            }
        }
        // Nothing the client sent comes back unless it was the valid ID.
        for name in ["x-request-id", "x-correlation-id"] {
            for value in response.headers().get_all(name) {
                prop_assert!(value == "set-by-handler" || value.as_bytes() == echoed);
            }
        }
        let seen = response.body();
        prop_assert_eq!(seen.current.as_ref().unwrap().as_bytes(), echoed);
        prop_assert_eq!(seen.extension.as_ref().unwrap().as_bytes(), echoed);
    }
}

/// What `CorrelationId::current()` was each time a guard was dropped.
#[derive(Clone, Default)]
struct DropLog(Arc<Mutex<Vec<Option<CorrelationId>>>>);

impl DropLog {
    fn guard(&self) -> LogsCurrentOnDrop {
        LogsCurrentOnDrop(self.clone())
    }

    fn entries(&self) -> Vec<Option<CorrelationId>> {
        self.0.lock().unwrap().clone()
    }
}

/// A handler's guard that logs the current ID in its `Drop`, as a request-scoped span
/// or metrics guard would.
struct LogsCurrentOnDrop(DropLog);

impl Drop for LogsCurrentOnDrop {
    fn drop(&mut self) {
        self.0.0.lock().unwrap().push(CorrelationId::current());
    }
}

fn id(text: &str) -> Option<CorrelationId> {
    Some(CorrelationId::parse(text).unwrap())
}

#[tokio::test(start_paused = true)]
async fn the_id_is_current_while_an_outer_timeout_drops_the_handler() {
    let log = DropLog::default();
    let guards = log.clone();
    let hangs = service_fn(move |_: Request<()>| {
        let guard = guards.guard();
        async move {
            let _guard = guard;
            std::future::pending::<Result<Response<()>, Infallible>>().await
        }
    });
    let service = CorrelationIdLayer::new().layer(hangs);
    let request = request_with(&[("x-request-id", "timed-out")]);
    let outcome = tokio::time::timeout(Duration::from_secs(5), service.oneshot(request)).await;
    assert!(outcome.is_err(), "the handler never answers");
    assert_eq!(log.entries(), [id("timed-out")]);
    assert_eq!(CorrelationId::current(), None, "and the scope ends with it");
}

/// A hand-written handler future that keeps its guard until it is dropped, after it
/// has answered.
struct KeepsGuard<F> {
    future: F,
    _guard: LogsCurrentOnDrop,
}

impl<F: Future + Unpin> Future for KeepsGuard<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        Pin::new(&mut self.future).poll(cx)
    }
}

#[tokio::test]
async fn the_id_is_current_while_a_finished_handler_future_is_dropped() {
    let log = DropLog::default();
    let guards = log.clone();
    let answers = service_fn(move |_: Request<()>| KeepsGuard {
        future: std::future::ready(Ok::<_, Infallible>(Response::new(()))),
        _guard: guards.guard(),
    });
    let service = CorrelationIdLayer::new().layer(answers);
    let request = request_with(&[("x-request-id", "answered")]);
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.headers()["x-request-id"], "answered");
    assert_eq!(log.entries(), [id("answered")]);
}

#[test]
fn the_id_is_current_while_a_scoped_future_is_dropped_mid_flight() {
    let log = DropLog::default();
    let pending_with_guard = || {
        let guard = log.guard();
        async move {
            let _guard = guard;
            std::future::pending::<()>().await
        }
    };
    let outer = CorrelationId::parse("outer").unwrap();
    let inner = CorrelationId::parse("inner").unwrap();
    let mut cx = Context::from_waker(Waker::noop());
    let mut scoped = Box::pin(CorrelationId::scope(inner.clone(), pending_with_guard()));
    let mut with_id = Box::pin(pending_with_guard().with_correlation_id(inner));
    // Made in `outer`'s scope, polled and dropped outside it, as a spawned task is.
    let make_in_outer = CorrelationId::scope(outer, async {
        Box::new(pending_with_guard().with_current_correlation_id())
    });
    let Poll::Ready(with_current) = pin!(make_in_outer).poll(&mut cx) else {
        panic!("the future does not wait on anything");
    };
    let mut with_current = Box::into_pin(with_current);
    assert!(scoped.as_mut().poll(&mut cx).is_pending());
    assert!(with_id.as_mut().poll(&mut cx).is_pending());
    assert!(with_current.as_mut().poll(&mut cx).is_pending());
    drop((scoped, with_id, with_current));
    assert_eq!(log.entries(), [id("inner"), id("inner"), id("outer")]);
    assert_eq!(CorrelationId::current(), None);
}

/// What a handler reads of the request context: the ID, the caller's earlier attempts,
/// the trace-id.
async fn context_read(layer: &CorrelationIdLayer, request: Request<()>) -> (String, u32, String) {
    let handler = service_fn(|request: Request<()>| async move {
        let trace = request
            .extensions()
            .get::<palisade::context::TraceContext>();
        let trace_id = trace.map(|trace| trace.trace_id().to_string());
        let id = CorrelationId::current().map(|id| id.as_str().to_owned());
        let read = (
            id.unwrap_or_default(),
            palisade::context::previous_attempts(),
        );
        Ok::<_, Infallible>(Response::new((
            read.0,
            read.1,
            trace_id.unwrap_or_default(),
        )))
    });
    layer
        .layer(handler)
        .oneshot(request)
        .await
        .unwrap()
        .into_body()
}

/// The server reads the headers it needs in one pass, passing over names by their
/// length: names of the same lengths must neither hide the real ones nor stand in for
/// them, wherever they come in the request.
#[tokio::test]
async fn the_headers_read_are_found_among_others_of_the_same_lengths() {
    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let decoys = [
        ("x-request-iz", "decoy-id"), // the length of x-request-id, content-type
        ("traceparenx", TRACEPARENT), // of traceparent
        ("user-agent", "bench/1.0"),  // of tracestate
        ("x-previous-attemptz", "7"), // of x-previous-attempts
        ("grpc-previous-rpc-attemptz", "8"), // of grpc-previous-rpc-attempts
    ];
    let real = [
        ("x-request-id", "real-id"),
        ("traceparent", TRACEPARENT),
        ("x-previous-attempts", "2"),
    ];
    let layer = CorrelationIdLayer::new();
    for headers in [
        [&decoys[..], &real[..]].concat(),
        [&real[..], &decoys[..]].concat(),
    ] {
        let read = context_read(&layer, request_with(&headers)).await;
        let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736".to_owned();
        assert_eq!(read, ("real-id".to_owned(), 2, trace_id));
        let only_decoys = context_read(&layer, request_with(&decoys)).await;
        assert_eq!(uuid_version(&only_decoys.0), 4, "minted: no decoy is an ID");
        assert_eq!((only_decoys.1, only_decoys.2.as_str()), (0, ""));
    }
    // gRPC requests count their earlier attempts in gRPC's header, and only there.
    let grpc = request_with(&[
        ("x-previous-attempts", "9"),
        ("content-type", "application/grpc"),
        ("grpc-previous-rpc-attempts", "3"),
    ]);
    assert_eq!(context_read(&layer, grpc).await.1, 3);
}
