//! The rejection contract: how every refusal describes itself.
//!
//! A palisade layer that refuses a request (an open circuit, a rate limit, a fail-closed
//! store, a missing key, a timeout) resolves the response future at once to an error of
//! its own concrete type, which callers can downcast as usual
//! ([`CircuitOpen`](crate::circuit_breaker::CircuitOpen),
//! [`RateLimited`](crate::rate_limit::RateLimited), ...). Every one of them also describes
//! itself the same way, as a [`Rejection`]: its [`RejectionKind`], when trying again can
//! succeed ([`retry_after`](Rejection::retry_after)), and for rate limits the fields of
//! the IETF `RateLimit` / `RateLimit-Policy` headers ([`RateLimitInfo`]).
//!
//! [`Rejection::find`] finds the description of any error, also one wrapped inside
//! another error (it walks [`source()`](std::error::Error::source)). The HTTP answer
//! ([`http_response`], feature `http`), the gRPC answer (`palisade::tonic`, feature
//! `tonic`) and the retry layer read nothing else, so:
//!
//! - a user's error that wraps a `CircuitOpen` as its source is still answered with 503;
//! - another crate's layer takes part by returning [`Rejected`] (or an error whose
//!   `source()` chain holds one), without palisade knowing its type.
//!
//! # HTTP and gRPC
//!
//! | kind | HTTP | gRPC |
//! |---|---|---|
//! | [`Unavailable`](RejectionKind::Unavailable) | 503, `Retry-After` | `UNAVAILABLE`, `grpc-retry-pushback-ms` |
//! | [`Overloaded`](RejectionKind::Overloaded) | 503, `Retry-After` | `UNAVAILABLE`, `grpc-retry-pushback-ms` |
//! | [`RateLimited`](RejectionKind::RateLimited) | 429, `Retry-After`, `RateLimit-Policy`, `RateLimit` | `RESOURCE_EXHAUSTED`, `grpc-retry-pushback-ms` |
//! | [`Malformed`](RejectionKind::Malformed) | 400 | `INVALID_ARGUMENT` |
//! | [`DeadlineExceeded`](RejectionKind::DeadlineExceeded) | 504 | `DEADLINE_EXCEEDED` |
//!
//! | not a rejection | 500, no body | the status tonic makes of the error |
//!
//! The delay headers are sent only when the rejection has a `retry_after`, the
//! `RateLimit` fields only when it carries a [`RateLimitInfo`]. HTTP bodies are empty and
//! the gRPC message is the rejection's [`reason`](Rejection::reason), so an inner
//! error's text never reaches the client.
//!
//! # A rejection from a layer of your own
//!
//! ```
//! use palisade::rejection::{Rejected, Rejection, RejectionKind};
//! use std::time::Duration;
//! use tower::BoxError;
//!
//! // A layer that sheds load refuses with `Rejected`...
//! fn refuse() -> BoxError {
//!     Rejected::new(
//!         Rejection::new(RejectionKind::Overloaded, "queue full")
//!             .with_retry_after(Duration::from_millis(250)),
//!     )
//!     .into()
//! }
//!
//! // ...and every palisade mapper, and the retry layer, understands it.
//! let error = refuse();
//! let rejection = Rejection::find(&*error).expect("a rejection");
//! assert_eq!(rejection.kind(), RejectionKind::Overloaded);
//! assert_eq!(rejection.retry_after(), Some(Duration::from_millis(250)));
//! # #[cfg(feature = "http")]
//! assert_eq!(palisade::rejection::http_response::<()>(&error).status(), 503);
//! ```

use std::error::Error;
use std::fmt;
use std::time::Duration;

mod known;
#[cfg(feature = "http")]
mod response;

#[cfg(all(test, feature = "redis"))]
pub(crate) use self::response::tests::redis_unavailable;

#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use self::response::{
    RATELIMIT, RATELIMIT_POLICY, http_response, insert_rate_limit_fields, rejection_response,
    whole_seconds,
};

