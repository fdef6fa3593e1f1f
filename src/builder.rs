//! [`ServiceBuilderExt`]: palisade's layers as `ServiceBuilder` methods.

use tower::ServiceBuilder;
use tower_layer::Stack;

use crate::circuit_breaker::CircuitBreakerLayer;
use crate::concurrency_limit::ConcurrencyLimitLayer;
#[cfg(feature = "http")]
use crate::correlation::{CorrelationIdLayer, PropagateCorrelationIdLayer};
use crate::rate_limit::RateLimitLayer;
use crate::retry::RetryLayer;

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}

/// Adds palisade's layers to [`ServiceBuilder`] as methods, in the style of
/// tower-http's `ServiceBuilderExt`.
///
/// Layers apply outside-in in the order they are added: the first method called wraps
/// all the others.
///
/// The rate limiter and the retry layer go in with [`rate_limiter`](Self::rate_limiter)
/// and [`retries`](Self::retries), not `rate_limit` and `retry`: `ServiceBuilder` has
/// inherent methods of those names (tower's own layers, behind tower's `limit` and
/// `retry` features, which tonic and many applications turn on), and an inherent method
/// always wins over a trait's. The concurrency limit goes in with
/// [`concurrency_limiter`](Self::concurrency_limiter) for the same reason:
/// `ServiceBuilder` has inherent `concurrency_limit(n)` and `load_shed()` (tower's
/// features `limit` and `load-shed`).
///
/// ```
/// use palisade::ServiceBuilderExt;
/// use palisade::circuit_breaker::CircuitBreakerLayer;
/// use palisade::concurrency_limit::ConcurrencyLimitLayer;
/// use palisade::rate_limit::RateLimitLayer;
/// use palisade::retry::RetryLayer;
/// use std::time::Duration;
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), tower::BoxError> {
/// let service = ServiceBuilder::new()
///     .concurrency_limiter(ConcurrencyLimitLayer::builder().max_in_flight(256).build()?)
///     .rate_limiter(RateLimitLayer::builder().capacity(100).refill(10, Duration::from_secs(1)).build()?)
///     .circuit_breaker(CircuitBreakerLayer::builder().build()?)
///     .retries(RetryLayer::builder().max_attempts(3).build()?)
///     .service_fn(|order: u64| async move { Ok::<_, tower::BoxError>(order * 2) });
/// # let _ = service;
/// # Ok(())
/// # }
/// ```
#[cfg_attr(
    feature = "http",
    doc = r#"
With the `http` feature, correlation IDs too, outermost:

```
use palisade::ServiceBuilderExt;
use palisade::circuit_breaker::CircuitBreakerLayer;
use tower::ServiceBuilder;

# fn main() -> Result<(), tower::BoxError> {
let service = ServiceBuilder::new()
    .correlation_id()
    .circuit_breaker(CircuitBreakerLayer::builder().build()?)
    .service_fn(|_request: http::Request<String>| async {
        Ok::<_, tower::BoxError>(http::Response::new(String::from("hello")))
    });
# let _ = service;
# Ok(())
# }
```
"#
)]
pub trait ServiceBuilderExt<L>: sealed::Sealed + Sized {
    /// Accepts or mints a correlation ID per request, echoes it and scopes it; see
    /// [`CorrelationIdLayer`].
    #[cfg(feature = "http")]
    fn correlation_id(self) -> ServiceBuilder<Stack<CorrelationIdLayer, L>>;

    /// Puts the current correlation ID on outgoing requests; see
    /// [`PropagateCorrelationIdLayer`].
    #[cfg(feature = "http")]
    fn propagate_correlation_id(self) -> ServiceBuilder<Stack<PropagateCorrelationIdLayer, L>>;

    /// Adds a rate limiter built with [`RateLimitLayer::builder`].
    fn rate_limiter<X, C, St, H>(
        self,
        layer: RateLimitLayer<X, C, St, H>,
    ) -> ServiceBuilder<Stack<RateLimitLayer<X, C, St, H>, L>>;

    /// Adds a circuit breaker built with [`CircuitBreakerLayer::builder`].
    fn circuit_breaker<C>(
        self,
        layer: CircuitBreakerLayer<C>,
    ) -> ServiceBuilder<Stack<CircuitBreakerLayer<C>, L>>;

    /// Adds a concurrency limit (load shedding) built with
    /// [`ConcurrencyLimitLayer::builder`].
    fn concurrency_limiter<C, H, X, K>(
        self,
        layer: ConcurrencyLimitLayer<C, H, X, K>,
    ) -> ServiceBuilder<Stack<ConcurrencyLimitLayer<C, H, X, K>, L>>;

    /// Adds a retry layer built with [`RetryLayer::builder`].
    fn retries<P, D>(self, layer: RetryLayer<P, D>) -> ServiceBuilder<Stack<RetryLayer<P, D>, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    #[cfg(feature = "http")]
    fn correlation_id(self) -> ServiceBuilder<Stack<CorrelationIdLayer, L>> {
        self.layer(CorrelationIdLayer::new())
    }

    #[cfg(feature = "http")]
    fn propagate_correlation_id(self) -> ServiceBuilder<Stack<PropagateCorrelationIdLayer, L>> {
        self.layer(PropagateCorrelationIdLayer::new())
    }

    fn rate_limiter<X, C, St, H>(
        self,
        layer: RateLimitLayer<X, C, St, H>,
    ) -> ServiceBuilder<Stack<RateLimitLayer<X, C, St, H>, L>> {
        self.layer(layer)
    }

    fn circuit_breaker<C>(
        self,
        layer: CircuitBreakerLayer<C>,
    ) -> ServiceBuilder<Stack<CircuitBreakerLayer<C>, L>> {
        self.layer(layer)
    }

    fn concurrency_limiter<C, H, X, K>(
        self,
        layer: ConcurrencyLimitLayer<C, H, X, K>,
    ) -> ServiceBuilder<Stack<ConcurrencyLimitLayer<C, H, X, K>, L>> {
        self.layer(layer)
    }

    fn retries<P, D>(self, layer: RetryLayer<P, D>) -> ServiceBuilder<Stack<RetryLayer<P, D>, L>> {
        self.layer(layer)
    }
}
