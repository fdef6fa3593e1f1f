//! What a keyed limiter keys on: any closure `Fn(&Req) -> Option<K>`, or (with the `http`
//! feature) the ready-made extractors for HTTP requests here.
//!
//! A request whose key cannot be extracted is refused with
//! [`MissingKey`](super::MissingKey), or charged to the shared fallback bucket, as
//! chosen with [`when_key_missing`](super::Builder::when_key_missing).
//!
//! # Which address to trust
//!
//! [`PeerIp`] is the address of the TCP peer: it cannot be spoofed, but behind a reverse
//! proxy or load balancer it is the proxy's, so every client shares one bucket.
//! [`ForwardedFor`] and [`Forwarded`] read the client address the proxies recorded. Each
//! proxy *appends* the address it received the request from, and anything further left
//! came from the client, who can write whatever it likes there. So these extractors take
//! the address exactly `trusted_proxies` entries from the right end. Configure the number
//! of proxies you actually run: too high and clients choose their own key (and can dodge
//! the limit by rotating it); too low and the key is one of your proxies. Read only the
//! header your proxies set: a client may send the other one.

#[cfg(feature = "http")]
use std::net::{IpAddr, SocketAddr};

#[cfg(feature = "http")]
use http::{HeaderName, HeaderValue, Request};

/// Extracts the rate limiting key of a request.
///
/// Implemented for every closure `Fn(&Req) -> Option<K>`; `None` means the request has
/// no key.
pub trait KeyExtractor<Req> {
    /// The key: each distinct value gets its own bucket.
    type Key;

    /// The request's key, if it has one.
    fn extract(&self, request: &Req) -> Option<Self::Key>;
}

impl<F, Req, K> KeyExtractor<Req> for F
where
    F: Fn(&Req) -> Option<K>,
{
    type Key = K;

    fn extract(&self, request: &Req) -> Option<K> {
        self(request)
    }
}

/// The extractor of a global limiter: every request shares the one bucket.
#[derive(Debug, Clone, Copy, Default)]
pub struct Global;

impl<Req> KeyExtractor<Req> for Global {
    type Key = ();

    fn extract(&self, _request: &Req) -> Option<()> {
        Some(())
    }
}

/// Keys on the TCP peer's IP address: axum's `ConnectInfo<SocketAddr>` (with the `axum`
/// feature and `Router::into_make_service_with_connect_info`), or else a plain
/// `SocketAddr` request extension (what you insert yourself with hyper).
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerIp;

#[cfg(feature = "http")]
impl<B> KeyExtractor<Request<B>> for PeerIp {
    type Key = IpAddr;

    fn extract(&self, request: &Request<B>) -> Option<IpAddr> {
        peer_ip(request)
    }
}

#[cfg(feature = "http")]
fn peer_ip<B>(request: &Request<B>) -> Option<IpAddr> {
    let extensions = request.extensions();
    #[cfg(feature = "axum")]
    if let Some(axum::extract::ConnectInfo(address)) =
        extensions.get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(address.ip());
    }
    extensions.get::<SocketAddr>().map(SocketAddr::ip)
}

/// Keys on a header's value (an API key, a tenant id). A request without the header, or
/// with an empty value, has no key; with several, the first counts.
#[cfg(feature = "http")]
#[derive(Debug, Clone)]
pub struct Header {
    name: HeaderName,
}

#[cfg(feature = "http")]
impl Header {
    /// Keys on the header `name`.
    pub fn new(name: HeaderName) -> Self {
        Self { name }
    }
}

#[cfg(feature = "http")]
impl<B> KeyExtractor<Request<B>> for Header {
    type Key = HeaderValue;

    fn extract(&self, request: &Request<B>) -> Option<HeaderValue> {
        request
            .headers()
            .get(&self.name)
            .filter(|value| !value.is_empty())
            .cloned()
    }
}

/// Keys on the client IP recorded in `X-Forwarded-For` by `trusted_proxies` proxies (see
/// the [module docs](self#which-address-to-trust): spoofable if misconfigured). With zero
/// trusted proxies it is [`PeerIp`].
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy)]
pub struct ForwardedFor {
    trusted_proxies: usize,
}

#[cfg(feature = "http")]
impl ForwardedFor {
    /// Behind `trusted_proxies` proxies that each append to `X-Forwarded-For`.
    pub fn new(trusted_proxies: usize) -> Self {
        Self { trusted_proxies }
    }
}

#[cfg(feature = "http")]
impl<B> KeyExtractor<Request<B>> for ForwardedFor {
    type Key = IpAddr;

    fn extract(&self, request: &Request<B>) -> Option<IpAddr> {
        client_ip(request, self.trusted_proxies, "x-forwarded-for", parse_node)
    }
}

/// Keys on the client IP recorded in the standard `Forwarded` header (RFC 7239, its
/// `for=` parameters) by `trusted_proxies` proxies (see the
/// [module docs](self#which-address-to-trust): spoofable if misconfigured). With zero
/// trusted proxies it is [`PeerIp`].
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy)]
pub struct Forwarded {
    trusted_proxies: usize,
}

#[cfg(feature = "http")]
impl Forwarded {
    /// Behind `trusted_proxies` proxies that each append a `Forwarded` element.
    pub fn new(trusted_proxies: usize) -> Self {
        Self { trusted_proxies }
    }
}

#[cfg(feature = "http")]
impl<B> KeyExtractor<Request<B>> for Forwarded {
    type Key = IpAddr;

    fn extract(&self, request: &Request<B>) -> Option<IpAddr> {
        client_ip(request, self.trusted_proxies, "forwarded", |element| {
            let node = element.split(';').find_map(|pair| {
                let (name, value) = pair.split_once('=')?;
                name.trim().eq_ignore_ascii_case("for").then_some(value)
            })?;
            parse_node(node.trim().trim_matches('"'))
        })
    }
}

/// The address `trusted_proxies` entries from the right of the comma-separated list in
/// every `header` line, or the peer's with no trusted proxy. Anything unparsable (an
/// obfuscated or `unknown` node, garbage) means no key.
#[cfg(feature = "http")]
fn client_ip<B>(
    request: &Request<B>,
    trusted_proxies: usize,
    header: &'static str,
    parse: impl Fn(&str) -> Option<IpAddr>,
) -> Option<IpAddr> {
    if trusted_proxies == 0 {
        return peer_ip(request);
    }
    let mut lines = request.headers().get_all(header).iter().rev();
    let mut skip = trusted_proxies - 1;
    lines.find_map(|line| {
        let Ok(line) = line.to_str() else {
            return Some(None);
        };
        for entry in line.rsplit(',') {
            if skip == 0 {
                return Some(parse(entry.trim()));
            }
            skip -= 1;
        }
        None
    })?
}

/// An IP address with an optional port, IPv6 possibly in brackets.
#[cfg(feature = "http")]
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(address) = node.parse::<SocketAddr>() {
        return Some(address.ip());
    }
    node.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}
