use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::bucket::Quota;
use super::error::RateLimitConfigError;
use super::handle::RateLimitHandle;
use super::service::RateLimitService;
use super::shadow::Shadow;
use super::store::{LocalStore, Store};
use crate::key::Global;

/// Applies a token-bucket rate limit, global or per key, to every service it builds.
///
/// All services built by one layer, and all their clones, share the layer's buckets.
/// Build a second layer for an independent limit.
#[must_use = "a layer or builder does nothing until it is used"]
pub struct RateLimitLayer<X = Global, C = UnitCost, St = LocalStore, H = NoHeaders> {
    store: Arc<St>,
    policy: Arc<Policy<X, C, H>>,
    /// What it was built with: a reload checks what cannot change against it.
    settings: Settings,
}

/// What a [`RateLimitService`] does with each request, apart from the store.
#[derive(Debug)]
pub(crate) struct Policy<X, C, H> {
    pub(crate) extractor: X,
    pub(crate) cost: C,
    pub(crate) max_wait: Duration,
    pub(crate) when_key_missing: WhenKeyMissing,
    pub(crate) on_admitted: H,
    /// The shadow switch (on: nothing is refused, and what would have been is counted).
    pub(crate) shadow: Arc<Shadow>,
}

impl RateLimitLayer {
    /// Starts a configuration: a global limiter unless [`keyed`](Builder::keyed).
    pub fn builder() -> Builder {
        Builder {
            settings: Settings {
                capacity: 0,
                refill_tokens: 0,
                refill_period: Duration::ZERO,
                max_wait: Duration::ZERO,
                max_keys: DEFAULT_MAX_KEYS,
                when_key_missing: WhenKeyMissing::Reject,
                keyed: false,
                shadow: false,
            },
            extractor: Global,
            cost: UnitCost,
            on_admitted: NoHeaders,
            key: PhantomData,
        }
    }
}

impl<X, C, St: Store, H> RateLimitLayer<X, C, St, H> {
    /// A handle that observes and controls this layer's buckets.
    pub fn handle(&self) -> RateLimitHandle<St> {
        RateLimitHandle::new(
            self.store.clone(),
            self.policy.shadow.clone(),
            self.settings,
        )
    }
}

impl<S, X, C, St, H> Layer<S> for RateLimitLayer<X, C, St, H> {
    type Service = RateLimitService<S, X, C, St, H>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService::new(inner, self.store.clone(), self.policy.clone())
    }
}

impl<X, C, St, H> Clone for RateLimitLayer<X, C, St, H> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            policy: self.policy.clone(),
            settings: self.settings,
        }
    }
}

impl<X, C, St: std::fmt::Debug, H> std::fmt::Debug for RateLimitLayer<X, C, St, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("store", &self.store)
            .field("max_wait", &self.policy.max_wait)
            .finish_non_exhaustive()
    }
}

pub(crate) const DEFAULT_MAX_KEYS: usize = 100_000;

/// Configures a [`RateLimitLayer`]. `capacity` and `refill` are required.
#[must_use]
pub struct Builder<X = Global, C = UnitCost, K = (), H = NoHeaders> {
    settings: Settings,
    extractor: X,
    cost: C,
    on_admitted: H,
    key: PhantomData<fn() -> K>,
}

/// A builder's options (and, kept by the layer, what it was built with).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    capacity: u64,
    refill_tokens: u64,
    refill_period: Duration,
    pub(crate) max_wait: Duration,
    pub(crate) max_keys: usize,
    pub(crate) when_key_missing: WhenKeyMissing,
    pub(crate) keyed: bool,
    pub(crate) shadow: bool,
}

impl<X, C, K, H> Builder<X, C, K, H> {
    /// The burst size: how many tokens a full bucket holds.
    pub fn capacity(mut self, capacity: u64) -> Self {
        self.settings.capacity = capacity;
        self
    }

    /// Refills `tokens` per `period`, continuously: one token every `period / tokens`,
    /// counted exactly (`tokens` refills take exactly `period`; see [`Quota`] for the
    /// bounds).
    pub fn refill(mut self, tokens: u64, period: Duration) -> Self {
        self.settings.refill_tokens = tokens;
        self.settings.refill_period = period;
        self
    }

