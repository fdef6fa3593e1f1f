//! The client side: put the current ID on every outgoing request.

use super::server::DEFAULT_HEADER;
use super::{CorrelationId, Generator};
use http::Request;
use http::header::HeaderName;
use std::sync::Arc;
use std::task::{Context, Poll};
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
/// The response future is the inner service's own: the layer adds no work after `call`.
#[derive(Clone, Debug, Default)]
pub struct PropagateCorrelationIdLayer {
    config: Arc<Config>,
}

#[derive(Clone, Debug)]
struct Config {
    header: HeaderName,
    mint: Option<Generator>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            header: DEFAULT_HEADER,
            mint: None,
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
}

impl Config {
    fn id_for<B>(&self, request: &Request<B>) -> Option<CorrelationId> {
        request
            .extensions()
            .get::<CorrelationId>()
            .cloned()
            .or_else(CorrelationId::current)
            .or_else(|| self.mint.as_ref().map(Generator::generate))
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
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let header = &self.config.header;
        if !request.headers().contains_key(header)
            && let Some(id) = self.config.id_for(&request)
        {
            request
                .headers_mut()
                .insert(header.clone(), id.into_header_value());
        }
        self.inner.call(request)
    }
}
