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

    #[inline(always)]
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
    use crate::sync::Mutex;
    use crate::sync::lock;
    use bytes::Bytes;
    use http::{HeaderMap, HeaderName, HeaderValue, Request};
    use http_body::{Body, Frame, SizeHint};
    use std::pin::Pin;
    use std::sync::{Arc, OnceLock};
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
        body: Source<B>,
    }

    impl<B> Duplicate<Request<B>> for ReplayBodies
    where
        B: Body<Data = Bytes>,
    {
        type Request = Request<ReplayBody<B>>;
        type Copy = HttpCopy<B>;

        #[inline(always)]
        fn first(
            &self,
            mut request: Request<B>,
            keep: bool,
        ) -> (Self::Request, Option<HttpCopy<B>>) {
            self.stamp(request.headers_mut(), 1);
            let too_big = request.body().size_hint().lower() > self.limit as u64;
            if !keep || too_big {
                return (request.map(ReplayBody::once), None);
            }
            let head = with_head(&request, ());
            let mut source = Source::Empty;
            let request = request.map(|body| {
                let (first, kept) = ReplayBody::kept(body, self.limit);
                source = kept;
                first
            });
            (request, Some(HttpCopy { head, body: source }))
        }

        fn again(&self, copy: &HttpCopy<B>, attempt: u32) -> Option<Self::Request> {
            let mut request = with_head(&copy.head, copy.body.replay()?);
            let headers = request.headers_mut();
            // Carried onward, so that the hops below know this is a retry (see
            // `RetryLayerBuilder::defer_to_retrying_caller`).
            let earlier = attempt
                .saturating_sub(1)
                .max(crate::context::previous_attempts());
            crate::context::write_previous_attempts(headers, earlier);
            self.stamp(headers, attempt);
            Some(request)
        }
    }

    /// A request with `body` and a copy of the head of `like`.
    fn with_head<T, U>(like: &Request<U>, body: T) -> Request<T> {
        let mut request = Request::new(body);
        *request.method_mut() = like.method().clone();
        *request.uri_mut() = like.uri().clone();
        *request.version_mut() = like.version();
        *request.headers_mut() = like.headers().clone();
        *request.extensions_mut() = like.extensions().clone();
        request
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
        /// This attempt reads the original, keeping a copy as it goes.
        Reading(Reader<B>),
        /// This attempt replays the copy: the whole body once the original was read to
        /// its end, else the part kept before the rest it then reads.
        Replaying(Replayer<B>),
    }

    /// What the kept request holds of its body.
    #[derive(Debug)]
    enum Source<B> {
        Empty,
        Kept(Arc<Recording<B>>),
    }

    /// What one request's attempts share about its body.
    ///
    /// Only one attempt at a time reads the original, and it keeps its copy to itself
    /// while it streams: nothing is shared per frame. It publishes once, when the
    /// original ends (the complete copy) or when the body turns out not to be
    /// replayable; an attempt that stops reading before either hands over the rest.
    #[derive(Debug)]
    struct Recording<B> {
        limit: usize,
        size_hint: SizeHint,
        ended: OnceLock<Ended>,
        /// The unread rest of the original, handed over by an attempt that stopped
        /// reading it mid-stream (the response came first, or the attempt was
        /// cancelled). Locked only on that hand-over, never per frame.
        rest: Mutex<Option<Rest<B>>>,
    }

    #[derive(Debug)]
    enum Ended {
        /// The original reached its end within the limit: this is all of it.
        Complete {
            chunks: Chunks,
            trailers: Option<HeaderMap>,
        },
        /// The body outgrew the limit or failed.
        NotReplayable,
    }

    #[derive(Debug)]
    struct Rest<B> {
        chunks: Chunks,
        kept_bytes: usize,
        original: Pin<Box<B>>,
    }

    /// An attempt reading the original. It first sends what earlier attempts kept.
    #[derive(Debug)]
    struct Reader<B> {
        store: Arc<Recording<B>>,
        /// `None` once the original has ended.
        original: Option<Pin<Box<B>>>,
        chunks: Chunks,
        kept_bytes: usize,
        /// Chunks of `chunks` this attempt has sent.
        sent: usize,
        trailers: Option<HeaderMap>,
        /// False once the body outgrew the limit or failed (and that was published).
        replayable: bool,
    }

    /// An attempt replaying the complete copy (or about to take over the rest).
    #[derive(Debug)]
    struct Replayer<B> {
        store: Arc<Recording<B>>,
        sent: usize,
        trailers_sent: bool,
    }

    /// The kept chunks: one without allocating (most bodies are a single frame), any
    /// number in a `Vec`.
    #[derive(Debug, Default)]
    enum Chunks {
        #[default]
        None,
        One(Bytes),
        Many(Vec<Bytes>),
    }

    impl Chunks {
        fn get(&self, index: usize) -> Option<&Bytes> {
            match self {
                Chunks::None => None,
                Chunks::One(chunk) => (index == 0).then_some(chunk),
                Chunks::Many(chunks) => chunks.get(index),
            }
        }

        fn len(&self) -> usize {
            match self {
                Chunks::None => 0,
                Chunks::One(_) => 1,
                Chunks::Many(chunks) => chunks.len(),
            }
        }

        fn push(&mut self, chunk: Bytes) {
            *self = match std::mem::take(self) {
                Chunks::None => Chunks::One(chunk),
                Chunks::One(first) => Chunks::Many(vec![first, chunk]),
                Chunks::Many(mut chunks) => {
                    chunks.push(chunk);
                    Chunks::Many(chunks)
                }
            };
        }
    }

    /// A stream error that is not the body's own: a retry reached the part of the body
    /// an earlier attempt is still holding (or outgrew the limit while holding).
    #[derive(Debug, thiserror::Error)]
    #[error("the rest of the request body is still held by an earlier attempt")]
    struct OriginalInUse;

    impl<B: Body<Data = Bytes>> ReplayBody<B> {
        fn once(body: B) -> Self {
            Self {
                kind: Kind::Once(body),
            }
        }

        /// The first attempt's body, and the source replays are made from.
        fn kept(body: B, limit: usize) -> (Self, Source<B>) {
            if body.is_end_stream() {
                return (Self { kind: Kind::Empty }, Source::Empty);
            }
            let store = Arc::new(Recording {
                limit,
                size_hint: body.size_hint(),
                ended: OnceLock::new(),
                rest: Mutex::new(None),
            });
            let first = Reader {
                store: store.clone(),
                original: Some(Box::pin(body)),
                chunks: Chunks::None,
                kept_bytes: 0,
                sent: 0,
                trailers: None,
                replayable: true,
            };
            (
                Self {
                    kind: Kind::Reading(first),
                },
                Source::Kept(store),
            )
        }
    }

    impl<B> Source<B> {
        /// A fresh replay, or `None` when the body cannot be replayed.
        fn replay(&self) -> Option<ReplayBody<B>> {
            let kind = match self {
                Source::Empty => Kind::Empty,
                Source::Kept(store) => {
                    if matches!(store.ended.get(), Some(Ended::NotReplayable)) {
                        return None;
                    }
                    Kind::Replaying(Replayer {
                        store: store.clone(),
                        sent: 0,
                        trailers_sent: false,
                    })
                }
            };
            Some(ReplayBody { kind })
        }
    }

    type PolledFrame = Poll<Option<Result<Frame<Bytes>, tower::BoxError>>>;

    impl<B> Reader<B>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<tower::BoxError>,
    {
        fn taking_over(store: Arc<Recording<B>>, rest: Rest<B>) -> Self {
            Self {
                store,
                original: Some(rest.original),
                chunks: rest.chunks,
                kept_bytes: rest.kept_bytes,
                sent: 0,
                trailers: None,
                replayable: true,
            }
        }

        fn poll_frame(&mut self, cx: &mut Context<'_>) -> PolledFrame {
            if let Some(chunk) = self.chunks.get(self.sent) {
                self.sent += 1;
                return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
            }
            let Some(original) = self.original.as_mut() else {
                return Poll::Ready(None);
            };
            let frame = std::task::ready!(original.as_mut().poll_frame(cx));
            match &frame {
                None => {
                    self.original = None;
                    if self.replayable {
                        self.sent = 0;
                        let complete = Ended::Complete {
                            chunks: std::mem::take(&mut self.chunks),
                            trailers: self.trailers.take(),
                        };
                        self.publish(complete);
                    }
                }
                Some(Err(_)) => self.give_up(),
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.keep(data);
                    } else if let Some(trailers) = frame.trailers_ref()
                        && self.replayable
                    {
                        self.trailers = Some(trailers.clone());
                    }
                }
            }
            Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
        }

        /// Keeps a copy of `data` while the body fits the limit.
        fn keep(&mut self, data: &Bytes) {
            if !self.replayable {
                return;
            }
            if self.kept_bytes + data.len() > self.store.limit {
                self.give_up();
                return;
            }
            self.kept_bytes += data.len();
            self.chunks.push(data.clone());
            self.sent = self.chunks.len();
        }

        /// The body cannot be replayed: free the copy and tell the other attempts.
        fn give_up(&mut self) {
            if self.replayable {
                self.replayable = false;
                self.chunks = Chunks::None;
                self.sent = 0;
                self.publish(Ended::NotReplayable);
            }
        }

        fn publish(&self, ended: Ended) {
            // Only the attempt holding the original publishes, once: it cannot be set.
            let _ = self.store.ended.set(ended);
        }

        fn is_end_stream(&self) -> bool {
            self.sent >= self.chunks.len()
                && self
                    .original
                    .as_ref()
                    .is_none_or(|original| original.is_end_stream())
        }

        fn size_hint(&self) -> SizeHint {
            match &self.original {
                Some(original) if self.sent == 0 && self.chunks.len() == 0 => original.size_hint(),
                _ if self.sent == 0 => self.store.size_hint,
                _ => SizeHint::default(),
            }
        }
    }

    impl<B> Drop for Reader<B> {
        fn drop(&mut self) {
            // Hand the unread rest of the original to the next attempt, if there can
            // be one: the kept request holds the only other reference to the store.
            if !self.replayable || Arc::strong_count(&self.store) == 1 {
                return;
            }
            if let Some(original) = self.original.take() {
                *lock(&self.store.rest) = Some(Rest {
                    chunks: std::mem::take(&mut self.chunks),
                    kept_bytes: self.kept_bytes,
                    original,
                });
            }
        }
    }

    impl<B> Replayer<B> {
        /// Serves the copy once it is published: the complete body, or an error if it
        /// turned out not to be replayable after this retry was decided.
        fn poll_published(&mut self) -> Option<PolledFrame> {
            let (chunks, trailers) = match self.store.ended.get()? {
                Ended::Complete { chunks, trailers } => (chunks, trailers),
                Ended::NotReplayable => return Some(Poll::Ready(Some(Err(OriginalInUse.into())))),
            };
            if let Some(chunk) = chunks.get(self.sent) {
                self.sent += 1;
                return Some(Poll::Ready(Some(Ok(Frame::data(chunk.clone())))));
            }
            Some(Poll::Ready(match trailers {
                Some(trailers) if !self.trailers_sent => {
                    self.trailers_sent = true;
                    Some(Ok(Frame::trailers(trailers.clone())))
                }
                _ => None,
            }))
        }

        /// The rest of the original, if an earlier attempt handed it over.
        fn take_over(&self) -> Option<Rest<B>> {
            lock(&self.store.rest).take()
        }

        fn is_end_stream(&self) -> bool {
            match self.store.ended.get() {
                Some(Ended::Complete { chunks, trailers }) => {
                    self.sent >= chunks.len() && (self.trailers_sent || trailers.is_none())
                }
                _ => false,
            }
        }

        fn size_hint(&self) -> SizeHint {
            if self.sent == 0 {
                self.store.size_hint
            } else {
                SizeHint::default()
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
            let mut kind = self.project().kind;
            let mut reader = match kind.as_mut().project() {
                KindProj::Once(body) => {
                    return body
                        .poll_frame(cx)
                        .map(|frame| frame.map(|frame| frame.map_err(Into::into)));
                }
                KindProj::Empty => return Poll::Ready(None),
                KindProj::Reading(reader) => return reader.poll_frame(cx),
                KindProj::Replaying(replayer) => {
                    if let Some(frame) = replayer.poll_published() {
                        return frame;
                    }
                    match replayer.take_over() {
                        Some(rest) => Reader::taking_over(replayer.store.clone(), rest),
                        // The attempt holding the original may have reached its end
                        // between the two looks: it publishes before it lets go.
                        None => {
                            return replayer
                                .poll_published()
                                .unwrap_or_else(|| Poll::Ready(Some(Err(OriginalInUse.into()))));
                        }
                    }
                }
            };
            let frame = reader.poll_frame(cx);
            kind.set(Kind::Reading(reader));
            frame
        }

        fn is_end_stream(&self) -> bool {
            match &self.kind {
                Kind::Once(body) => body.is_end_stream(),
                Kind::Empty => true,
                Kind::Reading(reader) => reader.is_end_stream(),
                Kind::Replaying(replayer) => replayer.is_end_stream(),
            }
        }

        fn size_hint(&self) -> SizeHint {
            match &self.kind {
                Kind::Once(body) => body.size_hint(),
                Kind::Empty => SizeHint::with_exact(0),
                Kind::Reading(reader) => reader.size_hint(),
                Kind::Replaying(replayer) => replayer.size_hint(),
            }
        }
    }
}

