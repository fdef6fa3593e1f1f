//! A token-bucket rate limiter, global or per client.
//!
//! [`RateLimitLayer`] admits a burst of `capacity` requests and then `tokens` per
//! `period`, refilled continuously and counted exactly (in fractions of a nanosecond
//! where `period / tokens` is none: `tokens` refills take exactly `period`, in process
//! and on Redis alike). Over any stretch of time `t` it admits at most
//! `capacity + rate * t` requests, and a client that keeps to the rate is never refused.
//! A global bucket is one atomic word (GCRA), so its success path is a clock read and a
//! compare-and-swap: no lock, no allocation. A keyed limiter adds one hash of the key
//! and a brief lock of one of its table's shards.
//!
//! - **Reject or wait.** With `max_wait` zero (the default) a request over the limit gets
//!   [`RateLimited`] at once, with [`retry_after`](RateLimited::retry_after) and the
//!   policy. With a positive `max_wait`, a request that can be served within that time
//!   reserves its slot and waits for it in its response future (waiters go in arrival
//!   order; a waiter dropped before its turn gives its slot back when no later one was
//!   queued behind it). The inner service is called only once a request is admitted.
//! - **Weighted requests.** [`cost`](Builder::cost) charges a request several tokens; a
//!   request costing more than the capacity gets [`CostExceedsCapacity`].
//! - **Per client.** [`keyed`](Builder::keyed) gives every key its own bucket, with the
//!   [`key`] extractors for the peer IP, a header, or the client IP behind proxies. A
//!   request without a key gets [`MissingKey`] or shares a fallback bucket
//!   ([`WhenKeyMissing`]).
//! - **Runtime changes.** [`RateLimitLayer::handle`] gives a [`RateLimitHandle`] to read
//!   the buckets and change rate and capacity while serving.
//! - **Pluggable state.** The buckets live in a [`Store`]; the in-process
//!   [`LocalStore`] is the default; with the `redis` feature, `RedisStore` keeps them on
//!   a Redis server so that a whole fleet of replicas shares one limit. A store of your
//!   own answers at once or later (its [`Answer`]); the [`Store`] docs show one.
//! - **HTTP answers** (feature `http`): [`headers::too_many_requests`] turns
//!   [`RateLimited`] into a 429 with `Retry-After` and the IETF `RateLimit-Policy` and
//!   `RateLimit` fields; [`Builder::headers_on_success`] adds the fields to admitted
//!   responses too.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use palisade::rate_limit::{RateLimitLayer, RateLimited};
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let limit = RateLimitLayer::builder()
//!     .capacity(2)
//!     .refill(1, Duration::from_secs(1))
//!     .build()?;
//! let handle = limit.handle();
//! let mut service = ServiceBuilder::new()
//!     .layer(limit)
//!     .service(service_fn(|name: &'static str| async move {
//!         Ok::<_, tower::BoxError>(format!("hello {name}"))
//!     }));
//!
//! assert_eq!(service.ready().await?.call("ada").await?, "hello ada");
//! assert_eq!(service.ready().await?.call("bob").await?, "hello bob");
//! assert_eq!(handle.available(), 0);
//!
//! let error = service.ready().await?.call("eve").await.unwrap_err();
//! let limited = error.downcast_ref::<RateLimited>().expect("rate limited");
//! assert_eq!(limited.retry_after(), Duration::from_secs(1));
//!
//! tokio::time::advance(limited.retry_after()).await;
//! assert_eq!(service.ready().await?.call("eve").await?, "hello eve");
//! # Ok(())
//! # }
//! ```
//!
//! # Memory
//!
//! A keyed limiter drops the bucket of a key that has been idle long enough for it to be
//! full again (a fresh bucket is full, so nothing is lost). There is no background task:
//! each shard of the table sweeps out full buckets when it has doubled in size since its
//! last sweep (amortised constant time per new key), and when it reaches its share of
//! [`max_keys`](Builder::max_keys).
//!
//! # At the cap
//!
//! The table never holds more than `max_keys` keys. When a new key arrives at a full
//! shard and a sweep frees nothing, the key is not tracked: its request is charged to the
//! limiter's shared bucket (the fallback bucket), as if every such key were one client.
//! So a flood of fresh keys (spoofed addresses) can neither exhaust memory nor evict a
//! real client's bucket (which would reset it to full), and only competes with itself.
//! A real client that first shows up during such a flood shares that bucket until the
//! flood's buckets are full again and get swept (each shard retries a sweep at most once
//! per refill interval, and at most once a millisecond, so a flood cannot make every
//! request pay for a sweep).
//!
//! # Shadow mode
//!
//! [`Builder::shadow`] rolls a new limit out by watching it first: the limiter decides
//! every request as it would (its buckets are charged the same way, so they follow the
//! limit it would enforce), counts and logs what it would refuse and, with
//! [`headers_on_success`](Builder::headers_on_success), sets the `RateLimit` fields it
//! would answer with, but lets every request through at once.
//! [`RateLimitHandle::shadow_rejected`] and the `palisade_rate_limit_shadow_rejected_total`
//! counter show how many requests it would have refused. The switch is live:
//! [`RateLimitHandle::set_shadow`], or a reload of a configuration with (or without)
//! `shadow = true`, turns it on or off from the next request on, and since both modes
//! charge the buckets alike, they carry on as they are.
//!
//! ```
//! use std::time::Duration;
//! use palisade::rate_limit::RateLimitLayer;
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let watching = RateLimitLayer::builder()
//!     .capacity(2)
//!     .refill(1, Duration::from_secs(1))
//!     .shadow(true)
//!     .build()?;
//! let handle = watching.handle();
//! let mut service = ServiceBuilder::new()
//!     .layer(watching)
//!     .service(service_fn(|n: u32| async move { Ok::<_, tower::BoxError>(n) }));
//! for n in 0..5 {
//!     assert_eq!(service.ready().await?.call(n).await?, n); // all five pass
//! }
//! assert_eq!(handle.shadow_rejected(), 3); // an enforcing limiter would refuse three
//! # Ok(())
//! # }
//! ```
//!
//! # Runtime changes
//!
//! [`RateLimitHandle::set_rate`] and [`set_capacity`](RateLimitHandle::set_capacity)
//! change one side of the quota; `RateLimitHandle::reload` (feature `serde`) switches to
//! a whole new configuration, capacity, rate and shadow switch at once. Each change is
//! one atomic step: a request is decided under the quota before it or the one after,
//! never a mix (and gets the outcome of the policy before or after a reload, never one's
//! quota with the other's shadow switch).
//!
//! The tokens carry over *as a fraction* of the capacity, whichever way it moves: a
//! bucket of 100 holding 50 becomes one of 10 holding 5, or one of 1000 holding 500 (full
//! stays full, empty stays empty; a change of rate alone keeps the tokens). Queued
//! reservations keep their slots (a debt beyond empty is kept in tokens). The global
//! bucket moves to the new quota at once; a keyed bucket moves on its next request (its
//! refill since its last request counts at the old rate).
//!
//! The fraction is counted in the bucket's units, fractions of a token (a token is
//! `period / g` units, `g` as in [`Quota`]: 200,000,000 of them for `refill(5, 1s)`), and
//! is kept exactly whenever the new quota's units can express it. Where they cannot, it
//! is rounded to one of the new quota's units: down (fewer tokens) when the new full
//! bucket has fewer units than the old, up (more, by less than a unit) when it has more.
//! So a change and its reverse bring a bucket back exactly when the quota in between had
//! at least as many units in a full bucket; through one with fewer, the bucket loses
//! less than one of its units (a `1 / (capacity * units of a token)` share of the
//! bucket), once: flipping between two quotas any number of times ends where the first
//! round trip did. (A unit is usually tiny, 10^-7 of a token at `refill(100, 1s)`; it is
//! a whole token only at a refill of one token per nanosecond.)
//!
//! That is the in-process store's rule. `RedisStore` (feature `redis`) keeps each
//! bucket's time until it is full instead, so that replicas that have not all reloaded
//! yet agree on what the buckets on the server mean; its docs say what that gives.

