//! Outlier ejection: the breaker of an endpoint inside a `tower::balance` pool, which
//! tells the balancer to route around the endpoint instead of failing its calls.

use super::future::ResponseFuture;
use super::lanes::{Lanes, Published};
use super::service::{CallReport, refused};
use super::state::{Core, Permit, Refusal};
use crate::classify::{Classify, ErrorsAsFailures};
use crate::sync::{Mutex, MutexGuard, lock};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tower::BoxError;
use tower_layer::Layer;
use tower_service::Service;

/// The endpoints of one balancer, so that they can tell when all of them refuse calls
/// (and then answer with the rejection rather than leave the balancer waiting).
///
/// Cheap to clone; clones are the same group. An endpoint joins it when
/// [`EjectionLayer`] wraps it and leaves when its service (and every clone of it) is
/// dropped, as a balancer drops an endpoint its discovery removed.
#[derive(Clone, Default)]
pub struct EjectionGroup {
    members: Arc<Mutex<Vec<Weak<Member>>>>,
}

/// One endpoint's breaker, as long as its service lives.
struct Member {
    core: Arc<Core>,
    /// Probe slots this endpoint's services hold for their next call: such an endpoint
    /// is ready, though its breaker counts every slot as taken.
    reserved_probes: AtomicUsize,
}

impl Member {
    /// Why this endpoint cannot take a call now, if it cannot.
    fn refuses(&self, now: Instant) -> Option<Refusal> {
        // A breaker in shadow mode lets every call through, so its endpoint takes them.
        if self.reserved_probes.load(Ordering::Acquire) > 0 || self.core.is_shadow() {
            return None;
        }
        self.core.refuses(now)
    }
}

impl fmt::Debug for EjectionGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EjectionGroup")
            .field("endpoints", &self.lock().len())
            .finish()
    }
}

impl EjectionGroup {
    /// An empty group.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Weak<Member>>> {
        // Every update is one push or one retain: a panic cannot leave the list torn.
        lock(&self.members)
    }

    fn join(&self, core: Arc<Core>) -> Arc<Member> {
        let member = Arc::new(Member {
            core,
            reserved_probes: AtomicUsize::new(0),
        });
        let mut members = self.lock();
        members.retain(|member| member.strong_count() > 0);
        members.push(Arc::downgrade(&member));
        member
    }

    /// The live members (dropping the departed from the list).
    fn members(&self) -> Vec<Arc<Member>> {
        let mut members = self.lock();
        members.retain(|member| member.strong_count() > 0);
        members.iter().filter_map(Weak::upgrade).collect()
    }
}

/// Wraps an endpoint of a balancer in its breaker, in ejection mode; made by
/// [`CircuitBreakerLayer::ejecting`](super::CircuitBreakerLayer::ejecting).
///
/// Every service it builds shares the one breaker it was made from: give each endpoint
/// a [`CircuitBreakerLayer`](super::CircuitBreakerLayer) of its own.
///
/// # Why this mode works through `poll_ready`
///
/// A breaker on its own rejects in `call` and leaves `poll_ready` to the inner service
/// (principle 2 of the design: a `poll_ready` error is final in tower and poisons
/// `Buffer` and balancers). Inside a balancer that is the wrong answer: the balancer has
/// other endpoints, and an open endpoint that reports ready takes its share of the
/// requests and fails every one of them. "Not ready" is how a balancer is told to send
/// them elsewhere, so here, and only here, the breaker answers through `poll_ready`, and
/// never with an error: an open endpoint is `Pending`.
///
/// - **Closed**: ready when the inner service is.
/// - **Open**: `Pending`, with a timer for the moment the breaker may probe, so that
///   the balancer polls the endpoint again then.
/// - **May probe** (open time over, or half-open with a free probe slot): `poll_ready`
///   takes a probe slot and reports ready; the next `call` is the probe. Dropping the
///   service before that call gives the slot back.
/// - **Half-open, every probe slot taken**: `Pending` until a probe's verdict.
/// - **Every endpoint of the [`EjectionGroup`] refuses calls**: a balancer whose every
///   endpoint is `Pending` would wait, and the requests with it. So when the whole group
///   refuses, each endpoint reports ready and its `call` answers at once with
///   [`CircuitOpen`](super::CircuitOpen), whose `retry_after` is the soonest any of
///   them may probe.
///
/// A closed endpoint's readiness is decided again at every `poll_ready`, so an endpoint
/// whose breaker opens while it sits in the balancer's ready set is moved out of it the
/// next time the balancer checks it (tower's p2c checks the endpoint it picked right
/// before calling it).
///
/// # Example
///
/// ```
/// use palisade::circuit_breaker::{CircuitBreakerLayer, CircuitOpen, EjectionGroup};
/// use std::time::Duration;
/// use tower::balance::p2c::Balance;
/// use tower::discover::ServiceList;
/// use tower::load::{CompleteOnResponse, PendingRequests};
/// use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let group = EjectionGroup::new();
/// let mut handles = Vec::new();
/// let endpoints = ["a", "b"].map(|name| {
///     // One breaker per endpoint.
///     let breaker = CircuitBreakerLayer::builder()
///         .minimum_calls(2)
///         .open_for(Duration::from_secs(30))
///         .build()
///         .expect("valid");
///     handles.push(breaker.handle());
///     let endpoint = ServiceBuilder::new()
///         .layer(breaker.ejecting(&group))
///         .service(service_fn(move |_: ()| async move {
///             if name == "a" { Err::<&str, BoxError>("a is down".into()) } else { Ok(name) }
///         }));
///     PendingRequests::new(endpoint, CompleteOnResponse::default())
/// });
/// let mut pool = Balance::new(ServiceList::new(endpoints));
///
/// // Until a's breaker opens, some calls reach it and fail; then only b answers.
/// for _ in 0..20 {
///     let _ = pool.ready().await?.call(()).await;
/// }
/// for _ in 0..20 {
///     assert_eq!(pool.ready().await?.call(()).await?, "b");
/// }
///
/// // With both open, the pool answers with the rejection instead of waiting.
/// handles[1].force_open();
/// let error = pool.ready().await?.call(()).await.unwrap_err();
/// assert!(error.downcast_ref::<CircuitOpen>().is_some());
/// # Ok(())
/// # }
/// ```
pub struct EjectionLayer<C = ErrorsAsFailures> {
    core: Arc<Core>,
    lanes: Published,
    classify: C,
    group: EjectionGroup,
}

