//! The layer, its builder, its handle and its configuration errors.

use super::{
    Backoff, CloneRequest, Jitter, RetryBudget, RetryErrors, RetryIf, RetryReason, RetryService,
};
use crate::sync::{AtomicU64, Ordering};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tower_layer::Layer;

/// Adds retries to a service. Build it with [`RetryLayer::builder`].
///
/// Every service the layer builds, and every clone of them, shares one budget and one
/// set of counters; build a second layer for independent ones.
#[must_use = "a layer or builder does nothing until it is used"]
pub struct RetryLayer<P = RetryErrors, D = CloneRequest> {
    shared: Arc<Shared<P, D>>,
}

impl<P, D> Clone for RetryLayer<P, D> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<P, D> fmt::Debug for RetryLayer<P, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("options", &self.shared.ledger.options.load())
            .field("budget", &self.shared.ledger.budget)
            .finish_non_exhaustive()
    }
}

impl RetryLayer {
    /// A builder with the defaults: 3 attempts, exponential backoff from 100 ms doubling
    /// up to 5 s with full jitter, the default [`RetryBudget`], errors retried
    /// ([`RetryErrors`]), `Clone` requests ([`CloneRequest`]), server hints up to 30 s,
    /// no timeouts.
    pub fn builder() -> RetryLayerBuilder {
        RetryLayerBuilder {
            max_attempts: 3,
            backoff: Backoff::exponential(Duration::from_millis(100))
                .max(Duration::from_secs(5))
                .jitter(Jitter::Full),
            budget: RetryBudget::new(Duration::from_secs(10), 10, 0.2),
            policy: RetryErrors,
            duplicate: CloneRequest,
            per_attempt_timeout: None,
            deadline: None,
            defer_to_retrying_caller: true,
            max_server_delay: Duration::from_secs(30),
            on_retry: None,
        }
    }
}

impl<P, D> RetryLayer<P, D> {
    /// A handle observing this layer's budget and counters.
    pub fn handle(&self) -> RetryHandle {
        RetryHandle {
            ledger: self.shared.ledger.clone(),
        }
    }
}

impl<S, P, D> Layer<S> for RetryLayer<P, D> {
    type Service = RetryService<S, P, D>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryService::new(inner, self.shared.clone())
    }
}

/// Builds a [`RetryLayer`]; see [`RetryLayer::builder`] for the defaults.
#[must_use = "a layer or builder does nothing until it is used"]
pub struct RetryLayerBuilder<P = RetryErrors, D = CloneRequest> {
    max_attempts: u32,
    backoff: Backoff,
    budget: RetryBudget,
    policy: P,
    duplicate: D,
    per_attempt_timeout: Option<Duration>,
    deadline: Option<Duration>,
    defer_to_retrying_caller: bool,
    max_server_delay: Duration,
    on_retry: Option<OnRetry>,
}

type OnRetry = Box<dyn Fn(&RetryEvent) + Send + Sync>;

impl<P, D> fmt::Debug for RetryLayerBuilder<P, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayerBuilder")
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("budget", &self.budget)
            .field("per_attempt_timeout", &self.per_attempt_timeout)
            .field("deadline", &self.deadline)
            .field("max_server_delay", &self.max_server_delay)
            .finish_non_exhaustive()
    }
}

impl<P, D> RetryLayerBuilder<P, D> {
    /// The most attempts per request, **counting the first**: 3 means one call and up
    /// to two retries, and 1 disables retries. (Some libraries count retries only.)
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// The delays between attempts: a [`Backoff`], or an
    /// [`ExponentialBackoff`](super::ExponentialBackoff) as it is.
    pub fn backoff(mut self, backoff: impl Into<Backoff>) -> Self {
        self.backoff = backoff.into();
        self
    }

