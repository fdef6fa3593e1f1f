//! What is retried: the [`RetryPolicy`] trait, closures, and the HTTP and gRPC presets.

use std::time::Duration;
use tower::BoxError;

use crate::rejection::{Rejection, RejectionKind};

/// Why an attempt is retried, as reported to the observer and in `tracing` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryReason {
    /// The inner service returned an error.
    Error,
    /// A response the policy deemed retryable (from a `retry_if` closure).
    Response,
    /// An HTTP response with this retryable status.
    #[cfg(feature = "http")]
    Status(http::StatusCode),
    /// A gRPC response with this retryable status.
    #[cfg(feature = "http")]
    Grpc(crate::classify::GrpcCode),
    /// A layer below refused the request without sending it: a
    /// [rejection](crate::rejection) of this kind (an open circuit is
    /// [`Unavailable`](RejectionKind::Unavailable), a rate limit
    /// [`RateLimited`](RejectionKind::RateLimited)).
    Rejected(RejectionKind),
    /// The attempt ran out of its [per-attempt timeout](super::RetryLayerBuilder::per_attempt_timeout).
    AttemptTimeout,
}

/// A policy's verdict on one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Hand this result to the caller.
    Return,
    /// Retry, if attempts, budget, deadline and caps allow.
    Retry {
        /// Why.
        reason: RetryReason,
        /// A wait the server asked for (`Retry-After`, `grpc-retry-pushback-ms`). The
        /// layer waits exactly this instead of the backoff (zero: at once), and the
        /// backoff starts over from its base after it, as gRFC A6 has it for a
        /// pushback. Above the [maximum server
        /// delay](super::RetryLayerBuilder::max_server_delay) the layer gives up
        /// instead.
        after: Option<Duration>,
    },
}

impl Decision {
    /// A retry without a server hint.
    pub const fn retry(reason: RetryReason) -> Self {
        Decision::Retry {
            reason,
            after: None,
        }
    }
}

/// Decides which requests may be retried and which results call for a retry.
///
/// Given to [`RetryLayerBuilder::policy`](super::RetryLayerBuilder::policy). The presets
/// are [`RetryErrors`] (the default), and with the `http` feature [`HttpRetry`] and
/// [`GrpcRetry`]; a bare condition on the result is [`RetryIf`], which
/// [`RetryLayerBuilder::retry_if`](super::RetryLayerBuilder::retry_if) makes.
///
/// A [rejection](crate::rejection) from a layer below (an open circuit, a rate limit,
/// any layer's [`Rejected`](crate::rejection::Rejected)) goes to
/// [`on_rejection`](RetryPolicy::on_rejection) instead of [`decide`](RetryPolicy::decide):
/// by default it is retried after its `retry_after` or the backoff, whichever is longer
/// (see [`retry_rejection`]), provided the request is retryable.
pub trait RetryPolicy<Req, Res> {
    /// Whether `request` may be retried at all. Asked once, before the first attempt;
    /// a request that may not is not copied and is sent exactly once.
    fn is_retryable(&self, request: &Req) -> bool {
        let _ = request;
        true
    }

    /// The verdict on the result of an attempt.
    fn decide(&self, result: &Result<Res, BoxError>) -> Decision;

    /// The verdict on an attempt whose error is, or wraps, a
    /// [rejection](crate::rejection): `rejection` is its description and `result` the
    /// attempt's result. The default is [`retry_rejection`]; override it to treat
    /// rejections differently (say, never to wait out an open circuit).
    fn on_rejection(&self, rejection: &Rejection, result: &Result<Res, BoxError>) -> Decision {
        retry_rejection(self, rejection, result)
    }
}