mod bucket;
mod error;
mod future;
mod handle;
#[cfg(feature = "http")]
pub mod headers;
mod keyed;
mod layer;
#[cfg(feature = "redis")]
mod redis;
mod service;
mod shadow;
mod store;

/// The key extractors, at their old path: this is the crate-level [`crate::key`] module,
/// shared by every keyed layer.
pub use crate::key;

#[cfg(loom)]
pub(crate) use self::bucket::Verdict;
pub use self::bucket::{Admitted, Denied, Quota, Reservation, TokenBucket};
pub use self::error::{CostExceedsCapacity, MissingKey, RateLimitConfigError, RateLimited};
pub use self::future::ResponseFuture;
pub use self::handle::RateLimitHandle;
pub use self::layer::{
    Builder, Cost, NoHeaders, OnAdmitted, RateLimitLayer, RateLimitStatus, StatusSlot, UnitCost,
    WhenKeyMissing,
};
#[cfg(feature = "serde")]
pub(crate) use self::layer::{DEFAULT_MAX_KEYS, Settings};
#[cfg(feature = "redis")]
pub use self::redis::{
    RedisConnection, RedisKey, RedisOptions, RedisReservation, RedisRoundTrip, RedisStore,
    RedisUnavailable, WhenUnavailable,
};
pub use self::service::RateLimitService;
#[cfg(loom)]
pub(crate) use self::shadow::{Shadow, Switch};
pub use self::store::{
    Acquire, Admission, Answer, LocalReservation, LocalStore, NeverPending, StatusWanted, Store,
};