    /// Zero (the default): a request over the limit is refused at once. Otherwise a
    /// request that can be served within `max_wait` reserves its slot and waits for it
    /// (waiters go in arrival order); one that cannot is refused at once.
    ///
    /// `build()` refuses a `max_wait` above 2^57 units of the quota
    /// ([`RateLimitConfigError::TooLarge`]): 4.5 years when the refill interval is a whole number
    /// of nanoseconds, `2^57 / (tokens / g)` ns in general, with `g` as in [`Quota`].
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.settings.max_wait = max_wait;
        self
    }

    /// The most keys a keyed limiter tracks (default 100,000); see the
    /// [module docs](super#at-the-cap) for what happens beyond.
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.settings.max_keys = max_keys;
        self
    }

    /// What a keyed limiter does with a request whose key cannot be extracted (default:
    /// [`WhenKeyMissing::Reject`]).
    pub fn when_key_missing(mut self, when: WhenKeyMissing) -> Self {
        self.settings.when_key_missing = when;
        self
    }

    /// Shadow mode (default off): the limiter decides, counts, logs and (with
    /// [`headers_on_success`](Self::headers_on_success)) sets the `RateLimit` fields
    /// exactly as it would, but lets every request through, at once: a request it would
    /// have refused (over the limit, costing more than the capacity, without a key, or
    /// refused by its store) reaches the inner service, and
    /// [`RateLimitHandle::shadow_rejected`] counts it. Its buckets are charged as they
    /// would be, so they track the limit it would enforce: roll out a new limit by
    /// watching it first. This is where the switch starts:
    /// [`RateLimitHandle::set_shadow`] and a reload turn it while serving. See the
    /// [module docs](super#shadow-mode).
    pub fn shadow(mut self, shadow: bool) -> Self {
        self.settings.shadow = shadow;
        self
    }

    /// Gives each key its own bucket. `extractor` is a closure `Fn(&Req) -> Option<K>` or
    /// one of the [`key`](crate::key) extractors.
    ///
    /// The key type `K` is inferred from the service the layer wraps; where nothing else
    /// pins it down (a layer built but not yet applied), name it:
    /// `.keyed::<_, IpAddr>(PeerIp)`.
    pub fn keyed<X2, K2>(self, extractor: X2) -> Builder<X2, C, K2, H> {
        Builder {
            settings: Settings {
                keyed: true,
                ..self.settings
            },
            extractor,
            cost: self.cost,
            on_admitted: self.on_admitted,
            key: PhantomData,
        }
    }

    /// Charges each request `cost(&request)` tokens instead of one (a closure
    /// `Fn(&Req) -> u64`).
    pub fn cost<C2>(self, cost: C2) -> Builder<X, C2, K, H> {
        Builder {
            settings: self.settings,
            extractor: self.extractor,
            cost,
            on_admitted: self.on_admitted,
            key: PhantomData,
        }
    }

    /// Adds the `RateLimit` and `RateLimit-Policy` fields to responses admitted at once
    /// too, so that clients can pace themselves. (A request that waited for its slot
    /// found the bucket empty; its response gets no fields.)
    #[cfg(feature = "http")]
    pub fn headers_on_success(self) -> Builder<X, C, K, super::headers::AddRateLimitFields> {
        Builder {
            settings: self.settings,
            extractor: self.extractor,
            cost: self.cost,
            on_admitted: super::headers::AddRateLimitFields,
            key: PhantomData,
        }
    }

    /// Whether [`keyed`](Self::keyed) was called: a configuration from a file checks that
    /// the code that builds it agrees.
    #[cfg(feature = "serde")]
    pub(crate) fn is_keyed(&self) -> bool {
        self.settings.keyed
    }

    /// Checks the configuration and builds the layer with the in-process store.
    pub fn build(self) -> Result<RateLimitLayer<X, C, LocalStore<K>, H>, RateLimitConfigError>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
    {
        let Settings {
            keyed, max_keys, ..
        } = self.settings;
        if keyed && max_keys == 0 {
            return Err(RateLimitConfigError::ZeroMaxKeys);
        }
        self.build_with(|quota| {
            if keyed {
                LocalStore::keyed(quota, max_keys)
            } else {
                LocalStore::global(quota)
            }
        })
    }

    /// Checks the configuration and builds the layer on the store `make_store` returns
    /// for the configured quota (a fleet-wide store, say), failing with the store's own
    /// configuration error if [`Store::validate`] reports one. `max_keys` is the
    /// in-process store's and is ignored here.
    pub fn build_with<St>(
        self,
        make_store: impl FnOnce(Quota) -> St,
    ) -> Result<RateLimitLayer<X, C, St, H>, RateLimitConfigError>
    where
        St: Store<Key = K>,
    {
        let settings = self.settings;
        let quota = Quota::new(
            settings.capacity,
            settings.refill_tokens,
            settings.refill_period,
        )?;
        if !quota.fits_wait(settings.max_wait) {
            return Err(RateLimitConfigError::TooLarge);
        }
        let store = make_store(quota);
        store.validate()?;
        Ok(RateLimitLayer {
            store: Arc::new(store),
            policy: Arc::new(Policy {
                extractor: self.extractor,
                cost: self.cost,
                max_wait: settings.max_wait,
                when_key_missing: settings.when_key_missing,
                on_admitted: self.on_admitted,
                shadow: Arc::new(Shadow::new(settings.shadow)),
            }),
            settings,
        })
    }
}