/// The default treatment of a [rejection](crate::rejection), for
/// [`RetryPolicy::on_rejection`]:
///
/// - a rejection with a `retry_after` (an unavailable dependency, an overloaded server,
///   a rate limit) is retried after it or after the backoff, whichever is longer (a
///   layer that answers "now" again and again is not hammered in a tight loop); the
///   layer gives up instead when `retry_after` is above its
///   [maximum server delay](super::RetryLayerBuilder::max_server_delay);
/// - a [`DeadlineExceeded`](RejectionKind::DeadlineExceeded) (a timeout, which the
///   request may have outlived at the server) is the policy's
///   [`decide`](RetryPolicy::decide), like any other error;
/// - anything else (a malformed request, a cost no wait can pay) is returned: trying
///   again cannot help.
pub fn retry_rejection<P, Req, Res>(
    policy: &P,
    rejection: &Rejection,
    result: &Result<Res, BoxError>,
) -> Decision
where
    P: RetryPolicy<Req, Res> + ?Sized,
{
    if rejection.kind() == RejectionKind::DeadlineExceeded {
        return policy.decide(result);
    }
    match (rejection.kind(), rejection.retry_after()) {
        (RejectionKind::Malformed, _) | (_, None) => Decision::Return,
        (kind, Some(after)) => Decision::Retry {
            reason: RetryReason::Rejected(kind),
            after: Some(after),
        },
    }
}

/// A policy made of a condition on the result: retries every request whose attempt the
/// condition holds for. Made by
/// [`RetryLayerBuilder::retry_if`](super::RetryLayerBuilder::retry_if).
#[derive(Debug, Clone, Copy)]
pub struct RetryIf<F>(pub F);

impl<F, Req, Res> RetryPolicy<Req, Res> for RetryIf<F>
where
    F: Fn(&Result<Res, BoxError>) -> bool,
{
    fn decide(&self, result: &Result<Res, BoxError>) -> Decision {
        match ((self.0)(result), result) {
            (false, _) => Decision::Return,
            (true, Ok(_)) => Decision::retry(RetryReason::Response),
            (true, Err(_)) => Decision::retry(RetryReason::Error),
        }
    }
}

/// Retries every error, never a response. The default policy.
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryErrors;

impl<Req, Res> RetryPolicy<Req, Res> for RetryErrors {
    fn decide(&self, result: &Result<Res, BoxError>) -> Decision {
        match result {
            Ok(_) => Decision::Return,
            Err(_) => Decision::retry(RetryReason::Error),
        }
    }
}

#[cfg(feature = "http")]
pub use self::http_policies::*;

#[cfg(feature = "http")]
mod http_policies {
    use super::{Decision, RetryPolicy, RetryReason};
    use crate::classify::GrpcCode;
    use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
    use std::time::{Duration, SystemTime};
    use tower::BoxError;

    /// The HTTP preset.
    ///
    /// - Requests: only idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE, TRACE)
    ///   unless others are opted in with [`with_method`](HttpRetry::with_method).
    /// - Responses: 429, 502, 503 and 504 (more with
    ///   [`with_status`](HttpRetry::with_status)), honouring `Retry-After` in both its
    ///   delay-seconds and HTTP-date forms.
    /// - Errors: every error. An HTTP client's error means no response arrived (refused,
    ///   reset or closed connections, timeouts), which is safe to retry for the
    ///   idempotent requests this preset lets through.
    ///
    /// ```
    /// use http::Method;
    /// use palisade::retry::HttpRetry;
    ///
    /// // This API makes POST idempotent with an idempotency key.
    /// let policy = HttpRetry::new().with_method(Method::POST);
    /// # let _ = policy;
    /// ```
    #[derive(Debug, Clone)]
    pub struct HttpRetry {
        extra_methods: Vec<Method>,
        statuses: Vec<StatusCode>,
    }

    impl Default for HttpRetry {
        fn default() -> Self {
            Self::new()
        }
    }

    impl HttpRetry {
        /// The preset with its defaults (see the type's documentation).
        pub fn new() -> Self {
            Self {
                extra_methods: Vec::new(),
                statuses: vec![
                    StatusCode::TOO_MANY_REQUESTS,
                    StatusCode::BAD_GATEWAY,
                    StatusCode::SERVICE_UNAVAILABLE,
                    StatusCode::GATEWAY_TIMEOUT,
                ],
            }
        }

        /// Also retries requests with this (non-idempotent) method.
        pub fn with_method(mut self, method: Method) -> Self {
            self.extra_methods.push(method);
            self
        }

        /// Also retries responses with this status.
        pub fn with_status(mut self, status: StatusCode) -> Self {
            self.statuses.push(status);
            self
        }

        fn is_idempotent(method: &Method) -> bool {
            matches!(
                *method,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::PUT
                    | Method::DELETE
                    | Method::TRACE
            )
        }
    }

    impl<B, ResB> RetryPolicy<Request<B>, Response<ResB>> for HttpRetry {
        fn is_retryable(&self, request: &Request<B>) -> bool {
            Self::is_idempotent(request.method()) || self.extra_methods.contains(request.method())
        }

