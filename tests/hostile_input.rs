//! Hostile input against every header parser palisade has: no panic, a bounded amount
//! of work, and a clear result that matches a reference model written here.
//!
//! Correlation IDs and `traceparent` (through `CorrelationIdLayer`) are covered in
//! tests/correlation.rs (`parse_accepts_exactly_the_safe_set`,
//! `hostile_headers_never_panic_and_only_valid_ids_come_back`); here are the sizes that
//! test does not reach, `Retry-After` in both forms, `grpc-retry-pushback-ms`,
//! `grpc-status`, the `X-Forwarded-For` / `Forwarded` key extractors, and a key flood of a
//! million spoofed client IPs through the `X-Forwarded-For` extractor.
#![cfg(feature = "http")]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use palisade::classify::GrpcCode;
use palisade::correlation::{CorrelationId, CorrelationIdLayer};
use palisade::rate_limit::RateLimitLayer;
use palisade::rate_limit::key::{Forwarded, ForwardedFor, KeyExtractor};
use palisade::retry::{Decision, GrpcRetry, RetryPolicy, parse_retry_after};
use proptest::prelude::*;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

/// Bytes a header value may hold (visible ASCII, space, tab, obs-text), biased towards
/// the characters the parsers split on.
fn header_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..max),
        proptest::collection::vec(
            prop::sample::select(b"0123456789abcdefABCDEF:.,;=\"[]- \t\xff_GMTfor".to_vec()),
            0..max
        ),
    ]
    // Control bytes cannot be in a header value (hyper refuses them while parsing).
    .prop_map(|mut bytes| {
        bytes.retain(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f));
        bytes
    })
}

fn value(bytes: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(bytes).expect("a valid header value")
}

fn http_date(secs: u64) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs))
}

/// A `Retry-After` value: digits (some overflowing), HTTP-dates (some mangled), junk.
fn retry_after_text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[0-9]{1,30}".prop_map(String::into_bytes),
        " {0,2}[0-9]{1,8} {0,2}".prop_map(String::into_bytes),
        "[-+]?[0-9]{0,6}[.e]?[0-9]{0,3}".prop_map(String::into_bytes),
        (0u64..4_102_444_800).prop_map(|secs| http_date(secs).into_bytes()),
        (0u64..4_102_444_800, 0usize..29, any::<u8>()).prop_map(|(secs, at, byte)| {
            let mut date = http_date(secs).into_bytes();
            date[at] = byte;
            date
        }),
        header_bytes(80),
        (0usize..3).prop_map(|n| vec![b'9'; [40, 4096, 100_000][n]]),
    ]
    .prop_filter("a header value", |bytes| {
        HeaderValue::from_bytes(bytes).is_ok()
    })
}

/// The reference: trimmed all-digit text is seconds (saturating), else an HTTP-date
/// relative to `now` (past = zero), else nothing.
fn expected_retry_after(bytes: &[u8], now: SystemTime) -> Option<Duration> {
    let text = std::str::from_utf8(bytes)
        .ok()?
        .trim_matches(|c| c == ' ' || c == '\t');
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return Some(match text.parse::<u64>() {
            Ok(secs) => Duration::from_secs(secs),
            Err(_) => Duration::MAX,
        });
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or_default())
}

fn grpc_response(headers: &[(&str, &[u8])]) -> Result<Response<()>, BoxError> {
    let mut response = Response::new(());
    *response.status_mut() = StatusCode::OK;
    for (name, bytes) in headers {
        response.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value(bytes),
        );
    }
    Ok(response)
}

fn decide(policy: &GrpcRetry, response: &Result<Response<()>, BoxError>) -> Decision {
    RetryPolicy::<Request<()>, Response<()>>::decide(policy, response)
}

/// A forwarding entry: an address in one of its spellings, or something that is not.
fn node() -> impl Strategy<Value = String> {
    let v4 = any::<[u8; 4]>().prop_map(|o| Ipv4Addr::from(o).to_string());
    let v6 = any::<u128>().prop_map(|bits| std::net::Ipv6Addr::from(bits).to_string());
    prop_oneof![
        3 => v4.clone(),
        1 => (v4, any::<u16>()).prop_map(|(ip, port)| format!("{ip}:{port}")),
        2 => v6.clone(),
        1 => v6.clone().prop_map(|ip| format!("[{ip}]")),
        1 => (v6, any::<u16>()).prop_map(|(ip, port)| format!("[{ip}]:{port}")),
        1 => Just("unknown".to_owned()),
        1 => "_[a-zA-Z0-9]{1,8}".prop_map(|s| s),
        1 => "[0-9.:\\[\\]a-f]{0,40}".prop_map(|s| s),
        1 => Just(String::new()),
    ]
}

