//! The correlation ID itself: validation and generation.

use bytes::Bytes;
use http::HeaderValue;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use uuid::Uuid;

/// The longest correlation ID accepted, in bytes.
const MAX_LEN: usize = 128;

/// Which bytes may appear in a correlation ID: letters, digits and `-._~+/=:`.
///
/// Nothing that could split a header list (`,`), end a header line (CR, LF), hide in a
/// log line (whitespace, control bytes) or confuse a terminal can pass.
const SAFE_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        let b = byte as u8;
        table[byte] = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=' | b':');
        byte += 1;
    }
    table
};

fn check(bytes: &[u8]) -> Result<(), InvalidCorrelationId> {
    if bytes.is_empty() {
        return Err(InvalidCorrelationId::Empty);
    }
    if bytes.len() > MAX_LEN {
        return Err(InvalidCorrelationId::TooLong);
    }
    // Without an early exit, the loop has no branch per byte and unrolls: a valid ID
    // (nearly every one) is read to its end anyway.
    if bytes
        .iter()
        .fold(true, |safe, &b| safe & SAFE_BYTES[usize::from(b)])
    {
        Ok(())
    } else {
        Err(InvalidCorrelationId::ForbiddenCharacter)
    }
}

/// A validated correlation ID: 1 to 128 characters from letters, digits and `-._~+/=:`.
///
/// It is stored as the [`HeaderValue`] it travels in, which is reference counted:
/// cloning an ID, echoing it and injecting it into an outgoing request never copy the
/// text, and an ID accepted from a request shares the request's header bytes.
///
/// ```
/// use palisade::correlation::CorrelationId;
///
/// let id = CorrelationId::parse("order-42:retry.1")?;
/// assert_eq!(id.as_str(), "order-42:retry.1");
/// assert!(CorrelationId::parse("two words").is_err());
/// assert_eq!(CorrelationId::new_v4().as_str().len(), 36);
/// # Ok::<(), palisade::correlation::InvalidCorrelationId>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CorrelationId(HeaderValue);

impl CorrelationId {
    /// Validates `input` and copies it into a new ID.
    pub fn parse(input: impl AsRef<[u8]>) -> Result<Self, InvalidCorrelationId> {
        let input = input.as_ref();
        check(input)?;
        Ok(Self::from_checked(Bytes::copy_from_slice(input)))
    }

    /// Validates a header value and, if it is a valid ID, shares its bytes (no copy).
    pub fn from_header_value(value: &HeaderValue) -> Result<Self, InvalidCorrelationId> {
        check(value.as_bytes())?;
        Ok(Self(value.clone()))
    }

    /// `checked` passed [`check`] (or is a formatted UUID): visible ASCII.
    fn from_checked(checked: Bytes) -> Self {
        Self(
            HeaderValue::from_maybe_shared(checked)
                .expect("a validated ID is visible ASCII, a valid header value"),
        )
    }

    /// A random (version 4) UUID, like `0b6b8e5c-3f41-4c0a-9a55-2f0e1a7c9d13`.
    pub fn new_v4() -> Self {
        Self::from_uuid(Uuid::new_v4())
    }

    /// A time-ordered (version 7) UUID: IDs minted later sort later, which reads well in
    /// logs and indexes well in databases.
    pub fn new_v7() -> Self {
        Self::from_uuid(Uuid::now_v7())
    }

    /// Formats the UUID on the stack and moves the buffer into the one reference-counted
    /// allocation that every clone (request header, extension, response header) shares.
    fn from_uuid(uuid: Uuid) -> Self {
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        uuid.hyphenated().encode_lower(&mut text);
        Self::from_checked(Bytes::from_owner(text))
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        // Validation admits only ASCII, so this never falls back.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    /// The ID as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The ID as the header value it travels in.
    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }

    /// Turns the ID into the header value it travels in, without copying.
    pub fn into_header_value(self) -> HeaderValue {
        self.0
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CorrelationId")
            .field(&self.as_str())
            .finish()
    }
}

