//! W3C Trace Context: `traceparent` and `tracestate`, parsed as the spec says.

use crate::rng::random_u64;
use std::fmt;
use std::sync::Arc;

/// The most list-members a `tracestate` may hold; a longer list is invalid.
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

/// A `traceparent`'s length up to its flags: `vv-<32>-<16>-ff`.
const TRACEPARENT_LEN: usize = 55;
const SAMPLED: u8 = 0x01;

/// Why a `traceparent` or `tracestate` was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidTraceContext {
    /// The `traceparent` breaks the grammar (or is version `ff`, or has an all-zero id).
    #[error("invalid traceparent")]
    TraceParent,
    /// More than one `traceparent` header, which the spec makes invalid.
    #[error("more than one traceparent")]
    RepeatedTraceParent,
    /// The `tracestate` breaks the grammar, repeats a key or has more than 32 members.
    #[error("invalid tracestate")]
    TraceState,
}

/// A 16-byte trace-id, never all zeros; its `Display` is 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId([u8; 16]);

/// An 8-byte span (parent) id, never all zeros; its `Display` is 16 lowercase hex
/// digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId([u8; 8]);

impl TraceId {
    /// The id's bytes.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    fn random() -> Self {
        let mut bytes = [0; 16];
        bytes[..8].copy_from_slice(&random_u64().to_be_bytes());
        bytes[8..].copy_from_slice(&nonzero_random().to_be_bytes());
        Self(bytes)
    }
}

impl SpanId {
    /// The id's bytes.
    pub fn to_bytes(self) -> [u8; 8] {
        self.0
    }

    /// A fresh random id, from the crate's small RNG (no syscall per id).
    pub fn random() -> Self {
        Self(nonzero_random().to_be_bytes())
    }
}

fn nonzero_random() -> u64 {
    random_u64().max(1)
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Writes `bytes` as lowercase hex into `out` (twice as long): a table lookup per
/// digit, where `{:02x}` would run the formatting machinery for every byte.
fn hex_encode(bytes: &[u8], out: &mut [u8]) {
    for (byte, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = HEX_DIGITS[usize::from(byte >> 4)];
        pair[1] = HEX_DIGITS[usize::from(byte & 0x0f)];
    }
}

/// The hex digits of an id of up to 16 bytes, as text.
fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    let mut digits = [0; 32];
    let digits = &mut digits[..bytes.len() * 2];
    hex_encode(bytes, digits);
    f.write_str(ascii(digits))
}

/// Text of bytes this module wrote, which are ASCII; never fails.
fn ascii(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or_default()
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceId({self})")
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpanId({self})")
    }
}

/// A validated `tracestate`, kept as it came (several headers joined with `,`) so that
/// it is forwarded unchanged.
#[derive(Clone, PartialEq, Eq)]
pub struct TraceState(Arc<str>);

impl TraceState {
    /// Validates the `tracestate` header values of one request (a list may be split
    /// over several headers): every list-member `key=value` as the spec's grammar has
    /// it, no key twice, at most [`MAX_TRACESTATE_MEMBERS`] members. Empty members
    /// (`a=1,,b=2`) are allowed, as the spec says.
    ///
    /// ```
    /// use palisade::context::TraceState;
    ///
    /// let state = TraceState::parse([&b"congo=t61rcWkgMzE"[..], b"rojo=00f067aa0ba902b7"])?;
    /// assert_eq!(state.as_str(), "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7");
    /// assert!(TraceState::parse([&b"Upper=1"[..]]).is_err());
    /// assert!(TraceState::parse([&b"a=1,a=2"[..]]).is_err());
    /// # Ok::<(), palisade::context::InvalidTraceContext>(())
    /// ```
    pub fn parse<'a>(
        values: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Self, InvalidTraceContext> {
        let mut joined = Vec::new();
        let mut keys: Vec<&[u8]> = Vec::new();
        for value in values {
            for member in value.split(|&b| b == b',') {
                let member = trim_ows(member);
                if member.is_empty() {
                    continue;
                }
                let key = list_member_key(member).ok_or(InvalidTraceContext::TraceState)?;
                if keys.contains(&key) || keys.len() == MAX_TRACESTATE_MEMBERS {
                    return Err(InvalidTraceContext::TraceState);
                }
                keys.push(key);
            }
            if !joined.is_empty() {
                joined.push(b',');
            }
            joined.extend_from_slice(value);
        }
        // Validated: visible ASCII, spaces and tabs only.
        let text = String::from_utf8(joined).map_err(|_| InvalidTraceContext::TraceState)?;
        Ok(Self(text.into()))
    }

    /// The list, as it is forwarded.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TraceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TraceState").field(&self.as_str()).finish()
    }
}

fn trim_ows(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

/// The key of a valid `key=value` list-member.
fn list_member_key(member: &[u8]) -> Option<&[u8]> {
    let split = member.iter().position(|&b| b == b'=')?;
    let (key, value) = (&member[..split], &member[split + 1..]);
    (valid_key(key) && valid_value(value)).then_some(key)
}

fn is_key_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'*' | b'/')
}

