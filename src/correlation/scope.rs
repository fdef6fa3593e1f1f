//! The task-local "current" ID: set by the server layer around a request, read by the
//! client layer and by `CorrelationId::current()`.

use super::CorrelationId;
use pin_project::{pin_project, pinned_drop};
use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

// A task-local by hand: `Scoped` moves its ID into this slot for the length of each poll
// (and of the inner future's drop) and takes it back after, like `tokio::task_local!`,
// but it can run the inner `call`
// and the future in one scope and hand the ID back at the end, without a clone.
thread_local! {
    static CURRENT: Cell<Option<CorrelationId>> = const { Cell::new(None) };
}

impl CorrelationId {
    /// The ID of the request being handled: set by
    /// [`CorrelationIdLayer`](super::CorrelationIdLayer) around the inner service's
    /// `call` and its response future, so it works anywhere the handler awaits, and
    /// also while that future is dropped, finished or cancelled (a `Drop` that logs
    /// sees the ID).
    ///
    /// `None` outside a scope, and inside a task spawned without
    /// [`WithCorrelationId::with_current_correlation_id`]: the scope does not cross
    /// `tokio::spawn`.
    pub fn current() -> Option<CorrelationId> {
        CURRENT
            .try_with(|current| {
                let id = current.take();
                current.set(id.clone());
                id
            })
            .ok()
            .flatten()
    }

    /// Runs `future` with this ID as [`CorrelationId::current`].
    ///
    /// ```
    /// use palisade::correlation::CorrelationId;
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let id = CorrelationId::parse("job-7")?;
    /// let seen = CorrelationId::scope(id, async { CorrelationId::current() }).await;
    /// assert_eq!(seen.unwrap(), "job-7");
    /// assert_eq!(CorrelationId::current(), None);
    /// # Ok::<(), palisade::correlation::InvalidCorrelationId>(())
    /// # }).unwrap();
    /// ```
    pub fn scope<F: Future>(self, future: F) -> Scoped<F> {
        Scoped::new(Some(self), future)
    }
}

/// Makes `slot` the current ID until dropped, then puts both IDs back where they were,
/// also when the code in between panics.
struct Entered<'a> {
    slot: &'a mut Option<CorrelationId>,
    outer: Option<CorrelationId>,
}

impl<'a> Entered<'a> {
    fn new(slot: &'a mut Option<CorrelationId>) -> Self {
        let outer = swap_current(slot.take());
        Entered { slot, outer }
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        *self.slot = swap_current(self.outer.take());
    }
}

/// Puts `id` in the slot and returns what was there. Only fails while the thread is
/// being torn down, when the ID is then simply absent rather than a panic.
fn swap_current(id: Option<CorrelationId>) -> Option<CorrelationId> {
    CURRENT
        .try_with(|current| current.replace(id))
        .ok()
        .flatten()
}

/// Runs `f` with the ID in `slot` (if any, else none) as the current one.
pub(crate) fn in_scope<R>(slot: &mut Option<CorrelationId>, f: impl FnOnce() -> R) -> R {
    let _entered = Entered::new(slot);
    f()
}

/// A future that runs with a correlation ID as [`CorrelationId::current`]: made by
/// [`CorrelationId::scope`] and [`WithCorrelationId`].
///
/// The ID is current while the inner future is polled and also while it is dropped,
/// whether it finished or was cancelled mid-flight (an outer timeout, a client that
/// disconnected), so guards in it that log on `Drop` still see the ID. Like
/// `tokio::task_local!`'s futures, it panics if polled again after it finished.
#[pin_project(PinnedDrop)]
#[must_use = "futures do nothing unless polled"]
pub struct Scoped<F> {
    /// `None` once finished: the inner future is dropped then, inside the scope, rather
    /// than later wherever the caller drops this one.
    #[pin]
    future: Option<F>,
    /// `None` runs the future with no current ID, whatever the poller's.
    id: Option<CorrelationId>,
}

impl<F> Scoped<F> {
    pub(crate) fn new(id: Option<CorrelationId>, future: F) -> Self {
        Self {
            future: Some(future),
            id,
        }
    }

    /// Gives the ID back once the future has completed, so the caller needs no clone.
    pub(crate) fn take_id(self: Pin<&mut Self>) -> Option<CorrelationId> {
        self.project().id.take()
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = Entered::new(this.id);
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
        // Without drop glue nothing can observe the ID, so skip the two swaps.
        if !std::mem::needs_drop::<F>() || self.future.is_none() {
            return;
        }
        let mut this = self.project();
        let _entered = Entered::new(this.id);
        this.future.set(None);
    }
}

impl<F> fmt::Debug for Scoped<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scoped")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Carries a correlation ID into futures that leave the request's task, above all
/// `tokio::spawn`ed ones: task-locals stay with their task, so without this a spawned
/// task sees no [`CorrelationId::current`] and its outgoing calls carry no ID.
///
/// ```
/// use palisade::correlation::{CorrelationId, WithCorrelationId};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let id = CorrelationId::parse("req-1")?;
/// CorrelationId::scope(id, async {
///     let kept = tokio::spawn(async { CorrelationId::current() }.with_current_correlation_id());
///     let lost = tokio::spawn(async { CorrelationId::current() });
///     assert_eq!(kept.await.unwrap().unwrap(), "req-1");
///     assert_eq!(lost.await.unwrap(), None);
/// })
/// .await;
/// # Ok::<(), palisade::correlation::InvalidCorrelationId>(())
/// # }).unwrap();
/// ```
pub trait WithCorrelationId: Future + Sized {
    /// Runs this future with `id` as the current ID.
    fn with_correlation_id(self, id: CorrelationId) -> Scoped<Self> {
        id.scope(self)
    }

    /// Runs this future with the ID current where this is called (if any), wherever
    /// the future is polled later.
    fn with_current_correlation_id(self) -> Scoped<Self> {
        Scoped::new(CorrelationId::current(), self)
    }
}

impl<F: Future> WithCorrelationId for F {}
