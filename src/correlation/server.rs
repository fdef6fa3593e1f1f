//! The server side: accept or mint an ID, echo it, scope the handler in it.

use super::{CorrelationId, Generator, IncomingDeadlines};
use crate::context::{
    DeadlineExceeded, RequestContext, Scoped, TRACEPARENT, TRACESTATE, TraceContext, TraceState,
    in_scope, is_grpc, read_previous_attempts, refusal,
};
use http::header::{HeaderMap, HeaderName};
use http::{Request, Response};
use pin_project::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::{Sleep, sleep_until};
use tower_layer::Layer;
use tower_service::Service;

/// The header the ID travels in unless configured otherwise.
pub(crate) const DEFAULT_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Gives every request a [`CorrelationId`]: the one it brings if valid, else a new one.
///
/// For each request, the service:
///
/// 1. takes the ID from the first configured header holding a valid one (default
///    `x-request-id`; more with [`also_accept`](Self::also_accept)), else, if
///    [`trust_traceparent`](Self::trust_traceparent) is on, from the trace-id of a valid
///    W3C `traceparent` sent once, else mints one with the [`Generator`] (UUID v4 by default) and
///    writes it into the request's primary header, replacing whatever invalid value was
///    there. Invalid values are dropped silently: never echoed, never logged, never an
///    error. A request that already carries a `CorrelationId` extension (an outer
///    `CorrelationIdLayer`) keeps it, so applying the layer twice is harmless;
/// 2. inserts the ID into the request extensions;
/// 3. runs the inner service's `call` and its response future with the ID as
///    [`CorrelationId::current`], also while that future is dropped (finished, or
///    cancelled by an outer timeout or a client that went away), and, with the
///    `tracing` feature, inside a span
///    `correlation{correlation_id=...}` (target `palisade::correlation`, level `ERROR`
///    so it is enabled whenever any event is, cost-free when no subscriber listens), so
///    every event the request logs carries the ID;
/// 4. sets the ID on the response, in the header it came in (the primary header when
///    minted or taken from `traceparent`), overwriting any value the handler set.
///
/// The ID is one part of the [request context](crate::context) the layer makes current;
/// the others are:
///
/// - the W3C **trace context** of a valid `traceparent` (and `tracestate`), also put in
///   the request extensions as a [`TraceContext`]; on by default, see
///   [`accept_trace_context`](Self::accept_trace_context);
/// - the caller's count of **earlier attempts** (`grpc-previous-rpc-attempts`, or
///   `x-previous-attempts` on HTTP), which the retry layer reads;
/// - the **deadline**, only with [`accept_deadlines`](Self::accept_deadlines): the
///   caller's `grpc-timeout` or HTTP timeout header, bounded and defaulted. A request
///   arriving with too little left is refused at once, and a handler still running at
///   the deadline is dropped, both answered as the rejection contract answers
///   [`DeadlineExceeded`] (504, or gRPC `DEADLINE_EXCEEDED`), with the ID echoed.
///
/// # Repeated headers
///
/// A header sent more than once counts by its **first value only**. If that value is
/// valid it is the ID and the later values are ignored, valid or not; if it is
/// invalid the whole header is passed over (a valid value after it is not used) and
/// the next accepted header is tried. Either way the primary header reaches the
/// handler, and any client it calls, holding exactly one value, the settled ID, and
/// the response carries exactly one value in the echo header. Headers added with
/// [`also_accept`](Self::also_accept) are read the same way but reach the handler as
/// they came. A repeated `traceparent` is never trusted (see
/// [`trust_traceparent`](Self::trust_traceparent)).
///
/// The configuration is shared behind an `Arc` by every service the layer builds.
#[derive(Clone, Debug, Default)]
#[must_use = "a layer or builder does nothing until it is used"]
pub struct CorrelationIdLayer {
    config: Arc<Config>,
}

#[derive(Clone, Debug)]
struct Config {
    primary: HeaderName,
    fallbacks: Vec<HeaderName>,
    generator: Generator,
    trust_traceparent: bool,
    accept_trace_context: bool,
    deadlines: Option<IncomingDeadlines>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            primary: DEFAULT_HEADER,
            fallbacks: Vec::new(),
            generator: Generator::default(),
            trust_traceparent: false,
            accept_trace_context: true,
            deadlines: None,
        }
    }
}

