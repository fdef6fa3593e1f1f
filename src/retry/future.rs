use super::layer::{Options, Shared};
use super::{
    AttemptTimedOut, Backoff, DeadlineExceeded, Decision, Duplicate, RetryEvent, RetryPolicy,
    RetryReason, Withdrawal,
};
use crate::rejection::Rejection;
use crate::rng::random_u64;
use pin_project::{pin_project, pinned_drop};
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::{Instant, Sleep, sleep_until};
use tower::BoxError;
use tower_service::Service;

/// The response future of [`RetryService`](super::RetryService): attempts, waits between them, and
/// resolves to the last result.
///
/// Dropping it stops everything: the attempt in flight or the pending delay is
/// abandoned. A budget withdrawal taken for a retry that was not sent yet is refunded;
/// one whose retry was handed to the service stays spent, since the request may have
/// reached the server.
#[pin_project(PinnedDrop)]
pub struct ResponseFuture<S, P, D, Req>
where
    D: Duplicate<Req>,
    S: Service<D::Request>,
{
    #[pin]
    state: State<S::Future, D::Request>,
    /// While attempting: the attempt's timeout or the call's deadline, whichever comes
    /// first. While waiting: the backoff delay. Out of line and absent until something
    /// is timed, so that a call without timeouts neither carries nor touches a timer.
    timer: Option<Pin<Box<Sleep>>>,
    /// The kept request; `None` when the request is not retryable.
    copy: Option<D::Copy>,
    /// The service to retry with: `Some` exactly when `copy` is. A field of its own
    /// rather than a tuple with the copy, so that neither is moved to be paired.
    service: Option<S>,
    progress: Progress,
    /// The budget taken for the retry being waited for: spent once the retry is sent,
    /// refunded if it never is.
    withdrawal: Option<Withdrawal>,
    shared: Arc<Shared<P, D>>,
    /// The options the call started with, kept to its end whatever a reload does.
    options: Arc<Options>,
    _request: PhantomData<fn(Req)>,
}

#[pin_project(project = StateProj, project_replace = StateOwn)]
enum State<F, R> {
    Attempting {
        #[pin]
        future: F,
    },
    /// Waiting for the delay, then for the service to be ready, to send `request`.
    /// The request is made when the retry is scheduled, so that a copy that cannot be
    /// replayed still returns the last result, and kept out of line so that it costs
    /// the future's size nothing on the success path.
    Waiting {
        request: Box<R>,
    },
    /// The request context's deadline had passed before the call: nothing is sent.
    Expired,
    Done,
}

/// Where a call stands across its attempts.
#[derive(Debug, Clone, Copy)]
struct Progress {
    /// The attempt in flight or next: 1 for the first.
    attempt: u32,
    /// Backoff delays since the start or the last server hint, after which the
    /// schedule starts over.
    backoff_retries: u32,
    /// The last backoff delay, for [`Jitter::Decorrelated`](super::Jitter::Decorrelated);
    /// zero when the schedule starts over.
    previous_delay: Duration,
    /// The earlier of the layer's own deadline and the request context's.
    deadline: Option<Instant>,
    /// The time from the start to `deadline`, for the error.
    given: Option<Duration>,
    timer_is_deadline: bool,
}

/// The first attempt's progress and timer. Made before the service splits the request
/// into the attempt's and the kept copy: nothing between that split and the future's
/// construction can then unwind, and a step that could (the clock arithmetic, the
/// timer's allocation) would make LLVM keep an extra copy of the request for its
/// landing pad.
pub(crate) struct Start {
    progress: Progress,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Start {
    #[inline(always)]
    pub(crate) fn new(options: &Options, now: Instant, caller_deadline: Option<Instant>) -> Self {
        let mut progress = Progress::new(options, now, caller_deadline);
        let timer = progress
            .attempt_timer(now, options.per_attempt_timeout)
            .map(|at| Box::pin(sleep_until(at)));
        Start { progress, timer }
    }
}

/// A retry the layer agreed to.
struct Scheduled<R> {
    delay: Wait,
    wake: Instant,
    reason: RetryReason,
    request: R,
    withdrawal: Withdrawal,
}

impl<S, P, D, Req> ResponseFuture<S, P, D, Req>
where
    D: Duplicate<Req>,
    S: Service<D::Request>,
{
    #[inline(always)]
    pub(crate) fn new(
        future: S::Future,
        copy: Option<D::Copy>,
        service: Option<S>,
        (shared, options): (Arc<Shared<P, D>>, Arc<Options>),
        Start { progress, timer }: Start,
    ) -> Self {
        Self {
            state: State::Attempting { future },
            timer,
            copy,
            service,
            progress,
            withdrawal: None,
            shared,
            options,
            _request: PhantomData,
        }
    }
}

impl<S, P, D, Req> ResponseFuture<S, P, D, Req>
where
    D: Duplicate<Req>,
    S: Service<D::Request>,
{
    /// A call whose caller's deadline passed before it: resolves to
    /// [`DeadlineExceeded`] without calling the service.
    pub(crate) fn expired(
        shared: Arc<Shared<P, D>>,
        options: Arc<Options>,
        now: Instant,
        caller_deadline: Instant,
    ) -> Self {
        Self {
            state: State::Expired,
            timer: None,
            copy: None,
            service: None,
            progress: Progress::new(&options, now, Some(caller_deadline)),
            withdrawal: None,
            shared,
            options,
            _request: PhantomData,
        }
    }
}

impl Progress {
    #[inline]
    fn new(options: &Options, now: Instant, caller_deadline: Option<Instant>) -> Self {
        let own = options
            .deadline
            .and_then(|deadline| now.checked_add(deadline));
        let deadline = match (own, caller_deadline) {
            (Some(own), Some(caller)) => Some(own.min(caller)),
            (own, caller) => own.or(caller),
        };
        Progress {
            attempt: 1,
            backoff_retries: 0,
            previous_delay: Duration::ZERO,
            deadline,
            given: deadline.map(|deadline| deadline.saturating_duration_since(now)),
            timer_is_deadline: false,
        }
    }