/// What a rejection says about the request it refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectionKind {
    /// The dependency behind the layer cannot take the request now (an open circuit, a
    /// rate-limit store that is down). Another replica, or the same one later, may.
    Unavailable,
    /// This server has more work in flight than it can finish; shed, try again later.
    Overloaded,
    /// The client is over its rate limit.
    RateLimited,
    /// The request lacks what the layer needs to decide (such as a rate-limit key);
    /// trying again unchanged cannot help.
    Malformed,
    /// A deadline or timeout passed before an answer came.
    DeadlineExceeded,
}

/// The state of the rate limit a request ran into, as the IETF `RateLimit-Policy`
/// (`q`, `w`) and `RateLimit` (`r`, `t`) fields report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimitInfo {
    /// The quota: the most a client can spend at once (`q`).
    pub limit: u64,
    /// The time an empty quota takes to come back whole (`w`).
    pub window: Duration,
    /// What is left of the quota (`r`).
    pub remaining: u64,
    /// How long until the quota is whole again; on a refusal, until the request would
    /// pass (`t`).
    pub reset: Duration,
}

impl RateLimitInfo {
    /// The fields: quota `limit` refilling in `window`, `remaining` of it left, whole
    /// again (or passing) after `reset`.
    pub const fn new(limit: u64, window: Duration, remaining: u64, reset: Duration) -> Self {
        Self {
            limit,
            window,
            remaining,
            reset,
        }
    }
}

/// How a rejection describes itself; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Rejection {
    kind: RejectionKind,
    reason: &'static str,
    retry_after: Option<Duration>,
    rate_limit: Option<RateLimitInfo>,
}

impl Rejection {
    /// A rejection of `kind`. `reason` is a short text that is safe to show the client
    /// (it becomes the gRPC status message): name what refused, not its internals.
    pub const fn new(kind: RejectionKind, reason: &'static str) -> Self {
        Self {
            kind,
            reason,
            retry_after: None,
            rate_limit: None,
        }
    }

    /// Says when trying again can succeed.
    pub const fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// Adds the state of the rate limit the request ran into.
    pub const fn with_rate_limit(mut self, rate_limit: RateLimitInfo) -> Self {
        self.rate_limit = Some(rate_limit);
        self
    }

    /// What kind of refusal this is.
    pub const fn kind(&self) -> RejectionKind {
        self.kind
    }

    /// A short text, safe to show the client.
    pub const fn reason(&self) -> &'static str {
        self.reason
    }

    /// How long until trying again can succeed; `None` when waiting cannot help, or
    /// when the layer cannot tell.
    pub const fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The rate limit the request ran into, for rate limits.
    pub const fn rate_limit(&self) -> Option<&RateLimitInfo> {
        self.rate_limit.as_ref()
    }

    /// The description of `error` if it, or an error in its
    /// [`source()`](Error::source) chain, is a rejection: one of palisade's, a
    /// [`Rejected`], or tower's `Elapsed` timeout. The outermost one wins.
    pub fn find(error: &(dyn Error + 'static)) -> Option<Rejection> {
        let mut next = Some(error);
        while let Some(error) = next {
            if let Some(rejection) = known::describe(error) {
                return Some(rejection);
            }
            next = error.source();
        }
        None
    }
}

/// A rejection from any layer: the carrier by which a layer palisade does not know
/// takes part in the [contract](self).
///
/// Its `Display` is the rejection's [`reason`](Rejection::reason); an optional source
/// keeps the layer's own error for logs and downcasts.
pub struct Rejected {
    rejection: Rejection,
    source: Option<Box<dyn Error + Send + Sync>>,
}

impl Rejected {
    /// The error for `rejection`.
    pub fn new(rejection: Rejection) -> Self {
        Self {
            rejection,
            source: None,
        }
    }

    /// Keeps the layer's own error as this one's `source()`.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The description.
    pub fn rejection(&self) -> Rejection {
        self.rejection
    }
}

impl fmt::Debug for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rejected")
            .field("rejection", &self.rejection)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.rejection.reason)
    }
}

impl Error for Rejected {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn Error + 'static))
    }
}