impl CorrelationIdLayer {
    /// Reads and echoes `x-request-id`, mints UUID v4s, ignores `traceparent`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The primary header: read first, echoed, and written when an ID is minted.
    pub fn header(mut self, name: HeaderName) -> Self {
        Arc::make_mut(&mut self.config).primary = name;
        self
    }

    /// Also accepts an ID from `name`, tried after the primary header and the headers
    /// added before it; the first valid value wins.
    pub fn also_accept(mut self, name: HeaderName) -> Self {
        Arc::make_mut(&mut self.config).fallbacks.push(name);
        self
    }

    /// How IDs are minted (default: [`Generator::uuid_v4`]).
    pub fn generator(mut self, generator: Generator) -> Self {
        Arc::make_mut(&mut self.config).generator = generator;
        self
    }

    /// When no header holds a valid ID, use the trace-id of a valid W3C `traceparent`
    /// (version `00`) so correlation IDs line up with OpenTelemetry traces. Invalid
    /// `traceparent` values are ignored, and so is a request with more than one
    /// `traceparent` header, which W3C Trace Context makes invalid (even when the
    /// values agree): its ID is minted. Off by default.
    pub fn trust_traceparent(mut self, trust: bool) -> Self {
        Arc::make_mut(&mut self.config).trust_traceparent = trust;
        self
    }

    /// Takes each request's W3C trace context (a valid `traceparent` sent once, and
    /// its `tracestate`, as [`TraceContext::parse`] and [`TraceState::parse`] check
    /// them) into the request context and extensions, so that
    /// [`PropagateCorrelationIdLayer`](super::PropagateCorrelationIdLayer) continues the
    /// trace. On by default; an invalid `tracestate` is dropped, an invalid
    /// `traceparent` drops both.
    pub fn accept_trace_context(mut self, accept: bool) -> Self {
        Arc::make_mut(&mut self.config).accept_trace_context = accept;
        self
    }

    /// Takes each request's deadline as `deadlines` says, refuses requests that arrive
    /// with too little time left, and stops handlers at the deadline. Off unless set.
    ///
    /// ```
    /// use http::{Request, Response, StatusCode};
    /// use palisade::context;
    /// use palisade::correlation::{CorrelationIdLayer, IncomingDeadlines};
    /// use std::time::Duration;
    /// use tower::{BoxError, ServiceBuilder, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), BoxError> {
    /// let deadlines = IncomingDeadlines::builder()
    ///     .max(Duration::from_secs(10))
    ///     .default(Duration::from_secs(2))
    ///     .build()?;
    /// let server = ServiceBuilder::new()
    ///     .layer(CorrelationIdLayer::new().accept_deadlines(deadlines))
    ///     .service(service_fn(|_request: Request<()>| async {
    ///         let left = context::time_left().unwrap();
    ///         tokio::time::sleep(Duration::from_millis(500)).await;
    ///         Ok::<_, BoxError>(Response::new(format!("{}", left.as_millis())))
    ///     }));
    ///
    /// // The caller has 800 ms left.
    /// let request = Request::builder().header("x-request-timeout-ms", "800").body(())?;
    /// let response = server.clone().oneshot(request).await?;
    /// assert_eq!(response.body(), "800");
    ///
    /// // 300 ms is too little for this handler: it is stopped at the deadline.
    /// let request = Request::builder().header("x-request-timeout-ms", "300").body(())?;
    /// let response = server.oneshot(request).await?;
    /// assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    /// # Ok(())
    /// # }
    /// ```
    pub fn accept_deadlines(mut self, deadlines: IncomingDeadlines) -> Self {
        Arc::make_mut(&mut self.config).deadlines = Some(deadlines);
        self
    }
}

impl Config {
    /// The first valid ID in the accepted headers, and whether the primary header holds
    /// that ID and nothing else (the common case, which needs no rewrite).
    fn find_in_headers(&self, headers: &HeaderMap) -> (Option<(CorrelationId, &HeaderName)>, bool) {
        let mut primary = headers.get_all(&self.primary).iter();
        let first = primary
            .next()
            .and_then(|value| CorrelationId::from_header_value(value).ok());
        if let Some(id) = first {
            let sole = primary.next().is_none();
            return (Some((id, &self.primary)), sole);
        }
        let found = self.fallbacks.iter().find_map(|name| {
            let id = CorrelationId::from_header_value(headers.get(name)?).ok()?;
            Some((id, name))
        });
        (found, false)
    }