    /// The retry budget, shared by every service this layer builds.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = budget;
        self
    }

    /// What is retried: a [`RetryPolicy`](super::RetryPolicy), such as the presets
    /// [`HttpRetry`](super::HttpRetry) and [`GrpcRetry`](super::GrpcRetry), or your own
    /// (which may also change how [rejections](crate::rejection) are retried).
    pub fn policy<Q>(self, policy: Q) -> RetryLayerBuilder<Q, D> {
        RetryLayerBuilder {
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            budget: self.budget,
            policy,
            duplicate: self.duplicate,
            per_attempt_timeout: self.per_attempt_timeout,
            deadline: self.deadline,
            defer_to_retrying_caller: self.defer_to_retrying_caller,
            max_server_delay: self.max_server_delay,
            on_retry: self.on_retry,
        }
    }

    /// Retries every request whose attempt `condition` holds for: a closure
    /// `Fn(&Result<Res, BoxError>) -> bool` (a [`RetryIf`](super::RetryIf) policy).
    /// Rejections from layers below are still waited out as
    /// [`retry_rejection`](super::retry_rejection) says.
    pub fn retry_if<F>(self, condition: F) -> RetryLayerBuilder<RetryIf<F>, D> {
        self.policy(RetryIf(condition))
    }

    /// How requests are kept for retries: [`CloneRequest`] (the default) or
    /// [`ReplayBodies`](super::ReplayBodies), or your own [`Duplicate`](super::Duplicate).
    pub fn duplicate<E>(self, duplicate: E) -> RetryLayerBuilder<P, E> {
        RetryLayerBuilder {
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            budget: self.budget,
            policy: self.policy,
            duplicate,
            per_attempt_timeout: self.per_attempt_timeout,
            deadline: self.deadline,
            defer_to_retrying_caller: self.defer_to_retrying_caller,
            max_server_delay: self.max_server_delay,
            on_retry: self.on_retry,
        }
    }

    /// Keeps `http::Request` bodies for replay (up to 64 KiB each unless set with
    /// [`replay_limit`](RetryLayerBuilder::replay_limit)): what tonic `Channel`s and
    /// hyper clients need, since their bodies are streams.
    #[cfg(feature = "http")]
    pub fn replay_bodies(self) -> RetryLayerBuilder<P, super::ReplayBodies> {
        self.duplicate(super::ReplayBodies::new())
    }

    /// Gives up on an attempt after `timeout` (its error,
    /// [`AttemptTimedOut`](super::AttemptTimedOut), is then handed to the policy like
    /// any other).
    pub fn per_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.per_attempt_timeout = Some(timeout);
        self
    }

    /// Bounds the whole call, attempts and delays included: no retry is scheduled that
    /// would start after it, and an attempt still running then, or a retry still
    /// waiting for the service to be ready, fails with
    /// [`DeadlineExceeded`](super::DeadlineExceeded).
    ///
    /// The [request context](crate::context)'s deadline, when the call runs inside one,
    /// bounds it the same way whether or not this is set (the earlier of the two wins),
    /// and caps the [per-attempt timeout](Self::per_attempt_timeout); a call made after
    /// that deadline passed fails at once, without an attempt.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Whether this hop makes a single attempt of a request that its caller is itself
    /// retrying (the [request context](crate::context) says the caller made earlier
    /// attempts: `grpc-previous-rpc-attempts` or `x-previous-attempts` came in). **On
    /// by default.**
    ///
    /// Without it, retries multiply down a call chain: three hops that each try three
    /// times turn one failure at the bottom into 27 calls. With it, the caller's retry
    /// is the only one: a gateway and a service that each make 3 attempts send at most
    /// 3 + 1 + 1 = 5 calls to a failing dependency instead of 9, and the count stays
    /// additive however deep the chain (the retry layer carries the count onward on
    /// every retry it sends). A request that is not a retry, and every request outside
    /// a server's context, is retried as configured, so a single retrying hop behaves
    /// as before; what is given up is only a second level of retries for a request the
    /// caller already retries, which is the amplification. Turn it off for a hop whose
    /// callers are known not to retry.
    pub fn defer_to_retrying_caller(mut self, defer: bool) -> Self {
        self.defer_to_retrying_caller = defer;
        self
    }

    /// The longest wait a server (`Retry-After`, `grpc-retry-pushback-ms`) or a local
    /// rejection (`retry_after()`) may ask for; asked for longer, the layer gives up
    /// and returns the result instead of waiting. 30 s unless set.
    pub fn max_server_delay(mut self, cap: Duration) -> Self {
        self.max_server_delay = cap;
        self
    }

    /// Calls `observer` before each retry's delay. Costs nothing when not set.
    pub fn on_retry(mut self, observer: impl Fn(&RetryEvent) + Send + Sync + 'static) -> Self {
        self.on_retry = Some(Box::new(observer));
        self
    }

    /// Checks the configuration and builds the layer.
    pub fn build(self) -> Result<RetryLayer<P, D>, RetryConfigError> {
        let options = self.options()?;
        Ok(RetryLayer {
            shared: Arc::new(Shared {
                policy: self.policy,
                duplicate: self.duplicate,
                on_retry: self.on_retry,
                ledger: Arc::new(Ledger {
                    budget: self.budget,
                    counters: Counters::default(),
                    options: Published::new(options),
                }),
            }),
        })
    }

    /// The checked options (the budget's too, which stays in the builder): what `build`
    /// builds with, and what a live reload switches to.
    pub(crate) fn options(&self) -> Result<Options, RetryConfigError> {
        if self.max_attempts == 0 {
            return Err(RetryConfigError::ZeroAttempts);
        }
        self.backoff.validate()?;
        self.budget.validate()?;
        if self.per_attempt_timeout == Some(Duration::ZERO) || self.deadline == Some(Duration::ZERO)
        {
            return Err(RetryConfigError::ZeroTimeout);
        }
        Ok(Options {
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            per_attempt_timeout: self.per_attempt_timeout,
            deadline: self.deadline,
            defer_to_retrying_caller: self.defer_to_retrying_caller,
            max_server_delay: self.max_server_delay,
        })
    }

    /// The budget's settings: its ttl, retries per second and ratio.
    #[cfg(feature = "serde")]
    pub(crate) fn budget_settings(&self) -> (Duration, u32, f64) {
        (
            self.budget.ttl(),
            self.budget.min_per_sec(),
            self.budget.ratio(),
        )
    }
}