    /// When the attempt starting `now` must end, if ever; notes whether that is the
    /// deadline.
    #[inline]
    fn attempt_timer(&mut self, now: Instant, timeout: Option<Duration>) -> Option<Instant> {
        let timeout = timeout.and_then(|timeout| now.checked_add(timeout));
        let (at, is_deadline) = match (timeout, self.deadline) {
            (Some(timeout), Some(deadline)) if deadline <= timeout => (deadline, true),
            (Some(timeout), _) => (timeout, false),
            (None, Some(deadline)) => (deadline, true),
            (None, None) => return None,
        };
        self.timer_is_deadline = is_deadline;
        Some(at)
    }

    /// Decides whether the attempt that just ended with a retryable verdict is retried,
    /// and takes the budget for it.
    fn schedule<P, D, Req>(
        &self,
        (shared, options): (&Shared<P, D>, &Options),
        copy: Option<&D::Copy>,
        now: Instant,
        reason: RetryReason,
        after: Option<Duration>,
    ) -> Option<Scheduled<D::Request>>
    where
        D: Duplicate<Req>,
    {
        let copy = copy?;
        if self.attempt >= options.max_attempts {
            return None;
        }
        if after.is_some_and(|after| after > options.max_server_delay) {
            #[cfg(feature = "tracing")]
            tracing::debug!(?after, cap = ?options.max_server_delay, "requested delay above the cap; not retrying");
            return None;
        }
        let delay = self.wait(&options.backoff, reason, after);
        let wake = now.checked_add(delay.duration())?;
        if self.deadline.is_some_and(|deadline| wake >= deadline) {
            return None;
        }
        let request = shared.duplicate.again(copy, self.attempt + 1)?;
        let Some(withdrawal) = shared.ledger.budget.withdraw(now) else {
            shared.ledger.counters.budget_exhausted();
            #[cfg(feature = "tracing")]
            tracing::debug!(
                attempt = self.attempt,
                "retry budget exhausted; not retrying"
            );
            return None;
        };
        Some(Scheduled {
            delay,
            wake,
            reason,
            request,
            withdrawal,
        })
    }
}

/// How long a scheduled retry waits, and why.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// The backoff's delay (for a local rejection, at least its `retry_after()`).
    Backoff(Duration),
    /// Exactly what the server asked for; the backoff starts over after it.
    Hint(Duration),
}

impl Wait {
    fn duration(self) -> Duration {
        match self {
            Wait::Backoff(delay) | Wait::Hint(delay) => delay,
        }
    }
}

impl Progress {
    /// The wait before the next attempt. A server's hint (`Retry-After`,
    /// `grpc-retry-pushback-ms`) is the delay, as gRFC A6 has it: the server knows
    /// when it recovers, and a zero means at once. A local rejection's `retry_after()`
    /// is only a floor under the backoff, so that a layer answering "now" again and
    /// again is not hammered in a tight loop.
    fn wait(&self, backoff: &Backoff, reason: RetryReason, after: Option<Duration>) -> Wait {
        let scheduled = || {
            let retry = self.backoff_retries.saturating_add(1);
            backoff.delay(retry, self.previous_delay, random_u64())
        };
        match after {
            None => Wait::Backoff(scheduled()),
            Some(after) if is_local_rejection(reason) => Wait::Backoff(after.max(scheduled())),
            Some(after) => Wait::Hint(after),
        }
    }

