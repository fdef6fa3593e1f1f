use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project::pin_project;
use tokio::time::{Sleep, sleep};
use tower::BoxError;
use tower_service::Service;

use super::bucket::Denied;
use super::error::{CostExceedsCapacity, RateLimited};
use super::layer::sealed::Slot;
use super::layer::{OnAdmitted, RateLimitStatus};
use super::shadow::{Shadow, Switch};
use super::store::{Admission, Store};

/// The response future of [`RateLimitService`](super::RateLimitService).
#[pin_project]
pub struct ResponseFuture<S, Req, St, H>
where
    S: Service<Req>,
    St: Store,
    H: OnAdmitted<S::Response>,
{
    #[pin]
    state: State<S, Req, St>,
    /// Nothing at all when nobody reads the status: an admitted request's future is then
    /// the inner future and the state's tag.
    status: H::Status,
    on_admitted: H,
}

/// An admitted request's state is the first: the throttled and pending-answer states are
/// boxed together, so that the future of an admitted request stays as small as the inner
/// service's and its poll and drop stay short.
#[pin_project(project = StateProj)]
enum State<S, Req, St>
where
    S: Service<Req>,
    St: Store,
{
    Calling {
        #[pin]
        future: S::Future,
    },
    Failed {
        error: Option<BoxError>,
    },
    Slow(Pin<Box<Slow<S, Req, St>>>),
}

#[pin_project(project = SlowProj)]
enum Slow<S, Req, St: Store> {
    /// The store answers later: waiting for its answer.
    Deciding {
        #[pin]
        pending: St::Pending,
        ready: Option<(S, Req)>,
        store: Arc<St>,
        shadow: Arc<Shadow>,
        /// The switch when the request was sent.
        was_shadow: bool,
    },
    /// Admitted for later: waiting for the reserved slot.
    Waiting {
        #[pin]
        sleep: Sleep,
        guard: ReservationGuard<St>,
        ready: Option<(S, Req)>,
    },
}

impl<S, Req, St: Store> Slow<S, Req, St> {
    fn waiting(wait: Duration, guard: ReservationGuard<St>, ready: (S, Req)) -> Self {
        Self::Waiting {
            sleep: sleep(wait),
            guard,
            ready: Some(ready),
        }
    }
}

impl<S, Req, St> Slow<S, Req, St>
where
    S: Service<Req>,
    St: Store,
{
    /// Drives a deciding or waiting request until it is called or refused. Out of line:
    /// the admitted request's poll stays small.
    #[inline(never)]
    fn advance<T: Slot>(
        mut self: Pin<&mut Self>,
        status: &mut T,
        cx: &mut Context<'_>,
    ) -> Poll<State<S, Req, St>> {
        loop {
            match self.as_mut().project() {
                SlowProj::Deciding {
                    pending,
                    ready,
                    store,
                    shadow,
                    was_shadow,
                } => {
                    let decision = ready!(pending.poll(cx));
                    let Some((mut service, request)) = ready.take() else {
                        return Poll::Ready(State::failed(completed()));
                    };
                    let switch = Switch::seen(shadow, *was_shadow);
                    match Next::resolve(store, decision, switch) {
                        Next::Go(admitted) => {
                            *status = T::keep(admitted);
                            return Poll::Ready(State::Calling {
                                future: service.call(request),
                            });
                        }
                        Next::Wait(wait, guard) => {
                            self.as_mut()
                                .set(Slow::waiting(wait, guard, (service, request)))
                        }
                        Next::Fail(error) => return Poll::Ready(State::failed(error)),
                    }
                }
                SlowProj::Waiting {
                    sleep,
                    guard,
                    ready,
                } => {
                    ready!(sleep.poll(cx));
                    let Some((mut service, request)) = ready.take() else {
                        return Poll::Ready(State::failed(completed()));
                    };
                    guard.used();
                    return Poll::Ready(State::Calling {
                        future: service.call(request),
                    });
                }
            }
        }
    }
}

impl<S, Req, St> State<S, Req, St>
where
    S: Service<Req>,
    St: Store,
{
    fn failed(error: BoxError) -> Self {
        Self::Failed { error: Some(error) }
    }
}

/// Hands a reservation back to the store unless the request went ahead, so that a
/// dropped waiting future never leaks its slot.
pub(crate) struct ReservationGuard<St: Store> {
    store: Arc<St>,
    reservation: Option<St::Reservation>,
}

impl<St: Store> ReservationGuard<St> {
    fn used(&mut self) {
        self.reservation = None;
    }
}

impl<St: Store> Drop for ReservationGuard<St> {
    fn drop(&mut self) {
        if let Some(reservation) = self.reservation.take() {
            self.store.cancel(reservation);
        }
    }
}

/// What to do with a store's decision.
pub(crate) enum Next<St: Store> {
    Go(Option<RateLimitStatus>),
    Wait(Duration, ReservationGuard<St>),
    Fail(BoxError),
}

