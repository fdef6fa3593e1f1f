//! The client side: put the current request context on every outgoing request.

use super::server::DEFAULT_HEADER;
use super::{CorrelationId, Generator};
use crate::context::{
    DEFAULT_TIMEOUT_HEADER, DeadlineExceeded, RequestContext, TRACEPARENT, TRACESTATE,
    TraceContext, with_current, write_previous_attempts, write_timeout,
};
use http::Request;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use pin_project::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::BoxError;
use tower_layer::Layer;
use tower_service::Service;

/// Sets the correlation ID header on every outgoing `http::Request`: wrap a tonic
/// `Channel`, a hyper client or any tower HTTP client with it.
///
/// The ID is, in order: the header the caller already set (kept as is), the request's
/// own [`CorrelationId`] extension, [`CorrelationId::current`] (the request being
/// handled, set by [`CorrelationIdLayer`](super::CorrelationIdLayer)), or, only with
/// [`mint_when_absent`](Self::mint_when_absent), a new one. Otherwise the request goes
/// out without one.
///
/// The rest of the [request context](crate::context) goes along:
///
/// - the **deadline**: the time left, less a [margin](Self::deadline_margin) for the
///   network, as `grpc-timeout` on gRPC requests and as
///   [`x-request-timeout-ms`](Self::deadline_header) on the others (a shorter timeout
///   the request already carries is kept). With less than
///   [`min_time_left`](Self::min_time_left) to send (by default: nothing), the request
///   is not sent and the call fails at once with [`DeadlineExceeded`];
/// - the **trace context**: a `traceparent` with the same trace-id, a fresh parent-id
///   for every call, the sampled flag carried and other flags zeroed, and the
///   `tracestate` unchanged; none when no trace came in unless
///   [`start_trace_when_absent`](Self::start_trace_when_absent). A `traceparent` the
///   request already carries is kept. With the `opentelemetry` feature, the current
///   `tracing` span's OpenTelemetry context is injected instead, through
///   OpenTelemetry's own `TraceContextPropagator`, when it has one;
/// - the caller's **earlier attempts**, so that the hop below knows the request is
///   part of a retry (`grpc-previous-rpc-attempts` / `x-previous-attempts`).
///
/// The response future is the inner service's own, or an error at once.
#[derive(Clone, Debug, Default)]
#[must_use = "a layer or builder does nothing until it is used"]
pub struct PropagateCorrelationIdLayer {
    config: Arc<Config>,
}

#[derive(Clone, Debug)]
struct Config {
    header: HeaderName,
    mint: Option<Generator>,
    deadline_header: HeaderName,
    margin: Duration,
    min_time_left: Duration,
    start_trace: Option<bool>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            header: DEFAULT_HEADER,
            mint: None,
            deadline_header: DEFAULT_TIMEOUT_HEADER,
            margin: Duration::ZERO,
            min_time_left: Duration::ZERO,
            start_trace: None,
        }
    }
}

impl PropagateCorrelationIdLayer {
    /// Sends `x-request-id`; sends nothing when there is no ID.
    pub fn new() -> Self {
        Self::default()
    }

    /// The header to send the ID in.
    pub fn header(mut self, name: HeaderName) -> Self {
        Arc::make_mut(&mut self.config).header = name;
        self
    }

