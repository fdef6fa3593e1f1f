//! What counts as a success, a failure, or neither.
//!
//! The circuit breaker records an [`Outcome`] for every call it lets through. A
//! classifier decides that outcome from the call's result. Any closure
//! `Fn(&Result<Res, E>) -> Outcome` is a classifier, and three presets cover the common
//! cases:
//!
//! | preset | failure |
//! |---|---|
//! | [`ErrorsAsFailures`] (the default) | every `Err` |
//! | [`ServerErrorsAsFailures`] | an `Err`, or an HTTP response with a 5xx status |
//! | [`GrpcErrorsAsFailures`] | an `Err`, or a gRPC status in a configurable set, read from the response headers *or* from the trailers at the end of the body |
//!
//! A gRPC server that has already started a response reports its status in the
//! trailers, after the body. [`GrpcErrorsAsFailures`] therefore wraps the response body
//! in a [`GrpcBody`] that reports the outcome when the trailers arrive; a body dropped
//! before its end reports nothing (the call was abandoned, not failed).
//!
//! # Example
//!
//! ```
//! use palisade::classify::{Classify, Outcome};
//!
//! // Timeouts are failures; a "not found" error is the caller's problem, not the
//! // dependency's, so it counts for nothing.
//! let classify = |result: &Result<u32, &'static str>| match result {
//!     Ok(_) => Outcome::Success,
//!     Err("not found") => Outcome::Ignored,
//!     Err(_) => Outcome::Failure,
//! };
//!
//! let mut seen = None;
//! let result = classify.classify(Err("not found"), |outcome| seen = Some(outcome));
//! assert_eq!(result, Err("not found"));
//! assert_eq!(seen, Some(Outcome::Ignored));
//! ```

/// The verdict on one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The dependency did its job.
    Success,
    /// The dependency failed; this counts towards tripping a breaker.
    Failure,
    /// Neither: the call counts for nothing (a client error, a cancelled call).
    Ignored,
}

/// Receives the verdict on one call, at most once.
///
/// A layer hands a `Report` to the classifier with each result. The classifier calls
/// [`report`](Report::report) as soon as the outcome is known: at once for most
/// responses, at the end of the body for a gRPC status sent in trailers. A `Report`
/// dropped without being called means the call was abandoned before its outcome was
/// known.
pub trait Report {
    /// Records the outcome of the call.
    fn report(self, outcome: Outcome);
}

impl<F: FnOnce(Outcome)> Report for F {
    #[inline]
    fn report(self, outcome: Outcome) {
        self(outcome)
    }
}

/// Decides the [`Outcome`] of a call from its result.
///
/// Implemented for every closure `Fn(&Result<Res, E>) -> Outcome`, which reports at once
/// and passes the result through unchanged. A classifier that needs to see more than
/// the response head (the gRPC trailers) may wrap the response, which is why the
/// response type is an associated type.
pub trait Classify<Res, E> {
    /// The response handed on to the caller once classified.
    type Response<R: Report>;

    /// Classifies `result`, calling `report` once the outcome is known.
    fn classify<R: Report>(
        &self,
        result: Result<Res, E>,
        report: R,
    ) -> Result<Self::Response<R>, E>;
}

impl<F, Res, E> Classify<Res, E> for F
where
    F: Fn(&Result<Res, E>) -> Outcome,
{
    type Response<R: Report> = Res;

    #[inline]
    fn classify<R: Report>(&self, result: Result<Res, E>, report: R) -> Result<Res, E> {
        report.report(self(&result));
        result
    }
}

/// Every `Ok` is a success and every `Err` a failure. The default classifier.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorsAsFailures;

impl<Res, E> Classify<Res, E> for ErrorsAsFailures {
    type Response<R: Report> = Res;

    #[inline]
    fn classify<R: Report>(&self, result: Result<Res, E>, report: R) -> Result<Res, E> {
        report.report(if result.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        });
        result
    }
}

#[cfg(feature = "http")]
pub use self::http_classify::*;

#[cfg(feature = "http")]
mod http_classify {
    use super::{Classify, Outcome, Report};
    use http::{HeaderMap, Response, StatusCode};
    use http_body::{Body, Frame, SizeHint};
    use std::pin::Pin;
    use std::task::{Context, Poll, ready};