impl<St: Store> Next<St> {
    /// In shadow mode (the `switch` on, before or after the decision) every decision is
    /// `Go`: a reserved slot stays taken (the enforcing limiter's request would use it)
    /// but is not waited for, and a refusal is counted and let through with the fields it
    /// would have answered with. An admission does not read the switch again.
    #[inline]
    pub(crate) fn resolve(
        store: &Arc<St>,
        decision: Result<Admission<St::Reservation>, BoxError>,
        switch: Switch<'_>,
    ) -> Self {
        let (refusal, why, fields) = match decision {
            Ok(Admission::Admitted { status }) => return Next::Go(status),
            Ok(Admission::Reserved { wait, reservation }) => {
                if switch.on().is_some() {
                    // Dropped, not cancelled: the slot stays taken.
                    return Next::Go(None);
                }
                return Next::Wait(
                    wait,
                    ReservationGuard {
                        store: store.clone(),
                        reservation: Some(reservation),
                    },
                );
            }
            Ok(Admission::Denied(Denied::Limited {
                retry_after,
                remaining,
            })) => {
                let limited = RateLimited::new(retry_after, store.quota(), remaining);
                let fields = RateLimitStatus::from(&limited);
                (BoxError::from(limited), "rate limited", Some(fields))
            }
            Ok(Admission::Denied(Denied::CostExceedsCapacity { cost, capacity })) => (
                CostExceedsCapacity { cost, capacity }.into(),
                "cost exceeds capacity",
                None,
            ),
            Err(error) => (error, "store refused", None),
        };
        if let Some(shadow) = switch.on() {
            shadow.let_through(why);
            return Next::Go(fields);
        }
        if fields.is_some() {
            #[cfg(feature = "tracing")]
            tracing::debug!(retry_after = ?fields.map(|fields| fields.reset), "request rate limited");
            crate::metrics::rate_limited();
        }
        Next::Fail(refusal)
    }
}

impl<S, Req, St, H> ResponseFuture<S, Req, St, H>
where
    S: Service<Req>,
    St: Store,
    H: OnAdmitted<S::Response>,
{
    #[inline]
    fn new(state: State<S, Req, St>, status: Option<RateLimitStatus>, on_admitted: H) -> Self {
        Self {
            state,
            status: H::Status::keep(status),
            on_admitted,
        }
    }

    #[inline]
    pub(crate) fn calling(
        future: S::Future,
        status: Option<RateLimitStatus>,
        on_admitted: H,
    ) -> Self {
        Self::new(State::Calling { future }, status, on_admitted)
    }

    pub(crate) fn failed(error: BoxError, on_admitted: H) -> Self {
        Self::new(State::failed(error), None, on_admitted)
    }

    pub(crate) fn waiting(
        wait: Duration,
        guard: ReservationGuard<St>,
        service: S,
        request: Req,
        on_admitted: H,
    ) -> Self {
        let slow = Slow::waiting(wait, guard, (service, request));
        Self::new(State::Slow(Box::pin(slow)), None, on_admitted)
    }

    pub(crate) fn deciding(
        pending: St::Pending,
        service: S,
        request: Req,
        store: Arc<St>,
        (shadow, was_shadow): (Arc<Shadow>, bool),
        on_admitted: H,
    ) -> Self {
        let slow = Slow::Deciding {
            pending,
            ready: Some((service, request)),
            store,
            shadow,
            was_shadow,
        };
        Self::new(State::Slow(Box::pin(slow)), None, on_admitted)
    }
}

impl<S, Req, St, H> Future for ResponseFuture<S, Req, St, H>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    St: Store,
    H: OnAdmitted<S::Response>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let this = self.as_mut().project();
            let next = match this.state.project() {
                StateProj::Calling { future } => {
                    let mut response = ready!(future.poll(cx)).map_err(Into::into)?;
                    if let Some(status) = this.status.take() {
                        this.on_admitted.on_admitted(&mut response, &status);
                    }
                    return Poll::Ready(Ok(response));
                }
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(error.take().unwrap_or_else(completed)));
                }
                StateProj::Slow(slow) => ready!(slow.as_mut().advance(this.status, cx)),
            };
            self.as_mut().project().state.set(next);
        }
    }
}

fn completed() -> BoxError {
    "rate limit response future polled after completion".into()
}

impl<S, Req, St, H> std::fmt::Debug for ResponseFuture<S, Req, St, H>
where
    S: Service<Req>,
    St: Store,
    H: OnAdmitted<S::Response>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

#[cfg(all(test, not(loom), feature = "http"))]
mod tests {
    use std::future::Ready;
    use std::mem::size_of;

    use http::{Request, Response};

    use super::*;
    use crate::rate_limit::LocalStore;
    use crate::rate_limit::NoHeaders;
    use crate::rate_limit::headers::AddRateLimitFields;

    /// A service whose future is its answer.
    #[derive(Clone)]
    struct Answering;

    impl Service<Request<()>> for Answering {
        type Response = Response<()>;
        type Error = BoxError;
        type Future = Ready<Result<Response<()>, BoxError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            std::future::ready(Ok(Response::new(())))
        }
    }

    type Future<H> = ResponseFuture<Answering, Request<()>, LocalStore, H>;

    #[test]
    fn a_limiter_without_headers_carries_no_status() {
        let state = size_of::<State<Answering, Request<()>, LocalStore>>();
        assert_eq!(size_of::<Future<NoHeaders>>(), state);
        assert!(size_of::<Future<AddRateLimitFields>>() >= state + size_of::<RateLimitStatus>());
    }
}