    /// Mints an ID with `generator` for requests made outside any correlation scope
    /// (background jobs, CLIs), instead of sending none.
    ///
    /// The ID is minted each time a request passes through this layer. Below a
    /// [`RetryLayer`](crate::retry::RetryLayer) that is once per attempt: every retry
    /// of a request mints its own ID, and the server sees unrelated requests. Put this
    /// layer above the retry layer (before it in a `ServiceBuilder`): it then mints once,
    /// the retry layer copies the header into every attempt, and all attempts share one
    /// ID. Inside a request's scope the order does not matter, since every attempt takes
    /// [`CorrelationId::current`] (or the request's extension).
    ///
    /// ```
    /// use http::{HeaderValue, Request, Response};
    /// use palisade::correlation::{Generator, PropagateCorrelationIdLayer};
    /// use palisade::retry::{Backoff, RetryLayer};
    /// use std::sync::{Arc, Mutex};
    /// use std::time::Duration;
    /// use tower::{BoxError, ServiceBuilder, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), BoxError> {
    /// // Fails twice, then answers; notes the ID each attempt carried.
    /// let sent: Arc<Mutex<Vec<Option<HeaderValue>>>> = Arc::default();
    /// let log = Arc::clone(&sent);
    /// let upstream = service_fn(move |request: Request<()>| {
    ///     let log = Arc::clone(&log);
    ///     async move {
    ///         let mut log = log.lock().unwrap();
    ///         log.push(request.headers().get("x-request-id").cloned());
    ///         if log.len() < 3 {
    ///             return Err::<Response<()>, BoxError>("connection reset".into());
    ///         }
    ///         Ok(Response::new(()))
    ///     }
    /// });
    ///
    /// let retry = RetryLayer::builder()
    ///     .max_attempts(3)
    ///     .backoff(Backoff::constant(Duration::ZERO))
    ///     .build()?;
    /// let client = ServiceBuilder::new()
    ///     .layer(PropagateCorrelationIdLayer::new().mint_when_absent(Generator::uuid_v7()))
    ///     .layer(retry) // below the minting layer: one ID for every attempt
    ///     .service(upstream);
    /// client.oneshot(Request::new(())).await?;
    ///
    /// let sent = sent.lock().unwrap();
    /// assert_eq!(sent.len(), 3);
    /// assert!(sent[0].is_some());
    /// assert!(sent.iter().all(|id| *id == sent[0]));
    /// # Ok(())
    /// # }
    /// ```
    pub fn mint_when_absent(mut self, generator: Generator) -> Self {
        Arc::make_mut(&mut self.config).mint = Some(generator);
        self
    }

    /// The HTTP header the time left is sent in, in whole milliseconds
    /// (`x-request-timeout-ms` unless set; gRPC requests use `grpc-timeout`).
    pub fn deadline_header(mut self, name: HeaderName) -> Self {
        Arc::make_mut(&mut self.config).deadline_header = name;
        self
    }

    /// Sends the time left less `margin`, the time the request and its answer spend on
    /// the network, so that the callee gives up while the caller still waits for its
    /// answer. Zero unless set.
    pub fn deadline_margin(mut self, margin: Duration) -> Self {
        Arc::make_mut(&mut self.config).margin = margin;
        self
    }

    /// Does not send a request with less than this left (after the margin): it fails
    /// at once with [`DeadlineExceeded`]. By default only a request with nothing left
    /// is refused.
    ///
    /// ```
    /// use http::{Request, Response};
    /// use palisade::context::{DeadlineExceeded, RequestContext};
    /// use palisade::correlation::PropagateCorrelationIdLayer;
    /// use std::time::Duration;
    /// use tower::{BoxError, ServiceBuilder, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let client = ServiceBuilder::new()
    ///     .layer(
    ///         PropagateCorrelationIdLayer::new()
    ///             .deadline_margin(Duration::from_millis(5))
    ///             .min_time_left(Duration::from_millis(10)),
    ///     )
    ///     .service(service_fn(|request: Request<()>| async move {
    ///         let sent = request.headers()["x-request-timeout-ms"].clone();
    ///         Ok::<_, BoxError>(Response::new(sent))
    ///     }));
    ///
    /// let call = |left| {
    ///     let client = client.clone();
    ///     RequestContext::new()
    ///         .with_timeout(Duration::from_millis(left))
    ///         .scope(async move { client.oneshot(Request::new(())).await })
    /// };
    /// assert_eq!(call(100).await.unwrap().body(), "95");
    /// let refused = call(14).await.unwrap_err();
    /// assert!(refused.is::<DeadlineExceeded>());
    /// # }
    /// ```
    pub fn min_time_left(mut self, min: Duration) -> Self {
        Arc::make_mut(&mut self.config).min_time_left = min;
        self
    }

    /// Starts a new trace (random trace-id, `sampled` or not) for a request made
    /// without a trace context, instead of sending no `traceparent`.
    pub fn start_trace_when_absent(mut self, sampled: bool) -> Self {
        Arc::make_mut(&mut self.config).start_trace = Some(sampled);
        self
    }
}

