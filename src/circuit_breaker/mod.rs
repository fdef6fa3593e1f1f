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
//! # Keyed breakers
//!
//! A gateway or a client in front of many upstreams wants one breaker per upstream, not
//! one for everything: [`keyed`](CircuitBreakerLayerBuilder::keyed) gives every key (an
//! upstream's [authority](crate::key::Authority), a header, a route, any closure) a
//! breaker of its own, with its own window, state, open-time growth and probes, all
//! with the one configuration. A [`KeyedCircuitBreakerHandle`] reads and forces one
//! key's breaker or all of them, and lists the keys that are not closed. Transitions
//! reach the [`on_transition`](CircuitBreakerLayerBuilder::on_transition) callback and
//! the `tracing` event with their key; the `metrics` counters carry it only with
//! [`key_in_metrics`](CircuitBreakerLayerBuilder::key_in_metrics).
//!
//! Memory is bounded by [`max_keys`](CircuitBreakerLayerBuilder::max_keys), in the
//! crate's one keyed table (see [`key`](crate::key)):
//!
//! - **Idle breakers go.** A breaker that is closed, has nothing but successes in its
//!   window and no call in flight is no worse than a fresh one (with fewer successes
//!   to dilute them, later failures trip a fresh breaker no later), so the table drops
//!   it when it needs the room. An open, half-open or forced breaker, or one with a
//!   failure or a slow call in its window, stays.
//! - **At the cap, a new key shares.** A new key that finds the table full of live
//!   breakers is not tracked: its calls go through the one *shared* breaker, until an
//!   idle breaker makes room. A flood of fresh keys thus neither grows memory past the
//!   cap nor evicts or resets a breaker that is open: it can at worst open the shared
//!   breaker, which only the untracked keys use.
//! - **A request without a key shares too.** It goes through the same shared breaker
//!   ([`KeyedCircuitBreakerHandle::shared_state`]), rather than being refused: a
//!   breaker protects the caller from a dependency, it does not police the caller.
//!
//! The closed path of a keyed breaker is the global one's plus one hash of the key
//! (SipHash with random keys: keys are client-controlled) and one probe of the table
//! under its shard's lock, held for the probe and one reference-count increment, never
//! across a call or user code; up to 64 padded shards spread it. It is a lock rather
//! than a lock-free read because the table may drop a breaker only while no call holds
//! it: under the shard's lock, that check and every lookup's reference cannot
//! interleave, where a lock-free map would need a retirement protocol on every
//! breaker's state word as well as memory reclamation. `bench/` counts what it costs.
//!
//! ```
//! # #[cfg(feature = "http")] {
//! use palisade::circuit_breaker::{CircuitBreakerLayer, State};
//! use palisade::key;
//! use http::{Request, uri::Authority};
//! use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let breaker = CircuitBreakerLayer::builder()
//!     .minimum_calls(3)
//!     .keyed::<_, Authority>(key::Authority)
//!     .max_keys(1_000)
//!     .build()?;
//! let handle = breaker.handle();
//!
//! // An HTTP client: `payments` is down, `orders` is fine.
//! let mut client = ServiceBuilder::new().layer(breaker).service(service_fn(
//!     |request: Request<()>| async move {
//!         match request.uri().host() {
//!             Some("payments") => Err::<&str, BoxError>("connection refused".into()),
//!             _ => Ok("ok"),
//!         }
//!     },
//! ));
//! for _ in 0..3 {
//!     let request = Request::get("http://payments/charge").body(())?;
//!     let _ = client.ready().await?.call(request).await;
//! }
//! let orders = Request::get("http://orders/list").body(())?;
//! assert!(client.ready().await?.call(orders).await.is_ok());
//!
//! assert_eq!(handle.state_for(&Authority::from_static("payments")), State::Open);
//! assert_eq!(handle.state_for(&Authority::from_static("orders")), State::Closed);
//! assert_eq!(handle.not_closed(), vec![(Authority::from_static("payments"), State::Open)]);
//! # Ok(())
//! # }
//! # }
//! ```
//!
//! # Shadow mode
//!
//! [`shadow`](CircuitBreakerLayerBuilder::shadow) rolls a breaker out by watching it
//! first: it records outcomes, trips, half-opens, closes, logs and reports every
//! transition as it would, but sends the calls it would reject to the inner service.
//! Those calls are not recorded (an enforcing breaker never sees their outcomes), so
//! the shadow breaker goes through the states an enforcing one would on the same
//! traffic, as long as the dependency answers the same whether or not the shed calls
//! reach it. [`CircuitBreakerHandle::shadow_rejected`] (or
//! [`KeyedCircuitBreakerHandle::shadow_rejected`] for a keyed layer),
//! [`Metrics::shadow_rejected`] and the `palisade_circuit_breaker_shadow_rejected_total`
//! counter show how many calls it would have rejected.
//!
//! ```
//! use palisade::circuit_breaker::{CircuitBreakerLayer, SlidingWindow, State};
//! use std::time::Duration;
//! use tower::{Layer, Service, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let watching = CircuitBreakerLayer::builder()
//!     .sliding_window(SlidingWindow::count(4))
//!     .minimum_calls(4)
//!     .open_for(Duration::from_secs(30))
//!     .shadow(true)
//!     .build()
//!     .unwrap();
//! let handle = watching.handle();
//! let mut service = watching.layer(service_fn(|_: ()| async { Err::<(), _>("down") }));
//! for _ in 0..6 {
//!     let error = service.ready().await.unwrap().call(()).await.unwrap_err();
//!     assert_eq!(error.to_string(), "down"); // every call reaches the dependency
//! }
//! assert_eq!(handle.state(), State::Open); // it tripped after four
//! assert_eq!(handle.shadow_rejected(), 2); // and would have rejected the last two
//! # }
//! ```
//!
//! # Live reload
//!
//! With the `serde` feature, [`CircuitBreakerHandle::reload`] switches a breaker built
//! in code or from a file to a new [`CircuitBreakerConfig`](crate::config::CircuitBreakerConfig)
//! while it serves ([`KeyedCircuitBreakerHandle::reload`] every breaker of a keyed layer,
//! present and future; `Policies::reload_circuit_breaker` a policy of a document, its
//! errors named in the document).
//!
//! - **Validated as `build()` validates**: an invalid configuration is refused with the
//!   same `ConfigError`, field path included, and changes nothing. What shapes the layer
//!   is fixed: global or keyed, and `keyed.max_keys`; a change is refused with
//!   `NotReloadable` at that field.
//! - **Atomic**: the configuration and the window it judges are one policy, published
//!   whole, so no decision mixes two configurations (a new threshold with an old
//!   minimum, a new window with an old minimum, one policy's verdict with the other's
//!   open time). A global breaker's call takes its policy with its lane when it is
//!   admitted and records its outcome under it; a keyed breaker's call under the policy
//!   in force when it finishes. Whether slow-call detection times a call is settled when
//!   it starts: a call started without it is not slow.
//! - **The state is kept**: closed, open, half-open or forced, the consecutive trips
//!   and the counters. A reload never moves the state by itself: a window the new
//!   thresholds condemn trips on the next outcome that changes it.
//! - **An open breaker keeps its deadline**: a new open time (or backoff) applies from
//!   the next trip, not to the open period under way, whose rejections keep telling the
//!   `retry_after` they told. A half-open episode keeps the probe count it started with
//!   (a smaller one must not strand probes in flight); its verdict takes the thresholds
//!   in force when its last probe reports.
//! - **The window is kept when its kind and size are**: the same count, or the same time
//!   span and buckets. A count window of another size keeps the newest outcomes that fit,
//!   in order: what a window of the new size would hold had it seen the same calls (a
//!   shrink keeps the last N, a growth keeps them all and fills up from there). A time
//!   window of another span or bucket count moves each old bucket's counts into the new
//!   bucket where the old one started, if the new span still covers it: a wider window
//!   keeps everything, a narrower one the newest part, and no count stays longer than the
//!   span it was recorded in allows. Rates over calls and over time do not translate into
//!   each other, so a window of the other kind starts empty, in the same state. A window
//!   only counts while closed (the breaker closes, or is reset, with an empty one), so in
//!   any other state a resized window starts empty. An outcome recorded while the resize
//!   copies the window may be lost.
//! - **The shadow switch** takes effect on the next call. Enforcing to shadow: the next
//!   call the breaker refuses goes through and counts in `shadow_rejected`; shadow to
//!   enforcing: the next is rejected. Under [`ejecting`](CircuitBreakerLayer::ejecting) a
//!   reload wakes the endpoints waiting in `poll_ready`, so one that turned shadow rejoins
//!   the pool at once.
//!
//! The success path pays for reload with one relaxed load and a compare: each service
//! keeps the lanes it last saw and renews them when a reload published others.
//!
#![cfg_attr(
    feature = "serde",
    doc = r##"
