use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// A rate limit key that names a Redis key: how a keyed limiter's key becomes bytes.
///
/// Implemented for strings, byte strings, integers, IP and socket addresses, `()` (the
/// global limiter) and, with the `http` feature, `http::HeaderValue` (the
/// [`Header`](crate::key::Header) extractor's key) and `http::uri::Authority` (the
/// [`Authority`](crate::key::Authority) extractor's, lowercased as it compares). Two keys that are different
/// must write different bytes, or their clients share a bucket.
pub trait RedisKey {
    /// Whether this is the key of a global limiter (`()`, and only `()`): its requests
    /// go to the shared bucket.
    const GLOBAL: bool = false;

    /// Appends the key's bytes to `out`.
    fn write_redis_key(&self, out: &mut Vec<u8>);
}

macro_rules! through_pointer {
    ($($ty:ty),*) => {$(
        impl<T: RedisKey + ?Sized> RedisKey for $ty {
            fn write_redis_key(&self, out: &mut Vec<u8>) {
                (**self).write_redis_key(out);
            }
        }
    )*};
}

through_pointer!(&T, Box<T>, Arc<T>);

impl RedisKey for () {
    const GLOBAL: bool = true;

    fn write_redis_key(&self, _out: &mut Vec<u8>) {}
}

macro_rules! as_bytes {
    ($($ty:ty),*) => {$(
        impl RedisKey for $ty {
            fn write_redis_key(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(AsRef::<[u8]>::as_ref(self));
            }
        }
    )*};
}

as_bytes!(str, String, [u8], Vec<u8>);

#[cfg(feature = "http")]
as_bytes!(http::HeaderValue);

#[cfg(feature = "http")]
impl RedisKey for http::uri::Authority {
    fn write_redis_key(&self, out: &mut Vec<u8>) {
        // Authorities that differ only in case are one key: so are their bytes.
        out.extend(self.as_str().bytes().map(|byte| byte.to_ascii_lowercase()));
    }
}

/// Types whose `Display` is their identity.
macro_rules! displayed {
    ($($ty:ty),*) => {$(
        impl RedisKey for $ty {
            fn write_redis_key(&self, out: &mut Vec<u8>) {
                // Writing to a Vec cannot fail.
                let _ = write!(Appender(out), "{self}");
            }
        }
    )*};
}

struct Appender<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Appender<'_> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.0.extend_from_slice(text.as_bytes());
        Ok(())
    }
}

displayed!(
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, u8, u16, u32, u64, u128, usize, i8, i16, i32, i64,
    i128, isize
);

#[cfg(all(test, not(loom), feature = "http"))]
mod tests {
    use super::*;

    #[test]
    fn authorities_equal_without_regard_to_case_write_the_same_bytes() {
        let bytes = |text: &str| {
            let mut out = Vec::new();
            let authority: http::uri::Authority = text.parse().unwrap();
            authority.write_redis_key(&mut out);
            out
        };
        assert_eq!(bytes("Orders.Internal:8080"), b"orders.internal:8080");
        assert_eq!(bytes("Orders.Internal:8080"), bytes("orders.internal:8080"));
    }
}