impl Config {
    fn id_for<B>(
        &self,
        request: &Request<B>,
        context: Option<&RequestContext>,
    ) -> Option<CorrelationId> {
        request
            .extensions()
            .get::<CorrelationId>()
            .or_else(|| context?.correlation_id())
            .cloned()
            .or_else(|| self.mint.as_ref().map(Generator::generate))
    }

    /// Writes the context onto the request, or says why it must not be sent.
    fn stamp<B>(
        &self,
        request: &mut Request<B>,
        context: Option<&RequestContext>,
    ) -> Result<(), DeadlineExceeded> {
        if !request.headers().contains_key(&self.header)
            && let Some(id) = self.id_for(request, context)
        {
            let value = id.into_header_value();
            request.headers_mut().insert(self.header.clone(), value);
        }
        let headers = request.headers_mut();
        if let Some(left) = context.and_then(RequestContext::time_left) {
            let send = left.saturating_sub(self.margin);
            if send.is_zero() || send < self.min_time_left {
                return Err(DeadlineExceeded::new(None));
            }
            write_timeout(headers, &self.deadline_header, send);
        }
        if let Some(context) = context {
            write_previous_attempts(headers, context.previous_attempts());
        }
        if !headers.contains_key(TRACEPARENT) {
            self.send_trace(headers, context.and_then(RequestContext::trace));
        }
        Ok(())
    }

    fn send_trace(&self, headers: &mut HeaderMap, incoming: Option<&TraceContext>) {
        #[cfg(feature = "opentelemetry")]
        if super::otel::inject_current_span(headers) {
            return;
        }
        let root;
        let incoming = match (incoming, self.start_trace) {
            (Some(incoming), _) => incoming,
            (None, Some(sampled)) => {
                root = TraceContext::new_root(sampled);
                &root
            }
            (None, None) => return,
        };
        // Hex-encoded into a fixed buffer: no `fmt`, and no clone of the context.
        if let Ok(value) = HeaderValue::from_bytes(&incoming.child_traceparent()) {
            headers.insert(TRACEPARENT, value);
        }
        if let Some(state) = incoming.state()
            && let Ok(value) = HeaderValue::try_from(state.as_str())
        {
            headers.insert(TRACESTATE, value);
        }
    }
}

impl<S> Layer<S> for PropagateCorrelationIdLayer {
    type Service = PropagateCorrelationIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PropagateCorrelationIdService {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// The service [`PropagateCorrelationIdLayer`] builds.
#[derive(Debug)]
pub struct PropagateCorrelationIdService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: Clone> Clone for PropagateCorrelationIdService<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: Arc::clone(&self.config),
        }
    }
}

impl<S, B> Service<Request<B>> for PropagateCorrelationIdService<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = PropagateFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let stamped = with_current(|context| self.config.stamp(&mut request, context));
        match stamped {
            Ok(()) => PropagateFuture {
                kind: PropagateKind::Sent {
                    future: self.inner.call(request),
                },
            },
            Err(refused) => PropagateFuture {
                kind: PropagateKind::Refused {
                    error: Some(refused),
                },
            },
        }
    }
}

/// The response future of [`PropagateCorrelationIdService`]: the inner service's, or
/// [`DeadlineExceeded`] at once when too little time was left to send the request.
#[pin_project]
#[must_use = "futures do nothing unless polled"]
pub struct PropagateFuture<F> {
    #[pin]
    kind: PropagateKind<F>,
}

#[pin_project(project = PropagateKindProjection)]
enum PropagateKind<F> {
    Sent {
        #[pin]
        future: F,
    },
    Refused {
        error: Option<DeadlineExceeded>,
    },
}

impl<F, T, E> Future for PropagateFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            PropagateKindProjection::Sent { future } => future.poll(cx).map_err(Into::into),
            PropagateKindProjection::Refused { error } => Poll::Ready(Err(error
                .take()
                .expect("PropagateFuture polled after completion")
                .into())),
        }
    }
}

impl<F> fmt::Debug for PropagateFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PropagateFuture").finish_non_exhaustive()
    }
}