impl<C> EjectionLayer<C> {
    pub(crate) fn new(
        core: Arc<Core>,
        lanes: Published,
        classify: C,
        group: EjectionGroup,
    ) -> Self {
        Self {
            core,
            lanes,
            classify,
            group,
        }
    }
}

impl<C: Clone> Clone for EjectionLayer<C> {
    fn clone(&self) -> Self {
        Self {
            core: Arc::clone(&self.core),
            lanes: Arc::clone(&self.lanes),
            classify: self.classify.clone(),
            group: self.group.clone(),
        }
    }
}

impl<C> fmt::Debug for EjectionLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EjectionLayer")
            .field("core", &self.core)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl<S, C: Clone> Layer<S> for EjectionLayer<C> {
    type Service = EjectionService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        EjectionService {
            inner,
            lanes: Lanes::new(&self.lanes),
            classify: self.classify.clone(),
            membership: self.group.join(Arc::clone(&self.core)),
            group: self.group.clone(),
            waiter: next_waiter(),
            reserved: None,
            timer: None,
        }
    }
}

/// An endpoint of a balancer behind its breaker, in ejection mode; made by
/// [`EjectionLayer`].
pub struct EjectionService<S, C = ErrorsAsFailures> {
    inner: S,
    lanes: Lanes,
    classify: C,
    /// Keeps the endpoint in the group for as long as it (or a clone) lives.
    membership: Arc<Member>,
    group: EjectionGroup,
    /// This service's name among the tasks waiting on the group's breakers: each clone
    /// may be polled by a task of its own.
    waiter: u64,
    /// What the last `poll_ready` decided, for the next `call`.
    reserved: Option<Reserved>,
    /// Wakes the task when the open breaker may probe; kept to be reset, not remade.
    timer: Option<Pin<Box<Sleep>>>,
}

#[derive(Debug)]
enum Reserved {
    /// The breaker let the call through (a probe holds its slot until the call).
    Admit(Permit),
    /// Every endpoint of the group refuses calls: the call is answered with this.
    Reject(Refusal),
}