/// `simple-key = lcalpha 0*255(keychar)`, or
/// `tenant-id "@" system-id` with `tenant-id = (lcalpha / DIGIT) 0*240(keychar)` and
/// `system-id = lcalpha 0*13(keychar)`.
fn valid_key(key: &[u8]) -> bool {
    let rest_valid = |part: &[u8], max_rest: usize| {
        part.len() <= max_rest + 1 && part[1..].iter().all(|&b| is_key_char(b))
    };
    match key.iter().position(|&b| b == b'@') {
        None => matches!(key.first(), Some(b) if b.is_ascii_lowercase()) && rest_valid(key, 255),
        Some(at) => {
            let (tenant, system) = (&key[..at], &key[at + 1..]);
            matches!(tenant.first(), Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit())
                && rest_valid(tenant, 240)
                && matches!(system.first(), Some(b) if b.is_ascii_lowercase())
                && rest_valid(system, 13)
        }
    }
}

/// `value = 0*255(chr) nblk-chr`: 1 to 256 of `0x20..=0x7e` but `,` and `=`, not
/// ending in a space.
fn valid_value(value: &[u8]) -> bool {
    let nblk = |b: u8| (0x21..=0x7e).contains(&b) && b != b',' && b != b'=';
    match value.split_last() {
        Some((&last, rest)) => {
            value.len() <= 256 && nblk(last) && rest.iter().all(|&b| b == b' ' || nblk(b))
        }
        None => false,
    }
}

/// A request's W3C trace context: the trace it belongs to, the caller's span
/// (`parent-id`), the sampled flag and the `tracestate`.
///
/// Its `Display` is the `traceparent` (version `00`; only the sampled flag is sent, any
/// other flag is zeroed as the spec asks of a version `00` sender).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TraceContext {
    trace_id: TraceId,
    parent_id: SpanId,
    sampled: bool,
    state: Option<TraceState>,
}

impl TraceContext {
    /// Parses a `traceparent` as W3C Trace Context says: version `00` exactly
    /// `00-<32 hex trace-id>-<16 hex parent-id>-<2 hex flags>`; a later version read by
    /// the same fields, and only longer than that if a `-` follows the flags; version
    /// `ff` invalid; lowercase hex only; neither id all zeros.
    ///
    /// ```
    /// use palisade::context::TraceContext;
    ///
    /// let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    /// let context = TraceContext::parse(parent.as_bytes())?;
    /// assert_eq!(context.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    /// assert!(context.is_sampled());
    /// assert_eq!(context.to_string(), parent);
    ///
    /// // A future version with more fields is read; upper case is not.
    /// assert!(TraceContext::parse(b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what").is_ok());
    /// assert!(TraceContext::parse(b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01").is_err());
    /// # Ok::<(), palisade::context::InvalidTraceContext>(())
    /// ```
    pub fn parse(traceparent: &[u8]) -> Result<Self, InvalidTraceContext> {
        parse_traceparent(traceparent).ok_or(InvalidTraceContext::TraceParent)
    }

    /// A new trace, with a random trace-id and parent-id, sampled or not.
    pub fn new_root(sampled: bool) -> Self {
        Self {
            trace_id: TraceId::random(),
            parent_id: SpanId::random(),
            sampled,
            state: None,
        }
    }

    /// With this `tracestate`.
    pub fn with_state(mut self, state: TraceState) -> Self {
        self.state = Some(state);
        self
    }

    /// The same trace, state and flag under a fresh random parent-id: what a hop sends
    /// on each outgoing call.
    pub fn child(&self) -> Self {
        Self {
            parent_id: SpanId::random(),
            ..self.clone()
        }
    }

    /// The `traceparent` of a child ([`child`](Self::child)), written straight into a
    /// fixed buffer: what the client side sends on each call, without cloning the
    /// context or formatting it.
    #[cfg(feature = "http")]
    pub(crate) fn child_traceparent(&self) -> [u8; TRACEPARENT_LEN] {
        self.traceparent(SpanId::random())
    }

    /// `00-<trace-id>-<parent>-<flags>`, only the sampled flag set.
    fn traceparent(&self, parent: SpanId) -> [u8; TRACEPARENT_LEN] {
        let mut out = *b"00-################################-################-00";
        hex_encode(&self.trace_id.0, &mut out[3..35]);
        hex_encode(&parent.0, &mut out[36..52]);
        if self.sampled {
            out[54] = b'0' + SAMPLED;
        }
        out
    }

    /// The trace-id.
    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    /// The caller's span id (for an outgoing context: the id the callee sees).
    pub fn parent_id(&self) -> SpanId {
        self.parent_id
    }

    /// Whether the caller recorded the trace.
    pub fn is_sampled(&self) -> bool {
        self.sampled
    }

