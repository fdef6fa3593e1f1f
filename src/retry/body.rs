//! Keeping a request for another attempt: one trait, [`Duplicate`], with a
//! [`CloneRequest`] strategy for `Clone` requests and, for HTTP requests with streaming
//! bodies, [`ReplayBodies`].

/// How the retry layer keeps a request so that it can send it again.
///
/// The layer asks for the first attempt's request and a copy, then for each retry a
/// request made from the copy. A strategy may refuse a retry (a body too large to have
/// been kept): the caller then gets the last result.
pub trait Duplicate<Req> {
    /// The request handed to the inner service.
    type Request;
    /// What is kept between attempts.
    type Copy;

    /// The first attempt's request, and a copy for retries when `keep` is true (the
    /// policy may retry this request and more than one attempt is allowed).
    fn first(&self, request: Req, keep: bool) -> (Self::Request, Option<Self::Copy>);

    /// The request for attempt number `attempt` (2 for the first retry), or `None` when
    /// the copy cannot be replayed.
    fn again(&self, copy: &Self::Copy, attempt: u32) -> Option<Self::Request>;
}

/// Clones the request for every attempt. The default, for any `Clone` request.
#[derive(Debug, Clone, Copy, Default)]
pub struct CloneRequest;

impl<Req: Clone> Duplicate<Req> for CloneRequest {
    type Request = Req;
    type Copy = Req;

    #[inline]
    fn first(&self, request: Req, keep: bool) -> (Req, Option<Req>) {
        if keep {
            (request.clone(), Some(request))
        } else {
            (request, None)
        }
    }

    fn again(&self, copy: &Req, _attempt: u32) -> Option<Req> {
        Some(copy.clone())
    }
}

#[cfg(feature = "http")]
pub use self::replay::*;

#[cfg(feature = "http")]
mod replay {
    use super::Duplicate;
    use bytes::Bytes;
    use http::{HeaderMap, HeaderName, HeaderValue, Request, header};
    use http_body::{Body, Frame, SizeHint};
    use std::pin::Pin;
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::task::{Context, Poll};

    /// The default most bytes of a request body kept for a retry: 64 KiB.
    pub const DEFAULT_REPLAY_LIMIT: usize = 64 * 1024;

    /// Retries `http::Request<B>` with any streaming body (`B: http_body::Body<Data =
    /// Bytes>`: tonic's and hyper's bodies, `Full`, streams), without requiring
    /// `Clone`.
    ///
    /// The first attempt streams the body to the inner service while keeping a copy of
    /// each chunk, up to a limit ([`DEFAULT_REPLAY_LIMIT`] unless set). A retry replays
    /// the copy, then continues with whatever of the original the earlier attempt did
    /// not read. A body larger than the limit is sent once, in full, and the request is
    /// not retried: never rejected, never truncated. So is a body whose stream failed.
    ///
    /// On retries of gRPC requests (`content-type: application/grpc…`) it sets
    /// `grpc-previous-rpc-attempts`; it can also set an attempt-number header on every
    /// attempt of every request ([`attempt_header`](ReplayBodies::attempt_header)).
    #[derive(Debug, Clone)]
    pub struct ReplayBodies {
        limit: usize,
        attempt_header: Option<HeaderName>,
    }

    impl Default for ReplayBodies {
        fn default() -> Self {
            Self::new()
        }
    }

    impl ReplayBodies {
        /// Keeps up to [`DEFAULT_REPLAY_LIMIT`] bytes, sets no attempt header.
        pub fn new() -> Self {
            Self {
                limit: DEFAULT_REPLAY_LIMIT,
                attempt_header: None,
            }
        }

        /// Keeps up to `bytes` of each request body.
        pub fn limit(mut self, bytes: usize) -> Self {
            self.limit = bytes;
            self
        }

        /// Sets this header to the attempt number (1, 2, …) on every attempt.
        pub fn attempt_header(mut self, name: HeaderName) -> Self {
            self.attempt_header = Some(name);
            self
        }

        fn stamp(&self, headers: &mut HeaderMap, attempt: u32) {
            if let Some(name) = &self.attempt_header {
                headers.insert(name.clone(), HeaderValue::from(attempt));
            }
        }
    }

    /// A kept HTTP request: its head and the body's replay source.
    #[derive(Debug)]
    pub struct HttpCopy<B> {
        head: Request<()>,
        body: ReplayBody<B>,
    }

