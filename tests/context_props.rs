//! The wire parsers of the request context against simple models of their grammars:
//! `grpc-timeout`, the millisecond header, `traceparent` and `tracestate`. Hostile bytes
//! never panic.

use palisade::context::{
    GrpcTimeout, MAX_TIMEOUT_MS, TraceContext, TraceState, format_timeout_ms, parse_grpc_timeout,
    parse_timeout_ms,
};
use proptest::prelude::*;
use std::time::Duration;

/// The gRPC spec's units, and their length in nanoseconds.
const UNITS: [(char, u128); 6] = [
    ('H', 3_600_000_000_000),
    ('M', 60_000_000_000),
    ('S', 1_000_000_000),
    ('m', 1_000_000),
    ('u', 1_000),
    ('n', 1),
];

fn unit_nanos(unit: char) -> u128 {
    UNITS
        .iter()
        .find(|(u, _)| *u == unit)
        .map(|(_, n)| *n)
        .unwrap()
}

proptest! {
    #[test]
    fn grpc_timeouts_in_the_grammar_parse_to_their_value(
        digits in "[0-9]{1,8}",
        unit in prop::sample::select(UNITS.map(|(unit, _)| unit).to_vec()),
    ) {
        let wire = format!("{digits}{unit}");
        let expected = digits.parse::<u128>().unwrap() * unit_nanos(unit);
        let parsed = parse_grpc_timeout(wire.as_bytes()).expect("in the grammar");
        prop_assert_eq!(parsed.as_nanos(), expected);
    }

    #[test]
    fn anything_outside_the_grammar_is_refused(bytes in prop::collection::vec(any::<u8>(), 0..16)) {
        let in_grammar = bytes.len() >= 2
            && bytes.len() <= 9
            && bytes[..bytes.len() - 1].iter().all(u8::is_ascii_digit)
            && b"HMSmun".contains(bytes.last().unwrap());
        prop_assert_eq!(parse_grpc_timeout(&bytes).is_some(), in_grammar);
        let ms_grammar = !bytes.is_empty() && bytes.len() <= 8 && bytes.iter().all(u8::is_ascii_digit);
        prop_assert_eq!(parse_timeout_ms(&bytes).is_some(), ms_grammar);
    }

    #[test]
    fn formatting_never_gives_more_time_and_loses_less_than_a_unit(nanos in any::<u64>(), secs in any::<u64>()) {
        for time in [Duration::from_nanos(nanos), Duration::new(secs, 0)] {
            let wire = GrpcTimeout(time).to_string();
            prop_assert!(wire.len() <= 9, "{}", wire);
            let parsed = parse_grpc_timeout(wire.as_bytes()).expect("what we send parses");
            prop_assert!(parsed <= time);
            let unit = unit_nanos(wire.chars().last().unwrap());
            let clamped = time.as_nanos() > 99_999_999 * unit_nanos('H');
            prop_assert!(clamped || time.as_nanos() - parsed.as_nanos() < unit);
            // Under 27.7 hours, never a millisecond lost.
            if time < Duration::from_millis(MAX_TIMEOUT_MS) {
                prop_assert!(time - parsed < Duration::from_millis(1));
            }
            let ms = format_timeout_ms(time);
            prop_assert!(Duration::from_millis(ms) <= time);
            prop_assert!(ms <= MAX_TIMEOUT_MS);
        }
    }

    #[test]
    fn valid_traceparents_round_trip(
        version in "[0-9a-f]{2}",
        trace_id in "[0-9a-f]{32}",
        parent_id in "[0-9a-f]{16}",
        flags in "[0-9a-f]{2}",
        tail in prop::option::of("-[ -~]{0,20}"),
    ) {
        let mut wire = format!("{version}-{trace_id}-{parent_id}-{flags}");
        if let Some(tail) = &tail {
            wire.push_str(tail);
        }
        let valid = version != "ff"
            && (version != "00" || tail.is_none())
            && trace_id.bytes().any(|b| b != b'0')
            && parent_id.bytes().any(|b| b != b'0');
        let parsed = TraceContext::parse(wire.as_bytes());
        prop_assert_eq!(parsed.is_ok(), valid, "{}", wire);
        if let Ok(context) = parsed {
            let sampled = u8::from_str_radix(&flags, 16).unwrap() & 1 == 1;
            prop_assert_eq!(context.is_sampled(), sampled);
            let flags_out = if sampled { "01" } else { "00" };
            prop_assert_eq!(context.to_string(), format!("00-{trace_id}-{parent_id}-{flags_out}"));
            let upper = wire.to_uppercase();
            prop_assert!(upper == wire || TraceContext::parse(upper.as_bytes()).is_err());
        }
    }

    #[test]
    fn hostile_trace_headers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = TraceContext::parse(&bytes);
        let _ = TraceState::parse([bytes.as_slice(), bytes.as_slice()]);
    }

    #[test]
    fn tracestate_lists_in_the_grammar_are_kept_unchanged(
        members in prop::collection::btree_map(
            "[a-z][a-z0-9_*/-]{0,20}(@[a-z][a-z0-9_*/-]{0,13})?",
            "[!-+\\--<>-~]([ !-+\\--<>-~]{0,30}[!-+\\--<>-~])?",
            0..40,
        ),
        ows in "[ \t]{0,2}",
    ) {
        let list = members
            .iter()
            .map(|(key, value)| format!("{ows}{key}={value}{ows}"))
            .collect::<Vec<_>>()
            .join(",");
        let parsed = TraceState::parse([list.as_bytes()]);
        prop_assert_eq!(parsed.is_ok(), members.len() <= 32, "{}", list);
        if let Ok(state) = parsed {
            prop_assert_eq!(state.as_str(), list.as_str());
        }
    }
}
