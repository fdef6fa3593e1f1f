//! The task-local "current" ID: set by the server layer around a request, read by the
//! client layer and by `CorrelationId::current()`.

use super::CorrelationId;
use pin_project::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::task::futures::TaskLocalFuture;

tokio::task_local! {
    static CURRENT: CorrelationId;
}

impl CorrelationId {
    /// The ID of the request being handled: set by
    /// [`CorrelationIdLayer`](super::CorrelationIdLayer) around the inner service's
    /// `call` and its response future, so it works anywhere the handler awaits.
    ///
    /// `None` outside a scope, and inside a task spawned without
    /// [`WithCorrelationId::with_current_correlation_id`]: task-locals do not cross
    /// `tokio::spawn`.
    pub fn current() -> Option<CorrelationId> {
        CURRENT.try_with(CorrelationId::clone).ok()
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
        Scoped {
            inner: ScopedInner::With(CURRENT.scope(self, future)),
        }
    }

    /// Runs a synchronous `f` with this ID as the current one (the inner `call`, which
    /// may log or reject before its future exists).
    pub(crate) fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self, f)
    }
}

/// A future that runs with a correlation ID as [`CorrelationId::current`]: made by
/// [`CorrelationId::scope`] and [`WithCorrelationId`].
#[pin_project]
#[must_use = "futures do nothing unless polled"]
pub struct Scoped<F> {
    #[pin]
    inner: ScopedInner<F>,
}

#[pin_project(project = ScopedProj)]
enum ScopedInner<F> {
    With(#[pin] TaskLocalFuture<CorrelationId, F>),
    /// Carrying "no current ID" into a task: it has none there anyway.
    Without(#[pin] F),
}

impl<F> Scoped<F> {
    /// Gives back the ID once the future has completed, so the server layer can echo it
    /// without another clone.
    pub(crate) fn take_id(self: Pin<&mut Self>) -> Option<CorrelationId> {
        match self.project().inner.project() {
            ScopedProj::With(future) => future.take_value(),
            ScopedProj::Without(_) => None,
        }
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().inner.project() {
            ScopedProj::With(future) => future.poll(cx),
            ScopedProj::Without(future) => future.poll(cx),
        }
    }
}

impl<F> fmt::Debug for Scoped<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let with_id = matches!(self.inner, ScopedInner::With(_));
        f.debug_struct("Scoped").field("with_id", &with_id).finish()
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
        match CorrelationId::current() {
            Some(id) => id.scope(self),
            None => Scoped {
                inner: ScopedInner::Without(self),
            },
        }
    }
}

impl<F: Future> WithCorrelationId for F {}