        fn decide(&self, result: &Result<Response<ResB>, BoxError>) -> Decision {
            let response = match result {
                Ok(response) => response,
                Err(_) => return Decision::retry(RetryReason::Error),
            };
            if !self.statuses.contains(&response.status()) {
                return Decision::Return;
            }
            Decision::Retry {
                reason: RetryReason::Status(response.status()),
                after: response
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|value| parse_retry_after(value, SystemTime::now())),
            }
        }
    }

    /// Reads a `Retry-After` value: delay-seconds (`120`) or an HTTP-date
    /// (`Wed, 21 Oct 2015 07:28:00 GMT`, relative to `now`; a date in the past is no
    /// wait). `None` for a malformed value, which is then ignored. A number of seconds
    /// too large to represent reads as [`Duration::MAX`], which is above any cap.
    pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
        let text = value.to_str().ok()?.trim();
        if !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()) {
            return Some(text.parse().map_or(Duration::MAX, Duration::from_secs));
        }
        let date = httpdate::parse_http_date(text).ok()?;
        Some(date.duration_since(now).unwrap_or(Duration::ZERO))
    }

    /// The gRPC preset.
    ///
    /// Retries `UNAVAILABLE` (more codes with [`with_code`](GrpcRetry::with_code)) and
    /// transport errors, for every method, and `RESOURCE_EXHAUSTED` when it carries a
    /// `grpc-retry-pushback-ms`: with a pushback the server invites a retry after it
    /// (gRFC A6), which is how a rate-limited server, palisade's own included, answers.
    /// [`without_code`](GrpcRetry::without_code) turns that off too. As in gRPC's own retry design, a call is
    /// committed once the server sends response headers without a status: only
    /// Trailers-Only responses (status in the headers, as a server sends when it fails
    /// a call before answering) are retried, so the response body is never buffered.
    /// A response whose HTTP status is not 200 reads as `UNAVAILABLE` for 429, 502, 503
    /// and 504 (the gRPC HTTP mapping) and is otherwise returned.
    ///
    /// `grpc-retry-pushback-ms` is the delay before the retry (`0`: at once), and the
    /// backoff starts over after it (gRFC A6); a negative or malformed value means the
    /// server asks not to be retried, and the response is returned.
    #[derive(Debug, Clone, Copy)]
    pub struct GrpcRetry {
        /// Retried with or without a pushback.
        codes: u32,
        /// Retried only when the server sent a pushback.
        with_pushback: u32,
    }

    impl Default for GrpcRetry {
        fn default() -> Self {
            Self::new()
        }
    }

    impl GrpcRetry {
        /// Retries `UNAVAILABLE`, and `RESOURCE_EXHAUSTED` with a pushback.
        pub const fn new() -> Self {
            Self {
                codes: bit(GrpcCode::Unavailable),
                with_pushback: bit(GrpcCode::ResourceExhausted),
            }
        }

        /// Also retries this code, with or without a pushback.
        pub const fn with_code(mut self, code: GrpcCode) -> Self {
            self.codes |= bit(code);
            self
        }

        /// No longer retries this code, even with a pushback.
        pub const fn without_code(mut self, code: GrpcCode) -> Self {
            self.codes &= !bit(code);
            self.with_pushback &= !bit(code);
            self
        }

        /// Whether this code is retried without a pushback. (`RESOURCE_EXHAUSTED` is
        /// retried with one unless [`without_code`](GrpcRetry::without_code) removed
        /// it.)
        pub const fn retries(&self, code: GrpcCode) -> bool {
            self.codes & bit(code) != 0
        }

        const fn retries_with_pushback(&self, code: GrpcCode) -> bool {
            (self.codes | self.with_pushback) & bit(code) != 0
        }

        fn status<B>(response: &Response<B>) -> Option<GrpcCode> {
            match response.status() {
                StatusCode::OK => GrpcCode::from_headers(response.headers()),
                StatusCode::TOO_MANY_REQUESTS
                | StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT => Some(GrpcCode::Unavailable),
                _ => None,
            }
        }
    }

    const fn bit(code: GrpcCode) -> u32 {
        1 << code as u32
    }

    impl<B, ResB> RetryPolicy<Request<B>, Response<ResB>> for GrpcRetry {
        fn decide(&self, result: &Result<Response<ResB>, BoxError>) -> Decision {
            let response = match result {
                Ok(response) => response,
                Err(_) => return Decision::retry(RetryReason::Error),
            };
            let Some(code) = Self::status(response) else {
                return Decision::Return;
            };
            match pushback(response.headers()) {
                Pushback::None if self.retries(code) => Decision::retry(RetryReason::Grpc(code)),
                Pushback::After(after) if self.retries_with_pushback(code) => Decision::Retry {
                    reason: RetryReason::Grpc(code),
                    after: Some(after),
                },
                _ => Decision::Return,
            }
        }
    }

    enum Pushback {
        None,
        After(Duration),
        Stop,
    }

    fn pushback(headers: &HeaderMap) -> Pushback {
        let Some(value) = headers.get("grpc-retry-pushback-ms") else {
            return Pushback::None;
        };
        let millis = std::str::from_utf8(value.as_bytes())
            .ok()
            .filter(|text| !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()))
            .map(|text| text.parse::<u64>().unwrap_or(u64::MAX));
        match millis {
            Some(millis) => Pushback::After(Duration::from_millis(millis)),
            None => Pushback::Stop,
        }
    }

    #[cfg(all(test, not(loom)))]
    mod tests {
        use super::*;

        #[test]
        fn grpc_preset_retries_resource_exhausted_with_a_pushback() {
            let exhausted = |pushback: Option<&'static str>| {
                let mut headers = vec![("grpc-status", "8")];
                headers.extend(pushback.map(|millis| ("grpc-retry-pushback-ms", millis)));
                response(200, &headers)
            };
            let policy = GrpcRetry::new();
            assert_eq!(
                decide(&policy, exhausted(Some("250"))),
                Decision::Retry {
                    reason: RetryReason::Grpc(GrpcCode::ResourceExhausted),
                    after: Some(Duration::from_millis(250)),
                }
            );
            // No pushback, or a refusal: the server did not invite a retry.
            for pushback in [None, Some("-1"), Some("soon")] {
                assert_eq!(
                    decide(&policy, exhausted(pushback)),
                    Decision::Return,
                    "{pushback:?}"
                );
            }
            assert!(!policy.retries(GrpcCode::ResourceExhausted));
            let opted_out = policy.without_code(GrpcCode::ResourceExhausted);
            assert_eq!(decide(&opted_out, exhausted(Some("250"))), Decision::Return);
            // Other codes still need a pushback and `with_code`.
            let aborted = response(
                200,
                &[("grpc-status", "10"), ("grpc-retry-pushback-ms", "250")],
            );
            assert_eq!(decide(&policy, aborted), Decision::Return);
        }

        fn response(status: u16, headers: &[(&'static str, &'static str)]) -> Response<()> {
            let mut response = Response::new(());
            *response.status_mut() = StatusCode::from_u16(status).expect("status");
            for (name, value) in headers {
                response
                    .headers_mut()
                    .insert(*name, HeaderValue::from_static(value));
            }
            response
        }

        fn decide<P: RetryPolicy<Request<()>, Response<()>>>(
            policy: &P,
            response: Response<()>,
        ) -> Decision {
            policy.decide(&Ok(response))
        }

        #[test]
        fn retry_after_seconds_and_dates() {
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
            let parse =
                |text: &'static str| parse_retry_after(&HeaderValue::from_static(text), now);
            assert_eq!(parse("120"), Some(Duration::from_secs(120)));
            assert_eq!(parse(" 0 "), Some(Duration::ZERO));
            // 2015-10-21T07:28:00Z is the `now` above.
            assert_eq!(
                parse("Wed, 21 Oct 2015 07:28:30 GMT"),
                Some(Duration::from_secs(30))
            );
            assert_eq!(
                parse("Wednesday, 21-Oct-15 07:29:00 GMT"),
                Some(Duration::from_secs(60))
            );
            assert_eq!(
                parse("Wed Oct 21 07:28:05 2015"),
                Some(Duration::from_secs(5))
            );
            assert_eq!(parse("Tue, 20 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
            assert_eq!(parse("99999999999999999999999"), Some(Duration::MAX));
            for malformed in ["", "-1", "1.5", "soon", "Wed, 32 Oct 2015 07:28:00 GMT"] {
                assert_eq!(parse(malformed), None, "{malformed:?}");
            }
        }

        #[test]
        fn http_preset_methods() {
            let policy = HttpRetry::new();
            let request =
                |method: Method| Request::builder().method(method).body(()).expect("request");
            for method in [
                Method::GET,
                Method::HEAD,
                Method::OPTIONS,
                Method::PUT,
                Method::DELETE,
                Method::TRACE,
            ] {
                assert!(RetryPolicy::<_, Response<()>>::is_retryable(
                    &policy,
                    &request(method)
                ));
            }
            for method in [Method::POST, Method::PATCH, Method::CONNECT] {
                assert!(!RetryPolicy::<_, Response<()>>::is_retryable(
                    &policy,
                    &request(method)
                ));
            }
            let policy = policy.with_method(Method::POST);
            assert!(RetryPolicy::<_, Response<()>>::is_retryable(
                &policy,
                &request(Method::POST)
            ));
        }

        #[test]
        fn http_preset_statuses_and_hints() {
            let policy = HttpRetry::new();
            for status in [429, 502, 503, 504] {
                assert_eq!(
                    decide(&policy, response(status, &[])),
                    Decision::retry(RetryReason::Status(
                        StatusCode::from_u16(status).expect("status")
                    ))
                );
            }
            for status in [200, 404, 500, 501] {
                assert_eq!(decide(&policy, response(status, &[])), Decision::Return);
            }
            assert_eq!(
                decide(&policy, response(503, &[("retry-after", "7")])),
                Decision::Retry {
                    reason: RetryReason::Status(StatusCode::SERVICE_UNAVAILABLE),
                    after: Some(Duration::from_secs(7)),
                }
            );
            let policy = policy.with_status(StatusCode::INTERNAL_SERVER_ERROR);
            assert!(matches!(
                decide(&policy, response(500, &[])),
                Decision::Retry { .. }
            ));
            let error: Result<Response<()>, BoxError> = Err("refused".into());
            assert_eq!(
                RetryPolicy::<Request<()>, _>::decide(&policy, &error),
                Decision::retry(RetryReason::Error)
            );
        }

        #[test]
        fn grpc_preset_codes_and_pushback() {
            let policy = GrpcRetry::new();
            let unavailable = Decision::retry(RetryReason::Grpc(GrpcCode::Unavailable));
            assert_eq!(
                decide(&policy, response(200, &[("grpc-status", "14")])),
                unavailable
            );
            assert_eq!(decide(&policy, response(503, &[])), unavailable);
            assert_eq!(
                decide(&policy, response(200, &[("grpc-status", "0")])),
                Decision::Return
            );
            assert_eq!(
                decide(&policy, response(200, &[("grpc-status", "8")])),
                Decision::Return
            );
            // Headers without a status: the call is committed.
            assert_eq!(decide(&policy, response(200, &[])), Decision::Return);
            assert_eq!(
                decide(
                    &policy,
                    response(
                        200,
                        &[("grpc-status", "14"), ("grpc-retry-pushback-ms", "250")]
                    )
                ),
                Decision::Retry {
                    reason: RetryReason::Grpc(GrpcCode::Unavailable),
                    after: Some(Duration::from_millis(250)),
                }
            );
            for refusal in ["-1", "", "soon", "1.5", " 3"] {
                assert_eq!(
                    decide(
                        &policy,
                        response(
                            200,
                            &[("grpc-status", "14"), ("grpc-retry-pushback-ms", refusal)]
                        )
                    ),
                    Decision::Return,
                    "{refusal:?}"
                );
            }
            let policy = policy
                .with_code(GrpcCode::ResourceExhausted)
                .without_code(GrpcCode::Unavailable);
            assert_eq!(
                decide(
                    &policy,
                    response(
                        200,
                        &[("grpc-status", "14"), ("grpc-retry-pushback-ms", "5")]
                    )
                ),
                Decision::Return,
                "a removed code is not retried, pushback or not"
            );
            assert!(policy.retries(GrpcCode::ResourceExhausted));
            assert_eq!(
                decide(&policy, response(200, &[("grpc-status", "14")])),
                Decision::Return
            );
            assert_eq!(
                decide(&policy, response(200, &[("grpc-status", "8")])),
                Decision::retry(RetryReason::Grpc(GrpcCode::ResourceExhausted))
            );
        }
    }
}
