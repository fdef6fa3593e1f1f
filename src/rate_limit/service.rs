use std::sync::Arc;
use std::task::{Context, Poll};

use tower::BoxError;
use tower_service::Service;

use super::MissingKey;
use super::future::{Next, ResponseFuture};
use super::layer::sealed::Slot;
use super::layer::{Cost, NoHeaders, OnAdmitted, Policy, UnitCost, WhenKeyMissing};
use super::shadow::Switch;
use super::store::{Acquire, Answer, LocalStore, StatusWanted, Store};
use crate::key::{Global, KeyExtractor};

/// A service rate limited by a [`RateLimitLayer`](super::RateLimitLayer).
///
/// `poll_ready` is the inner service's; a request over the limit gets its
/// [`RateLimited`](super::RateLimited) error from the response future, without the inner
/// service being called. Waiting requests (with `max_wait`) hold a clone of the inner
/// service, so the inner service must be `Clone`.
pub struct RateLimitService<S, X = Global, C = UnitCost, St = LocalStore, H = NoHeaders> {
    inner: S,
    store: Arc<St>,
    policy: Arc<Policy<X, C, H>>,
}

impl<S, X, C, St, H> RateLimitService<S, X, C, St, H> {
    pub(crate) fn new(inner: S, store: Arc<St>, policy: Arc<Policy<X, C, H>>) -> Self {
        Self {
            inner,
            store,
            policy,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, X, C, St, H, Req> Service<Req> for RateLimitService<S, X, C, St, H>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    X: KeyExtractor<Req, Key = St::Key>,
    C: Cost<Req>,
    St: Store,
    H: OnAdmitted<S::Response> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, St, H>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let policy = &*self.policy;
        let on_admitted = policy.on_admitted.clone();
        let key = policy.extractor.extract(&request);
        if key.is_none() && policy.when_key_missing == WhenKeyMissing::Reject {
            return self.missing_key(request, on_admitted);
        }
        let status = if H::Status::WANTED {
            StatusWanted::Yes
        } else {
            StatusWanted::No
        };
        let acquire = Acquire::new(key.as_ref(), policy.cost.cost(&request))
            .max_wait(policy.max_wait)
            .status(status);
        // Read before the store decides: see `shadow` for why a reload cannot mix policies.
        let switch = Switch::before(&policy.shadow);
        // An answer known now calls the service polled ready right here, with no clone.
        let decided = match self.store.acquire(acquire) {
            Answer::Now(decided) => decided,
            Answer::Later(pending) => {
                let ready = take_ready(&mut self.inner);
                let store = self.store.clone();
                let shadow = (policy.shadow.clone(), switch.was_on());
                return ResponseFuture::deciding(
                    pending,
                    ready,
                    request,
                    store,
                    shadow,
                    on_admitted,
                );
            }
        };
        match Next::resolve(&self.store, decided, switch) {
            Next::Go(status) => {
                ResponseFuture::calling(self.inner.call(request), status, on_admitted)
            }
            Next::Wait(wait, guard) => {
                let ready = take_ready(&mut self.inner);
                ResponseFuture::waiting(wait, guard, ready, request, on_admitted)
            }
            Next::Fail(error) => ResponseFuture::failed(error, on_admitted),
        }
    }
}

impl<S, X, C, St: Store, H> RateLimitService<S, X, C, St, H> {
    /// A request without a key, which the limiter refuses, or in shadow mode lets through
    /// undecided (there is no bucket to charge). Out of line: the keyed path stays short.
    #[cold]
    #[inline(never)]
    fn missing_key<Req>(&mut self, request: Req, on_admitted: H) -> ResponseFuture<S, Req, St, H>
    where
        S: Service<Req>,
        H: OnAdmitted<S::Response>,
    {
        let shadow = &self.policy.shadow;
        if !shadow.is_on() {
            return ResponseFuture::failed(MissingKey.into(), on_admitted);
        }
        shadow.let_through("missing key");
        ResponseFuture::calling(self.inner.call(request), None, on_admitted)
    }
}

/// Swaps the service that was polled ready for a clone, so that the ready one goes into
/// the future.
fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

impl<S: Clone, X, C, St, H> Clone for RateLimitService<S, X, C, St, H> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            store: self.store.clone(),
            policy: self.policy.clone(),
        }
    }
}

impl<S: std::fmt::Debug, X, C, St: std::fmt::Debug, H> std::fmt::Debug
    for RateLimitService<S, X, C, St, H>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}
