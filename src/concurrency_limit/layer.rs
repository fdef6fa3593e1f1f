use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::algorithms::{Aimd, Gradient, LimitAlgorithm};
use super::error::ConcurrencyLimitConfigError;
use super::fair::{FairShares, KeyCounts, Keyed};
use super::handle::ConcurrencyLimitHandle;
use super::limiter::{Algorithm, DEFAULT_RETRY_AFTER, Limit, Limiter, MAX_LIMIT, Policy};
use super::release::ReleaseOnResponse;
use super::service::ConcurrencyLimitService;
use crate::classify::ErrorsAsFailures;
use crate::key::Global;

/// The longest `retry_after` and `max_wait`.
const MAX_DURATION: Duration = Duration::from_secs(86_400);

/// The keys a keyed limit tracks unless told otherwise.
const DEFAULT_MAX_KEYS: usize = 10_000;

/// Limits the requests in flight through every service it builds, and refuses the rest
/// at once with [`Overloaded`](super::Overloaded).
///
/// The limit is created once, here: every service this layer builds, and every clone of
/// them, shares it. Build a second layer for an independent limit. See the
/// [module documentation](super).
#[must_use = "a layer or builder does nothing until it is used"]
pub struct ConcurrencyLimitLayer<C = ErrorsAsFailures, H = ReleaseOnResponse, X = Global, K = ()> {
    limiter: Arc<Limiter>,
    keyed: Option<Arc<Keyed<X, K>>>,
    /// The same shares as `keyed`, for the handle, which does not know `K`.
    counts: Option<Arc<dyn KeyCounts>>,
    built: Built,
    classify: C,
    release: PhantomData<fn() -> H>,
}

impl<C: Clone, H, X, K> Clone for ConcurrencyLimitLayer<C, H, X, K> {
    fn clone(&self) -> Self {
        Self {
            limiter: Arc::clone(&self.limiter),
            keyed: self.keyed.clone(),
            counts: self.counts.clone(),
            built: self.built,
            classify: self.classify.clone(),
            release: PhantomData,
        }
    }
}

impl<C, H, X, K> fmt::Debug for ConcurrencyLimitLayer<C, H, X, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimitLayer")
            .field("limiter", &self.limiter)
            .field("keyed", &self.keyed)
            .finish_non_exhaustive()
    }
}

impl ConcurrencyLimitLayer {
    /// Starts a configuration. It needs a limit: [`max_in_flight`] for a static one, or
    /// an algorithm ([`aimd`], [`gradient`], [`algorithm`]) for an adaptive one.
    ///
    /// [`max_in_flight`]: ConcurrencyLimitLayerBuilder::max_in_flight
    /// [`aimd`]: ConcurrencyLimitLayerBuilder::aimd
    /// [`gradient`]: ConcurrencyLimitLayerBuilder::gradient
    /// [`algorithm`]: ConcurrencyLimitLayerBuilder::algorithm
    pub fn builder() -> ConcurrencyLimitLayerBuilder {
        ConcurrencyLimitLayerBuilder {
            limit: None,
            queue: None,
            retry_after: DEFAULT_RETRY_AFTER,
            classify: ErrorsAsFailures,
            release: PhantomData,
            keyed: None,
            max_keys: DEFAULT_MAX_KEYS,
            extractor: Global,
            key: PhantomData,
            shadow: false,
        }
    }
}

impl<C, H, X, K> ConcurrencyLimitLayer<C, H, X, K> {
    /// A handle that observes this limit.
    pub fn handle(&self) -> ConcurrencyLimitHandle {
        ConcurrencyLimitHandle::new(Arc::clone(&self.limiter), self.counts.clone(), self.built)
    }
}

impl<S, C: Clone, H, X, K> Layer<S> for ConcurrencyLimitLayer<C, H, X, K> {
    type Service = ConcurrencyLimitService<S, C, H, X, K>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyLimitService::new(
            inner,
            Arc::clone(&self.limiter),
            self.keyed.clone(),
            self.classify.clone(),
        )
    }
}

enum LimitChoice {
    Fixed(u32),
    Aimd(Aimd),
    Gradient(Gradient),
    Custom(Box<dyn LimitAlgorithm>),
}