    /// The `tracestate`, if a valid one came.
    pub fn state(&self) -> Option<&TraceState> {
        self.state.as_ref()
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(ascii(&self.traceparent(self.parent_id)))
    }
}

fn parse_traceparent(bytes: &[u8]) -> Option<TraceContext> {
    let head = bytes.get(..TRACEPARENT_LEN)?;
    let version = hex_byte(&head[0..2])?;
    let length_ok = match version {
        0xff => false,
        0x00 => bytes.len() == TRACEPARENT_LEN,
        _ => bytes.len() == TRACEPARENT_LEN || bytes[TRACEPARENT_LEN] == b'-',
    };
    if !length_ok || head[2] != b'-' || head[35] != b'-' || head[52] != b'-' {
        return None;
    }
    let mut trace_id = [0; 16];
    let mut parent_id = [0; 8];
    hex_into(&head[3..35], &mut trace_id)?;
    hex_into(&head[36..52], &mut parent_id)?;
    let flags = hex_byte(&head[53..55])?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some(TraceContext {
        trace_id: TraceId(trace_id),
        parent_id: SpanId(parent_id),
        sampled: flags & SAMPLED != 0,
        state: None,
    })
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    Some(hex_digit(pair[0])? << 4 | hex_digit(pair[1])?)
}

fn hex_into(hex: &[u8], out: &mut [u8]) -> Option<()> {
    for (pair, byte) in hex.chunks_exact(2).zip(out) {
        *byte = hex_byte(pair)?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn version_00_is_strict() {
        assert!(TraceContext::parse(VALID.as_bytes()).is_ok());
        let longer = format!("{VALID}-extra");
        assert!(TraceContext::parse(longer.as_bytes()).is_err());
        assert!(TraceContext::parse(&VALID.as_bytes()[..54]).is_err());
    }

    #[test]
    fn later_versions_are_read_on_dash_boundaries() {
        let later = VALID.replacen("00", "01", 1);
        assert!(TraceContext::parse(later.as_bytes()).is_ok());
        assert!(TraceContext::parse(format!("{later}-x").as_bytes()).is_ok());
        assert!(TraceContext::parse(format!("{later}x").as_bytes()).is_err());
        let ff = VALID.replacen("00", "ff", 1);
        assert!(TraceContext::parse(ff.as_bytes()).is_err());
    }

    #[test]
    fn zero_ids_and_upper_case_are_invalid() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0G",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_flags_are_zeroed_and_sampled_carried() {
        let flags_ff = VALID.replace("-01", "-ff");
        let context = TraceContext::parse(flags_ff.as_bytes()).unwrap();
        assert!(context.to_string().ends_with("-01"));
        let unsampled = TraceContext::parse(VALID.replace("-01", "-02").as_bytes()).unwrap();
        assert!(unsampled.to_string().ends_with("-00"));
    }

    #[test]
    fn a_child_keeps_the_trace_under_a_fresh_parent() {
        let context = TraceContext::parse(VALID.as_bytes()).unwrap();
        let (a, b) = (context.child(), context.child());
        assert_eq!(a.trace_id(), context.trace_id());
        assert_ne!(a.parent_id(), context.parent_id());
        assert_ne!(a.parent_id(), b.parent_id());
    }

    #[test]
    #[cfg(feature = "http")]
    fn a_childs_traceparent_is_written_without_fmt_as_display_writes_it() {
        for flags in ["00", "01", "03"] {
            let context =
                TraceContext::parse(VALID.replace("-01", &format!("-{flags}")).as_bytes()).unwrap();
            let sent = context.child_traceparent();
            let child = TraceContext::parse(&sent).unwrap();
            assert_eq!(child.trace_id(), context.trace_id());
            assert_eq!(child.is_sampled(), context.is_sampled());
            assert_ne!(child.parent_id(), context.parent_id());
            assert_eq!(child.to_string().as_bytes(), sent);
            assert_eq!(context.trace_id().to_string(), &VALID[3..35]);
        }
    }

    #[test]
    fn tracestate_keys_and_limits() {
        let parse = |text: &str| TraceState::parse([text.as_bytes()]);
        assert!(parse("a=1, b@c=2 ,\t,x*/-_9=~!").is_ok());
        assert!(parse("0tenant@sys=1").is_ok());
        assert!(parse("0simple=1").is_err()); // a simple key starts with a letter
        assert!(parse("a=").is_err());
        assert!(parse("a=b=c").is_err());
        assert!(parse("a=1 2").is_ok());
        assert!(parse("t@s012345678901234=1").is_err()); // system-id above 14
        assert!(parse(&format!("a={}", "v".repeat(256))).is_ok());
        assert!(parse(&format!("a={}", "v".repeat(257))).is_err());
        let members = |n: usize| {
            (0..n)
                .map(|i| format!("k{i}=v"))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert!(parse(&members(32)).is_ok());
        assert!(parse(&members(33)).is_err());
    }
}