#[cfg(all(test, not(loom), feature = "http"))]
mod tests {
    use super::{Duplicate, HttpCopy, ReplayBodies, ReplayBody};
    use bytes::Bytes;
    use futures_util::FutureExt;
    use http::{HeaderMap, Request};
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use std::convert::Infallible;

    type Stream = StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>,
    >;

    /// A streaming body of `chunks` (each its own frame), then `trailers` if any.
    fn streaming(chunks: &[&'static str], trailers: Option<HeaderMap>) -> Stream {
        let mut frames: Vec<_> = chunks
            .iter()
            .map(|chunk| Ok(Frame::data(Bytes::from_static(chunk.as_bytes()))))
            .collect();
        frames.extend(trailers.map(|trailers| Ok(Frame::trailers(trailers))));
        StreamBody::new(futures_util::stream::iter(frames))
    }

    fn trailers() -> HeaderMap {
        let mut trailers = HeaderMap::new();
        trailers.insert("checksum", "abc".parse().expect("value"));
        trailers
    }

    fn first(replay: &ReplayBodies, body: Stream) -> (ReplayBody<Stream>, HttpCopy<Stream>) {
        let (request, copy) = replay.first(Request::new(body), true);
        (request.into_body(), copy.expect("kept"))
    }

    fn again(replay: &ReplayBodies, copy: &HttpCopy<Stream>) -> Option<ReplayBody<Stream>> {
        replay.again(copy, 2).map(Request::into_body)
    }

    /// Reads the body to its end: the data, and the trailers if any.
    fn read(body: ReplayBody<Stream>) -> (Bytes, Option<HeaderMap>) {
        let collected = body
            .collect()
            .now_or_never()
            .expect("ready")
            .expect("no error");
        let trailers = collected.trailers().cloned();
        (collected.to_bytes(), trailers)
    }

    /// Reads one frame's data.
    fn read_one(body: &mut ReplayBody<Stream>) -> Bytes {
        let frame = body.frame().now_or_never().expect("ready");
        let frame = frame.expect("a frame").expect("no error");
        frame.into_data().expect("data")
    }

    #[test]
    fn a_body_read_to_its_end_is_replayed_with_its_trailers() {
        let replay = ReplayBodies::new();
        let (body, copy) = first(&replay, streaming(&["ab", "cd", "ef"], Some(trailers())));
        assert_eq!(read(body), (Bytes::from("abcdef"), Some(trailers())));
        for _ in 0..2 {
            let body = again(&replay, &copy).expect("replayable");
            assert_eq!(http_body::Body::size_hint(&body).exact(), None);
            assert_eq!(read(body), (Bytes::from("abcdef"), Some(trailers())));
        }
    }

    #[test]
    fn a_retry_continues_the_rest_an_earlier_attempt_left_unread() {
        let replay = ReplayBodies::new();
        let (mut body, copy) = first(&replay, streaming(&["ab", "cd", "ef", "gh"], None));
        assert_eq!(read_one(&mut body), "ab");
        drop(body);
        // The second attempt sends what was kept, then reads on, and also stops early.
        let mut second = again(&replay, &copy).expect("replayable");
        assert_eq!(read_one(&mut second), "ab");
        assert_eq!(read_one(&mut second), "cd");
        assert_eq!(read_one(&mut second), "ef");
        drop(second);
        let third = again(&replay, &copy).expect("replayable");
        assert_eq!(read(third).0, "abcdefgh");
        let fourth = again(&replay, &copy).expect("replayable");
        assert_eq!(read(fourth).0, "abcdefgh");
    }

    #[test]
    fn a_body_never_read_is_read_by_the_retry() {
        let replay = ReplayBodies::new();
        let (body, copy) = first(&replay, streaming(&["ab", "cd"], Some(trailers())));
        drop(body);
        let second = again(&replay, &copy).expect("replayable");
        assert_eq!(read(second), (Bytes::from("abcd"), Some(trailers())));
    }

    #[test]
    fn a_body_over_the_limit_is_sent_in_full_and_not_replayed() {
        let replay = ReplayBodies::new().limit(5);
        let (mut body, copy) = first(&replay, streaming(&["abc", "def", "ghi"], None));
        assert_eq!(read_one(&mut body), "abc");
        assert!(again(&replay, &copy).is_some(), "still within the limit");
        assert_eq!(read(body).0, "defghi");
        assert!(again(&replay, &copy).is_none());
    }

    #[test]
    fn a_retry_reaching_what_an_earlier_attempt_still_holds_fails_its_body() {
        let replay = ReplayBodies::new();
        let (mut body, copy) = first(&replay, streaming(&["ab", "cd"], None));
        assert_eq!(read_one(&mut body), "ab");
        let second = again(&replay, &copy).expect("replayable");
        // It may send some of the kept part first; it must not end cleanly.
        let result = second.collect().now_or_never().expect("ready");
        assert!(result.is_err());
        // Once the first attempt lets go, a later retry has all of it.
        drop(body);
        let third = again(&replay, &copy).expect("replayable");
        assert_eq!(read(third).0, "abcd");
    }

    #[test]
    fn an_empty_stream_is_replayed_empty() {
        let replay = ReplayBodies::new();
        let (body, copy) = first(&replay, streaming(&[], None));
        assert_eq!(read(body).0, "");
        let second = again(&replay, &copy).expect("replayable");
        assert!(http_body::Body::is_end_stream(&second));
        assert_eq!(read(second), (Bytes::new(), None));
    }
}