    impl<B> Duplicate<Request<B>> for ReplayBodies
    where
        B: Body<Data = Bytes>,
    {
        type Request = Request<ReplayBody<B>>;
        type Copy = HttpCopy<B>;

        fn first(&self, request: Request<B>, keep: bool) -> (Self::Request, Option<HttpCopy<B>>) {
            let (mut parts, body) = request.into_parts();
            self.stamp(&mut parts.headers, 1);
            let too_big = body.size_hint().lower() > self.limit as u64;
            if !keep || too_big {
                return (Request::from_parts(parts, ReplayBody::once(body)), None);
            }
            let (first, source) = ReplayBody::kept(body, self.limit);
            let mut head = Request::new(());
            *head.method_mut() = parts.method.clone();
            *head.uri_mut() = parts.uri.clone();
            *head.version_mut() = parts.version;
            *head.headers_mut() = parts.headers.clone();
            *head.extensions_mut() = parts.extensions.clone();
            let copy = HttpCopy { head, body: source };
            (Request::from_parts(parts, first), Some(copy))
        }

        fn again(&self, copy: &HttpCopy<B>, attempt: u32) -> Option<Self::Request> {
            let body = copy.body.replay()?;
            let head = &copy.head;
            let mut request = Request::new(body);
            *request.method_mut() = head.method().clone();
            *request.uri_mut() = head.uri().clone();
            *request.version_mut() = head.version();
            *request.headers_mut() = head.headers().clone();
            *request.extensions_mut() = head.extensions().clone();
            let headers = request.headers_mut();
            if is_grpc(headers) {
                headers.insert(
                    "grpc-previous-rpc-attempts",
                    HeaderValue::from(attempt.saturating_sub(1)),
                );
            }
            self.stamp(headers, attempt);
            Some(request)
        }
    }

    fn is_grpc(headers: &HeaderMap) -> bool {
        headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
    }

    /// The body the inner service receives from [`ReplayBodies`]: the original body, or
    /// a replay of it. Passes frames through unchanged.
    #[pin_project::pin_project]
    #[derive(Debug)]
    pub struct ReplayBody<B> {
        #[pin]
        kind: Kind<B>,
    }

    #[pin_project::pin_project(project = KindProj)]
    #[derive(Debug)]
    enum Kind<B> {
        /// Not kept: the original, streamed once.
        Once(#[pin] B),
        /// An empty body needs no copy.
        Empty,
        Kept(Replay<B>),
    }

    /// Everything one request's attempts share about its body.
    #[derive(Debug)]
    struct Store<B> {
        chunks: Vec<Bytes>,
        kept_bytes: usize,
        limit: usize,
        /// False once the body outgrew the limit or failed.
        replayable: bool,
        /// The original reached its end: the chunks (and trailers) are all of it.
        complete: bool,
        trailers: Option<HeaderMap>,
        /// The rest of the original while no attempt is reading it.
        rest: Option<Pin<Box<B>>>,
        size_hint: SizeHint,
    }

    /// One attempt's view of the shared store.
    #[derive(Debug)]
    struct Replay<B> {
        store: Arc<Mutex<Store<B>>>,
        /// Chunks this attempt has sent.
        sent: usize,
        trailers_sent: bool,
        /// The original, while this attempt is the one reading it.
        original: Option<Pin<Box<B>>>,
    }

    /// A stream error that is not the body's own: a retry reached the part of the body
    /// an earlier attempt is still holding.
    #[derive(Debug, thiserror::Error)]
    #[error("the rest of the request body is still held by an earlier attempt")]
    struct OriginalInUse;

