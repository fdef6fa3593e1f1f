//! Every service stack the benches compare, built once: the bare services, palisade's
//! layers with the benches' settings, and the peers configured alike.
//!
//! Settings: a breaker trips at 50% over 100 calls (or 30 s) with at least 20 calls,
//! opens for 30 s and probes 5 at a time; a rate limiter never throttles (a trillion
//! tokens, a billion a second); a retry layer keeps its default budget on.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota as GovernorQuota};
use http::header::{ACCEPT, CONTENT_TYPE, HOST, USER_AGENT};
use http::{HeaderValue, Request, Response};
use palisade::circuit_breaker::{CircuitBreakerLayer, SlidingWindow};
use palisade::context::{RequestContext, Scoped, TraceContext, TraceState};
use palisade::correlation::{CorrelationId, CorrelationIdLayer, IncomingDeadlines};
use palisade::rate_limit::RateLimitLayer;
use palisade::retry::RetryLayer;
use tower::util::Oneshot;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

/// The bare service the `u64` stacks wrap: answers with the request, at once.
pub fn bare()
-> impl Service<u64, Response = u64, Error = BoxError, Future = Ready<Result<u64, BoxError>>>
+ Clone
+ Send
+ Sync
+ 'static {
    service_fn(|request: u64| ready(Ok::<_, BoxError>(request)))
}

/// The bare HTTP service: an empty response (of body type `B`), at once.
pub fn bare_http<B: Default + 'static>() -> impl Service<
    Request<()>,
    Response = Response<B>,
    Error = BoxError,
    Future = Ready<Result<Response<B>, BoxError>>,
> + Clone
+ Send
+ Sync
+ 'static {
    service_fn(|_: Request<()>| ready(Ok::<_, BoxError>(Response::new(B::default()))))
}

/// A handler's minimal work, for the correlation stacks: a response with a content type.
pub fn bare_handler()
-> impl Service<Request<()>, Response = Response<()>, Error = Infallible> + Clone + 'static {
    service_fn(|_: Request<()>| {
        let mut response = Response::new(());
        let content_type = HeaderValue::from_static("text/plain");
        response.headers_mut().insert(CONTENT_TYPE, content_type);
        ready(Ok(response))
    })
}

/// A request as hyper hands one over, with `x-request-id: id` when given (sharing its
/// bytes, as a parsed header shares the read buffer).
pub fn request_with_id(id: Option<&HeaderValue>) -> Request<()> {
    let mut request = Request::new(());
    let headers = request.headers_mut();
    headers.insert(HOST, HeaderValue::from_static("orders.internal"));
    headers.insert(USER_AGENT, HeaderValue::from_static("bench/1.0"));
    headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
    if let Some(id) = id {
        headers.insert("x-request-id", id.clone());
    }
    request
}

/// An `x-request-id` value as a client sends it.
pub fn request_id() -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::from_static(
        b"0b6b8e5c-3f41-4c0a-9a55-2f0e1a7c9d13",
    ))
    .expect("a UUID is a valid header value")
}

/// An HTTP request keyed by `key` in its extensions (what the keyed limiters read).
pub fn keyed_request(key: u64) -> Request<()> {
    let mut request = Request::new(());
    request.extensions_mut().insert(key);
    request
}

/// palisade's breaker with a count window.
pub fn breaker_count() -> CircuitBreakerLayer {
    breaker(SlidingWindow::count(100), None)
}

/// palisade's breaker with a 30 s time window and slow-call detection.
pub fn breaker_time_slow() -> CircuitBreakerLayer {
    breaker(
        SlidingWindow::time(Duration::from_secs(30)),
        Some(Duration::from_secs(2)),
    )
}

fn breaker(window: SlidingWindow, slow: Option<Duration>) -> CircuitBreakerLayer {
    let builder = CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .minimum_calls(20)
        .sliding_window(window)
        .open_for(Duration::from_secs(30))
        .half_open_probes(5);
    match slow {
        Some(slow) => builder.slow_calls(slow, 0.8),
        None => builder,
    }
    .build()
    .expect("valid")
}

