//! The server side: accept or mint an ID, echo it, scope the handler in it.

use super::{CorrelationId, Generator, IncomingDeadlines};
use crate::context::{
    DeadlineExceeded, GRPC_PREVIOUS_ATTEMPTS, GRPC_TIMEOUT, HTTP_PREVIOUS_ATTEMPTS, RequestContext,
    Scoped, TRACEPARENT, TRACESTATE, TraceContext, TraceState, enter, is_grpc_content_type,
    parse_previous_attempts, parse_timeout, refusal,
};
use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
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
    /// Settles the request's ID and reads the rest of its context, records the ID (and
    /// the trace context) on the request, and names the header to echo the ID in.
    fn identify<B>(&self, request: &mut Request<B>) -> Identified<'_> {
        let headers = request.headers();
        let seen = Seen::read(self, headers);
        let outer = request.extensions().get::<CorrelationId>().cloned();
        let had_id = outer.is_some();
        let trace = seen.trace_context(headers);
        // The primary header holds the settled ID and nothing else (the common case)
        // unless it is rewritten below.
        let (id, header, settled) = match outer {
            // An outer layer settled it: the request is left as it is.
            Some(id) => (id, &self.primary, true),
            None => match self.find_in_headers(&seen, headers) {
                Some(found) => found,
                None => {
                    let trusted = trace.as_ref().filter(|_| self.trust_traceparent);
                    let id = trusted
                        .and_then(|trace| CorrelationId::parse(trace.trace_id().to_string()).ok())
                        .unwrap_or_else(|| self.generator.generate());
                    (id, &self.primary, false)
                }
            },
        };
        let grpc = is_grpc_content_type(seen.content_type);
        let attempts = if grpc {
            seen.grpc_attempts
        } else {
            seen.http_attempts
        };
        let mut context =
            RequestContext::new().with_previous_attempts(parse_previous_attempts(attempts));
        let timeout = self.deadlines.as_ref().and_then(|deadlines| {
            let sent = if grpc {
                seen.grpc_timeout
            } else {
                seen.http_timeout
            };
            deadlines.timeout(parse_timeout(grpc, sent))
        });
        if let Some(timeout) = timeout {
            context = context.with_timeout(timeout);
        }
        // The primary header now holds exactly the settled ID: an invalid value in it, or
        // a second value after a valid one, must not reach the handler or be forwarded.
        if !settled {
            request
                .headers_mut()
                .insert(self.primary.clone(), id.header_value().clone());
        }
        let extensions = request.extensions_mut();
        if !had_id {
            extensions.insert(id.clone());
        }
        if let Some(trace) = trace.filter(|_| self.accept_trace_context) {
            extensions.insert(trace.clone());
            context = context.with_trace(trace);
        }
        Identified {
            id,
            header,
            context,
            timeout,
            grpc,
        }
    }

    /// The first valid ID in the accepted headers, the header it came in, and whether
    /// the primary header holds that ID and nothing else (no rewrite needed).
    fn find_in_headers<'a>(
        &'a self,
        seen: &Seen<'_>,
        headers: &HeaderMap,
    ) -> Option<(CorrelationId, &'a HeaderName, bool)> {
        if let (Some(first), repeated) = seen.primary
            && let Ok(id) = CorrelationId::from_header_value(first)
        {
            return Some((id, &self.primary, !repeated));
        }
        self.fallbacks.iter().find_map(|name| {
            let id = CorrelationId::from_header_value(headers.get(name)?).ok()?;
            Some((id, name, false))
        })
    }
}

/// What [`Config::identify`] settled.
struct Identified<'a> {
    id: CorrelationId,
    /// Where to echo the ID.
    header: &'a HeaderName,
    /// The request's context, but for its ID.
    context: RequestContext,
    timeout: Option<Duration>,
    grpc: bool,
}