    fn trusted_trace_id(&self, headers: &HeaderMap) -> Option<CorrelationId> {
        if !self.trust_traceparent {
            return None;
        }
        let trace = trace_context_of(headers)?;
        CorrelationId::parse(trace.trace_id().to_string()).ok()
    }

    /// The request's context, but for its ID: trace, earlier attempts, deadline.
    fn context_of<B>(&self, request: &mut Request<B>) -> (RequestContext, Option<Duration>) {
        let headers = request.headers();
        let mut context =
            RequestContext::new().with_previous_attempts(read_previous_attempts(headers));
        let timeout = self
            .deadlines
            .as_ref()
            .and_then(|deadlines| deadlines.timeout_of(headers));
        if let Some(timeout) = timeout {
            context = context.with_timeout(timeout);
        }
        if self.accept_trace_context
            && let Some(trace) = trace_context_of(headers)
        {
            request.extensions_mut().insert(trace.clone());
            context = context.with_trace(trace);
        }
        (context, timeout)
    }

    /// Settles the request's ID, records it on the request, and names the header to
    /// echo it in.
    fn identify<B>(&self, request: &mut Request<B>) -> (CorrelationId, &HeaderName) {
        if let Some(id) = request.extensions().get::<CorrelationId>() {
            return (id.clone(), &self.primary);
        }
        let (found, settled) = self.find_in_headers(request.headers());
        let (id, header) = found.unwrap_or_else(|| {
            let id = self
                .trusted_trace_id(request.headers())
                .unwrap_or_else(|| self.generator.generate());
            (id, &self.primary)
        });
        // The primary header now holds exactly the settled ID: an invalid value in it, or
        // a second value after a valid one, must not reach the handler or be forwarded.
        if !settled {
            request
                .headers_mut()
                .insert(self.primary.clone(), id.header_value().clone());
        }
        request.extensions_mut().insert(id.clone());
        (id, header)
    }
}

impl<S> Layer<S> for CorrelationIdLayer {
    type Service = CorrelationIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CorrelationIdService {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// The service [`CorrelationIdLayer`] builds.
#[derive(Debug)]
pub struct CorrelationIdService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: Clone> Clone for CorrelationIdService<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: Arc::clone(&self.config),
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CorrelationIdService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let (id, header) = self.config.identify(&mut request);
        let (context, timeout) = self.config.context_of(&mut request);
        let grpc = is_grpc(request.headers());
        let echo_header = Some(header.clone());
        if let Some(timeout) = timeout
            && self
                .config
                .deadlines
                .as_ref()
                .is_some_and(|deadlines| deadlines.refuses(timeout))
        {
            return ResponseFuture {
                kind: Kind::Refused {
                    id: Some(id),
                    timeout,
                },
                grpc,
                echo_header,
            };
        }
        let span = RequestSpan::new(&id, &context, request.headers());
        let timer = context
            .deadline()
            .map(|deadline| Box::pin(sleep_until(deadline)));
        let mut scope = Some(Box::new(context.with_correlation_id(id)));
        let inner = &mut self.inner;
        let future = span.in_scope(|| in_scope(&mut scope, || inner.call(request)));
        ResponseFuture {
            kind: Kind::Running {
                inner: Scoped::new(scope, span.instrument(future)),
                timer,
            },
            grpc,
            echo_header,
        }
    }
}

/// The trace context of a valid `traceparent` sent once, with its `tracestate` if
/// that is valid. W3C Trace Context: a repeated `traceparent` is invalid and the trace
/// restarts, so neither value may be used.
fn trace_context_of(headers: &HeaderMap) -> Option<TraceContext> {
    let mut values = headers.get_all(TRACEPARENT).iter();
    let (Some(only), None) = (values.next(), values.next()) else {
        return None;
    };
    let trace = TraceContext::parse(only.as_bytes()).ok()?;
    let states = headers.get_all(TRACESTATE);
    if states.iter().next().is_none() {
        return Some(trace);
    }
    Some(
        match TraceState::parse(states.iter().map(|value| value.as_bytes())) {
            Ok(state) => trace.with_state(state),
            Err(_) => trace,
        },
    )
}