    /// HTTP responses with a 5xx status, and every `Err`, are failures; all other
    /// responses are successes.
    ///
    /// A 4xx is the client's mistake, not a sign that the server is unwell, so it
    /// counts as a success for the breaker.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct ServerErrorsAsFailures;

    impl<B, E> Classify<Response<B>, E> for ServerErrorsAsFailures {
        type Response<R: Report> = Response<B>;

        #[inline]
        fn classify<R: Report>(
            &self,
            result: Result<Response<B>, E>,
            report: R,
        ) -> Result<Response<B>, E> {
            report.report(match &result {
                Ok(response) if response.status().is_server_error() => Outcome::Failure,
                Ok(_) => Outcome::Success,
                Err(_) => Outcome::Failure,
            });
            result
        }
    }

    /// A gRPC status code, as carried in the `grpc-status` header or trailer.
    ///
    /// Declared here so that classification works without the `tonic` feature; the
    /// numbers are those of the gRPC specification.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    #[non_exhaustive]
    #[allow(missing_docs)] // the names are the specification's
    pub enum GrpcCode {
        Ok = 0,
        Cancelled = 1,
        Unknown = 2,
        InvalidArgument = 3,
        DeadlineExceeded = 4,
        NotFound = 5,
        AlreadyExists = 6,
        PermissionDenied = 7,
        ResourceExhausted = 8,
        FailedPrecondition = 9,
        Aborted = 10,
        OutOfRange = 11,
        Unimplemented = 12,
        Internal = 13,
        Unavailable = 14,
        DataLoss = 15,
        Unauthenticated = 16,
    }

    impl GrpcCode {
        const ALL: [GrpcCode; 17] = [
            GrpcCode::Ok,
            GrpcCode::Cancelled,
            GrpcCode::Unknown,
            GrpcCode::InvalidArgument,
            GrpcCode::DeadlineExceeded,
            GrpcCode::NotFound,
            GrpcCode::AlreadyExists,
            GrpcCode::PermissionDenied,
            GrpcCode::ResourceExhausted,
            GrpcCode::FailedPrecondition,
            GrpcCode::Aborted,
            GrpcCode::OutOfRange,
            GrpcCode::Unimplemented,
            GrpcCode::Internal,
            GrpcCode::Unavailable,
            GrpcCode::DataLoss,
            GrpcCode::Unauthenticated,
        ];

        /// The code for a number, or `None` for a number the specification does not
        /// define.
        pub fn from_i32(code: i32) -> Option<Self> {
            usize::try_from(code)
                .ok()
                .and_then(|index| Self::ALL.get(index).copied())
        }

        /// Reads the `grpc-status` field of a header or trailer map.
        ///
        /// `None` when the field is absent. A field that is present but not a known
        /// code reads as [`GrpcCode::Unknown`], as the gRPC specification asks.
        pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
            let value = headers.get("grpc-status")?;
            let parsed = std::str::from_utf8(value.as_bytes())
                .ok()
                .and_then(|text| text.parse::<i32>().ok())
                .and_then(Self::from_i32);
            Some(parsed.unwrap_or(GrpcCode::Unknown))
        }

