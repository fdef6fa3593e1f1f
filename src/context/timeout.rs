//! The time left on the wire: `grpc-timeout` and whole milliseconds.

use std::fmt;
use std::time::Duration;

/// The most digits either wire format carries (the gRPC spec's limit).
const MAX_DIGITS: usize = 8;
const MAX_VALUE: u64 = 99_999_999;

/// The largest timeout in the HTTP header: 99 999 999 ms (about 27.8 hours), the
/// same 8 digits as `grpc-timeout`. A longer time left is sent as this.
pub const MAX_TIMEOUT_MS: u64 = MAX_VALUE;

/// 1 to 8 ASCII digits, as a number; anything else (empty, a sign, a space, a ninth
/// digit) is `None`.
fn digits(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || bytes.len() > MAX_DIGITS {
        return None;
    }
    bytes.iter().try_fold(0u64, |value, &b| {
        b.is_ascii_digit().then(|| value * 10 + u64::from(b - b'0'))
    })
}

/// Parses a `grpc-timeout` value as the gRPC HTTP/2 spec defines it: 1 to 8 ASCII
/// digits followed by one unit, `H` (hours), `M` (minutes), `S` (seconds), `m`
/// (milliseconds), `u` (microseconds) or `n` (nanoseconds). Anything else is `None`.
///
/// ```
/// use palisade::context::parse_grpc_timeout;
/// use std::time::Duration;
///
/// assert_eq!(parse_grpc_timeout(b"250m"), Some(Duration::from_millis(250)));
/// assert_eq!(parse_grpc_timeout(b"99999999H"), Some(Duration::from_secs(99_999_999 * 3600)));
/// assert_eq!(parse_grpc_timeout(b"100000000n"), None); // 9 digits
/// assert_eq!(parse_grpc_timeout(b"1 S"), None);
/// ```
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, number) = value.split_last()?;
    let number = digits(number)?;
    Some(match unit {
        b'H' => Duration::from_secs(number * 3600),
        b'M' => Duration::from_secs(number * 60),
        b'S' => Duration::from_secs(number),
        b'm' => Duration::from_millis(number),
        b'u' => Duration::from_micros(number),
        b'n' => Duration::from_nanos(number),
        _ => return None,
    })
}

/// A duration as a `grpc-timeout` value (its `Display`): in the finest unit that fits
/// in 8 digits, rounded down, so that the callee never gets more time than is left. Up
/// to about 100 s that is exact to the microsecond or better, and up to 27.8 hours to
/// the millisecond; past 99 999 999 hours it is clamped.
///
/// ```
/// use palisade::context::GrpcTimeout;
/// use std::time::Duration;
///
/// assert_eq!(GrpcTimeout(Duration::from_millis(1500)).to_string(), "1500000u");
/// assert_eq!(GrpcTimeout(Duration::from_nanos(42)).to_string(), "42n");
/// assert_eq!(GrpcTimeout(Duration::MAX).to_string(), "99999999H");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcTimeout(pub Duration);

impl fmt::Display for GrpcTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let time = self.0;
        let units: [(u128, char); 5] = [
            (time.as_nanos(), 'n'),
            (time.as_micros(), 'u'),
            (time.as_millis(), 'm'),
            (u128::from(time.as_secs()), 'S'),
            (u128::from(time.as_secs() / 60), 'M'),
        ];
        for (value, unit) in units {
            if value <= u128::from(MAX_VALUE) {
                return write!(f, "{value}{unit}");
            }
        }
        write!(f, "{}H", (time.as_secs() / 3600).min(MAX_VALUE))
    }
}

/// Parses the HTTP deadline header: the time left in whole milliseconds, 1 to 8 ASCII
/// digits. Anything else is `None`.
///
/// ```
/// use palisade::context::parse_timeout_ms;
/// use std::time::Duration;
///
/// assert_eq!(parse_timeout_ms(b"1500"), Some(Duration::from_millis(1500)));
/// assert_eq!(parse_timeout_ms(b"-1"), None);
/// assert_eq!(parse_timeout_ms(b"1.5"), None);
/// ```
pub fn parse_timeout_ms(value: &[u8]) -> Option<Duration> {
    digits(value).map(Duration::from_millis)
}

/// The HTTP deadline header's value for `time_left`: whole milliseconds rounded down
/// (the callee never gets more time than is left), at most [`MAX_TIMEOUT_MS`].
pub fn format_timeout_ms(time_left: Duration) -> u64 {
    u64::try_from(time_left.as_millis())
        .unwrap_or(u64::MAX)
        .min(MAX_TIMEOUT_MS)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn every_unit_parses() {
        let cases: [(&[u8], Duration); 6] = [
            (b"2H", Duration::from_secs(7200)),
            (b"3M", Duration::from_secs(180)),
            (b"4S", Duration::from_secs(4)),
            (b"5m", Duration::from_millis(5)),
            (b"6u", Duration::from_micros(6)),
            (b"7n", Duration::from_nanos(7)),
        ];
        for (wire, expected) in cases {
            assert_eq!(parse_grpc_timeout(wire), Some(expected));
        }
        assert_eq!(parse_grpc_timeout(b"0m"), Some(Duration::ZERO));
    }

    #[test]
    fn malformed_values_are_none() {
        for bad in [
            &b""[..],
            b"m",
            b"5",
            b"5x",
            b"5mm",
            b"+5m",
            b"-5m",
            b" 5m",
            b"5 m",
            b"123456789m",
            b"5\xffm",
            b"5h",
            b"5s",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn formatting_picks_the_finest_unit_that_fits() {
        let cases = [
            (Duration::ZERO, "0n"),
            (Duration::from_nanos(99_999_999), "99999999n"),
            (Duration::from_nanos(100_000_000), "100000u"),
            (Duration::from_nanos(100_000_001), "100000u"),
            (Duration::from_micros(99_999_999), "99999999u"),
            (Duration::from_secs(100), "100000m"),
            (Duration::from_millis(99_999_999), "99999999m"),
            (Duration::from_millis(100_000_000), "100000S"),
            (Duration::from_secs(99_999_999), "99999999S"),
            (Duration::from_secs(100_000_000), "1666666M"),
        ];
        for (time, wire) in cases {
            assert_eq!(GrpcTimeout(time).to_string(), wire, "{time:?}");
        }
    }

    #[test]
    fn milliseconds_round_down_and_clamp() {
        assert_eq!(format_timeout_ms(Duration::from_micros(1999)), 1);
        assert_eq!(format_timeout_ms(Duration::MAX), MAX_TIMEOUT_MS);
        assert_eq!(
            parse_timeout_ms(b"99999999"),
            Some(Duration::from_millis(MAX_TIMEOUT_MS))
        );
        assert_eq!(parse_timeout_ms(b"100000000"), None);
    }
}
