//! The task-local "current" context: set by the server layer around a request (or by
//! [`RequestContext::scope`]), read by the client layer, the retry layer, the breaker
//! and the handler.

use super::TraceContext;
#[cfg(feature = "http")]
use crate::correlation::CorrelationId;
use pin_project::{pin_project, pinned_drop};
use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::Instant;

// A task-local by hand: `Scoped` moves its context into this slot for the length of each
// poll (and of the inner future's drop) and takes it back after, like
// `tokio::task_local!`, but it can run the inner `call` and the future in one scope and
// hand the context back at the end, without a clone. The context is boxed so that each
// move in and out is one pointer, not the whole context: they happen on every poll and
// every read, the box once per scope.
thread_local! {
    static CURRENT: Cell<Option<Box<RequestContext>>> = const { Cell::new(None) };
}

/// A context as a scope holds it while it is not current.
pub(crate) type Slot = Option<Box<RequestContext>>;

/// What the hops of one request share; see the [module docs](super).
///
/// Cheap to clone: the correlation ID and `tracestate` are reference counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestContext {
    #[cfg(feature = "http")]
    correlation_id: Option<CorrelationId>,
    deadline: Option<Instant>,
    trace: Option<TraceContext>,
    previous_attempts: u32,
}

impl RequestContext {
    /// An empty context: no ID, no deadline, no trace, a first attempt.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the current context, `None` outside any scope.
    pub fn current() -> Option<RequestContext> {
        with_current(|context| context.cloned())
    }

    /// The request's correlation ID.
    #[cfg(feature = "http")]
    pub fn correlation_id(&self) -> Option<&CorrelationId> {
        self.correlation_id.as_ref()
    }

    /// The instant after which nobody waits for the request's answer.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// How long is left before the deadline, from now (zero once it passed).
    pub fn time_left(&self) -> Option<Duration> {
        let deadline = self.deadline?;
        Some(deadline.saturating_duration_since(Instant::now()))
    }

    /// The W3C trace context.
    pub fn trace(&self) -> Option<&TraceContext> {
        self.trace.as_ref()
    }

    /// How many attempts of this request the caller made before this one.
    pub fn previous_attempts(&self) -> u32 {
        self.previous_attempts
    }

    /// With this correlation ID.
    #[cfg(feature = "http")]
    pub fn with_correlation_id(mut self, id: CorrelationId) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// With this deadline.
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// With a deadline `timeout` from now, or none if that instant cannot be
    /// represented. An earlier deadline already set is kept: a context only shrinks.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        if let Some(deadline) = Instant::now().checked_add(timeout) {
            self.deadline = Some(self.deadline.map_or(deadline, |own| own.min(deadline)));
        }
        self
    }

    /// With this trace context.
    pub fn with_trace(mut self, trace: TraceContext) -> Self {
        self.trace = Some(trace);
        self
    }

    /// With this count of the caller's earlier attempts.
    pub fn with_previous_attempts(mut self, attempts: u32) -> Self {
        self.previous_attempts = attempts;
        self
    }

    #[cfg(feature = "http")]
    pub(crate) fn take_correlation_id(&mut self) -> Option<CorrelationId> {
        self.correlation_id.take()
    }

    /// Runs `future` with this context as the current one.
    ///
    /// ```
    /// use palisade::context::{self, RequestContext};
    /// use std::time::Duration;
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let context = RequestContext::new().with_timeout(Duration::from_secs(2));
    /// let left = context.scope(async { context::time_left() }).await;
    /// assert!(left.unwrap() <= Duration::from_secs(2));
    /// assert_eq!(context::time_left(), None);
    /// # });
    /// ```
    pub fn scope<F: Future>(self, future: F) -> Scoped<F> {
        Scoped::new(Some(Box::new(self)), future)
    }
}

/// Runs `f` on the current context without cloning it. `f` must not read the current
/// context itself (it would see none): it only looks at its argument.
pub(crate) fn with_current<R>(f: impl FnOnce(Option<&RequestContext>) -> R) -> R {
    let context = swap_current(None);
    let result = f(context.as_deref());
    swap_current(context);
    result
}

/// Makes `slot` the current context until dropped, then puts both back where they
/// were, also when the code in between panics.
pub(crate) struct Entered<'a> {
    slot: &'a mut Slot,
    outer: Slot,
}

impl<'a> Entered<'a> {
    fn new(slot: &'a mut Slot) -> Self {
        let outer = swap_current(slot.take());
        Entered { slot, outer }
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        *self.slot = swap_current(self.outer.take());
    }
}

/// Puts `context` in the slot and returns what was there. Only fails while the thread
/// is being torn down, when the context is then simply absent rather than a panic.
#[inline]
fn swap_current(context: Slot) -> Slot {
    CURRENT
        .try_with(|current| current.replace(context))
        .ok()
        .flatten()
}

/// Makes the context in `slot` (if any, else none) the current one until the guard is
/// dropped.
#[cfg(feature = "http")]
pub(crate) fn enter(slot: &mut Slot) -> Entered<'_> {
    Entered::new(slot)
}

/// A future that runs with a [`RequestContext`] as the current one: made by
/// [`RequestContext::scope`], `CorrelationId::scope` and `WithCorrelationId`.
///
/// The context is current while the inner future is polled and also while it is
/// dropped, whether it finished or was cancelled mid-flight (an outer timeout, a client
/// that disconnected), so guards in it that log on `Drop` still see it. Like
/// `tokio::task_local!`'s futures, it panics if polled again after it finished.
#[pin_project(PinnedDrop)]
#[must_use = "futures do nothing unless polled"]
pub struct Scoped<F> {
    /// `None` once finished: the inner future is dropped then, inside the scope, rather
    /// than later wherever the caller drops this one.
    #[pin]
    future: Option<F>,
    /// `None` runs the future with no current context, whatever the poller's.
    context: Slot,
}

impl<F> Scoped<F> {
    pub(crate) fn new(context: Slot, future: F) -> Self {
        Self {
            future: Some(future),
            context,
        }
    }

    /// Drops the inner future now, inside the scope (a deadline passed), leaving this
    /// one finished.
    #[cfg(feature = "http")]
    pub(crate) fn cancel(self: Pin<&mut Self>) {
        let mut this = self.project();
        let _entered = Entered::new(this.context);
        this.future.set(None);
    }

    /// Takes the correlation ID out of the context once the future has completed, so
    /// the caller needs no clone (the context itself stays in its box, unmoved).
    #[cfg(feature = "http")]
    pub(crate) fn take_correlation_id(self: Pin<&mut Self>) -> Option<CorrelationId> {
        self.project().context.as_mut()?.take_correlation_id()
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = Entered::new(this.context);
        let Some(future) = this.future.as_mut().as_pin_mut() else {
            panic!("`Scoped` polled after completion");
        };
        let output = ready!(future.poll(cx));
        this.future.set(None);
        Poll::Ready(output)
    }
}

#[pinned_drop]
impl<F> PinnedDrop for Scoped<F> {
    fn drop(self: Pin<&mut Self>) {
        // Without drop glue nothing can observe the context, so skip the two swaps.
        if !std::mem::needs_drop::<F>() || self.future.is_none() {
            return;
        }
        let mut this = self.project();
        let _entered = Entered::new(this.context);
        this.future.set(None);
    }
}

impl<F> fmt::Debug for Scoped<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scoped")
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}