#[cfg(feature = "http")]
impl<P> RetryLayerBuilder<P, super::ReplayBodies> {
    /// Keeps up to `bytes` of each request body; a larger body is sent once and not
    /// retried.
    pub fn replay_limit(mut self, bytes: usize) -> Self {
        self.duplicate = self.duplicate.limit(bytes);
        self
    }

    /// Sets this header to the attempt number (1, 2, …) on every attempt.
    pub fn attempt_header(mut self, name: http::HeaderName) -> Self {
        self.duplicate = self.duplicate.attempt_header(name);
        self
    }
}

/// An invalid [`RetryLayerBuilder`] configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RetryConfigError {
    /// `max_attempts(0)`: the first attempt counts, so at least 1 is needed.
    #[error("max_attempts must be at least 1 (it counts the first attempt)")]
    ZeroAttempts,
    /// An exponential multiplier below 1 (or not a number).
    #[error("the backoff multiplier must be at least 1, got {0}")]
    Multiplier(f64),
    /// A backoff cap below its base delay.
    #[error("the backoff cap {cap:?} is below its base {base:?}")]
    CapBelowBase {
        /// The base delay.
        base: Duration,
        /// The cap.
        cap: Duration,
    },
    /// A proportional jitter outside `[0, 1]`.
    #[error("the proportional jitter must be within [0, 1], got {0}")]
    Jitter(f64),
    /// A budget ttl outside [`RetryBudget::MIN_TTL`]`..=`[`RetryBudget::MAX_TTL`]
    /// (1 s to 60 s).
    #[error("the retry budget's ttl must be within 1 s and 60 s, got {0:?}")]
    BudgetTtl(Duration),
    /// A budget `min_per_sec` above [`RetryBudget::MAX_MIN_PER_SEC`].
    #[error("the retry budget's min_per_sec must be at most 1000000, got {0}")]
    BudgetMinPerSec(u32),
    /// A budget ratio outside `0.0..=`[`RetryBudget::MAX_RATIO`] (1000), or NaN.
    #[error("the retry budget's ratio must be within 0 and 1000, got {0}")]
    BudgetRatio(f64),
    /// A zero per-attempt timeout or deadline, which would fail every call.
    #[error("a per-attempt timeout or deadline must be above zero")]
    ZeroTimeout,
}

/// What the observer set with [`on_retry`](RetryLayerBuilder::on_retry) is told
/// before each retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryEvent {
    /// The attempt about to be made: 2 for the first retry.
    pub attempt: u32,
    /// The wait before it.
    pub delay: Duration,
    /// Why the previous attempt is retried.
    pub reason: RetryReason,
}

