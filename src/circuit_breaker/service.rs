use super::future::ResponseFuture;
use super::keyed::{KeyedBreaker, KeyedBreakers};
use super::lanes::{CoreRef, Lanes};
use super::state::{Core, Permit, Policy, Rejected, Timing};
use crate::classify::{Classify, ErrorsAsFailures, Outcome, Report};
use crate::context::DeadlineExceeded;
use crate::key::KeyExtractor;
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;
use tower::BoxError;
use tower_service::Service;

/// A service behind a circuit breaker; made by
/// [`CircuitBreakerLayer`](super::CircuitBreakerLayer).
///
/// A call made when the [request context](crate::context)'s deadline has already
/// passed is not sent and not counted: it fails at once with
/// [`DeadlineExceeded`], since a caller that gave up says nothing about the dependency.
pub struct CircuitBreakerService<S, C = ErrorsAsFailures> {
    inner: S,
    lanes: Lanes,
    classify: C,
}

impl<S, C> CircuitBreakerService<S, C> {
    pub(crate) fn new(inner: S, lanes: Lanes, classify: C) -> Self {
        Self {
            inner,
            lanes,
            classify,
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

    /// The wrapped service, consuming the breaker.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, C: Clone> Clone for CircuitBreakerService<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            lanes: self.lanes.clone(),
            classify: self.classify.clone(),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for CircuitBreakerService<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerService")
            .field("inner", &self.inner)
            .field("core", self.lanes.peek().core())
            .finish_non_exhaustive()
    }
}

impl<S, C, Request> Service<Request> for CircuitBreakerService<S, C>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = C::Response<CallReport>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // A caller that gave up before the call says nothing about the dependency: it
        // is neither sent nor counted.
        if let Some(deadline) = crate::context::deadline()
            && deadline <= Instant::now()
        {
            return ResponseFuture::rejected(DeadlineExceeded::new(None));
        }
        let lanes = self.lanes.load();
        match lanes.core().admit(Instant::now) {
            Ok(permit) => {
                let report = CallReport::new(lanes.take(), permit);
                ResponseFuture::called(self.inner.call(request), report, self.classify.clone())
            }
            Err(rejected) => refused(rejected, None, self.classify.clone(), || {
                let report = CallReport::new(lanes.take(), Permit::SHADOW);
                (self.inner.call(request), report)
            }),
        }
    }
}

/// A service behind a keyed circuit breaker: one breaker per key. Made by
/// [`KeyedCircuitBreakerLayer`](super::KeyedCircuitBreakerLayer).
///
/// Each call extracts its key, looks its breaker up (one hash, one probe of the table)
/// and then goes through exactly what [`CircuitBreakerService`] does. A call made when
/// the request context's deadline has passed is neither sent nor counted.
pub struct KeyedCircuitBreakerService<S, X, K, C = ErrorsAsFailures> {
    inner: S,
    breakers: Arc<KeyedBreakers<K>>,
    extractor: Arc<X>,
    classify: C,
}

impl<S, X, K, C> KeyedCircuitBreakerService<S, X, K, C> {
    pub(crate) fn new(
        inner: S,
        breakers: Arc<KeyedBreakers<K>>,
        extractor: Arc<X>,
        classify: C,
    ) -> Self {
        Self {
            inner,
            breakers,
            extractor,
            classify,
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

    /// The wrapped service, consuming the breaker.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, X, K, C: Clone> Clone for KeyedCircuitBreakerService<S, X, K, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            breakers: Arc::clone(&self.breakers),
            extractor: Arc::clone(&self.extractor),
            classify: self.classify.clone(),
        }
    }
}

impl<S: fmt::Debug, X, K, C> fmt::Debug for KeyedCircuitBreakerService<S, X, K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakerService")
            .field("inner", &self.inner)
            .field("breakers", &self.breakers)
            .finish_non_exhaustive()
    }
}

impl<S, X, K, C, Request> Service<Request> for KeyedCircuitBreakerService<S, X, K, C>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
    X: KeyExtractor<Request, Key = K>,
    K: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = C::Response<CallReport>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if let Some(deadline) = crate::context::deadline()
            && deadline <= Instant::now()
        {
            return ResponseFuture::rejected(DeadlineExceeded::new(None));
        }
        let key = self.extractor.extract(&request);
        let breaker = self.breakers.breaker(key.as_ref(), Instant::now);
        match breaker.core.admit(Instant::now) {
            Ok(permit) => {
                let report = CallReport::keyed(breaker, permit);
                ResponseFuture::called(self.inner.call(request), report, self.classify.clone())
            }
            Err(rejected) => {
                let classify = self.classify.clone();
                refused(rejected, breaker.label(), classify, || {
                    self.breakers.count_shadow_rejected();
                    let report = CallReport::keyed(breaker.clone(), Permit::SHADOW);
                    (self.inner.call(request), report)
                })
            }
        }
    }
}