/// Configures a [`ConcurrencyLimitLayer`]; made by [`ConcurrencyLimitLayer::builder`].
#[must_use]
pub struct ConcurrencyLimitLayerBuilder<
    C = ErrorsAsFailures,
    H = ReleaseOnResponse,
    X = Global,
    K = (),
> {
    limit: Option<LimitChoice>,
    queue: Option<(usize, Duration)>,
    retry_after: Duration,
    classify: C,
    release: PhantomData<fn() -> H>,
    /// Set by `keyed` (the `keyed` of the built layer is `None` without it).
    keyed: Option<()>,
    max_keys: usize,
    extractor: X,
    key: PhantomData<fn() -> K>,
    shadow: bool,
}

impl<C, H, X, K> fmt::Debug for ConcurrencyLimitLayerBuilder<C, H, X, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let limit = match &self.limit {
            None => "none",
            Some(LimitChoice::Fixed(_)) => "static",
            Some(LimitChoice::Aimd(_)) => "aimd",
            Some(LimitChoice::Gradient(_)) => "gradient",
            Some(LimitChoice::Custom(_)) => "custom",
        };
        f.debug_struct("ConcurrencyLimitLayerBuilder")
            .field("limit", &limit)
            .field("queue", &self.queue)
            .field("retry_after", &self.retry_after)
            .field("keyed", &self.keyed.is_some())
            .field("max_keys", &self.max_keys)
            .field("shadow", &self.shadow)
            .finish_non_exhaustive()
    }
}

impl<C, H, X, K> ConcurrencyLimitLayerBuilder<C, H, X, K> {
    /// A static limit: at most `limit` requests in flight, in `1..=2^31 - 1`. Replaces
    /// any algorithm set before.
    pub fn max_in_flight(mut self, limit: u32) -> Self {
        self.limit = Some(LimitChoice::Fixed(limit));
        self
    }

    /// An adaptive limit moved by [`Aimd`]. Replaces any limit set before.
    pub fn aimd(mut self, aimd: Aimd) -> Self {
        self.limit = Some(LimitChoice::Aimd(aimd));
        self
    }

    /// An adaptive limit moved by [`Gradient`]. Replaces any limit set before.
    pub fn gradient(mut self, gradient: Gradient) -> Self {
        self.limit = Some(LimitChoice::Gradient(gradient));
        self
    }

    /// An adaptive limit moved by an algorithm of your own. Replaces any limit set
    /// before.
    pub fn algorithm(mut self, algorithm: impl LimitAlgorithm) -> Self {
        self.limit = Some(LimitChoice::Custom(Box::new(algorithm)));
        self
    }

    /// Lets up to `waiters` requests over the limit wait, in arrival order, up to
    /// `max_wait` each for a permit, instead of being refused at once. A request that
    /// finds the queue full, or whose wait runs out, gets
    /// [`Overloaded`](super::Overloaded). A waiter dropped (its client gone) leaves the
    /// queue at once. `waiters` is in `1..=2^31 - 1` (the queue grows only as requests
    /// wait), `max_wait` above zero and at most a day.
    pub fn queue(mut self, waiters: usize, max_wait: Duration) -> Self {
        self.queue = Some((waiters, max_wait));
        self
    }

    /// What [`Overloaded::retry_after`](super::Overloaded::retry_after) asks refused
    /// clients to wait: above zero and at most a day; 1 second unless set. It becomes
    /// `Retry-After` (in whole seconds, rounded up) and `grpc-retry-pushback-ms`.
    pub fn retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// What counts as congestion for an adaptive limit: a preset from
    /// [`crate::classify`] or a closure `Fn(&Result<Res, E>) -> Outcome`. A failure is
    /// congestion; so is a request dropped before its outcome. Default: every `Err`
    /// (a timeout below the layer, an `Overloaded` from a layer below). For HTTP use
    /// [`ServerErrorsAsFailures`](crate::classify::ServerErrorsAsFailures) (5xx), for
    /// gRPC [`GrpcErrorsAsFailures`](crate::classify::GrpcErrorsAsFailures)
    /// (`UNAVAILABLE`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, ...), whose outcome
    /// arrives with the trailers. A static limit classifies nothing.
    pub fn classify<D>(self, classify: D) -> ConcurrencyLimitLayerBuilder<D, H, X, K> {
        ConcurrencyLimitLayerBuilder {
            limit: self.limit,
            queue: self.queue,
            retry_after: self.retry_after,
            classify,
            release: PhantomData,
            keyed: self.keyed,
            max_keys: self.max_keys,
            extractor: self.extractor,
            key: PhantomData,
            shadow: self.shadow,
        }
    }