        const fn bit(self) -> u32 {
            1 << self as u32
        }
    }

    /// Classifies gRPC responses by their status, whether it arrives in the response
    /// headers (a trailers-only response) or in the trailers after the body.
    ///
    /// By default the codes that say the *server* is unwell are failures: `UNKNOWN`,
    /// `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `INTERNAL`, `UNAVAILABLE` and
    /// `DATA_LOSS`. `CANCELLED` is ignored (the caller gave up). Every other code is a
    /// success: `NOT_FOUND` or `INVALID_ARGUMENT` are answers, not outages. A response
    /// whose HTTP status is not 200, a body that fails, and a body that ends without
    /// any status are failures.
    ///
    /// ```
    /// use palisade::classify::{GrpcCode, GrpcErrorsAsFailures};
    ///
    /// // Also treat ABORTED as a failure, and no longer RESOURCE_EXHAUSTED.
    /// let classify = GrpcErrorsAsFailures::new()
    ///     .with_failure(GrpcCode::Aborted)
    ///     .without_failure(GrpcCode::ResourceExhausted);
    /// assert!(classify.is_failure(GrpcCode::Aborted));
    /// assert!(!classify.is_failure(GrpcCode::ResourceExhausted));
    /// ```
    #[derive(Debug, Clone, Copy)]
    pub struct GrpcErrorsAsFailures {
        failures: u32,
    }

    impl Default for GrpcErrorsAsFailures {
        fn default() -> Self {
            Self::new()
        }
    }

    impl GrpcErrorsAsFailures {
        /// The default set of failing codes (see the type's documentation).
        pub const fn new() -> Self {
            Self {
                failures: GrpcCode::Unknown.bit()
                    | GrpcCode::DeadlineExceeded.bit()
                    | GrpcCode::ResourceExhausted.bit()
                    | GrpcCode::Internal.bit()
                    | GrpcCode::Unavailable.bit()
                    | GrpcCode::DataLoss.bit(),
            }
        }

        /// Also counts `code` as a failure.
        pub const fn with_failure(mut self, code: GrpcCode) -> Self {
            self.failures |= code.bit();
            self
        }

        /// No longer counts `code` as a failure.
        pub const fn without_failure(mut self, code: GrpcCode) -> Self {
            self.failures &= !code.bit();
            self
        }

        /// Whether `code` counts as a failure.
        pub const fn is_failure(&self, code: GrpcCode) -> bool {
            self.failures & code.bit() != 0
        }

        /// The outcome for a status code.
        pub fn outcome(&self, code: GrpcCode) -> Outcome {
            if self.is_failure(code) {
                Outcome::Failure
            } else if code == GrpcCode::Cancelled {
                Outcome::Ignored
            } else {
                Outcome::Success
            }
        }
    }

    impl<B, E> Classify<Response<B>, E> for GrpcErrorsAsFailures {
        type Response<R: Report> = Response<GrpcBody<B, R>>;

        fn classify<R: Report>(
            &self,
            result: Result<Response<B>, E>,
            report: R,
        ) -> Result<Self::Response<R>, E> {
            let response = match result {
                Ok(response) => response,
                Err(error) => {
                    report.report(Outcome::Failure);
                    return Err(error);
                }
            };
            let pending = if response.status() != StatusCode::OK {
                report.report(Outcome::Failure);
                None
            } else if let Some(code) = GrpcCode::from_headers(response.headers()) {
                report.report(self.outcome(code));
                None
            } else {
                Some(report)
            };
            let classify = *self;
            Ok(response.map(|body| GrpcBody {
                body,
                pending,
                classify,
            }))
        }
    }

    /// A response body that reports the gRPC status found in its trailers.
    ///
    /// Made by [`GrpcErrorsAsFailures`]. It passes every frame through unchanged.
    #[pin_project::pin_project]
    pub struct GrpcBody<B, R> {
        #[pin]
        body: B,
        pending: Option<R>,
        classify: GrpcErrorsAsFailures,
    }

    impl<B, R> GrpcBody<B, R> {
        /// The wrapped body.
        pub fn into_inner(self) -> B {
            self.body
        }
    }

    impl<B: std::fmt::Debug, R> std::fmt::Debug for GrpcBody<B, R> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("GrpcBody")
                .field("body", &self.body)
                .field("pending", &self.pending.is_some())
                .finish()
        }
    }

    impl<B: Body, R: Report> Body for GrpcBody<B, R> {
        type Data = B::Data;
        type Error = B::Error;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
            let this = self.project();
            let frame = ready!(this.body.poll_frame(cx));
            if let Some(report) = this.pending.take() {
                let outcome = match &frame {
                    Some(Ok(frame)) => frame.trailers_ref().map(|trailers| {
                        GrpcCode::from_headers(trailers)
                            .map_or(Outcome::Failure, |code| this.classify.outcome(code))
                    }),
                    Some(Err(_)) | None => Some(Outcome::Failure),
                };
                match outcome {
                    Some(outcome) => report.report(outcome),
                    None => *this.pending = Some(report),
                }
            }
            Poll::Ready(frame)
        }

        fn is_end_stream(&self) -> bool {
            self.body.is_end_stream()
        }

        fn size_hint(&self) -> SizeHint {
            self.body.size_hint()
        }
    }
}