/// The headers the server reads, each as its first value and whether it came more than
/// once, found in one pass over the request's headers instead of a hashed lookup each:
/// hashing a name walks its every byte, where comparing it with a constant name mostly
/// stops at its kind (standard or not) or its length.
#[derive(Default)]
struct Seen<'a> {
    primary: (Option<&'a HeaderValue>, bool),
    traceparent: (Option<&'a HeaderValue>, bool),
    tracestate: bool,
    content_type: Option<&'a HeaderValue>,
    http_attempts: Option<&'a HeaderValue>,
    grpc_attempts: Option<&'a HeaderValue>,
    http_timeout: Option<&'a HeaderValue>,
    grpc_timeout: Option<&'a HeaderValue>,
}

impl<'a> Seen<'a> {
    fn read(config: &Config, headers: &'a HeaderMap) -> Self {
        let mut seen = Seen::default();
        let timeout_header = config.deadlines.as_ref().map(IncomingDeadlines::header);
        for (name, value) in headers {
            if name == config.primary {
                note(&mut seen.primary, value);
            }
            if name == TRACEPARENT {
                note(&mut seen.traceparent, value);
            } else if name == TRACESTATE {
                seen.tracestate = true;
            } else if name == CONTENT_TYPE {
                seen.content_type.get_or_insert(value);
            } else if name == HTTP_PREVIOUS_ATTEMPTS {
                seen.http_attempts.get_or_insert(value);
            } else if name == GRPC_PREVIOUS_ATTEMPTS {
                seen.grpc_attempts.get_or_insert(value);
            } else if timeout_header.is_some() && name == GRPC_TIMEOUT {
                seen.grpc_timeout.get_or_insert(value);
            }
            if timeout_header == Some(name) {
                seen.http_timeout.get_or_insert(value);
            }
        }
        seen
    }

    /// The trace context of a valid `traceparent` sent once, with its `tracestate` if
    /// that is valid. W3C Trace Context: a repeated `traceparent` is invalid and the
    /// trace restarts, so neither value may be used.
    fn trace_context(&self, headers: &HeaderMap) -> Option<TraceContext> {
        let (Some(only), false) = self.traceparent else {
            return None;
        };
        let trace = TraceContext::parse(only.as_bytes()).ok()?;
        if !self.tracestate {
            return Some(trace);
        }
        let states = headers.get_all(TRACESTATE);
        Some(
            match TraceState::parse(states.iter().map(|value| value.as_bytes())) {
                Ok(state) => trace.with_state(state),
                Err(_) => trace,
            },
        )
    }
}

/// Keeps the first value of a header, and notes a second one.
fn note<'a>(slot: &mut (Option<&'a HeaderValue>, bool), value: &'a HeaderValue) {
    match slot.0 {
        None => slot.0 = Some(value),
        Some(_) => slot.1 = true,
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
        let Identified {
            id,
            header,
            context,
            timeout,
            grpc,
        } = self.config.identify(&mut request);
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
        // The inner `call` runs in the span and the context, like every poll after it;
        // the guards leave them in the reverse order.
        let future = {
            let _in_span = span.enter();
            let _in_context = enter(&mut scope);
            self.inner.call(request)
        };
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

#[cfg(feature = "tracing")]
#[pin_project(project = TracedProjection)]
enum Traced<F> {
    /// No subscriber listens: nothing to enter on each poll and on drop.
    Plain(#[pin] F),
    Spanned(#[pin] tracing::instrument::Instrumented<F>),
}

#[cfg(feature = "tracing")]
impl<F: Future> Future for Traced<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project() {
            TracedProjection::Plain(future) => future.poll(cx),
            TracedProjection::Spanned(future) => future.poll(cx),
        }
    }
}

#[cfg(not(feature = "tracing"))]
type Traced<F> = F;

/// The span `correlation{correlation_id=... trace_id=...}` every event of the request is
/// logged in.
///
/// `None` when no subscriber wants it: a disabled `tracing::Span` still costs its drop
/// (and, with `tracing/log` on, a `log` lookup), so none is made.
#[cfg(feature = "tracing")]
struct RequestSpan(Option<tracing::Span>);

#[cfg(feature = "tracing")]
impl RequestSpan {
    fn new(id: &CorrelationId, context: &RequestContext, _headers: &HeaderMap) -> Self {
        // One relaxed load when no subscriber was ever installed, instead of a callsite
        // check (and, if `tracing/log` is on, a `log` lookup) per request.
        if !tracing::dispatcher::has_been_set() {
            return Self(None);
        }
        let span = tracing::error_span!(
            target: "palisade::correlation",
            "correlation",
            correlation_id = %id,
            trace_id = tracing::field::Empty,
        );
        if span.is_disabled() {
            return Self(None);
        }
        if let Some(trace) = context.trace() {
            span.record("trace_id", tracing::field::display(trace.trace_id()));
        }
        #[cfg(feature = "opentelemetry")]
        if context.trace().is_some() {
            super::otel::set_parent(&span, _headers);
        }
        Self(Some(span))
    }

    fn enter(&self) -> Option<tracing::span::Entered<'_>> {
        self.0.as_ref().map(tracing::Span::enter)
    }

    fn instrument<F>(self, future: F) -> Traced<F> {
        match self.0 {
            Some(span) => Traced::Spanned(tracing::Instrument::instrument(future, span)),
            None => Traced::Plain(future),
        }
    }
}

/// Without `tracing`, nothing to do.
#[cfg(not(feature = "tracing"))]
struct RequestSpan;

/// What entering no span gives.
#[cfg(not(feature = "tracing"))]
struct NoSpan;

#[cfg(not(feature = "tracing"))]
impl RequestSpan {
    fn new(_id: &CorrelationId, _context: &RequestContext, _headers: &HeaderMap) -> Self {
        Self
    }

    fn enter(&self) -> NoSpan {
        NoSpan
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
                let id = inner.take_correlation_id();
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