    fn lock<B>(store: &Mutex<Store<B>>) -> MutexGuard<'_, Store<B>> {
        // Nothing in the store can be left half-updated by a panic elsewhere.
        store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    impl<B: Body<Data = Bytes>> ReplayBody<B> {
        fn once(body: B) -> Self {
            Self {
                kind: Kind::Once(body),
            }
        }

        /// The first attempt's body, and the source replays are made from.
        fn kept(body: B, limit: usize) -> (Self, Self) {
            if body.is_end_stream() {
                let empty = || Self { kind: Kind::Empty };
                return (empty(), empty());
            }
            let store = Arc::new(Mutex::new(Store {
                chunks: Vec::new(),
                kept_bytes: 0,
                limit,
                replayable: true,
                complete: false,
                trailers: None,
                rest: None,
                size_hint: body.size_hint(),
            }));
            let first = Replay {
                store: store.clone(),
                sent: 0,
                trailers_sent: false,
                original: Some(Box::pin(body)),
            };
            let source = Replay {
                store,
                sent: 0,
                trailers_sent: false,
                original: None,
            };
            let wrap = |replay| Self {
                kind: Kind::Kept(replay),
            };
            (wrap(first), wrap(source))
        }

        /// A fresh replay, or `None` when the body cannot be replayed.
        fn replay(&self) -> Option<Self> {
            let kind = match &self.kind {
                Kind::Once(_) => return None,
                Kind::Empty => Kind::Empty,
                Kind::Kept(source) => {
                    if !lock(&source.store).replayable {
                        return None;
                    }
                    Kind::Kept(Replay {
                        store: source.store.clone(),
                        sent: 0,
                        trailers_sent: false,
                        original: None,
                    })
                }
            };
            Some(Self { kind })
        }
    }

    impl<B> Replay<B>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<tower::BoxError>,
    {
        fn poll_frame(
            &mut self,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, tower::BoxError>>> {
            let mut store = lock(&self.store);
            if let Some(chunk) = store.chunks.get(self.sent) {
                self.sent += 1;
                return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
            }
            if store.complete {
                return Poll::Ready(match &store.trailers {
                    Some(trailers) if !self.trailers_sent => {
                        self.trailers_sent = true;
                        Some(Ok(Frame::trailers(trailers.clone())))
                    }
                    _ => None,
                });
            }
            if self.original.is_none() {
                self.original = store.rest.take();
            }
            drop(store);
            let Some(original) = self.original.as_mut() else {
                return Poll::Ready(Some(Err(OriginalInUse.into())));
            };
            let frame = std::task::ready!(original.as_mut().poll_frame(cx));
            let mut store = lock(&self.store);
            match &frame {
                None => store.complete = true,
                Some(Err(_)) => store.replayable = false,
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        keep(&mut store, data);
                        if store.replayable {
                            self.sent = store.chunks.len();
                        }
                    } else if let Some(trailers) = frame.trailers_ref() {
                        store.trailers = Some(trailers.clone());
                        self.trailers_sent = true;
                    }
                }
            }
            Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
        }

        fn is_end_stream(&self) -> bool {
            match &self.original {
                Some(original) => original.is_end_stream(),
                None => {
                    let store = lock(&self.store);
                    store.complete
                        && self.sent >= store.chunks.len()
                        && (self.trailers_sent || store.trailers.is_none())
                }
            }
        }

        fn size_hint(&self) -> SizeHint {
            match &self.original {
                Some(original) if self.sent == 0 => original.size_hint(),
                None if self.sent == 0 => lock(&self.store).size_hint,
                _ => SizeHint::default(),
            }
        }
    }

    /// Keeps a copy of `data` while the body fits the limit; past it, frees the copy.
    fn keep<B>(store: &mut Store<B>, data: &Bytes) {
        if !store.replayable {
            return;
        }
        if store.kept_bytes + data.len() > store.limit {
            store.replayable = false;
            store.chunks = Vec::new();
            return;
        }
        store.kept_bytes += data.len();
        store.chunks.push(data.clone());
    }

    impl<B> Drop for Replay<B> {
        fn drop(&mut self) {
            // Hand the unread rest of the original to the next attempt.
            if let Some(original) = self.original.take() {
                lock(&self.store).rest = Some(original);
            }
        }
    }

    impl<B> Body for ReplayBody<B>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<tower::BoxError>,
    {
        type Data = Bytes;
        type Error = tower::BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.project().kind.project() {
                KindProj::Once(body) => body
                    .poll_frame(cx)
                    .map(|frame| frame.map(|frame| frame.map_err(Into::into))),
                KindProj::Empty => Poll::Ready(None),
                KindProj::Kept(replay) => replay.poll_frame(cx),
            }
        }

        fn is_end_stream(&self) -> bool {
            match &self.kind {
                Kind::Once(body) => body.is_end_stream(),
                Kind::Empty => true,
                Kind::Kept(replay) => replay.is_end_stream(),
            }
        }

        fn size_hint(&self) -> SizeHint {
            match &self.kind {
                Kind::Once(body) => body.size_hint(),
                Kind::Empty => SizeHint::with_exact(0),
                Kind::Kept(replay) => replay.size_hint(),
            }
        }
    }
}