/// What a call the breaker refused gets: the rejection, or in shadow mode what `send`
/// gives, the call sent with a [`Permit::SHADOW`] that records nothing. Out of line and
/// cold, so that the admitted call's path stays as it was.
#[cold]
#[inline(never)]
pub(crate) fn refused<F, C>(
    rejected: Rejected,
    label: Option<&str>,
    classify: C,
    send: impl FnOnce() -> (F, CallReport),
) -> ResponseFuture<F, C> {
    let Rejected { open, shadow } = rejected;
    if !shadow {
        crate::metrics::circuit_rejected(label);
        return ResponseFuture::rejected(open);
    }
    #[cfg(feature = "tracing")]
    tracing::debug!(
        key = label,
        retry_after = ?open.retry_after(),
        "call would be rejected: circuit open (shadow mode: let through)"
    );
    crate::metrics::circuit_rejected_in_shadow(label);
    let (future, report) = send();
    ResponseFuture::called(future, report, classify)
}

/// Records one call's outcome into its breaker; the [`Report`] the breaker hands to
/// the classifier.
///
/// The call's time, for slow-call detection, runs from the call until
/// [`report`](Report::report). Dropped without a report (the response future or a
/// gRPC body dropped before the outcome was known), it records nothing and gives back
/// the half-open probe slot it may hold.
pub struct CallReport {
    breaker: Held,
    permit: Option<Permit>,
    started: Option<Instant>,
}

/// The reference to its breaker a call holds until its outcome is known.
enum Held {
    /// A global breaker, through this thread's lane.
    Lane(Arc<CoreRef>),
    /// One key's breaker (or a keyed layer's shared one).
    Keyed(crate::sync::Arc<KeyedBreaker>),
}

impl Held {
    #[inline]
    fn core(&self) -> &Core {
        match self {
            Held::Lane(lane) => &lane.core,
            Held::Keyed(breaker) => &breaker.core,
        }
    }

    /// Whether the call is timed for slow-call detection.
    #[inline]
    fn times_calls(&self) -> bool {
        match self {
            Held::Lane(lane) => lane.policy.times_calls(),
            Held::Keyed(breaker) => breaker
                .policy()
                .map_or_else(|| breaker.core.times_calls(), Policy::times_calls),
        }
    }

    /// Records the call under the policy it holds (a global breaker's lane) or the one
    /// in force (a keyed breaker's).
    #[inline]
    fn record(&self, permit: Permit, outcome: Outcome, timing: Option<Timing>) {
        let now = || timing.map_or_else(Instant::now, |timing| timing.ended());
        match self {
            Held::Lane(lane) => lane
                .core
                .record_under(&lane.policy, permit, outcome, timing, now),
            Held::Keyed(breaker) => match breaker.policy() {
                Some(policy) => breaker
                    .core
                    .record_under(policy, permit, outcome, timing, now),
                None => breaker.core.record(permit, outcome, timing, now),
            },
        }
    }
}

impl CallReport {
    #[inline]
    pub(crate) fn new(lane: Arc<CoreRef>, permit: Permit) -> Self {
        Self::holding(Held::Lane(lane), permit)
    }

    #[inline]
    pub(crate) fn keyed(breaker: crate::sync::Arc<KeyedBreaker>, permit: Permit) -> Self {
        Self::holding(Held::Keyed(breaker), permit)
    }

    #[inline]
    fn holding(breaker: Held, permit: Permit) -> Self {
        // Only slow-call detection needs the start; the closed fast path reads no clock.
        let started = breaker.times_calls().then(Instant::now);
        Self {
            breaker,
            permit: Some(permit),
            started,
        }
    }
}

impl fmt::Debug for CallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallReport")
            .field("permit", &self.permit)
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl Report for CallReport {
    #[inline]
    fn report(mut self, outcome: Outcome) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let timing = self
            .started
            .map(|started| Timing::new(started, Instant::now()));
        self.breaker.record(permit, outcome, timing);
    }
}

impl Drop for CallReport {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.breaker.core().release(permit);
        }
    }
}