    /// Moves on to the next attempt, which waits `wait` first.
    fn advance(&mut self, wait: Wait) {
        self.attempt += 1;
        match wait {
            Wait::Backoff(delay) => {
                self.backoff_retries = self.backoff_retries.saturating_add(1);
                self.previous_delay = delay;
            }
            Wait::Hint(_) => {
                self.backoff_retries = 0;
                self.previous_delay = Duration::ZERO;
            }
        }
    }
}

/// Whether the retry is for a [rejection](crate::rejection) from a layer below rather
/// than for a server's answer.
fn is_local_rejection(reason: RetryReason) -> bool {
    matches!(reason, RetryReason::Rejected(_))
}

/// The verdict on an attempt: a [rejection](crate::rejection) (the request never
/// left) is the policy's [`on_rejection`](RetryPolicy::on_rejection), anything else its
/// [`decide`](RetryPolicy::decide).
fn verdict<P, Req, Res>(policy: &P, result: &Result<Res, BoxError>) -> Decision
where
    P: RetryPolicy<Req, Res>,
{
    if let Err(error) = result
        && let Some(rejection) = Rejection::find(&**error)
    {
        return policy.on_rejection(&rejection, result);
    }
    policy.decide(result)
}

/// Arms the timer for `at`, reusing its allocation if it has one.
fn set_timer(timer: &mut Option<Pin<Box<Sleep>>>, at: Instant) {
    match timer {
        Some(sleep) => sleep.as_mut().reset(at),
        None => *timer = Some(Box::pin(sleep_until(at))),
    }
}

impl<S, P, D, Req> Future for ResponseFuture<S, P, D, Req>
where
    D: Duplicate<Req>,
    P: RetryPolicy<Req, S::Response>,
    S: Service<D::Request>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The common cases stay in this small function: an attempt still running without
        // a timer, and one that ended with a result to return. The rest is out of line.
        let mut this = self.as_mut().project();
        let StateProj::Attempting { future } = this.state.as_mut().project() else {
            return self.poll_on(cx, None);
        };
        let result = match future.poll(cx) {
            Poll::Ready(result) => result.map_err(Into::into),
            Poll::Pending if this.timer.is_none() => return Poll::Pending,
            Poll::Pending => return self.poll_on(cx, Some(Poll::Pending)),
        };
        let verdict = verdict::<P, Req, _>(&this.shared.policy, &result);
        if verdict != Decision::Return {
            return self.poll_on(cx, Some(Poll::Ready((result, verdict))));
        }
        this.state.set(State::Done);
        let succeeded = result.is_ok();
        Poll::Ready(finish(this.shared, this.progress, result, succeeded))
    }
}

/// An attempt just polled by [`ResponseFuture::poll`]: still running, or ended with this
/// result and verdict.
type Polled<T> = Option<Poll<(Result<T, BoxError>, Decision)>>;

