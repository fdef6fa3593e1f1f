use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::BoxError;
use tower_service::Service;

use super::fair::{FairAdmission, Keyed};
use super::future::ResponseFuture;
use super::limiter::{Admission, Limiter, Refusal};
use super::release::{Permit, Release, ReleaseOnResponse, SampleReport};
use crate::classify::{Classify, ErrorsAsFailures};
use crate::key::{Global, KeyExtractor};

/// A service behind a concurrency limit; made by
/// [`ConcurrencyLimitLayer`](super::ConcurrencyLimitLayer).
///
/// `poll_ready` is the inner service's; a request over the limit gets
/// [`Overloaded`](super::Overloaded) from its response future, without the inner
/// service being called. Queued requests hold a clone of the inner service (the one
/// polled ready), so the inner service must be `Clone`. A
/// [keyed](super::ConcurrencyLimitLayerBuilder::keyed) limit extracts each request's key
/// with `X` (keys of type `K`).
pub struct ConcurrencyLimitService<
    S,
    C = ErrorsAsFailures,
    H = ReleaseOnResponse,
    X = Global,
    K = (),
> {
    inner: S,
    limiter: Arc<Limiter>,
    /// `None` for an unkeyed limit, whose requests skip the key entirely.
    keyed: Option<Arc<Keyed<X, K>>>,
    classify: C,
    release: PhantomData<fn() -> H>,
}

impl<S, C, H, X, K> ConcurrencyLimitService<S, C, H, X, K> {
    pub(crate) fn new(
        inner: S,
        limiter: Arc<Limiter>,
        keyed: Option<Arc<Keyed<X, K>>>,
        classify: C,
    ) -> Self {
        Self {
            inner,
            limiter,
            keyed,
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

impl<S: Clone, C: Clone, H, X, K> Clone for ConcurrencyLimitService<S, C, H, X, K> {
    fn clone(&self) -> Self {
        Self::new(
            self.inner.clone(),
            Arc::clone(&self.limiter),
            self.keyed.clone(),
            self.classify.clone(),
        )
    }
}

impl<S: fmt::Debug, C, H, X, K> fmt::Debug for ConcurrencyLimitService<S, C, H, X, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimitService")
            .field("inner", &self.inner)
            .field("limiter", &self.limiter)
            .field("keyed", &self.keyed)
            .finish_non_exhaustive()
    }
}

impl<S, C, H, X, K, Req> Service<Req> for ConcurrencyLimitService<S, C, H, X, K>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error> + Clone,
    H: Release<C::Response<SampleReport>>,
    X: KeyExtractor<Req, Key = K>,
    K: Hash + Eq + Clone,
{
    type Response = H::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, C, H>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, request: Req) -> Self::Future {
        if self.keyed.is_some() {
            return self.call_keyed(request);
        }
        let classify = self.classify.clone();
        match self.limiter.try_admit() {
            Admission::Admitted(in_flight) => {
                let report = SampleReport::new(&self.limiter, in_flight);
                let permit = Permit::new(Arc::clone(&self.limiter));
                ResponseFuture::called(self.inner.call(request), permit, report, classify)
            }
            Admission::Queued {
                waiter,
                max_wait,
                refusal,
            } => {
                let ready = take_ready(&mut self.inner);
                let limiter = Arc::clone(&self.limiter);
                let place = (limiter, waiter, refusal);
                ResponseFuture::queued(place, max_wait, (ready, request), classify)
            }
            Admission::Rejected(refusal) => self.shed(request, refusal, classify),
        }
    }
}

impl<S, C, H, X, K> ConcurrencyLimitService<S, C, H, X, K> {
    /// A request over the limit (already counted): refused with `Overloaded`, or in
    /// shadow mode sent with a permit of the overflow limit, as the policy it was
    /// refused under says. Out of line and cold: the admitted path stays small.
    #[cold]
    #[inline(never)]
    fn shed<Req>(
        &mut self,
        request: Req,
        refusal: Refusal,
        classify: C,
    ) -> ResponseFuture<S, Req, C, H>
    where
        S: Service<Req>,
    {
        if refusal.shadow
            && let Some(permit) = Permit::shadow(&self.limiter)
        {
            #[cfg(feature = "tracing")]
            tracing::debug!(
                limit = refusal.limit,
                "request would be shed: overloaded (shadow mode: let through)"
            );
            return ResponseFuture::let_through(self.inner.call(request), permit, classify);
        }
        #[cfg(feature = "tracing")]
        tracing::debug!(limit = refusal.limit, "request shed: overloaded");
        ResponseFuture::rejected(refusal.overloaded(), classify)
    }

    /// A keyed limit's admission: out of line and marked cold, so that the unkeyed call
    /// stays small and its path straight.
    #[cold]
    #[inline(never)]
    fn call_keyed<Req>(&mut self, request: Req) -> ResponseFuture<S, Req, C, H>
    where
        S: Service<Req>,
        C: Clone,
        X: KeyExtractor<Req, Key = K>,
        K: Hash + Eq + Clone,
    {
        let classify = self.classify.clone();
        let Some(keyed) = &self.keyed else {
            let refusal = self.limiter.refusal();
            return self.shed(request, refusal, classify);
        };
        let key = keyed.extractor.extract(&request);
        let now = tokio::time::Instant::now();
        let admission = keyed.shares.admit(&self.limiter, key.as_ref(), now);
        match admission {
            FairAdmission::Admitted(in_flight, share) => {
                let report = SampleReport::new(&self.limiter, in_flight);
                let permit = Permit::keyed(Arc::clone(&self.limiter), share);
                ResponseFuture::called(self.inner.call(request), permit, report, classify)
            }
            FairAdmission::Rejected(refusal) => self.shed(request, refusal, classify),
        }
    }
}

/// Swaps the service that was polled ready for a clone, so that the ready one goes into
/// the future.
fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}