impl<X, C, K, H> std::fmt::Debug for Builder<X, C, K, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// What a keyed limiter does with a request whose key cannot be extracted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenKeyMissing {
    /// Refuse it with [`MissingKey`](super::MissingKey) (the default): a missing key is
    /// usually a misconfiguration (no `ConnectInfo`) or a client that did not identify
    /// itself.
    #[default]
    Reject,
    /// Charge it to the one shared fallback bucket (which also takes new keys beyond
    /// `max_keys`).
    Share,
}

/// What a request costs in tokens.
///
/// Implemented for every closure `Fn(&Req) -> u64`.
pub trait Cost<Req> {
    /// The tokens `request` takes from the bucket.
    fn cost(&self, request: &Req) -> u64;
}

impl<F, Req> Cost<Req> for F
where
    F: Fn(&Req) -> u64,
{
    fn cost(&self, request: &Req) -> u64 {
        self(request)
    }
}

/// Every request costs one token (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct UnitCost;

impl<Req> Cost<Req> for UnitCost {
    fn cost(&self, _request: &Req) -> u64 {
        1
    }
}

/// Something done to each admitted response: nothing ([`NoHeaders`], the default) or,
/// with the `http` feature, adding the `RateLimit` fields
/// ([`AddRateLimitFields`](super::headers::AddRateLimitFields)).
pub trait OnAdmitted<Res> {
    /// What the response future keeps of the bucket's state until the response arrives:
    /// `()` when [`on_admitted`](Self::on_admitted) does nothing (the layer then neither
    /// reads the bucket's state nor carries room for it), `Option<RateLimitStatus>` when
    /// it reads it.
    type Status: StatusSlot;

    /// Called with each admitted response and the bucket's state after the request.
    fn on_admitted(&self, response: &mut Res, status: &RateLimitStatus);
}

/// Where a response future keeps an admitted request's [`RateLimitStatus`]: `()` (nowhere:
/// nobody reads it) or `Option<RateLimitStatus>`. Sealed.
pub trait StatusSlot: sealed::Slot + Send + Sync + Unpin + 'static {}

impl StatusSlot for () {}

impl StatusSlot for Option<RateLimitStatus> {}

pub(crate) mod sealed {
    use super::RateLimitStatus;

    /// What the layer does with a [`StatusSlot`](super::StatusSlot).
    pub trait Slot: Sized {
        /// Whether the status is read: the store is asked for it only then.
        const WANTED: bool;

        /// Keeps `status` (or drops it, for a slot that keeps nothing).
        fn keep(status: Option<RateLimitStatus>) -> Self;

        /// The status kept, once.
        fn take(&mut self) -> Option<RateLimitStatus>;
    }

    impl Slot for () {
        const WANTED: bool = false;

        #[inline]
        fn keep(_: Option<RateLimitStatus>) -> Self {}

        #[inline]
        fn take(&mut self) -> Option<RateLimitStatus> {
            None
        }
    }

    impl Slot for Option<RateLimitStatus> {
        const WANTED: bool = true;

        #[inline]
        fn keep(status: Option<RateLimitStatus>) -> Self {
            status
        }

        #[inline]
        fn take(&mut self) -> Option<RateLimitStatus> {
            Option::take(self)
        }
    }
}

/// Leaves admitted responses alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHeaders;

impl<Res> OnAdmitted<Res> for NoHeaders {
    type Status = ();

    fn on_admitted(&self, _response: &mut Res, _status: &RateLimitStatus) {}
}

/// A bucket's state, as the IETF `RateLimit` fields report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitStatus {
    /// The quota in force.
    pub quota: Quota,
    /// The tokens left.
    pub remaining: u64,
    /// How long until the bucket is full again (for a refused request: until it would
    /// pass).
    pub reset: Duration,
}

impl From<&RateLimitStatus> for crate::rejection::RateLimitInfo {
    fn from(status: &RateLimitStatus) -> Self {
        Self::new(
            status.quota.capacity(),
            status.quota.period(),
            status.remaining,
            status.reset,
        )
    }
}

impl From<&super::RateLimited> for RateLimitStatus {
    fn from(error: &super::RateLimited) -> Self {
        Self {
            quota: error.quota(),
            remaining: error.remaining(),
            reset: error.retry_after(),
        }
    }
}