/// What `parse_node` must make of an entry: an address with or without a port, IPv6
/// possibly bracketed; nothing else.
fn expected_node(node: &str) -> Option<IpAddr> {
    node.parse::<IpAddr>()
        .ok()
        .or_else(|| node.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| node.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}

/// The `trusted`-th entry from the right over all lines, lines in order.
fn nth_from_right<T: Clone>(lines: &[Vec<T>], trusted: usize) -> Option<T> {
    let all: Vec<&T> = lines.iter().flatten().collect();
    trusted
        .checked_sub(1)
        .and_then(|skip| all.len().checked_sub(skip + 1))
        .map(|index| all[index].clone())
}

fn request(headers: &[(&str, String)]) -> Request<()> {
    let mut request = Request::new(());
    for (name, text) in headers {
        request.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value(text.as_bytes()),
        );
    }
    request
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn retry_after_matches_the_reference(bytes in retry_after_text(), offset in 0u64..4_102_444_800) {
        let now = UNIX_EPOCH + Duration::from_secs(offset);
        let parsed = parse_retry_after(&value(&bytes), now);
        prop_assert_eq!(parsed, expected_retry_after(&bytes, now));
    }

    #[test]
    fn retry_after_dates_round_trip(at in 0u64..4_102_444_800, ahead in 0u64..1_000_000) {
        let now = UNIX_EPOCH + Duration::from_secs(at);
        let date = value(http_date(at + ahead).as_bytes());
        prop_assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(ahead)));
        // A date in the past is no wait, never an error or an underflow.
        let past = value(http_date(at.saturating_sub(ahead)).as_bytes());
        prop_assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
    }

    #[test]
    fn grpc_pushback_matches_the_reference(
        pushback in prop::option::of(prop_oneof![
            "[0-9]{1,25}".prop_map(String::into_bytes),
            "-?[0-9]{0,5}[.x ]?[0-9]{0,3}".prop_map(String::into_bytes),
            header_bytes(40),
        ]),
    ) {
        let mut headers: Vec<(&str, &[u8])> = vec![("grpc-status", b"14")];
        if let Some(bytes) = &pushback {
            headers.push(("grpc-retry-pushback-ms", bytes));
        }
        let decision = decide(&GrpcRetry::new(), &grpc_response(&headers));
        // The reference: absent = retry on the backoff; all digits = wait that long
        // (saturating); anything else = the server asks not to be retried.
        match pushback {
            None => prop_assert!(
                matches!(decision, Decision::Retry { after: None, .. }),
                "{:?}",
                decision
            ),
            Some(bytes) if !bytes.is_empty() && bytes.iter().all(u8::is_ascii_digit) => {
                let millis = std::str::from_utf8(&bytes).unwrap().parse().unwrap_or(u64::MAX);
                let expected = Duration::from_millis(millis);
                prop_assert!(
                    matches!(decision, Decision::Retry { after: Some(after), .. } if after == expected),
                    "{:?}", decision
                );
            }
            Some(_) => prop_assert!(matches!(decision, Decision::Return), "{:?}", decision),
        }
    }

    #[test]
    fn grpc_status_matches_the_reference(
        statuses in proptest::collection::vec(prop_oneof![
            "-?[0-9]{1,12}".prop_map(String::into_bytes),
            header_bytes(20),
        ], 0..3),
    ) {
        let mut headers = HeaderMap::new();
        for bytes in &statuses {
            headers.append("grpc-status", value(bytes));
        }
        let code = GrpcCode::from_headers(&headers);
        // Absent: none. The first value, if a defined code, is that code; anything
        // else present reads as UNKNOWN (the gRPC spec).
        let expected = statuses.first().map(|bytes| {
            std::str::from_utf8(bytes)
                .ok()
                .and_then(|text| text.parse::<i32>().ok())
                .and_then(GrpcCode::from_i32)
                .unwrap_or(GrpcCode::Unknown)
        });
        prop_assert_eq!(code, expected);
    }

    #[test]
    fn x_forwarded_for_picks_the_trusted_entry_or_nothing(
        lines in proptest::collection::vec(proptest::collection::vec(node(), 1..5), 0..4),
        trusted in 1usize..7,
        spaces in any::<bool>(),
    ) {
        let separator = if spaces { ", " } else { "," };
        let headers: Vec<_> = lines
            .iter()
            .map(|line| ("x-forwarded-for", line.join(separator)))
            .collect();
        let got = ForwardedFor::new(trusted).extract(&request(&headers));
        let expected = nth_from_right(&lines, trusted).and_then(|node| expected_node(node.trim()));
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn forwarded_picks_the_trusted_for_or_nothing(
        lines in proptest::collection::vec(
            proptest::collection::vec(
                (node(), any::<bool>(), prop::sample::select(vec!["for", "For", "FOR", "by", "host"]), any::<bool>()),
                1..4,
            ),
            0..3,
        ),
        trusted in 1usize..6,
    ) {
        // Each element: `[proto=https;]NAME="NODE"` or unquoted; a `by=` or `host=`
        // element has no `for`.
        let element = |(node, quoted, name, proto): &(String, bool, &str, bool)| {
            let node = if *quoted { format!("\"{node}\"") } else { node.clone() };
            format!("{}{name}={node}", if *proto { "proto=https;" } else { "" })
        };
        let headers: Vec<_> = lines
            .iter()
            .map(|line| ("forwarded", line.iter().map(element).collect::<Vec<_>>().join(", ")))
            .collect();
        // Skip the lines a comma inside a node would re-split (the header is
        // comma-separated; the generator never puts one there).
        let got = Forwarded::new(trusted).extract(&request(&headers));
        let expected = nth_from_right(&lines, trusted).and_then(|(node, _, name, _)| {
            name.eq_ignore_ascii_case("for").then(|| expected_node(&node))?
        });
        prop_assert_eq!(got, expected);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Huge values: tens of thousands of entries or kilobytes of one, in several lines.
    /// The extractors walk what they are given once and return.
    #[test]
    fn huge_forwarding_headers_are_handled(
        entries in 1usize..20_000,
        lines in 1usize..4,
        trusted in prop_oneof![1usize..4, Just(usize::MAX)],
    ) {
        let line = vec!["1.2.3.4"; entries].join(",");
        let headers: Vec<_> = (0..lines).map(|_| ("x-forwarded-for", line.clone())).collect();
        let expected = (trusted <= entries * lines).then(|| IpAddr::from([1, 2, 3, 4]));
        prop_assert_eq!(ForwardedFor::new(trusted).extract(&request(&headers)), expected);
        let forwarded: Vec<_> = headers.iter().map(|(_, line)| ("forwarded", line.replace("1.2", "for=1.2"))).collect();
        prop_assert_eq!(Forwarded::new(trusted).extract(&request(&forwarded)), expected);
    }

    /// Header values up to 64 KiB: parsed (or refused) without a panic, and a
    /// correlation ID is never longer than its limit.
    #[test]
    fn oversized_values_are_refused_not_echoed(len in 129usize..65_536, byte in prop::sample::select(b"a9-=:".to_vec())) {
        let big = vec![byte; len];
        prop_assert!(CorrelationId::parse(&big).is_err());
        prop_assert_eq!(parse_retry_after(&value(&big), SystemTime::now()).is_some(), byte == b'9');
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut request = Request::new(());
        request.headers_mut().insert("x-request-id", value(&big));
        let service = CorrelationIdLayer::new()
            .layer(service_fn(|_: Request<()>| async { Ok::<_, BoxError>(Response::new(())) }));
        let response = runtime.block_on(service.oneshot(request)).unwrap();
        let echoed = &response.headers()["x-request-id"];
        prop_assert!(echoed.len() <= 128 && echoed.as_bytes() != big.as_slice());
    }
}

/// A million spoofed client addresses in `X-Forwarded-For`, behind one trusted proxy:
/// the table stays at its cap and a real client's bucket is neither reset nor drained.
/// (tests/rate_limit_layer.rs floods with plain `u32` keys; this goes through the
/// header parsing extractor a gateway would use.)
#[tokio::test(start_paused = true)]
async fn a_million_spoofed_forwarded_ips_keep_the_table_bounded() {
    const CAP: usize = 1_000;
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RateLimitLayer::builder()
        .capacity(5)
        .refill(1, Duration::from_secs(60))
        .keyed(ForwardedFor::new(1))
        .max_keys(CAP)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut service = layer.layer(service_fn({
        let calls = calls.clone();
        move |_: Request<()>| {
            calls.fetch_add(1, Ordering::Relaxed);
            async { Ok::<_, BoxError>(()) }
        }
    }));
    let real: IpAddr = "203.0.113.7".parse().unwrap();
    let from = |ip: String| request(&[("x-forwarded-for", ip)]);
    for _ in 0..3 {
        send(&mut service, from(real.to_string())).await.unwrap();
    }
    let mut admitted_spoofed = 0usize;
    for n in 0..1_000_000u32 {
        // 10.x.y.z: a million distinct addresses, some with the client's own spoofed
        // prefix entries before the one our proxy appended.
        let spoofed = Ipv4Addr::from(0x0A00_0000 | n);
        let header = if n % 3 == 0 {
            format!("{real}, {spoofed}")
        } else {
            spoofed.to_string()
        };
        let result = send(&mut service, from(header)).await;
        admitted_spoofed += usize::from(result.is_ok());
        if n % 100_000 == 0 {
            assert!(
                handle.tracked_keys() <= CAP,
                "{} keys",
                handle.tracked_keys()
            );
        }
    }
    assert!(handle.tracked_keys() <= CAP);
    // Fresh keys beyond the cap share one overflow bucket: nearly all are refused.
    assert!(
        admitted_spoofed < 10 * CAP,
        "{admitted_spoofed} spoofed requests admitted"
    );
    assert_eq!(calls.load(Ordering::Relaxed), 3 + admitted_spoofed);
    // The real client kept its bucket: exactly two tokens left, then refused.
    assert_eq!(handle.available_for(&real), 2);
    for _ in 0..2 {
        send(&mut service, from(real.to_string())).await.unwrap();
    }
    assert!(send(&mut service, from(real.to_string())).await.is_err());
}

async fn send<S: Service<Request<()>>>(
    service: &mut S,
    request: Request<()>,
) -> Result<S::Response, S::Error> {
    service.ready().await?.call(request).await
}
