//! Configuration as data (feature `serde`): every layer's settings as plain types that
//! deserialize from any serde format, and a document of named policies.
//!
//! Operators tune limits and breakers in a file; the code keeps what cannot be data (key
//! extractors, classifiers, retry policies). Each configuration type turns into its layer
//! through the layer's own builder, so the builder's validation is the validation, and a
//! field left out keeps the builder's default: a policy from a file behaves exactly as the
//! same policy built in code.
//!
//! | type | layer | in [`Policies`] |
//! |---|---|---|
//! | [`RateLimitConfig`] | [`RateLimitLayer`](crate::rate_limit::RateLimitLayer) | `limits` |
//! | [`CircuitBreakerConfig`] | [`CircuitBreakerLayer`](crate::circuit_breaker::CircuitBreakerLayer) | `breakers` |
//! | [`RetryConfig`] | [`RetryLayer`](crate::retry::RetryLayer) | `retries` |
//! | [`ConcurrencyLimitConfig`] | [`ConcurrencyLimitLayer`](crate::concurrency_limit::ConcurrencyLimitLayer) | `concurrency` |
//! | [`DeadlinesConfig`] | `IncomingDeadlines` (feature `http`) | `deadlines` |
//!
//! - **Durations** are written as people write them: `"250ms"`, `"30s"`, `"1m 30s"`
//!   ([humantime](https://docs.rs/humantime) syntax).
//! - **Rates** are `"100/s"`, `"5/250ms"` or `{ tokens = 100, per = "1s" }` ([`Refill`]).
//! - **Unknown fields are errors**, in every table: a misspelt `max_wiat` is refused,
//!   not ignored.
//! - **Errors name the field**: a [`ConfigError`] says where (`limits.payments.refill`)
//!   and which rule was broken (the builder's own error).
//! - **Live reload**: a running rate limiter, concurrency limit or retry layer takes a
//!   new configuration through its handle (`handle.reload(&config)`, or
//!   `Policies::reload_rate_limit`, `reload_concurrency_limit`, `reload_retry` by name),
//!   validated as `build()` validates it; what cannot change at run time is refused as
//!   [`NotReloadable`] at its field.
//! - **Code where data cannot go.** Each type has `build()` for the layer with its
//!   defaults in code, `apply(builder)` to set its fields on a builder of your own, and
//!   `build_from(builder)` for both at once: a breaker with its classifier, a retry with
//!   its policy, a limiter with its cost. A keyed policy (`keyed = { max_keys = .. }`)
//!   takes its extractor in code: [`RateLimitConfig::build_keyed`],
//!   [`Policies::keyed_rate_limit`]; building it without one, or a global one with one,
//!   is a [`PolicyMismatch`], so a file and its code cannot silently disagree.
//!
//! # A document
//!
//! ```
//! use palisade::config::Policies;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let policies: Policies = toml::from_str(r#"
//!     [limits.payments]
//!     capacity = 100
//!     refill = "50/s"
//!     max_wait = "20ms"
//!
//!     [limits.per_client]
//!     capacity = 10
//!     refill = { tokens = 1, per = "100ms" }
//!     keyed = { max_keys = 100000 }
//!
//!     [breakers.upstream]
//!     failure_rate_threshold = 0.5
//!     sliding_window = { time = "30s" }
//!     open_backoff = { initial = "5s", max = "60s", jitter = 0.2 }
//!
//!     [retries.idempotent]
//!     max_attempts = 3
//!     backoff = { base = "50ms", max = "2s", jitter = "full" }
//!
//!     [concurrency.api]
//!     aimd = { initial_limit = 20, max_limit = 200 }
//! "#)?;
//!
//! let payments = policies.rate_limit("payments")?;
//! let per_client = policies.keyed_rate_limit::<_, String>("per_client", |req: &String| Some(req.clone()))?;
//! let upstream = policies.circuit_breaker("upstream")?;
//! let retry = policies.retry("idempotent")?;
//! let api = policies.concurrency_limit("api")?;
//! # let _ = (payments, per_client, upstream, retry, api);
//!
//! let missing = policies.rate_limit("checkout").unwrap_err();
//! assert_eq!(missing.to_string(), "limits.checkout: no such policy");
//!
//! // The builder's rules, at the field's place in the document.
//! let bad: Policies = toml::from_str("[limits.payments]\ncapacity = 0\nrefill = \"1/s\"")?;
//! let error = bad.rate_limit("payments").unwrap_err();
//! assert_eq!(error.path(), "limits.payments.capacity");
//! assert_eq!(error.to_string(), "limits.payments.capacity: rate limit capacity must be at least 1");
//! # Ok(())
//! # }
//! ```
#![cfg_attr(
    feature = "axum",
    doc = r##"
# Per route in axum

Each route gets the named policy it needs with `route_layer`; the routes without one
are not limited.

```
use axum::{Router, error_handling::HandleErrorLayer, routing::{get, post}};
use palisade::config::Policies;
use tower::{ServiceBuilder, ServiceExt};

# #[tokio::main(flavor = "current_thread", start_paused = true)]
# async fn main() -> Result<(), Box<dyn std::error::Error>> {
let policies: Policies = serde_json::from_str(r#"{
    "limits": {
        "payments": { "capacity": 1, "refill": "1/10s" },
        "search": { "capacity": 100, "refill": "100/s" }
    }
}"#)?;

let app = Router::new()
    .route("/payments", post(|| async { "paid" }))
    .route_layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(palisade::axum::handle_error))
            .layer(policies.rate_limit("payments")?),
    )
    .route("/search", get(|| async { "found" }))
    .route_layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(palisade::axum::handle_error))
            .layer(policies.rate_limit("search")?),
    )
    .route("/health", get(|| async { "ok" }));

let call = |app: Router, method: &str, uri: &str| {
    let request = http::Request::builder().method(method).uri(uri).body(axum::body::Body::empty());
    async move { Ok::<_, Box<dyn std::error::Error>>(app.oneshot(request?).await?.status()) }
};
assert_eq!(call(app.clone(), "POST", "/payments").await?, 200);
// One payment per ten seconds: the second is refused, the other routes are not.
assert_eq!(call(app.clone(), "POST", "/payments").await?, 429);
assert_eq!(call(app.clone(), "GET", "/search").await?, 200);
assert_eq!(call(app.clone(), "GET", "/health").await?, 200);
# Ok(())
# }
```
"##
)]

mod circuit_breaker;
mod concurrency_limit;
mod deadlines;
mod error;
mod policies;
mod rate_limit;
mod retry;

pub use self::circuit_breaker::{
    CircuitBreakerConfig, OpenBackoffConfig, SlidingWindowConfig, SlowCallsConfig,
};
pub use self::concurrency_limit::{
    AimdConfig, ConcurrencyLimitConfig, GradientConfig, QueueConfig,
};
pub use self::deadlines::DeadlinesConfig;
pub use self::error::{ConfigError, MissingPolicy, NotReloadable, PolicyMismatch};
pub use self::policies::Policies;
pub use self::rate_limit::{
    KeyedRateLimitConfig, RateLimitConfig, RedisConfig, Refill, WhenKeyMissingConfig,
    WhenUnavailableConfig,
};
pub use self::retry::{BackoffConfig, BackoffKind, BudgetConfig, JitterConfig, RetryConfig};

use serde::{Deserialize, Serialize};

/// The `keyed` section of a keyed layer's configuration (a concurrency limit fair per
/// client; the keyed breaker's, when it lands): the cap is data, the key extractor is
/// code, given to `build_keyed`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct KeyedConfig {
    /// The most keys tracked (default: the layer's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<usize>,
}