/// tower-resilience's breaker, configured like ours.
pub fn tower_resilience_breaker<S: Clone>(
    inner: S,
) -> tower_resilience::circuitbreaker::CircuitBreaker<
    S,
    tower_resilience::circuitbreaker::DefaultClassifier,
> {
    tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .minimum_number_of_calls(20)
        .sliding_window_size(100)
        .wait_duration_in_open(Duration::from_secs(30))
        .permitted_calls_in_half_open(5)
        .build()
        .expect("valid")
        .layer(inner)
}

/// failsafe's breaker around the bare service's work.
pub fn failsafe_breaker()
-> impl Service<u64, Response = u64, Error = failsafe::Error<BoxError>> + Clone + Send + 'static {
    let backoff = failsafe::backoff::constant(Duration::from_secs(30));
    let policy = failsafe::failure_policy::success_rate_over_time_window(
        0.5,
        20,
        Duration::from_secs(30),
        backoff,
    );
    let breaker = failsafe::Config::new().failure_policy(policy).build();
    service_fn(move |request: u64| {
        use failsafe::futures::CircuitBreaker;
        breaker.call(async move { Ok::<_, BoxError>(request) })
    })
}

/// palisade's rate limiter, global, never throttling.
pub fn rate_limit_global() -> RateLimitLayer {
    RateLimitLayer::builder()
        .capacity(1_000_000_000_000)
        .refill(1_000_000_000, Duration::from_secs(1))
        .build()
        .expect("config")
}

/// palisade's rate limiter keyed on the request's `u64` extension, never throttling.
pub fn rate_limit_keyed_http<S>(
    inner: S,
) -> impl Service<Request<()>, Response = S::Response, Error = BoxError> + Clone
where
    S: Service<Request<()>> + Clone,
    S::Error: Into<BoxError>,
{
    RateLimitLayer::builder()
        .capacity(1_000_000_000_000)
        .refill(1_000_000_000, Duration::from_secs(1))
        .keyed(|request: &Request<()>| request.extensions().get::<u64>().copied())
        .build()
        .expect("config")
        .layer(inner)
}

/// governor's quota that never throttles.
pub fn never_throttled() -> GovernorQuota {
    GovernorQuota::per_second(NonZeroU32::MAX)
}

/// governor in the smallest tower wrapper that rejects in `call`: `admit` is its
/// direct `check()` or keyed `check_key()`.
#[derive(Clone)]
pub struct Governed<S, F> {
    inner: S,
    admit: F,
}

impl<S, F> Service<u64> for Governed<S, F>
where
    S: Service<u64, Error = BoxError>,
    F: Fn(&u64) -> bool,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Either<S::Future, Ready<Result<S::Response, BoxError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: u64) -> Self::Future {
        if (self.admit)(&request) {
            Either::Left(self.inner.call(request))
        } else {
            Either::Right(ready(Err("rate limited".into())))
        }
    }
}

/// governor's direct limiter around `inner`.
pub fn governor_direct<S>(
    inner: S,
    limiter: Arc<DefaultDirectRateLimiter>,
) -> Governed<S, impl Fn(&u64) -> bool + Clone + Send> {
    Governed {
        inner,
        admit: move |_: &u64| limiter.check().is_ok(),
    }
}

/// governor's keyed limiter (keyed on the request) around `inner`.
pub fn governor_keyed<S>(inner: S) -> Governed<S, impl Fn(&u64) -> bool + Clone> {
    let limiter = Arc::new(DefaultKeyedRateLimiter::<u64>::keyed(never_throttled()));
    Governed {
        inner,
        admit: move |key: &u64| limiter.check_key(key).is_ok(),
    }
}

/// tower_governor keyed on the request's `u64` extension, never throttling.
pub fn tower_governor_keyed<S>(
    inner: S,
) -> tower_governor::governor::Governor<
    ExtensionKey,
    governor::middleware::NoOpMiddleware<governor::clock::QuantaInstant>,
    S,
    axum::body::Body,
>
where
    S: Clone,
{
    let config = tower_governor::governor::GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .key_extractor(ExtensionKey)
        .finish()
        .expect("config");
    tower_governor::GovernorLayer::new(config).layer(inner)
}

/// tower_governor's key: the request's `u64` extension.
#[derive(Debug, Clone, Copy)]
pub struct ExtensionKey;

