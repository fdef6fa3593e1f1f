use super::future::Start;
use super::layer::{Options, Shared};
use super::{Duplicate, ResponseFuture, RetryPolicy};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;
use tower::BoxError;
use tower_service::Service;

/// The service [`RetryLayer`](super::RetryLayer) builds: retries calls to `S`.
pub struct RetryService<S, P, D> {
    inner: S,
    shared: Arc<Shared<P, D>>,
    /// The options last taken, and the generation they were taken at.
    options: Arc<Options>,
    generation: u64,
}

impl<S, P, D> RetryService<S, P, D> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<P, D>>) -> Self {
        let published = &shared.ledger.options;
        let generation = published.generation();
        let options = published.load();
        Self {
            inner,
            shared,
            options,
            generation,
        }
    }

    /// The options in force, for a request starting now.
    #[inline]
    fn options(&mut self) -> Arc<Options> {
        let generation = self.shared.ledger.options.generation();
        if generation != self.generation {
            self.refresh(generation);
        }
        Arc::clone(&self.options)
    }

    #[cold]
    #[inline(never)]
    fn refresh(&mut self, generation: u64) {
        self.options = self.shared.ledger.options.load();
        self.generation = generation;
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, P, D> Clone for RetryService<S, P, D> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            options: self.options.clone(),
            generation: self.generation,
        }
    }
}

impl<S: fmt::Debug, P, D> fmt::Debug for RetryService<S, P, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, P, D, Req> Service<Req> for RetryService<S, P, D>
where
    D: Duplicate<Req>,
    P: RetryPolicy<Req, S::Response>,
    S: Service<D::Request> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, P, D, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, request: Req) -> Self::Future {
        let options = self.options();
        let shared = &self.shared;
        let now = Instant::now();
        shared.ledger.budget.deposit(now);
        let (caller_deadline, caller_retries) = crate::context::with_current(|context| {
            context.map_or((None, false), |context| {
                (context.deadline(), context.previous_attempts() > 0)
            })
        });
        if let Some(deadline) = caller_deadline.filter(|&deadline| deadline <= now) {
            return ResponseFuture::expired(shared.clone(), options, now, deadline);
        }
        let retries_here = !(caller_retries && options.defer_to_retrying_caller);
        let keep = retries_here && options.max_attempts > 1 && shared.policy.is_retryable(&request);
        // Kept as one tuple rather than destructured: each rebinding of the copy is a
        // move, and the copy is a whole request.
        let start = Start::new(&options, now, caller_deadline);
        let first = shared.duplicate.first(request, keep);
        let shared = shared.clone();
        if first.1.is_none() {
            let future = self.inner.call(first.0);
            return ResponseFuture::new(future, None, None, (shared, options), start);
        }
        // The service polled ready is the one called; the future keeps it to retry.
        let clone = self.inner.clone();
        let mut service = std::mem::replace(&mut self.inner, clone);
        let future = service.call(first.0);
        ResponseFuture::new(future, first.1, Some(service), (shared, options), start)
    }
}
