//! The context's HTTP headers (feature `http`), read by the server side and written by
//! the client side and the retry layer.

use super::{GrpcTimeout, parse_grpc_timeout, parse_timeout_ms};
use crate::rejection::{Rejection, RejectionKind};
use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use std::time::Duration;

/// The HTTP header the time left travels in unless configured otherwise: whole
/// milliseconds (see the [module docs](super#wire-formats)).
pub const DEFAULT_TIMEOUT_HEADER: HeaderName = HeaderName::from_static("x-request-timeout-ms");
/// gRPC's time-left header.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
/// How many attempts of a gRPC request came before this one (gRFC A6).
pub const GRPC_PREVIOUS_ATTEMPTS: HeaderName =
    HeaderName::from_static("grpc-previous-rpc-attempts");
/// The same for HTTP requests: palisade's name, with gRPC's meaning.
pub const HTTP_PREVIOUS_ATTEMPTS: HeaderName = HeaderName::from_static("x-previous-attempts");
/// W3C `traceparent`.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// W3C `tracestate`.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Whether the request or response is gRPC (`content-type: application/grpc…`).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    is_grpc_content_type(headers.get(CONTENT_TYPE))
}

/// Whether this first `content-type` value says gRPC.
pub(crate) fn is_grpc_content_type(value: Option<&HeaderValue>) -> bool {
    value.is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

fn previous_attempts_header(headers: &HeaderMap) -> HeaderName {
    if is_grpc(headers) {
        GRPC_PREVIOUS_ATTEMPTS
    } else {
        HTTP_PREVIOUS_ATTEMPTS
    }
}

/// The caller's count of earlier attempts; 0 when absent or malformed (at most 8
/// digits are read, so a hostile value cannot overflow).
pub(crate) fn read_previous_attempts(headers: &HeaderMap) -> u32 {
    parse_previous_attempts(headers.get(previous_attempts_header(headers)))
}

/// The count in the first value of the earlier-attempts header, as
/// [`read_previous_attempts`] reads it.
pub(crate) fn parse_previous_attempts(value: Option<&HeaderValue>) -> u32 {
    value
        .and_then(|value| parse_timeout_ms(value.as_bytes()))
        .map_or(0, |count| {
            u32::try_from(count.as_millis()).unwrap_or(u32::MAX)
        })
}

/// Marks a request as a retry: `attempts` earlier attempts (kept if it says more).
pub(crate) fn write_previous_attempts(headers: &mut HeaderMap, attempts: u32) {
    // A first attempt adds nothing, and a count already there stays: no lookup on the
    // common path.
    if attempts == 0 || read_previous_attempts(headers) >= attempts {
        return;
    }
    let name = previous_attempts_header(headers);
    headers.insert(name, HeaderValue::from(attempts));
}

/// The caller's time left: `grpc-timeout` on gRPC requests, else `http_header` in
/// milliseconds. Malformed values count as absent.
pub(crate) fn read_timeout(headers: &HeaderMap, http_header: &HeaderName) -> Option<Duration> {
    if is_grpc(headers) {
        parse_timeout(true, headers.get(GRPC_TIMEOUT))
    } else {
        parse_timeout(false, headers.get(http_header))
    }
}

/// The time left in the first value of the timeout header of a gRPC (`grpc-timeout`) or
/// HTTP (milliseconds) request, as [`read_timeout`] reads it.
pub(crate) fn parse_timeout(grpc: bool, value: Option<&HeaderValue>) -> Option<Duration> {
    let value = value?.as_bytes();
    if grpc {
        parse_grpc_timeout(value)
    } else {
        parse_timeout_ms(value)
    }
}

/// Sends `time_left` in the request's own format, keeping a shorter timeout the caller
/// set itself (tonic's `Request::set_timeout`).
pub(crate) fn write_timeout(
    headers: &mut HeaderMap,
    http_header: &HeaderName,
    time_left: Duration,
) {
    if read_timeout(headers, http_header).is_some_and(|own| own <= time_left) {
        return;
    }
    if is_grpc(headers) {
        let value = GrpcTimeout(time_left).to_string();
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.insert(GRPC_TIMEOUT, value);
        }
    } else {
        let millis = super::format_timeout_ms(time_left);
        headers.insert(http_header.clone(), HeaderValue::from(millis));
    }
}

/// The answer to a request refused by `rejection`, in the request's protocol: the HTTP
/// status, or for gRPC a trailers-only response with its status code.
pub(crate) fn refusal<B: Default>(grpc: bool, rejection: &Rejection) -> Response<B> {
    if !grpc {
        return rejection.to_http_response();
    }
    let mut response = Response::new(B::default());
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(
        "grpc-status",
        HeaderValue::from(grpc_code(rejection.kind())),
    );
    if let Ok(message) = HeaderValue::from_str(rejection.reason()) {
        headers.insert("grpc-message", message);
    }
    response
}

/// The gRPC status code of each kind, as `palisade::tonic` maps them.
fn grpc_code(kind: RejectionKind) -> u16 {
    match kind {
        RejectionKind::Unavailable | RejectionKind::Overloaded => 14,
        RejectionKind::RateLimited => 8,
        RejectionKind::Malformed => 3,
        RejectionKind::DeadlineExceeded => 4,
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn grpc() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        headers
    }

    #[test]
    fn timeouts_use_the_request_format_and_keep_a_shorter_one() {
        let mut headers = grpc();
        write_timeout(
            &mut headers,
            &DEFAULT_TIMEOUT_HEADER,
            Duration::from_millis(1500),
        );
        assert_eq!(headers[GRPC_TIMEOUT], "1500000u");
        write_timeout(
            &mut headers,
            &DEFAULT_TIMEOUT_HEADER,
            Duration::from_secs(9),
        );
        assert_eq!(headers[GRPC_TIMEOUT], "1500000u");

        let mut headers = HeaderMap::new();
        write_timeout(
            &mut headers,
            &DEFAULT_TIMEOUT_HEADER,
            Duration::from_micros(2999),
        );
        assert_eq!(headers[DEFAULT_TIMEOUT_HEADER], "2");
        assert_eq!(
            read_timeout(&headers, &DEFAULT_TIMEOUT_HEADER),
            Some(Duration::from_millis(2))
        );
    }

    #[test]
    fn previous_attempts_only_grow() {
        let mut headers = HeaderMap::new();
        write_previous_attempts(&mut headers, 0);
        assert!(headers.is_empty());
        write_previous_attempts(&mut headers, 2);
        write_previous_attempts(&mut headers, 1);
        assert_eq!(read_previous_attempts(&headers), 2);
        headers.insert(
            HTTP_PREVIOUS_ATTEMPTS,
            HeaderValue::from_static("999999999999"),
        );
        assert_eq!(read_previous_attempts(&headers), 0);
    }

    #[test]
    fn a_grpc_refusal_is_trailers_only() {
        let rejection = Rejection::new(RejectionKind::DeadlineExceeded, "deadline exceeded");
        let response = refusal::<()>(true, &rejection);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "4");
        let response = refusal::<()>(false, &rejection);
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    }
}