impl tower_governor::key_extractor::KeyExtractor for ExtensionKey {
    type Key = u64;

    fn extract<T>(&self, request: &Request<T>) -> Result<u64, tower_governor::GovernorError> {
        request
            .extensions()
            .get::<u64>()
            .copied()
            .ok_or(tower_governor::GovernorError::UnableToExtractKey)
    }
}

/// palisade's retry layer with its defaults (budget on).
pub fn retry() -> RetryLayer {
    RetryLayer::builder().build().expect("config")
}

/// tower's retry with a policy that never retries but clones every request, as any
/// tower retry policy must.
pub fn tower_retry<S>(inner: S) -> tower::retry::Retry<NeverRetry, S> {
    tower::retry::RetryLayer::new(NeverRetry).layer(inner)
}

/// The tower retry policy of [`tower_retry`].
#[derive(Debug, Clone, Copy)]
pub struct NeverRetry;

impl<Res> tower::retry::Policy<Request<()>, Res, BoxError> for NeverRetry {
    type Future = Ready<()>;

    fn retry(&mut self, _: &mut Request<()>, _: &mut Result<Res, BoxError>) -> Option<Ready<()>> {
        None
    }

    fn clone_request(&mut self, request: &Request<()>) -> Option<Request<()>> {
        Some(request.clone())
    }
}

/// tower-http's request-ID pair, minting UUIDs.
pub fn tower_http_request_id<S>(
    inner: S,
) -> tower_http::request_id::SetRequestId<
    tower_http::request_id::PropagateRequestId<S>,
    tower_http::request_id::MakeRequestUuid,
> {
    tower::ServiceBuilder::new()
        .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(
            tower_http::request_id::MakeRequestUuid,
        ))
        .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
        .service(inner)
}

/// The W3C trace context the deadline benches' requests carry.
pub const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// Its `tracestate`.
pub const TRACESTATE: &str = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";

/// A request from a caller that propagates its context: a correlation ID, 5 s left
/// (`x-request-timeout-ms`), a `traceparent` and a `tracestate`.
pub fn request_with_context(id: &HeaderValue) -> Request<()> {
    let mut request = request_with_id(Some(id));
    let headers = request.headers_mut();
    headers.insert("x-request-timeout-ms", HeaderValue::from_static("5000"));
    headers.insert("traceparent", HeaderValue::from_static(TRACEPARENT));
    headers.insert("tracestate", HeaderValue::from_static(TRACESTATE));
    request
}

/// palisade's server layer reading deadlines (at most 30 s) as well as IDs and traces.
pub fn correlation_with_deadlines() -> CorrelationIdLayer {
    let deadlines = IncomingDeadlines::builder()
        .max(Duration::from_secs(30))
        .build()
        .expect("a valid maximum");
    CorrelationIdLayer::new().accept_deadlines(deadlines)
}

/// The context a handler has while it makes an outgoing call: an ID, a deadline (an hour
/// away, so that no bench run reaches it), the incoming trace context with its
/// `tracestate`.
pub fn handler_context() -> RequestContext {
    let trace = TraceContext::parse(TRACEPARENT.as_bytes())
        .expect("a valid traceparent")
        .with_state(TraceState::parse([TRACESTATE.as_bytes()]).expect("a valid tracestate"));
    let id = CorrelationId::from_header_value(&request_id()).expect("a valid ID");
    RequestContext::new()
        .with_correlation_id(id)
        .with_timeout(Duration::from_secs(3600))
        .with_trace(trace)
}

/// Makes every call to `inner` (its `poll_ready`, `call` and future) inside `context`,
/// as a handler's outgoing calls are: the client benches measure the layer below it
/// against the same wrapper around the bare service.
#[derive(Clone)]
pub struct InContext<S> {
    context: RequestContext,
    inner: S,
}

/// `inner`, called inside `context`.
pub fn in_context<S>(context: RequestContext, inner: S) -> InContext<S> {
    InContext { context, inner }
}

impl<S, Req> Service<Req> for InContext<S>
where
    S: Service<Req> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Scoped<Oneshot<S, Req>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        self.context
            .clone()
            .scope(self.inner.clone().oneshot(request))
    }
}
