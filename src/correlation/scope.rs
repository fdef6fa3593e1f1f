//! The correlation ID's view of the [request context](crate::context): `current()`,
//! `scope()` and [`WithCorrelationId`] delegate to it.

use super::CorrelationId;
use crate::context::{RequestContext, Scoped, with_current};
use std::future::Future;

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
        with_current(|context| context?.correlation_id().cloned())
    }

    /// Runs `future` with this ID as [`CorrelationId::current`], and the rest of the
    /// [request context](crate::context) (deadline, trace) as it is where this is
    /// called.
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
        RequestContext::current()
            .unwrap_or_default()
            .with_correlation_id(self)
            .scope(future)
    }
}

/// Carries a correlation ID, and the whole [request context](crate::context) with it,
/// into futures that leave the request's task, above all `tokio::spawn`ed ones:
/// task-locals stay with their task, so without this a spawned task sees no
/// [`CorrelationId::current`] (nor deadline, nor trace) and its outgoing calls carry
/// none.
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

    /// Runs this future with the context current where this is called (if any),
    /// wherever the future is polled later.
    fn with_current_correlation_id(self) -> Scoped<Self> {
        Scoped::new(RequestContext::current().map(Box::new), self)
    }
}

impl<F: Future> WithCorrelationId for F {}