```
use palisade::circuit_breaker::State;
use palisade::config::CircuitBreakerConfig;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

# #[tokio::main(flavor = "current_thread", start_paused = true)]
# async fn main() -> Result<(), BoxError> {
let config: CircuitBreakerConfig = toml::from_str(r#"
    sliding_window = { count = 10 }
    minimum_calls = 10
    open_for = "30s"
"#)?;
let breaker = config.build()?;
let handle = breaker.handle();
let mut service = breaker.layer(service_fn(|fail: bool| async move {
    if fail { Err::<(), BoxError>("down".into()) } else { Ok(()) }
}));
for fail in [true, true, false] {
    let _ = service.ready().await?.call(fail).await;
}

// Tighter, watched first: 3 calls are enough, and a third of them failing trips it.
handle.reload(&toml::from_str(r#"
    sliding_window = { count = 10 }
    minimum_calls = 3
    failure_rate_threshold = 0.3
    open_for = "30s"
    shadow = true
"#)?)?;
assert_eq!(handle.metrics().calls, 3); // the window was kept
let _ = service.ready().await?.call(true).await;
assert_eq!(handle.state(), State::Open);
assert!(service.ready().await?.call(false).await.is_ok()); // shadow: let through
assert_eq!(handle.shadow_rejected(), 1);
# Ok(())
# }
```
"##
)]
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
mod keyed;
mod lanes;
mod layer;
#[cfg(all(test, loom))]
pub(crate) mod loom_api;
mod service;
mod state;
mod waiters;
mod window;

#[cfg(all(test, not(loom)))]
mod model_tests;

#[cfg(feature = "serde")]
pub(crate) use self::config::Config;
pub use self::config::{OpenBackoff, SlidingWindow};
pub use self::ejection::{EjectionGroup, EjectionLayer, EjectionService};
pub use self::error::{CircuitBreakerConfigError, CircuitOpen};
pub use self::future::ResponseFuture;
pub use self::handle::{CircuitBreakerHandle, KeyedCircuitBreakerHandle};
#[cfg(feature = "serde")]
pub(crate) use self::layer::DEFAULT_MAX_KEYS;
pub use self::layer::{
    CircuitBreakerLayer, CircuitBreakerLayerBuilder, Keyed, KeyedCircuitBreakerLayer,
};
pub use self::service::{CallReport, CircuitBreakerService, KeyedCircuitBreakerService};
pub use self::state::{Metrics, State, Transition, TransitionReason};
