//! Load shedding: a limit on the requests in flight that refuses the rest at once.
//!
//! [`ConcurrencyLimitLayer`] lets at most `limit` requests be in flight through every
//! service it builds (and every clone of them). A request over the limit is refused in
//! `call`, not held in `poll_ready`: its response future resolves at once to
//! [`Overloaded`], which says when to come back, and the inner service is not called.
//! So a server under a burst answers the excess at once instead of letting it pile up,
//! and the requests it admits keep their latency. (tower's `ConcurrencyLimit` waits in
//! `poll_ready` instead; with `LoadShed` the wait becomes an error from `poll_ready`,
//! which routers cannot answer and which ends a connection.)
//!
//! - **Answers.** `Overloaded` is a [rejection](crate::rejection) of kind
//!   [`Overloaded`](crate::rejection::RejectionKind::Overloaded): over HTTP it is
//!   `503 Service Unavailable` with `Retry-After`
//!   ([`http_response`](crate::rejection::http_response),
//!   [`palisade::axum::handle_error`](crate::rejection)); over gRPC (with
//!   `palisade::tonic::RejectionsAsStatusLayer`) `UNAVAILABLE` with
//!   `grpc-retry-pushback-ms`, which the retry layer's `GrpcRetry` and gRPC clients
//!   that honour pushback wait out.
//! - **Until the request is over.** A permit is given back when the response future
//!   completes or is dropped; with
//!   [`release_on_body_end`](ConcurrencyLimitLayerBuilder::release_on_body_end)
//!   (feature `http`), only when the response body ends or is dropped, so that a long
//!   stream holds its place.
//! - **A queue, if you want one.** [`queue`](ConcurrencyLimitLayerBuilder::queue) lets a
//!   bounded number of requests wait, first come first served, for at most `max_wait`;
//!   a dropped waiter leaves the queue at once.
//! - **Fair per client.** [`keyed`](ConcurrencyLimitLayerBuilder::keyed) gives each
//!   client (each key) at most its share of the limit while the layer is contended, and
//!   reserves nothing while it is not: one client flooding cannot take another's slots
//!   ([the policy](#fair-per-client)).
//! - **Adaptive limits.** [`Aimd`] and [`Gradient`] (Envoy's gradient controller) move
//!   the limit with the latency the backend shows; bring your own with
//!   [`LimitAlgorithm`]. Failures (as [classified](ConcurrencyLimitLayerBuilder::classify):
//!   errors and timeouts by default, 5xx or `UNAVAILABLE` with the HTTP or gRPC
//!   presets) and requests dropped before their outcome count as congestion.
//! - **Observable.** [`ConcurrencyLimitHandle`] reads the limit, the requests in flight,
//!   the queue and the rejections; with the `metrics` feature,
//!   `palisade_concurrency_limit_rejected_total` counts rejections and the gauges
//!   `palisade_concurrency_limit_limit` and `palisade_concurrency_limit_in_flight` are
//!   set when an adaptive limit moves and on every rejection (never on the admitted path).
//!
//! The static limit's admit and release are one compare-and-swap each on one atomic
//! word that holds the limit, the count and a "someone is queued" bit: no lock, no
//! allocation. Each admitted request holds a reference to the shared limit (a permit may
//! outlive the service, in a body). An adaptive limit adds a clock read per request and
//! a short lock of the algorithm when one finishes; the queue is a lock taken only while
//! someone waits.
//!
//! # Fair per client
//!
//! A [`keyed`](ConcurrencyLimitLayerBuilder::keyed) limit applies, on top of the limit,
//! this policy (`W` is [`retry_after`](ConcurrencyLimitLayerBuilder::retry_after), at
//! least a millisecond; time is cut into windows of `W` from when the layer was built):
//!
//! - **Contended.** The layer is contended from the moment it refuses a request for want
//!   of a free slot (the requests in flight at the limit) until `2 W` after the latest
//!   such refusal: long enough for the refused client to come back after its
//!   `retry_after` and still find its share.
//! - **Competing keys.** While contended, every key that asks for a permit, admitted or
//!   not, is counted once in the current window. The competing keys are the larger of
//!   the counts of the current and the previous window, so a client that keeps asking
//!   keeps counting, and one that stopped asking stops counting within two windows.
//! - **Shares.** While contended, a key that holds `ceil(limit / competing keys)`
//!   permits or more is refused with [`Overloaded`], even if slots are free: they are
//!   the others' share. A key below its share is admitted when a slot is free.
//! - **Not contended**, any key may take any free slot (no share is reserved for clients
//!   that are not there), and a key holds what it took: when contention begins, nothing
//!   in flight is cut short; a key over its new share is refused until enough of its
//!   requests finish.
//! - **No key, or no room for it.** A request whose key the extractor cannot find, and
//!   a request whose key is new when the table is full of live keys
//!   ([`max_keys`](ConcurrencyLimitLayerBuilder::max_keys), default 10,000), count as one
//!   more key, the overflow: together they hold at most one share. A key is live while
//!   it holds a permit or has counted as competing in the current or previous window;
//!   the others are dropped when their shard needs room (no background task), so a
//!   flood of fresh keys can neither grow the table past `max_keys` nor take more than
//!   the share of the keys it did get in. Key on something a client cannot forge (an
//!   authenticated tenant, [`PeerIp`](crate::key::PeerIp)): a client that rotates keys
//!   counts as many clients.
//!
//! So with a limit of 10, a client flooding alone gets 10; once a second client is
//! refused for want of a slot, each may hold 5, and the flooding client's requests are
//! refused as its excess finishes until the other holds its 5. The shares follow an
//! adaptive limit as it moves. A keyed limit has no queue (`build` refuses the two
//! together: a FIFO queue hands each released permit to its oldest waiter, so a flooding
//! client's waiters would take the slots the shares keep for the others). The handle's
//! [`active_keys`](ConcurrencyLimitHandle::active_keys) and
//! [`tracked_keys`](ConcurrencyLimitHandle::tracked_keys) count the clients.
//!
//! A keyed request costs one hash of its key and a lock of its shard of the table for a
//! few instructions, a clock read, and while contended a short lock that counts it; an
//! unkeyed limit does none of this.
//!
//! # Shadow mode
//!
//! [`shadow`](ConcurrencyLimitLayerBuilder::shadow) rolls a limit out by watching it
//! first: every request over the limit (or whose wait in the queue runs out) is counted
//! and logged as a refusal would be, and sent to the inner service instead. It takes no
//! place under the limit and tells an adaptive algorithm nothing, so the limit keeps adapting on the
//! requests an enforcing limit would run. [`ConcurrencyLimitHandle::shadow_rejected`]
//! and the `palisade_concurrency_limit_shadow_rejected_total` counter show how many
//! requests it would have refused. The switch is also in the configuration
//! (`shadow = true`) and [live-reloadable](#live-reload), both ways, for the next request.
//!
//! ```
//! use palisade::concurrency_limit::ConcurrencyLimitLayer;
//! use tower::{Layer, Service, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let watching = ConcurrencyLimitLayer::builder().max_in_flight(1).shadow(true).build()?;
//! let handle = watching.handle();
//! let mut service = watching.layer(service_fn(|n: u32| async move { Ok::<_, tower::BoxError>(n) }));
//! let first = service.ready().await?.call(1); // holds the one permit
//! let second = service.ready().await?.call(2); // over the limit: let through
//! assert_eq!((first.await?, second.await?), (1, 2));
//! assert_eq!(handle.shadow_rejected(), 1);
//! # Ok(())
//! # }
//! ```
//!
//! # Live reload
//!
//! With the `serde` feature, [`ConcurrencyLimitHandle::reload`] switches a running limit
//! to a new [`ConcurrencyLimitConfig`](crate::config::ConcurrencyLimitConfig) (and
//! `Policies::reload_concurrency_limit` to a named policy of a document): its static
//! limit or its algorithm's settings, shadow mode, `retry_after` and the queue, in one
//! step. A refusal is decided and answered under the old configuration or the new one:
//! the options are published with the limit through a sequence number that a refusal
//! reads (it never waits), while an admission reads nothing new. A lower limit keeps the
//! permits held; a higher one lets queued requests in; the same algorithm keeps its
//! estimate, clamped into the new bounds, and another kind starts afresh. An invalid
//! configuration, or one that changes what shapes a keyed limit, is refused at its
//! field and changes nothing.
//!
//! ```
//! # #[cfg(not(feature = "serde"))]
//! # fn main() {}
//! # #[cfg(feature = "serde")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use palisade::config::ConcurrencyLimitConfig;
//!
//! // Roll a tighter limit out in shadow mode first, then enforce it.
//! let handle = toml::from_str::<ConcurrencyLimitConfig>("max_in_flight = 100")?.build()?.handle();
//! handle.reload(&toml::from_str("max_in_flight = 40\nshadow = true")?)?;
//! assert!(handle.is_shadow());
//! // ... watch handle.shadow_rejected() ...
//! handle.reload(&toml::from_str("max_in_flight = 40")?)?;
//! assert_eq!((handle.limit(), handle.is_shadow()), (40, false));
//! # Ok(())
//! # }
//! ```
//!
//! # Example
//!
//! ```
//! use palisade::concurrency_limit::{ConcurrencyLimitLayer, Overloaded};
//! use std::time::Duration;
//! use tokio::sync::oneshot;
//! use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let limit = ConcurrencyLimitLayer::builder()
//!     .max_in_flight(1)
//!     .retry_after(Duration::from_millis(250))
//!     .build()?;
//! let handle = limit.handle();
//! let mut service = ServiceBuilder::new()
//!     .layer(limit)
//!     .service(service_fn(|done: oneshot::Receiver<()>| async move {
//!         done.await?;
//!         Ok::<_, BoxError>("done")
//!     }));
//!
//! // The first request is in flight...
//! let (finish, done) = oneshot::channel();
//! let first = service.ready().await?.call(done);
//! assert_eq!(handle.in_flight(), 1);
//!
//! // ...so the second is refused at once, and told when to come back.
//! let (_, never) = oneshot::channel();
//! let error = service.ready().await?.call(never).await.unwrap_err();
//! let overloaded = error.downcast_ref::<Overloaded>().expect("shed");
//! assert_eq!(overloaded.retry_after(), Duration::from_millis(250));
//!
//! finish.send(()).unwrap();
//! assert_eq!(first.await?, "done");
//! assert_eq!((handle.in_flight(), handle.rejected()), (0, 1));
//! # Ok(())
//! # }
//! ```
//!
//! Fair per client, keyed on an API key header:
//!
//! ```
//! # #[cfg(not(feature = "http"))]
//! # fn main() {}
//! # #[cfg(feature = "http")]
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower::BoxError> {
//! use http::{HeaderName, HeaderValue, Request};
//! use palisade::concurrency_limit::{ConcurrencyLimitLayer, Overloaded};
//! use palisade::key::Header;
//! use tokio::sync::oneshot;
//! use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! let limit = ConcurrencyLimitLayer::builder()
//!     .max_in_flight(4)
//!     .keyed::<_, HeaderValue>(Header::new(HeaderName::from_static("x-api-key")))
//!     .build()?;
//! let handle = limit.handle();
//! let mut service = ServiceBuilder::new().layer(limit).service(service_fn(
//!     |request: Request<oneshot::Receiver<()>>| async move {
//!         let _ = request.into_body().await;
//!         Ok::<_, BoxError>("done")
//!     },
//! ));
//! let request = |client: &'static str| {
//!     let (finish, done) = oneshot::channel();
//!     (finish, Request::builder().header("x-api-key", client).body(done).unwrap())
//! };
//!
//! // Alone, "flood" may take every slot...
//! let mut flood = Vec::new();
//! for _ in 0..4 {
//!     let (finish, request) = request("flood");
//!     flood.push((finish, service.ready().await?.call(request)));
//! }
//! // ...until another client is refused for want of a slot: the layer is contended.
//! let (_, refused) = request("calm");
//! assert!(service.ready().await?.call(refused).await.unwrap_err().is::<Overloaded>());
//! // Two of the flood's requests finish; its share is now 2 of 4, so the free slots
//! // are the other client's.
//! for (finish, response) in flood.drain(..2) {
//!     finish.send(()).unwrap();
//!     response.await?;
//! }
//! let (_, more) = request("flood");
//! assert!(service.ready().await?.call(more).await.unwrap_err().is::<Overloaded>());
//! let (_calm_finish, calm) = request("calm");
//! let _calm = service.ready().await?.call(calm);
//! assert_eq!((handle.in_flight(), handle.active_keys()), (3, 2));
//! # Ok(())
//! # }
//! ```
//!
//! An adaptive limit for an HTTP server, holding each permit until the body ends:
//!
//! ```
//! # #[cfg(not(feature = "http"))]
//! # fn main() {}
//! # #[cfg(feature = "http")]
//! # fn main() -> Result<(), palisade::concurrency_limit::ConcurrencyLimitConfigError> {
//! use palisade::classify::ServerErrorsAsFailures;
//! use palisade::concurrency_limit::{Aimd, ConcurrencyLimitLayer};
//! use std::time::Duration;
//!
//! let shed = ConcurrencyLimitLayer::builder()
//!     .aimd(Aimd::new().initial_limit(50).max_limit(500).latency_threshold(Duration::from_millis(250)))
//!     .classify(ServerErrorsAsFailures) // a 5xx is congestion
//!     .release_on_body_end()
//!     .build()?;
//! assert_eq!(shed.handle().limit(), 50);
//! # Ok(())
//! # }
//! ```

mod algorithms;
mod error;
mod fair;
mod future;
mod handle;
mod layer;
mod limiter;
#[cfg(all(test, loom))]
pub(crate) mod loom_api;
mod release;
mod service;

#[cfg(all(test, not(loom)))]
mod fair_model_tests;
#[cfg(all(test, not(loom)))]
mod model_tests;

pub use self::algorithms::{Aimd, Gradient, LimitAlgorithm, Sample};
pub use self::error::{ConcurrencyLimitConfigError, Overloaded};
pub use self::future::ResponseFuture;
pub use self::handle::ConcurrencyLimitHandle;
#[cfg(feature = "serde")]
pub(crate) use self::layer::{Built, Plan};
pub use self::layer::{ConcurrencyLimitLayer, ConcurrencyLimitLayerBuilder};
pub use self::release::{Permit, Release, ReleaseOnResponse, SampleReport};
#[cfg(feature = "http")]
pub use self::release::{PermitBody, ReleaseOnBodyEnd};
pub use self::service::ConcurrencyLimitService;
