use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project::pin_project;
use tokio::time::{Sleep, sleep};
use tower::BoxError;
use tower_service::Service;

use super::error::Overloaded;
use super::limiter::{Limiter, Refusal, Waiter};
use super::release::{Permit, Release, SampleReport};
use crate::classify::Classify;

/// The response future of [`ConcurrencyLimitService`](super::ConcurrencyLimitService).
///
/// Resolves at once to [`Overloaded`] when the request was refused. A queued request
/// waits here for its permit, and the inner service is called only once it has one.
/// Dropped at any point, it gives back its permit or its place in the queue.
#[pin_project]
pub struct ResponseFuture<S, Req, C, H>
where
    S: Service<Req>,
{
    #[pin]
    state: State<S, Req>,
    classify: C,
    release: PhantomData<fn() -> H>,
}

/// The admitted state is first and small; a queued request's state is boxed, off the
/// admitted path.
#[pin_project(project = StateProj)]
enum State<S: Service<Req>, Req> {
    Called {
        #[pin]
        future: S::Future,
        admitted: Option<(Permit, SampleReport)>,
    },
    Rejected {
        error: Option<Overloaded>,
    },
    Queued(Pin<Box<Queued<S, Req>>>),
}

#[pin_project]
struct Queued<S, Req> {
    #[pin]
    sleep: Sleep,
    place: Place,
    ready: Option<(S, Req)>,
}

/// A place in the queue, left when dropped: a permit granted meanwhile is given back.
struct Place {
    limiter: Arc<Limiter>,
    waiter: Arc<Waiter>,
    /// The answer if the wait runs out: the policy the request was queued under, so
    /// that a reload meanwhile does not mix two.
    refusal: Refusal,
    left: bool,
}

impl Place {
    /// Leaves the queue: `true` when a permit was granted meanwhile, which the caller
    /// now holds.
    fn leave(&mut self) -> bool {
        self.left = true;
        self.limiter.leave(&self.waiter)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if !self.left && self.leave() {
            self.limiter.release();
        }
    }
}

impl<S, Req, C, H> ResponseFuture<S, Req, C, H>
where
    S: Service<Req>,
{
    fn new(state: State<S, Req>, classify: C) -> Self {
        Self {
            state,
            classify,
            release: PhantomData,
        }
    }

    #[inline]
    pub(crate) fn called(
        future: S::Future,
        permit: Permit,
        report: SampleReport,
        classify: C,
    ) -> Self {
        let admitted = Some((permit, report));
        Self::new(State::Called { future, admitted }, classify)
    }

    /// A request a limit in shadow mode let through over the limit: it holds a permit
    /// of the overflow limit only ([`Permit::shadow`]) and reports nothing to an
    /// adaptive limit.
    pub(crate) fn let_through(future: S::Future, permit: Permit, classify: C) -> Self {
        Self::called(future, permit, SampleReport::shadow(), classify)
    }

    pub(crate) fn rejected(error: Overloaded, classify: C) -> Self {
        Self::new(State::Rejected { error: Some(error) }, classify)
    }

    pub(crate) fn queued(
        (limiter, waiter, refusal): (Arc<Limiter>, Arc<Waiter>, Refusal),
        max_wait: Duration,
        ready: (S, Req),
        classify: C,
    ) -> Self {
        let queued = Queued {
            sleep: sleep(max_wait),
            place: Place {
                limiter,
                waiter,
                refusal,
                left: false,
            },
            ready: Some(ready),
        };
        Self::new(State::Queued(Box::pin(queued)), classify)
    }
}

impl<S: Service<Req>, Req> Queued<S, Req> {
    /// Waits for the permit or the end of `max_wait`. Out of line: the admitted
    /// request's poll stays small.
    #[inline(never)]
    fn advance(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<State<S, Req>> {
        let this = self.project();
        let granted = this.place.waiter.poll_granted(cx)
            || (this.sleep.poll(cx).is_ready() && this.place.leave());
        if !granted {
            if !this.place.left {
                return Poll::Pending;
            }
            let (limiter, refusal) = (&this.place.limiter, this.place.refusal);
            limiter.count(&refusal);
            // In shadow mode a request that waited in vain goes through all the same.
            if refusal.shadow
                && let Some(permit) = Permit::shadow(limiter)
                && let Some((mut service, request)) = this.ready.take()
            {
                return Poll::Ready(State::Called {
                    future: service.call(request),
                    admitted: Some((permit, SampleReport::shadow())),
                });
            }
            let error = refusal.overloaded();
            return Poll::Ready(State::Rejected { error: Some(error) });
        }
        this.place.left = true;
        let limiter = &this.place.limiter;
        let permit = Permit::new(Arc::clone(limiter));
        let report = SampleReport::new(limiter, limiter.in_flight());
        let Some((mut service, request)) = this.ready.take() else {
            return Poll::Ready(State::Rejected { error: None });
        };
        Poll::Ready(State::Called {
            future: service.call(request),
            admitted: Some((permit, report)),
        })
    }
}

impl<S, Req, C, H> Future for ResponseFuture<S, Req, C, H>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error>,
    H: Release<C::Response<SampleReport>>,
{
    type Output = Result<H::Response, BoxError>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let this = self.as_mut().project();
            let next = match this.state.project() {
                StateProj::Called { future, admitted } => {
                    let result = ready!(future.poll(cx));
                    let Some((permit, report)) = admitted.take() else {
                        return Poll::Ready(Err(completed()));
                    };
                    let response = this.classify.classify(result, report);
                    return Poll::Ready(match response {
                        Ok(response) => Ok(H::hold(response, permit)),
                        Err(error) => Err(error.into()),
                    });
                }
                StateProj::Rejected { error } => {
                    return Poll::Ready(Err(error.take().map_or_else(completed, Into::into)));
                }
                StateProj::Queued(queued) => ready!(queued.as_mut().advance(cx)),
            };
            self.as_mut().project().state.set(next);
        }
    }
}

fn completed() -> BoxError {
    "concurrency limit response future polled after completion".into()
}

impl<S, Req, C, H> fmt::Debug for ResponseFuture<S, Req, C, H>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::Rejected { .. } => "rejected",
            State::Queued(_) => "queued",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
