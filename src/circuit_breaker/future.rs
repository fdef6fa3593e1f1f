use super::service::CallReport;
use crate::classify::Classify;
use pin_project::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tower::BoxError;

/// The response future of [`CircuitBreakerService`](super::CircuitBreakerService).
///
/// Resolves to [`CircuitOpen`](super::CircuitOpen) at once when the breaker rejected the
/// call (or to [`DeadlineExceeded`](crate::context::DeadlineExceeded) when the request
/// context's deadline had passed before it); otherwise
/// to the inner service's result, classified. Dropped before that, it records nothing
/// and gives back any half-open probe slot.
#[pin_project]
pub struct ResponseFuture<F, C> {
    #[pin]
    kind: Kind<F, C>,
}

#[pin_project(project = KindProjection)]
enum Kind<F, C> {
    Called {
        #[pin]
        future: F,
        report: Option<CallReport>,
        classify: C,
    },
    /// An open circuit, or a caller's deadline that passed before the call.
    Rejected { error: Option<BoxError> },
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn called(future: F, report: CallReport, classify: C) -> Self {
        Self {
            kind: Kind::Called {
                future,
                report: Some(report),
                classify,
            },
        }
    }

    pub(crate) fn rejected(error: impl Into<BoxError>) -> Self {
        Self {
            kind: Kind::Rejected {
                error: Some(error.into()),
            },
        }
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.kind {
            Kind::Called { .. } => "called",
            Kind::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<F, C, Response, Error> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<Response, Error>>,
    Error: Into<BoxError>,
    C: Classify<Response, Error>,
{
    type Output = Result<C::Response<CallReport>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProjection::Called {
                future,
                report,
                classify,
            } => {
                let result = ready!(future.poll(cx));
                let report = report
                    .take()
                    .expect("circuit breaker future polled after completion");
                Poll::Ready(classify.classify(result, report).map_err(Into::into))
            }
            KindProjection::Rejected { error } => Poll::Ready(Err(error
                .take()
                .expect("circuit breaker future polled after completion"))),
        }
    }
}
