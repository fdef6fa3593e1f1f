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
#[cfg(loom)]
pub(crate) mod loom_api;
mod release;
mod service;

#[cfg(test)]
mod model_tests;

pub use self::algorithms::{Aimd, Gradient, LimitAlgorithm, Sample};
pub use self::error::{ConcurrencyLimitConfigError, Overloaded};
pub use self::future::ResponseFuture;
pub use self::handle::ConcurrencyLimitHandle;
pub use self::layer::{ConcurrencyLimitLayer, ConcurrencyLimitLayerBuilder};
pub use self::release::{Permit, Release, ReleaseOnResponse, SampleReport};
#[cfg(feature = "http")]
pub use self::release::{PermitBody, ReleaseOnBodyEnd};
pub use self::service::ConcurrencyLimitService;
