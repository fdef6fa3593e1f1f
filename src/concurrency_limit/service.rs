use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::BoxError;
use tower_service::Service;

use super::future::ResponseFuture;
use super::limiter::{Admission, Limiter};
use super::release::{Permit, Release, ReleaseOnResponse, SampleReport};
use crate::classify::{Classify, ErrorsAsFailures};

/// A service behind a concurrency limit; made by
/// [`ConcurrencyLimitLayer`](super::ConcurrencyLimitLayer).
///
/// `poll_ready` is the inner service's; a request over the limit gets
/// [`Overloaded`](super::Overloaded) from its response future, without the inner
/// service being called. Queued requests hold a clone of the inner service (the one
/// polled ready), so the inner service must be `Clone`.
pub struct ConcurrencyLimitService<S, C = ErrorsAsFailures, H = ReleaseOnResponse> {
    inner: S,
    limiter: Arc<Limiter>,
    classify: C,
    release: PhantomData<fn() -> H>,
}

impl<S, C, H> ConcurrencyLimitService<S, C, H> {
    pub(crate) fn new(inner: S, limiter: Arc<Limiter>, classify: C) -> Self {
        Self {
            inner,
            limiter,
            classify,
            release: PhantomData,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, consuming the limit.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, C: Clone, H> Clone for ConcurrencyLimitService<S, C, H> {
    fn clone(&self) -> Self {
        Self::new(
            self.inner.clone(),
            Arc::clone(&self.limiter),
            self.classify.clone(),
        )
    }
}

impl<S: fmt::Debug, C, H> fmt::Debug for ConcurrencyLimitService<S, C, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimitService")
            .field("inner", &self.inner)
            .field("limiter", &self.limiter)
            .finish_non_exhaustive()
    }
}

impl<S, C, H, Req> Service<Req> for ConcurrencyLimitService<S, C, H>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error> + Clone,
    H: Release<C::Response<SampleReport>>,
{
    type Response = H::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, C, H>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let classify = self.classify.clone();
        match self.limiter.try_admit() {
            Admission::Admitted(in_flight) => {
                let report = SampleReport::new(&self.limiter, in_flight);
                let permit = Permit::new(Arc::clone(&self.limiter));
                ResponseFuture::called(self.inner.call(request), permit, report, classify)
            }
            Admission::Queued(waiter) => {
                let max_wait = self.limiter.max_wait().unwrap_or_default();
                let ready = take_ready(&mut self.inner);
                let limiter = Arc::clone(&self.limiter);
                ResponseFuture::queued(limiter, waiter, max_wait, (ready, request), classify)
            }
            Admission::Rejected => {
                #[cfg(feature = "tracing")]
                tracing::debug!(limit = self.limiter.limit(), "request shed: overloaded");
                ResponseFuture::rejected(self.limiter.overloaded(), classify)
            }
        }
    }
}

/// Swaps the service that was polled ready for a clone, so that the ready one goes into
/// the future.
fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}