    /// Makes the limit fair per client: while the layer is contended, each key holds at
    /// most its share of the limit, so that one client flooding cannot take the slots
    /// of the others; while it is not, any key may take any free slot (see
    /// [fair per client](super#fair-per-client) for the exact policy). `extractor` is a
    /// closure `Fn(&Req) -> Option<K>` or one of the [`key`](crate::key) extractors.
    ///
    /// The key type `K` is inferred from the service the layer wraps; where nothing else
    /// pins it down, name it: `.keyed::<_, HeaderValue>(Header::new(name))`. A keyed
    /// limit has no [`queue`](Self::queue) (`build` refuses one).
    pub fn keyed<X2, K2>(self, extractor: X2) -> ConcurrencyLimitLayerBuilder<C, H, X2, K2> {
        ConcurrencyLimitLayerBuilder {
            limit: self.limit,
            queue: self.queue,
            retry_after: self.retry_after,
            classify: self.classify,
            release: PhantomData,
            keyed: Some(()),
            max_keys: self.max_keys,
            extractor,
            key: PhantomData,
            shadow: self.shadow,
        }
    }

    /// The most keys a keyed limit tracks (default 10,000); keys beyond share one
    /// share, with the requests that have no key (see
    /// [at the cap](super#fair-per-client)). At least 1.
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// Keeps each request's permit until its HTTP response body ends or is dropped,
    /// rather than until the response head (feature `http`): a long download, a
    /// server-sent event stream or a gRPC stream holds its place for as long as it
    /// runs. Use it on HTTP and gRPC servers and clients.
    #[cfg(feature = "http")]
    pub fn release_on_body_end(
        self,
    ) -> ConcurrencyLimitLayerBuilder<C, super::ReleaseOnBodyEnd, X, K> {
        self.release_with()
    }

    /// Shadow mode (default off): the limit decides and counts every request as it
    /// would, but a request it would refuse with [`Overloaded`](super::Overloaded) is
    /// sent to the inner service instead, and
    /// [`shadow_rejected`](super::ConcurrencyLimitHandle::shadow_rejected) counts it
    /// (the `metrics` counter `palisade_concurrency_limit_shadow_rejected_total` too).
    /// Rolls a new limit out by watching it before it sheds anything.
    ///
    /// A request let through holds no place under the limit and reports nothing to an adaptive
    /// algorithm, as an enforcing limit never runs it: so `in_flight`, the queue and
    /// the limit an algorithm moves follow what an enforcing limit's would on the same
    /// traffic, as long as the backend's latency and errors do not depend on the extra
    /// load the shadow limit lets through (on an overloaded backend they do, and the
    /// shadow's adaptive limit then falls further). A queued request waits as it would;
    /// if its wait ends without a permit it goes through, counted. See the
    /// [module docs](super#shadow-mode).
    pub fn shadow(mut self, shadow: bool) -> Self {
        self.shadow = shadow;
        self
    }

    /// Keeps each request's permit where `H2` says (see [`Release`](super::Release)).
    pub fn release_with<H2>(self) -> ConcurrencyLimitLayerBuilder<C, H2, X, K> {
        ConcurrencyLimitLayerBuilder {
            limit: self.limit,
            queue: self.queue,
            retry_after: self.retry_after,
            classify: self.classify,
            release: PhantomData,
            keyed: self.keyed,
            max_keys: self.max_keys,
            extractor: self.extractor,
            key: PhantomData,
            shadow: self.shadow,
        }
    }

