//! When an admitted request gives its permit back, and what finished requests report to
//! an adaptive limit.

use std::fmt;
use std::sync::Arc;

use tokio::time::Instant;

use super::algorithms::Sample;
use super::fair::KeyCell;
use super::limiter::{Admission, Limiter};
use crate::classify::{Outcome, Report};

/// One admitted request's place under the limit, given back when dropped.
pub struct Permit {
    limiter: Arc<Limiter>,
    /// A keyed limit's: the key's count of permits, given back first.
    share: Option<Arc<KeyCell>>,
}

impl Permit {
    #[inline]
    pub(crate) fn new(limiter: Arc<Limiter>) -> Self {
        Self {
            limiter,
            share: None,
        }
    }

    pub(crate) fn keyed(limiter: Arc<Limiter>, share: Arc<KeyCell>) -> Self {
        Self {
            limiter,
            share: Some(share),
        }
    }

    /// The permit of a request `limiter` in shadow mode lets through over the limit:
    /// one of its overflow limit's, so that the request holds no place under `limiter`
    /// itself. `None` for the overflow limit itself, or once the overflow holds its
    /// [`MAX_LIMIT`](super::limiter::MAX_LIMIT) (then the request is refused after all).
    pub(crate) fn shadow(limiter: &Limiter) -> Option<Self> {
        let overflow = limiter.overflow()?;
        match overflow.try_admit() {
            Admission::Admitted(_) => Some(Self::new(Arc::clone(overflow))),
            Admission::Queued { .. } | Admission::Rejected(_) => None,
        }
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        if let Some(share) = &self.share {
            share.unhold();
        }
        self.limiter.release();
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit").finish_non_exhaustive()
    }
}

/// Where a response keeps its [`Permit`] until the request is over.
///
/// [`ReleaseOnResponse`] (the default) gives it back when the response future
/// completes; [`ReleaseOnBodyEnd`] (feature `http`) when the HTTP response body ends or
/// is dropped, so that a long download or a gRPC stream holds its place. Implement it
/// for a streaming response type of your own to do the same.
pub trait Release<Res> {
    /// The response, holding the permit.
    type Response;

    /// Attaches `permit` to `response` (or drops it).
    fn hold(response: Res, permit: Permit) -> Self::Response;
}

/// Gives the permit back as soon as the response future completes (or is dropped).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReleaseOnResponse;

impl<Res> Release<Res> for ReleaseOnResponse {
    type Response = Res;

    #[inline]
    fn hold(response: Res, permit: Permit) -> Res {
        drop(permit);
        response
    }
}

#[cfg(feature = "http")]
pub use self::body::{PermitBody, ReleaseOnBodyEnd};

#[cfg(feature = "http")]
mod body {
    use super::{Permit, Release};
    use http_body::{Body, Frame, SizeHint};
    use std::pin::Pin;
    use std::task::{Context, Poll, ready};

    /// Keeps the permit in the HTTP response body until it ends (its last frame, or
    /// an error) or is dropped (feature `http`).
    #[derive(Debug, Clone, Copy, Default)]
    pub struct ReleaseOnBodyEnd;

    impl<B> Release<http::Response<B>> for ReleaseOnBodyEnd {
        type Response = http::Response<PermitBody<B>>;

        fn hold(response: http::Response<B>, permit: Permit) -> Self::Response {
            response.map(|body| PermitBody {
                body,
                permit: Some(permit),
            })
        }
    }

    /// A response body holding its request's [`Permit`] until it ends or is dropped;
    /// made by [`ReleaseOnBodyEnd`]. Every frame passes through unchanged.
    #[pin_project::pin_project]
    #[derive(Debug)]
    pub struct PermitBody<B> {
        #[pin]
        body: B,
        permit: Option<Permit>,
    }

    impl<B> PermitBody<B> {
        /// The wrapped body; the permit is given back.
        pub fn into_inner(self) -> B {
            self.body
        }
    }

    impl<B: Body> Body for PermitBody<B> {
        type Data = B::Data;
        type Error = B::Error;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
            let mut this = self.project();
            let frame = ready!(this.body.as_mut().poll_frame(cx));
            // A server may stop polling once the body says it has ended: give the
            // permit back with the last frame, not at the drop.
            if !matches!(frame, Some(Ok(_))) || this.body.is_end_stream() {
                this.permit.take();
            }
            Poll::Ready(frame)
        }

        fn is_end_stream(&self) -> bool {
            self.body.is_end_stream()
        }

        fn size_hint(&self) -> SizeHint {
            self.body.size_hint()
        }
    }
}

/// Reports a finished request to an adaptive limit; the [`Report`] the layer hands its
/// classifier. A failure is congestion, an ignored outcome counts for nothing, and a
/// report dropped without an outcome (the response future or a gRPC body dropped before
/// its status) is congestion too. On a static limit it does nothing and reads no clock.
pub struct SampleReport {
    pending: Option<Pending>,
}

struct Pending {
    limiter: Arc<Limiter>,
    started: Instant,
    in_flight: u32,
}

impl SampleReport {
    #[inline]
    pub(crate) fn new(limiter: &Arc<Limiter>, in_flight: u32) -> Self {
        let pending = limiter.is_adaptive().then(|| Pending {
            limiter: Arc::clone(limiter),
            started: Instant::now(),
            in_flight,
        });
        Self { pending }
    }
}

impl SampleReport {
    /// The report of a request let through in shadow mode: an enforcing limit would not
    /// have run it, so it tells the algorithm nothing.
    pub(crate) fn shadow() -> Self {
        Self { pending: None }
    }
}

impl Pending {
    fn record(self, congested: bool) {
        let now = Instant::now();
        let rtt = now.saturating_duration_since(self.started);
        self.limiter
            .record(Sample::new(rtt, self.in_flight, congested, now));
    }
}

impl Report for SampleReport {
    #[inline]
    fn report(mut self, outcome: Outcome) {
        if let Some(pending) = self.pending.take() {
            match outcome {
                Outcome::Success => pending.record(false),
                Outcome::Failure => pending.record(true),
                Outcome::Ignored => {}
            }
        }
    }
}

impl Drop for SampleReport {
    #[inline]
    fn drop(&mut self) {
        if let Some(pending) = self.pending.take() {
            pending.record(true);
        }
    }
}

impl fmt::Debug for SampleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SampleReport")
            .field("pending", &self.pending.is_some())
            .finish_non_exhaustive()
    }
}