#[cfg(feature = "tracing")]
type Traced<F> = tracing::instrument::Instrumented<F>;
#[cfg(not(feature = "tracing"))]
type Traced<F> = F;

/// The span `correlation{correlation_id=... trace_id=...}` every event of the request is
/// logged in.
#[cfg(feature = "tracing")]
struct RequestSpan(tracing::Span);

#[cfg(feature = "tracing")]
impl RequestSpan {
    fn new(id: &CorrelationId, context: &RequestContext, _headers: &HeaderMap) -> Self {
        // One relaxed load when no subscriber was ever installed, instead of a callsite
        // check (and, if `tracing/log` is on, a `log` lookup) per request.
        if !tracing::dispatcher::has_been_set() {
            return Self(tracing::Span::none());
        }
        let span = tracing::error_span!(
            target: "palisade::correlation",
            "correlation",
            correlation_id = %id,
            trace_id = tracing::field::Empty,
        );
        if let Some(trace) = context.trace() {
            span.record("trace_id", tracing::field::display(trace.trace_id()));
        }
        #[cfg(feature = "opentelemetry")]
        if context.trace().is_some() {
            super::otel::set_parent(&span, _headers);
        }
        Self(span)
    }

    fn in_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        self.0.in_scope(f)
    }

    fn instrument<F>(self, future: F) -> Traced<F> {
        tracing::Instrument::instrument(future, self.0)
    }
}

/// Without `tracing`, nothing to do.
#[cfg(not(feature = "tracing"))]
struct RequestSpan;

#[cfg(not(feature = "tracing"))]
impl RequestSpan {
    fn new(_id: &CorrelationId, _context: &RequestContext, _headers: &HeaderMap) -> Self {
        Self
    }

    fn in_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        f()
    }

    fn instrument<F>(self, future: F) -> Traced<F> {
        future
    }
}

/// The response future of [`CorrelationIdService`]: runs the inner future in the
/// request context's scope until it finishes or the deadline passes, and echoes the ID
/// on the response.
#[pin_project]
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture<F> {
    #[pin]
    kind: Kind<F>,
    grpc: bool,
    echo_header: Option<HeaderName>,
}

// `Running` is the common case: boxing it to shrink the rare `Refused` would allocate
// on every request.
#[allow(clippy::large_enum_variant)]
#[pin_project(project = KindProjection)]
enum Kind<F> {
    Running {
        #[pin]
        inner: Scoped<Traced<F>>,
        /// The deadline, when there is one: out of line, so that a request without one
        /// neither carries nor moves a timer.
        timer: Option<Pin<Box<Sleep>>>,
    },
    /// Refused on arrival: too little time left.
    Refused {
        id: Option<CorrelationId>,
        timeout: Duration,
    },
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: Default,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let (mut response, id) = match this.kind.project() {
            KindProjection::Running { mut inner, timer } => {
                let response = match inner.as_mut().poll(cx) {
                    Poll::Ready(result) => result?,
                    Poll::Pending => {
                        let Some(timer) = timer.as_mut() else {
                            return Poll::Pending;
                        };
                        ready!(timer.as_mut().poll(cx));
                        // Nobody waits for the answer any more: stop the work.
                        inner.as_mut().cancel();
                        refusal(*this.grpc, &DeadlineExceeded::new(None).rejection())
                    }
                };
                let id = inner
                    .take_context()
                    .and_then(|mut context| context.take_correlation_id());
                (response, id)
            }
            KindProjection::Refused { id, timeout } => {
                let refused = DeadlineExceeded::new(Some(*timeout)).rejection();
                (refusal(*this.grpc, &refused), id.take())
            }
        };
        if let (Some(header), Some(id)) = (this.echo_header.take(), id) {
            response
                .headers_mut()
                .insert(header, id.into_header_value());
        }
        Poll::Ready(Ok(response))
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("echo_header", &self.echo_header)
            .finish_non_exhaustive()
    }
}
