//! What a keyed layer keys on: any closure `Fn(&Req) -> Option<K>`, or (with the `http`
//! feature) the ready-made extractors for HTTP requests here. Every keyed layer takes a
//! [`KeyExtractor`]: the rate limiter gives each key its own bucket
//! ([`rate_limit::Builder::keyed`](crate::rate_limit::Builder::keyed)), and the circuit
//! breaker its own breaker
//! ([`CircuitBreakerLayerBuilder::keyed`](crate::circuit_breaker::CircuitBreakerLayerBuilder::keyed)).
//!
//! A request whose key cannot be extracted is the layer's to decide: a keyed rate limiter
//! refuses it with [`MissingKey`](crate::rate_limit::MissingKey), or charges it to its
//! shared fallback bucket, as chosen with
//! [`when_key_missing`](crate::rate_limit::Builder::when_key_missing); a keyed circuit
//! breaker sends it through its one shared breaker.
//!
//! Every keyed layer keeps its per-key state in one kind of table: sharded, hashed with
//! randomly keyed SipHash (keys are client-controlled), and bounded by its `max_keys`.
//! It drops the state of idle keys (state a fresh key would have anyway), and at its cap
//! it tracks no new key rather than evict a live one, so a flood of fresh keys can
//! neither grow memory past the cap nor reset a real client's state.
//!
//! # Example
//!
//! ```
//! # #[cfg(feature = "http")] {
//! use std::net::{IpAddr, SocketAddr};
//! use http::{HeaderName, Request};
//! use palisade::key::{Authority, ForwardedFor, Header, KeyExtractor, PeerIp};
//!
//! let mut request = Request::get("/orders")
//!     .header("host", "orders.internal:8080")
//!     .header("x-api-key", "tenant-7")
//!     .header("x-forwarded-for", "203.0.113.9, 10.0.0.2")
//!     .body(())
//!     .unwrap();
//! request.extensions_mut().insert("10.0.0.3:40000".parse::<SocketAddr>().unwrap());
//!
//! assert_eq!(PeerIp.extract(&request), Some("10.0.0.3".parse::<IpAddr>().unwrap()));
//! // One proxy of ours appended the address it got the request from.
//! assert_eq!(ForwardedFor::new(1).extract(&request), Some("10.0.0.2".parse().unwrap()));
//! assert_eq!(ForwardedFor::new(2).extract(&request), Some("203.0.113.9".parse().unwrap()));
//! let api_key = Header::new(HeaderName::from_static("x-api-key"));
//! assert_eq!(api_key.extract(&request).unwrap(), "tenant-7");
//! assert_eq!(Authority.extract(&request).unwrap(), "orders.internal:8080");
//! // Any closure is an extractor too.
//! let by_path = |request: &Request<()>| Some(request.uri().path().to_owned());
//! assert_eq!(by_path.extract(&request).as_deref(), Some("/orders"));
//! # }
//! ```
//!
//! # Which address to trust
//!
//! [`PeerIp`] is the address of the TCP peer: it cannot be spoofed, but behind a reverse
//! proxy or load balancer it is the proxy's, so every client shares one key.
//! [`ForwardedFor`] and [`Forwarded`] read the client address the proxies recorded. Each
//! proxy *appends* the address it received the request from, and anything further left
//! came from the client, who can write whatever it likes there. So these extractors take
//! the address exactly `trusted_proxies` entries from the right end. Configure the number
//! of proxies you actually run: too high and clients choose their own key (and can dodge
//! a limit by rotating it); too low and the key is one of your proxies. Read only the
//! header your proxies set: a client may send the other one.

#[cfg(feature = "http")]
use std::net::{IpAddr, SocketAddr};

#[cfg(feature = "http")]
use http::{HeaderName, HeaderValue, Request, header, uri};

mod table;

pub(crate) use self::table::{Idle, KeyedTable, MIN_SWEEP_SPACING};

/// Extracts the key of a request for a keyed layer.
///
/// Implemented for every closure `Fn(&Req) -> Option<K>`; `None` means the request has
/// no key.
pub trait KeyExtractor<Req> {
    /// The key: each distinct value gets its own state (its own bucket, its own breaker).
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

/// The extractor of a global layer: every request has the one key `()`, so every
/// request shares the layer's one bucket.
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

/// Keys on the authority a request is addressed to (`host[:port]`, compared without
/// regard to case): the URI's authority (an absolute-form or HTTP/2 request, and a
/// client's outgoing request), else the `Host` header (an HTTP/1.1 request to a server).
/// A request with neither, or with an unparsable `Host`, has no key. On the client side
/// this is one key per upstream, what a keyed circuit breaker wants.
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy, Default)]
pub struct Authority;

#[cfg(feature = "http")]
impl<B> KeyExtractor<Request<B>> for Authority {
    type Key = uri::Authority;

    fn extract(&self, request: &Request<B>) -> Option<uri::Authority> {
        if let Some(authority) = request.uri().authority() {
            return Some(authority.clone());
        }
        let host = request.headers().get(header::HOST)?;
        uri::Authority::try_from(host.as_bytes()).ok()
    }
}

/// Keys on the route axum matched (its path pattern, such as `/users/{id}`), for one
/// breaker or limit per route of a server. axum puts the `MatchedPath` in the request's
/// extensions for middleware added with `Router::layer` or `route_layer`; a request
/// without one (no route matched, or outside a `Router`) has no key.
#[cfg(feature = "axum")]
#[derive(Debug, Clone, Copy, Default)]
pub struct MatchedPath;

/// The key [`MatchedPath`] extracts: the matched route's path pattern (sharing axum's
/// string, so extracting it does not allocate).
#[cfg(feature = "axum")]
#[derive(Debug, Clone)]
pub struct RoutePath(axum::extract::MatchedPath);

#[cfg(feature = "axum")]
impl RoutePath {
    /// The path pattern, such as `/users/{id}`.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

#[cfg(feature = "axum")]
impl PartialEq for RoutePath {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

#[cfg(feature = "axum")]
impl Eq for RoutePath {}

#[cfg(feature = "axum")]
impl std::hash::Hash for RoutePath {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

#[cfg(feature = "axum")]
impl<B> KeyExtractor<Request<B>> for MatchedPath {
    type Key = RoutePath;

    fn extract(&self, request: &Request<B>) -> Option<RoutePath> {
        request
            .extensions()
            .get::<axum::extract::MatchedPath>()
            .cloned()
            .map(RoutePath)
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