/// Everything every service and future of one layer shares.
pub(crate) struct Shared<P, D> {
    pub(crate) policy: P,
    pub(crate) duplicate: D,
    on_retry: Option<OnRetry>,
    pub(crate) ledger: Arc<Ledger>,
}

/// The options a request reads, which a live reload replaces: each request keeps the
/// snapshot it started with, so its attempts and delays all follow one configuration.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Options {
    pub(crate) max_attempts: u32,
    pub(crate) backoff: Backoff,
    pub(crate) per_attempt_timeout: Option<Duration>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) defer_to_retrying_caller: bool,
    pub(crate) max_server_delay: Duration,
}

/// The options in force, and how many times they were replaced.
///
/// Each service keeps the snapshot it last took and the generation it took it at;
/// a call compares one number (a plain load of a line written only by reloads) and
/// clones the snapshot's `Arc`. Only a service whose generation is behind reads the
/// `ArcSwap`, lock-free, which a reload stores before it moves the generation on: a
/// service that sees the new generation takes the new options.
pub(crate) struct Published {
    generation: AtomicU64,
    options: arc_swap::ArcSwap<Options>,
    /// Serialises reloads, so that the budget and the options of one land together.
    #[cfg(feature = "serde")]
    writer: crate::sync::Mutex<()>,
}

impl Published {
    fn new(options: Options) -> Self {
        Self {
            generation: AtomicU64::new(0),
            options: arc_swap::ArcSwap::from_pointee(options),
            #[cfg(feature = "serde")]
            writer: crate::sync::Mutex::new(()),
        }
    }

    /// The generation in force.
    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The options in force (at least as new as the generation read before).
    pub(crate) fn load(&self) -> Arc<Options> {
        self.options.load_full()
    }

    /// Replaces the options: a request started from now on takes these.
    #[cfg(feature = "serde")]
    fn store(&self, options: Options) {
        self.options.store(Arc::new(options));
        self.generation.fetch_add(1, Ordering::Release);
    }
}

impl fmt::Debug for Published {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Published")
            .field("generation", &self.generation())
            .field("options", &self.options.load())
            .finish()
    }
}

impl<P, D> Shared<P, D> {
    pub(crate) fn notify(&self, event: RetryEvent) {
        #[cfg(feature = "tracing")]
        tracing::debug!(
            attempt = event.attempt,
            delay_ms = event.delay.as_millis() as u64,
            reason = ?event.reason,
            "retrying request"
        );
        self.ledger.counters.retries.fetch_add(1, Ordering::Relaxed);
        crate::metrics::retried(event.reason);
        if let Some(observer) = &self.on_retry {
            observer(&event);
        }
    }
}

/// The retry budget, the call counters and the options: the part a [`RetryHandle`]
/// reads and reloads.
#[derive(Debug)]
pub(crate) struct Ledger {
    pub(crate) budget: RetryBudget,
    pub(crate) counters: Counters,
    pub(crate) options: Published,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    success_without_retry: AtomicU64,
    success_with_retry: AtomicU64,
    failure_without_retry: AtomicU64,
    failure_with_retry: AtomicU64,
    budget_exhausted: AtomicU64,
    retries: AtomicU64,
}

impl Counters {
    pub(crate) fn budget_exhausted(&self) {
        self.budget_exhausted.fetch_add(1, Ordering::Relaxed);
        crate::metrics::retry_budget_exhausted();
    }