impl FromStr for CorrelationId {
    type Err = InvalidCorrelationId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<&str> for CorrelationId {
    type Error = InvalidCorrelationId;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl TryFrom<&HeaderValue> for CorrelationId {
    type Error = InvalidCorrelationId;

    fn try_from(value: &HeaderValue) -> Result<Self, Self::Error> {
        Self::from_header_value(value)
    }
}

impl From<CorrelationId> for HeaderValue {
    fn from(id: CorrelationId) -> Self {
        id.into_header_value()
    }
}

impl AsRef<str> for CorrelationId {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<str> for CorrelationId {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<&str> for CorrelationId {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

/// Why a value is not a correlation ID. The rejected value itself is deliberately not
/// kept: it came from a client and must not reach a log line raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidCorrelationId {
    /// The value is empty.
    #[error("invalid correlation ID: empty")]
    Empty,
    /// The value is longer than 128 bytes.
    #[error("invalid correlation ID: longer than 128 bytes")]
    TooLong,
    /// The value holds a byte other than letters, digits and `-._~+/=:`.
    #[error("invalid correlation ID: only letters, digits and `-._~+/=:` are allowed")]
    ForbiddenCharacter,
}

/// How a layer mints an ID when a request arrives without a usable one.
///
/// The default is a random (version 4) UUID.
///
/// ```
/// use palisade::correlation::{CorrelationId, Generator};
///
/// let sequential = std::sync::atomic::AtomicU64::new(0);
/// let generator = Generator::custom(move || {
///     let n = sequential.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
///     CorrelationId::parse(format!("req-{n}")).expect("req-N is a valid ID")
/// });
/// assert_eq!(generator.generate(), "req-0");
/// assert_eq!(generator.generate(), "req-1");
/// ```
#[derive(Clone, Default)]
pub struct Generator(Kind);

#[derive(Clone, Default)]
enum Kind {
    #[default]
    UuidV4,
    UuidV7,
    Custom(Arc<dyn Fn() -> CorrelationId + Send + Sync>),
}

impl Generator {
    /// Random (version 4) UUIDs: the default.
    pub fn uuid_v4() -> Self {
        Self(Kind::UuidV4)
    }

    /// Time-ordered (version 7) UUIDs.
    pub fn uuid_v7() -> Self {
        Self(Kind::UuidV7)
    }

    /// IDs from your own function. It returns a [`CorrelationId`], so what it mints is
    /// validated like everything else.
    pub fn custom(generate: impl Fn() -> CorrelationId + Send + Sync + 'static) -> Self {
        Self(Kind::Custom(Arc::new(generate)))
    }

    /// Mints one ID.
    pub fn generate(&self) -> CorrelationId {
        match &self.0 {
            Kind::UuidV4 => CorrelationId::new_v4(),
            Kind::UuidV7 => CorrelationId::new_v7(),
            Kind::Custom(generate) => generate(),
        }
    }
}

impl fmt::Debug for Generator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.0 {
            Kind::UuidV4 => "UuidV4",
            Kind::UuidV7 => "UuidV7",
            Kind::Custom(_) => "Custom",
        };
        f.debug_tuple("Generator")
            .field(&format_args!("{kind}"))
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_safe_set_up_to_128_bytes() {
        let all_safe = "azAZ09-._~+/=:";
        assert_eq!(CorrelationId::parse(all_safe).unwrap(), all_safe);
        assert!(CorrelationId::parse("a").is_ok());
        assert!(CorrelationId::parse("a".repeat(128)).is_ok());
    }

    #[test]
    fn rejects_empty_long_and_unsafe_values() {
        use InvalidCorrelationId::*;
        assert_eq!(CorrelationId::parse(""), Err(Empty));
        assert_eq!(CorrelationId::parse("a".repeat(129)), Err(TooLong));
        for bad in [
            "a b", "a,b", "a\r\nb", "a\0b", "a\tb", "a;b", "a\"b", "a<b", "é", "a%20", "a*",
        ] {
            assert_eq!(
                CorrelationId::parse(bad),
                Err(ForbiddenCharacter),
                "{bad:?}"
            );
        }
        assert_eq!(CorrelationId::parse([0xff, 0xfe]), Err(ForbiddenCharacter));
    }

    #[test]
    fn every_byte_outside_the_safe_set_is_rejected() {
        for byte in 0..=u8::MAX {
            let expected = byte.is_ascii_alphanumeric() || b"-._~+/=:".contains(&byte);
            assert_eq!(
                CorrelationId::parse([byte]).is_ok(),
                expected,
                "byte {byte}"
            );
        }
    }

    #[test]
    fn header_values_are_shared_not_copied() {
        let value = HeaderValue::from_static("abc-123");
        let id = CorrelationId::from_header_value(&value).unwrap();
        assert_eq!(id.as_bytes().as_ptr(), value.as_bytes().as_ptr());
        assert_eq!(HeaderValue::from(id), value);
        let invalid = HeaderValue::from_static("a b");
        assert!(CorrelationId::from_header_value(&invalid).is_err());
    }

    #[test]
    fn v4_ids_are_random_version_4_uuids() {
        let a = CorrelationId::new_v4();
        let b = CorrelationId::new_v4();
        assert_ne!(a, b);
        let uuid = Uuid::parse_str(a.as_str()).unwrap();
        assert_eq!(uuid.get_version_num(), 4);
        assert_eq!(a.as_str(), uuid.hyphenated().to_string());
        assert!(CorrelationId::parse(a.as_str()).is_ok());
    }

    #[test]
    fn v7_ids_are_time_ordered_version_7_uuids() {
        let ids: Vec<_> = (0..100).map(|_| CorrelationId::new_v7()).collect();
        for id in &ids {
            assert_eq!(Uuid::parse_str(id.as_str()).unwrap().get_version_num(), 7);
        }
        assert!(
            ids.windows(2).all(|w| w[0].as_str() < w[1].as_str()),
            "v7 IDs minted in sequence sort in sequence"
        );
    }

    #[test]
    fn generators_mint_what_they_say() {
        let v4 = Generator::default().generate();
        assert_eq!(Uuid::parse_str(v4.as_str()).unwrap().get_version_num(), 4);
        let v7 = Generator::uuid_v7().generate();
        assert_eq!(Uuid::parse_str(v7.as_str()).unwrap().get_version_num(), 7);
        let fixed = Generator::custom(|| CorrelationId::parse("fixed").unwrap());
        assert_eq!(fixed.generate(), "fixed");
        assert_eq!(format!("{fixed:?}"), "Generator(Custom)");
    }
}