    /// Checks the configuration and creates the limit's state.
    pub fn build(mut self) -> Result<ConcurrencyLimitLayer<C, H, X, K>, ConcurrencyLimitConfigError>
    where
        X: Send + Sync + 'static,
        K: Hash + Eq + Clone + Send + Sync + 'static,
    {
        if self.limit.is_none() {
            return Err(ConcurrencyLimitConfigError::NoLimit);
        }
        let plan = self.plan()?;
        let limit = plan.limit.ok_or(ConcurrencyLimitConfigError::NoLimit)?;
        let built = plan.built;
        let (keyed, counts) = match built.max_keys {
            None => (None, None),
            Some(max_keys) => {
                let shares =
                    FairShares::new(max_keys, built.retry_after, tokio::time::Instant::now());
                let keyed = Arc::new(Keyed {
                    extractor: self.extractor,
                    shares,
                });
                let counts: Arc<dyn KeyCounts> = Arc::clone(&keyed) as Arc<dyn KeyCounts>;
                (Some(keyed), Some(counts))
            }
        };
        Ok(ConcurrencyLimitLayer {
            limiter: Arc::new(Limiter::new(limit, plan.policy)),
            keyed,
            counts,
            built,
            classify: self.classify,
            release: PhantomData,
        })
    }

    /// The checked settings, without the state: what `build` builds, and what a live
    /// reload switches to (the same rules, in the same order).
    pub(crate) fn plan(&mut self) -> Result<Plan, ConcurrencyLimitConfigError> {
        let limit = match self.limit.take() {
            None => None,
            Some(LimitChoice::Fixed(limit)) if limit == 0 || limit > MAX_LIMIT => {
                return Err(ConcurrencyLimitConfigError::Limit {
                    limit,
                    max: MAX_LIMIT,
                });
            }
            Some(LimitChoice::Fixed(limit)) => Some(Limit::Fixed(limit)),
            Some(LimitChoice::Aimd(aimd)) => {
                aimd.validate()
                    .map_err(|reason| algorithm("Aimd", reason))?;
                Some(Limit::Adaptive(Algorithm::Aimd(aimd)))
            }
            Some(LimitChoice::Gradient(gradient)) => {
                gradient
                    .validate()
                    .map_err(|reason| algorithm("Gradient", reason))?;
                Some(Limit::Adaptive(Algorithm::Gradient(gradient)))
            }
            Some(LimitChoice::Custom(custom)) => Some(Limit::Adaptive(Algorithm::Custom(custom))),
        };
        if self.retry_after.is_zero() || self.retry_after > MAX_DURATION {
            return Err(ConcurrencyLimitConfigError::RetryAfter(self.retry_after));
        }
        let mut policy = Policy {
            shadow: self.shadow,
            retry_after: self.retry_after,
            ..Policy::default()
        };
        if let Some((waiters, max_wait)) = self.queue {
            let max = MAX_LIMIT as usize;
            if waiters == 0 || waiters > max {
                return Err(ConcurrencyLimitConfigError::QueueSize { waiters, max });
            }
            if max_wait.is_zero() || max_wait > MAX_DURATION {
                return Err(ConcurrencyLimitConfigError::MaxWait(max_wait));
            }
            policy.waiters = waiters;
            policy.max_wait = max_wait;
        }
        let max_keys = match self.keyed {
            None => None,
            Some(()) if self.max_keys == 0 => return Err(ConcurrencyLimitConfigError::ZeroMaxKeys),
            Some(()) if self.queue.is_some() => {
                return Err(ConcurrencyLimitConfigError::KeyedQueue);
            }
            Some(()) => Some(self.max_keys),
        };
        Ok(Plan {
            limit,
            policy,
            built: Built {
                max_keys,
                retry_after: self.retry_after,
            },
        })
    }
}

/// A checked configuration: what [`ConcurrencyLimitLayerBuilder::plan`] returns.
#[derive(Debug)]
pub(crate) struct Plan {
    /// `None` when no limit was given (`build` refuses that; a reload keeps the limit).
    pub(crate) limit: Option<Limit>,
    pub(crate) policy: Policy,
    pub(crate) built: Built,
}

/// What a live reload cannot change: the key table, and the fairness windows that a
/// keyed limit cuts time into (`retry_after` long).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Built {
    /// `Some(max_keys)` for a keyed limit.
    pub(crate) max_keys: Option<usize>,
    pub(crate) retry_after: Duration,
}

fn algorithm(algorithm: &'static str, reason: &'static str) -> ConcurrencyLimitConfigError {
    ConcurrencyLimitConfigError::Algorithm { algorithm, reason }
}