    /// Counts a call's final result.
    pub(crate) fn finish(&self, succeeded: bool, retried: bool) {
        let counter = match (succeeded, retried) {
            (true, false) => &self.success_without_retry,
            (true, true) => &self.success_with_retry,
            (false, false) => &self.failure_without_retry,
            (false, true) => &self.failure_with_retry,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Observes a [`RetryLayer`]: a cheap clone of an `Arc`.
#[derive(Debug, Clone)]
pub struct RetryHandle {
    ledger: Arc<Ledger>,
}

impl RetryHandle {
    /// The counters so far.
    pub fn metrics(&self) -> RetryMetrics {
        let counters = &self.ledger.counters;
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RetryMetrics {
            success_without_retry: read(&counters.success_without_retry),
            success_with_retry: read(&counters.success_with_retry),
            failure_without_retry: read(&counters.failure_without_retry),
            failure_with_retry: read(&counters.failure_with_retry),
            budget_exhausted: read(&counters.budget_exhausted),
            retries: read(&counters.retries),
        }
    }

    /// Whole retries the budget allows right now.
    pub fn budget_available(&self) -> u64 {
        self.ledger.budget.available(tokio::time::Instant::now())
    }

    /// The most attempts a request started now makes, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.ledger.options.load().max_attempts
    }

    /// The backoff a request started now follows.
    pub fn backoff(&self) -> Backoff {
        self.ledger.options.load().backoff
    }

    /// Switches the layer to `config` for every request started from now on (the next
    /// call sees it): its attempts, backoff and jitter, timeouts, deadline, server-delay
    /// cap, whether it defers to a retrying caller, and its budget.
    ///
    /// **A request in flight keeps the options it started with**: its attempts, its
    /// delays, its per-attempt timeout and its deadline all follow one configuration,
    /// never some of each. Each request reads the options once, when it is called: a
    /// snapshot behind an `Arc`, checked against a generation number, so that a call
    /// costs no lock and, between reloads, no more than one atomic load.
    ///
    /// **The budget is the layer's state**, shared by every request, so it changes
    /// once for all, in place, keeping what it holds: the retries earned and spent in
    /// its window stay (they expire as they would, each slice of the window keeping
    /// its place when `ttl` changes, the window now spanning the new `ttl`), the
    /// reserve becomes the new `min_per_sec * ttl`, and requests deposit the new
    /// `ratio` from now on. A configuration without a `budget` section gets the default
    /// budget, as `build` would. A request in flight draws its next retry from the
    /// budget as it is then.
    ///
    /// `config` is validated as [`RetryConfig::build`](crate::config::RetryConfig::build)
    /// validates it, with the same [`ConfigError`](crate::config::ConfigError) (field
    /// path included); a refused configuration changes nothing. A field left out takes
    /// the builder's default, not what the code that built the layer set. What is
    /// retried ([`policy`](RetryLayerBuilder::policy)), how requests are kept
    /// ([`duplicate`](RetryLayerBuilder::duplicate)) and the
    /// [`on_retry`](RetryLayerBuilder::on_retry) observer are code and stay.
    ///
    /// ```
    /// use palisade::config::RetryConfig;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config: RetryConfig = toml::from_str("max_attempts = 3")?;
    /// let handle = config.build()?.handle();
    ///
    /// handle.reload(&toml::from_str(r#"
    ///     max_attempts = 5
    ///     backoff = { kind = "constant", base = "10ms" }
    ///     budget = { ttl = "10s", min_per_sec = 1, ratio = 0.1 }
    /// "#)?)?;
    /// assert_eq!(handle.max_attempts(), 5);
    /// assert_eq!(handle.budget_available(), 10); // the reserve: 1 a second for 10 s
    ///
    /// let refused = handle.reload(&toml::from_str("max_attempts = 0")?);
    /// assert_eq!(refused.unwrap_err().path(), "max_attempts");
    /// assert_eq!(handle.max_attempts(), 5); // the old configuration holds
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "serde")]
    #[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
    pub fn reload(
        &self,
        config: &crate::config::RetryConfig,
    ) -> Result<(), crate::config::ConfigError> {
        let (options, (ttl, min_per_sec, ratio)) = config.reload_options()?;
        let _writer = crate::sync::lock(&self.ledger.options.writer);
        let now = tokio::time::Instant::now();
        self.ledger.budget.reconfigure(ttl, min_per_sec, ratio, now);
        self.ledger.options.store(options);
        Ok(())
    }
}

/// A snapshot of a layer's counters. A call counts as failed when it ends in an error
/// or in a response the policy would have retried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryMetrics {
    /// Calls that succeeded on their first attempt.
    pub success_without_retry: u64,
    /// Calls that succeeded after one or more retries.
    pub success_with_retry: u64,
    /// Calls that failed and were not retried (not retryable, or nothing allowed it).
    pub failure_without_retry: u64,
    /// Calls that failed after one or more retries.
    pub failure_with_retry: u64,
    /// Retries refused because the budget was spent.
    pub budget_exhausted: u64,
    /// Retries scheduled.
    pub retries: u64,
}
