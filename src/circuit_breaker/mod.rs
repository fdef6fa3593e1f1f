//! A circuit breaker: stop calling a dependency that keeps failing, give it time to
//! recover, then test it with a few probe calls.
//!
//! - **Closed**: calls flow, and their [outcomes](crate::classify) go into a
//!   [`SlidingWindow`]: the last N calls, or the calls of the last T. Once the window
//!   holds at least `minimum_calls` calls, the breaker trips when the failure rate
//!   reaches `failure_rate_threshold`, or when the rate of slow calls (slower than the
//!   [`slow_calls`](CircuitBreakerLayerBuilder::slow_calls) duration, whatever their
//!   outcome) reaches its threshold. Ignored outcomes count for nothing.
//! - **Open**: calls fail at once with [`CircuitOpen`], without reaching the inner
//!   service. [`CircuitOpen::retry_after`] says when the breaker will let a probe
//!   through. The open time is fixed, or grows with consecutive trips
//!   ([`OpenBackoff`]).
//! - **Half-open**, from the first call after the open time: at most
//!   `half_open_probes` calls go through, all others are rejected. When they have all
//!   completed, the breaker closes if their failure and slow rates are below the
//!   thresholds and opens again otherwise. A probe dropped before its outcome is known
//!   gives its slot back and counts for nothing, so the breaker cannot get stuck.
//!   Calls rejected meanwhile get the last open time as their `retry_after`.
//!
//! Give the inner service a timeout, below the breaker (for example
//! `ServiceBuilder::new().layer(breaker).timeout(limit)`): a probe that hangs holds
//! its slot, and every call is rejected until it ends. Below the breaker, the timeout
//! ends it as a failure, which reopens the breaker.
//!
//! The state is created once in the [`CircuitBreakerLayer`]: every service it builds
//! and every clone of those share it. A [`CircuitBreakerHandle`] reads the state and
//! [`Metrics`], forces the breaker open or closed, and resets it. An
//! [`on_transition`](CircuitBreakerLayerBuilder::on_transition) callback, and a
//! `tracing` event with the `tracing` feature, report every state change.
//!
//! Inside a `tower::balance` pool, [`CircuitBreakerLayer::ejecting`] puts each
//! endpoint's breaker in ejection mode ([`EjectionLayer`]): an open endpoint reports
//! not-ready, so the balancer sends its requests to the healthy ones, and a pool whose
//! every endpoint is open answers with [`CircuitOpen`] at once. That mode, and only
//! that mode, answers through `poll_ready`; its documentation says why.
//!
//! The closed path is lock-free and allocates nothing: a count window is a ring of
//! atomic slots, a time window a fixed set of buckets stamped with their epoch, and the
//! state one atomic word changed by compare-and-swap. So that threads sharing a breaker
//! do not all write one cache line per call, each thread takes ring positions a block
//! at a time and its per-call reference to the breaker from a lane of its own. One
//! thread fills a count window in exact call order; with several, the ring's last
//! positions may still hold outcomes from its previous lap, at most an eighth of the
//! window.
//!
//! # Example
//!
//! ```
//! use palisade::circuit_breaker::{CircuitBreakerLayer, CircuitOpen, SlidingWindow, State};
//! use std::time::Duration;
//! use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let breaker = CircuitBreakerLayer::builder()
//!     .failure_rate_threshold(0.5)
//!     .minimum_calls(4)
//!     .sliding_window(SlidingWindow::count(10))
//!     .open_for(Duration::from_secs(30))
//!     .build()?;
//! let handle = breaker.handle();
//!
//! let mut service = ServiceBuilder::new()
//!     .layer(breaker)
//!     .service(service_fn(|fail: bool| async move {
//!         if fail { Err::<&str, BoxError>("dependency down".into()) } else { Ok("ok") }
//!     }));
//!
//! for _ in 0..4 {
//!     let _ = service.ready().await?.call(true).await;
//! }
//! assert_eq!(handle.state(), State::Open);
//!
//! let error = service.ready().await?.call(false).await.unwrap_err();
//! let open = error.downcast_ref::<CircuitOpen>().expect("rejected by the breaker");
//! assert!(open.retry_after() <= Duration::from_secs(30));
//! # Ok(())
//! # }
//! ```

mod config;
mod ejection;
mod error;
mod future;
mod handle;
mod lanes;
mod layer;
#[cfg(loom)]
pub(crate) mod loom_api;
mod service;
mod state;
mod waiters;
mod window;

#[cfg(test)]
mod model_tests;

pub use self::config::{OpenBackoff, SlidingWindow};
pub use self::ejection::{EjectionGroup, EjectionLayer, EjectionService};
pub use self::error::{CircuitBreakerConfigError, CircuitOpen};
pub use self::future::ResponseFuture;
pub use self::handle::CircuitBreakerHandle;
pub use self::layer::{CircuitBreakerLayer, CircuitBreakerLayerBuilder};
pub use self::service::{CallReport, CircuitBreakerService};
pub use self::state::{Metrics, State, Transition, TransitionReason};