impl<S, P, D, Req> ResponseFuture<S, P, D, Req>
where
    D: Duplicate<Req>,
    P: RetryPolicy<Req, S::Response>,
    S: Service<D::Request>,
    S::Error: Into<BoxError>,
{
    /// Everything but the common cases of [`poll`](Future::poll): timeouts, retries, the
    /// waits between them. `polled` is the attempt `poll` just polled, if it did.
    #[inline(never)]
    fn poll_on(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut polled: Polled<S::Response>,
    ) -> Poll<Result<S::Response, BoxError>> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Attempting { future } => {
                    let polled = match polled.take() {
                        Some(polled) => polled,
                        None => future.poll(cx).map(|result| {
                            let result = result.map_err(Into::into);
                            let verdict = verdict::<P, Req, _>(&this.shared.policy, &result);
                            (result, verdict)
                        }),
                    };
                    let (result, verdict) = match polled {
                        Poll::Ready(ended) => ended,
                        Poll::Pending => {
                            let expired = this
                                .timer
                                .as_mut()
                                .is_some_and(|timer| timer.as_mut().poll(cx).is_ready());
                            if !expired {
                                return Poll::Pending;
                            }
                            if this.progress.timer_is_deadline {
                                this.state.set(State::Done);
                                return Poll::Ready(deadline_exceeded(this.shared, this.progress));
                            }
                            let timeout = this.options.per_attempt_timeout.unwrap_or_default();
                            let result = Err(AttemptTimedOut::new(timeout).into());
                            let verdict = verdict::<P, Req, _>(&this.shared.policy, &result);
                            (result, verdict)
                        }
                    };
                    // Drops the attempt (cancelling it on a timeout).
                    this.state.set(State::Done);
                    let Decision::Retry { reason, after } = verdict else {
                        let succeeded = result.is_ok();
                        return Poll::Ready(finish(this.shared, this.progress, result, succeeded));
                    };
                    let scheduled = this.progress.schedule(
                        (this.shared, this.options),
                        this.copy.as_ref(),
                        Instant::now(),
                        reason,
                        after,
                    );
                    let Some(scheduled) = scheduled else {
                        return Poll::Ready(finish(this.shared, this.progress, result, false));
                    };
                    this.progress.advance(scheduled.delay);
                    *this.withdrawal = Some(scheduled.withdrawal);
                    this.shared.notify(RetryEvent {
                        attempt: this.progress.attempt,
                        delay: scheduled.delay.duration(),
                        reason: scheduled.reason,
                    });
                    set_timer(this.timer, scheduled.wake);
                    this.progress.timer_is_deadline = false;
                    this.state.set(State::Waiting {
                        request: Box::new(scheduled.request),
                    });
                }
                StateProj::Waiting { .. } => {
                    if !this.progress.timer_is_deadline
                        && let Some(timer) = this.timer.as_mut()
                    {
                        // The backoff delay; once elapsed it stays ready.
                        ready!(timer.as_mut().poll(cx));
                    }
                    let service = this
                        .service
                        .as_mut()
                        .expect("a retry is only scheduled with a service and a copy");
                    let ready = match service.poll_ready(cx) {
                        Poll::Ready(ready) => ready.map_err(Into::into),
                        Poll::Pending => {
                            if !deadline_expired(this.timer, this.progress, cx) {
                                return Poll::Pending;
                            }
                            // Never sent: the withdrawal goes back.
                            this.state.set(State::Done);
                            refund(this.shared, this.withdrawal.take());
                            return Poll::Ready(deadline_exceeded(this.shared, this.progress));
                        }
                    };
                    if let Err(error) = ready {
                        this.state.set(State::Done);
                        refund(this.shared, this.withdrawal.take());
                        return Poll::Ready(finish(this.shared, this.progress, Err(error), false));
                    }
                    let StateOwn::Waiting { request } =
                        this.state.as_mut().project_replace(State::Done)
                    else {
                        unreachable!("in the waiting state");
                    };
                    this.state.set(State::Attempting {
                        future: service.call(*request),
                    });
                    // The retry is on its way to the server, which pays for it whether or
                    // not the caller waits for the answer: its withdrawal is spent.
                    this.withdrawal.take();
                    let now = Instant::now();
                    match this
                        .progress
                        .attempt_timer(now, this.options.per_attempt_timeout)
                    {
                        Some(at) => set_timer(this.timer, at),
                        None => *this.timer = None,
                    }
                }
                StateProj::Expired => {
                    this.state.set(State::Done);
                    return Poll::Ready(deadline_exceeded(this.shared, this.progress));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

/// Whether the deadline has passed while the service is not ready, once the backoff
/// delay is over. The timer is moved from the delay to the deadline then, and only
/// then: a service ready at once costs no timer reset.
fn deadline_expired(
    timer: &mut Option<Pin<Box<Sleep>>>,
    progress: &mut Progress,
    cx: &mut Context<'_>,
) -> bool {
    let Some(deadline) = progress.deadline else {
        return false;
    };
    if !progress.timer_is_deadline {
        set_timer(timer, deadline);
        progress.timer_is_deadline = true;
    }
    timer
        .as_mut()
        .is_some_and(|timer| timer.as_mut().poll(cx).is_ready())
}

/// Ends the call with [`DeadlineExceeded`].
fn deadline_exceeded<P, D, T>(shared: &Shared<P, D>, progress: &Progress) -> Result<T, BoxError> {
    finish(
        shared,
        progress,
        Err(DeadlineExceeded::new(progress.given).into()),
        false,
    )
}

/// Counts the call's final result and hands it over.
fn finish<P, D, T>(
    shared: &Shared<P, D>,
    progress: &Progress,
    result: Result<T, BoxError>,
    succeeded: bool,
) -> Result<T, BoxError> {
    shared
        .ledger
        .counters
        .finish(succeeded, progress.attempt > 1);
    result
}

fn refund<P, D>(shared: &Shared<P, D>, withdrawal: Option<Withdrawal>) {
    if let Some(withdrawal) = withdrawal {
        shared.ledger.budget.refund(withdrawal, Instant::now());
    }
}

#[pinned_drop]
impl<S, P, D, Req> PinnedDrop for ResponseFuture<S, P, D, Req>
where
    D: Duplicate<Req>,
    S: Service<D::Request>,
{
    fn drop(self: Pin<&mut Self>) {
        let this = self.project();
        refund(this.shared, this.withdrawal.take());
    }
}

impl<S, P, D, Req> fmt::Debug for ResponseFuture<S, P, D, Req>
where
    D: Duplicate<Req>,
    S: Service<D::Request>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("attempt", &self.progress.attempt)
            .finish_non_exhaustive()
    }
}