fn next_waiter() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl<S, C> EjectionService<S, C> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    fn core(&self) -> &Core {
        &self.membership.core
    }

    /// Decides whether the next call may go through, or must be rejected, or (Pending)
    /// the balancer should look elsewhere until the task is woken.
    fn reserve(&mut self, cx: &mut Context<'_>) -> Poll<Reserved> {
        let refusal = match self.core().try_admit(Instant::now) {
            Ok(permit) => return Poll::Ready(Reserved::Admit(permit)),
            Err(refusal) => refusal,
        };
        // In shadow mode the endpoint is never taken out of the pool: the call goes
        // through, and `call` counts it.
        if self.core().is_shadow() {
            return Poll::Ready(Reserved::Reject(refusal));
        }
        // Registered first and looked again second, so that a change in between wakes us.
        self.wake_on_any_change(cx.waker());
        let refusal = match self.core().try_admit(Instant::now) {
            Ok(permit) => return Poll::Ready(Reserved::Admit(permit)),
            Err(refusal) => refusal,
        };
        let now = Instant::now();
        if let Some(soonest) = self.every_endpoint_refuses(now) {
            return Poll::Ready(Reserved::Reject(Refusal {
                retry_after: soonest,
                ..refusal
            }));
        }
        if refusal.timed {
            self.wake_at(now + refusal.retry_after, cx);
        }
        Poll::Pending
    }

    /// Every endpoint's breaker wakes this task when it changes: one that opens may
    /// leave the whole group refusing, one that closes ends that.
    fn wake_on_any_change(&self, waker: &Waker) {
        for member in self.group.members() {
            member.core.wake_on_change(self.waiter, waker);
        }
    }

    /// The soonest any endpoint may probe, if every endpoint of the group refuses calls.
    /// An endpoint that holds a probe slot for its next call does not refuse: the
    /// balancer can send that call to it.
    fn every_endpoint_refuses(&self, now: Instant) -> Option<Duration> {
        self.group
            .members()
            .iter()
            .map(|member| member.refuses(now).map(|refusal| refusal.retry_after))
            .try_fold(Duration::MAX, |soonest, retry_after| {
                retry_after.map(|retry_after| soonest.min(retry_after))
            })
    }

    fn wake_at(&mut self, deadline: Instant, cx: &mut Context<'_>) {
        let timer = match &mut self.timer {
            Some(timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        if timer.as_mut().poll(cx).is_ready() {
            cx.waker().wake_by_ref();
        }
    }

    /// Keeps what `poll_ready` decided for the next call, telling the group when it is a
    /// probe slot.
    fn hold(&mut self, reserved: Reserved) {
        if matches!(&reserved, Reserved::Admit(permit) if permit.is_probe()) {
            self.membership
                .reserved_probes
                .fetch_add(1, Ordering::AcqRel);
        }
        self.reserved = Some(reserved);
    }

    /// Takes what the last `poll_ready` decided, for a call or to give it back.
    fn take_reserved(&mut self) -> Option<Reserved> {
        let reserved = self.reserved.take();
        if matches!(&reserved, Some(Reserved::Admit(permit)) if permit.is_probe()) {
            self.membership
                .reserved_probes
                .fetch_sub(1, Ordering::AcqRel);
        }
        reserved
    }

    /// Gives back what a reservation holds (a probe slot).
    fn release(&mut self) {
        if let Some(Reserved::Admit(permit)) = self.take_reserved() {
            self.membership.core.release(permit);
        }
    }
}

impl<S: Clone, C: Clone> Clone for EjectionService<S, C> {
    /// The same endpoint, without the original's reservation.
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            lanes: self.lanes.clone(),
            classify: self.classify.clone(),
            membership: Arc::clone(&self.membership),
            group: self.group.clone(),
            waiter: next_waiter(),
            reserved: None,
            timer: None,
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for EjectionService<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EjectionService")
            .field("inner", &self.inner)
            .field("core", self.core())
            .field("reserved", &self.reserved)
            .finish_non_exhaustive()
    }
}

impl<S, C> Drop for EjectionService<S, C> {
    fn drop(&mut self) {
        self.release();
    }
}

impl<S, C, Request> Service<Request> for EjectionService<S, C>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = C::Response<CallReport>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A probe slot is kept until the call; anything else is decided afresh, since
        // the breaker may have opened (or the group recovered) since.
        if !matches!(&self.reserved, Some(Reserved::Admit(permit)) if permit.is_probe()) {
            self.release();
            match self.reserve(cx) {
                Poll::Ready(reserved) => self.hold(reserved),
                Poll::Pending => return Poll::Pending,
            }
        }
        if let Some(Reserved::Reject(_)) = self.reserved
            && !self.core().is_shadow()
        {
            return Poll::Ready(Ok(()));
        }
        let ready = self.inner.poll_ready(cx).map_err(Into::into);
        if let Poll::Ready(Err(_)) = ready {
            self.release();
        }
        ready
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // Without a reservation (a call without `poll_ready`), decide now.
        let decision = match self.take_reserved() {
            Some(Reserved::Admit(permit)) => Ok(permit),
            Some(Reserved::Reject(refusal)) => Err(self.core().reject(refusal)),
            None => self.core().admit(Instant::now),
        };
        let lanes = self.lanes.load();
        match decision {
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
