//! The [`RedisStore`] and its [`Store`] implementation: one round trip per decision,
//! leases in process, and the fallback policy while Redis is away.

use std::future::Future;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower::BoxError;

use super::connection::RedisConnection;
use super::error::RedisUnavailable;
use super::health::{Health, Route};
use super::key::RedisKey;
use super::lease::{Batch, Leases, Refilling};
use super::options::{MAX_LEASE_FOR, RedisOptions, WhenUnavailable};
use super::reply::Reply;
use super::script::{self, Scaled};
use crate::rate_limit::{
    Acquire, Admission, Answer, Denied, LocalReservation, LocalStore, Quota, RateLimitConfigError,
    RateLimitStatus, StatusWanted, Store,
};
use crate::sync::{AtomicU64, Ordering, read, write};

/// A [`Store`] that keeps the buckets on a Redis server (or Valkey, or any server that
/// runs Redis Lua scripts), so that every replica of a service draws from the same
/// buckets: a fleet-wide limit.
///
/// Plug it in with [`Builder::build_with`](crate::rate_limit::Builder::build_with); the layer's
/// behaviour and API are otherwise those of the in-process store.
///
/// ```no_run
/// use std::num::NonZeroU32;
/// use std::time::Duration;
/// use palisade::rate_limit::{RateLimitLayer, RedisOptions, RedisStore, WhenUnavailable};
///
/// # async fn run() -> Result<(), tower::BoxError> {
/// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
/// let redis = redis::aio::ConnectionManager::new(client).await?;
/// let options = RedisOptions::default()
///     .prefix("gateway:per-client:")
///     .timeout(Duration::from_millis(5))
///     .when_unavailable(WhenUnavailable::Local { replicas: NonZeroU32::new(5).unwrap() });
/// let limit = RateLimitLayer::builder()
///     .capacity(20)
///     .refill(5, Duration::from_secs(1))
///     .keyed::<_, String>(|client: &String| Some(client.clone()))
///     .build_with(|quota| RedisStore::new(redis, quota, options))?;
/// # drop(limit);
/// # Ok(())
/// # }
/// ```
///
/// (Not run here: it needs a Redis server. The tests in `tests/rate_limit_redis.rs` run
/// the same against a real one.)
///
/// # One round trip per decision
///
/// Each request runs one Lua script (`EVALSHA`, loading it first when the server's
/// script cache is empty) that does GCRA on the bucket's single key: it reads the
/// bucket's *theoretical arrival time* (when it will be full again), decides, and writes
/// it back, atomically. The script reads the time with `TIME` on the server, so replicas
/// whose clocks disagree still agree on every bucket. The server's clock ticks in
/// microseconds, and the script counts the refill exactly, in fractions of one:
/// `refill(n, period)` gives `n` tokens in every `period` on Redis as in process (the
/// TAT is stored as whole microseconds, then `.` and the units past them). The script
/// counts in doubles, exact below 2^53: a quota whose capacity times its refill
/// interval exceeds 2^51 of the script's units (71 years when the interval is a whole
/// number of microseconds, less for finer rates) is [`RateLimitConfigError::TooLarge`], from
/// [`build_with`](crate::rate_limit::Builder::build_with) and from the handle's setters.
///
/// A request that costs more than the capacity is refused without a round trip. A
/// request dropped while Redis decides may still have spent its tokens (the script ran):
/// a remote store errs towards admitting less.
///
/// # Keys
///
/// A bucket's key is the [prefix](RedisOptions::prefix) followed by `{` the client key `}`
/// (the key's [`RedisKey`] bytes), or by `shared` for the shared bucket (a global
/// limiter's only one, and a keyed limiter's fallback bucket): `palisade:rl:{10.0.0.7}`,
/// `palisade:rl:shared`. Two limiters sharing a server need different prefixes. Every
/// key expires when its bucket is full again: idle clients cost nothing.
///
/// # On Redis Cluster
///
/// Give [`RedisStore::new`] a cluster connection (feature `redis-cluster`: a
/// [`RedisConnection`] from the redis crate's `ClusterConnection`) instead of a
/// `ConnectionManager`; nothing else changes. Each script touches one key, so each
/// decision runs on the one master that serves its slot:
///
/// - The braces around the client key are a hash tag: the slot is the client's, so a
///   cluster spreads a keyed limiter's clients over all of its masters, and its load
///   with them. A global limiter has one bucket, on one master.
/// - A hash tag in the prefix (`"{api}:"`) keeps every bucket of the limiter in that one
///   slot, on one master: one node to watch and to fail over, but no spreading.
/// - The cluster connection follows `MOVED` and `ASK` (a slot that moved, or is moving,
///   to another master) and re-reads the slot map after a failover; a bucket moves with
///   its slot and keeps the tokens it had spent. A master that answers `NOSCRIPT` (a
///   promoted replica that never saw the script) is sent the script and asked again,
///   once. `CLUSTERDOWN`, `TRYAGAIN` and a dead master are retried by the client
///   within the store's [`timeout`](RedisOptions::timeout); past it, the
///   [`WhenUnavailable`] policy answers, as for a single node.
///
/// # When Redis is slow or down
///
/// A request waits at most the [`timeout`](RedisOptions::timeout) (default 5 ms) for
/// Redis. On a timeout or an error the store applies its
/// [`WhenUnavailable`] policy to that request, marks Redis down (logged once, with the
/// `tracing` feature) and sends later requests straight to the policy, letting one
/// request every [`recheck`](RedisOptions::recheck) (default 100 ms) ask Redis again.
/// The first answer switches every request back to Redis (logged once too). The
/// connection reconnects on its own meanwhile; its retry settings bound how
/// soon it notices that the server is back.
///
/// # Waiting
///
/// With [`max_wait`](crate::rate_limit::Builder::max_wait), the script reserves a slot on the
/// server and the request waits for it in the layer. A request dropped while waiting
/// hands its tokens back, best effort: a second script returns them only if nobody took
/// tokens from the bucket since (otherwise the slot stays spent and the fleet admits a
/// little less, never more).
///
/// # Local batching
///
/// With [`batch(n)`](RedisOptions::batch), a request that finds no tokens leased for
/// its bucket takes up to `n` times its cost from the bucket on Redis in its one round
/// trip (as many whole multiples as the bucket holds, at least one), keeps its own, and
/// leaves the rest in a lease in this replica; the next requests for that bucket spend
/// the lease in process, without a round trip, until it runs out or expires
/// ([`lease_for`](RedisOptions::lease_for), by default `n` refill intervals, at most a
/// second, counted from when the leasing request was sent). One request per bucket
/// fetches a batch at a time; the others meanwhile go to Redis one by one as without
/// batching. A lease that cannot pay for a request's cost, or has expired, is dropped
/// with what it held. Only requests that would not wait fetch batches: with
/// [`max_wait`](crate::rate_limit::Builder::max_wait) every request reserves its own slot on Redis.
/// Leases are kept for at most [`lease_max_keys`](RedisOptions::lease_max_keys) keys
/// (and the shared bucket); the requests of further keys go to Redis one by one. While
/// Redis is unavailable, leased tokens are still spent, and the policy decides once
/// they run out.
///
/// What holds, with `R` replicas, batch `n`, unit costs (multiply the lease terms by the
/// largest cost otherwise), a bucket of capacity `C` refilling at `r` tokens per second
/// and leases living `L`:
///
/// - Every admitted request's tokens were taken out of the Redis bucket, by itself or by
///   the lease it spent. From the bucket's creation to any time `T` the fleet admits at
///   most `C + r·T`, exactly the bound of one bucket.
/// - A replica holds at most one lease per bucket, of at most `n - 1` tokens, so at most
///   `R·(n - 1)` tokens per bucket sit in leases at any time. In a window of length `t`
///   the fleet admits at most `C + r·t + min(R·(n - 1), r·L)`: the bucket's bound plus
///   the tokens leased before the window and spent in it (leased within `L` before it,
///   while the bucket was refilling). With the default `L` of `n` refill intervals the
///   excess is at most `n` tokens; a shorter `lease_for` lowers it.
/// - The price is fairness: tokens in one replica's lease are not in the bucket, so
///   another replica may refuse a client while the first still holds up to `n - 1` of
///   its tokens, and tokens a lease held when it expired are lost (the fleet admits
///   less, never more). The status a lease-admitted request reports (`RateLimit`
///   fields) is the bucket's at the lease plus the lease's unspent tokens.
///
/// Batching pays off for hot buckets that one replica spends several tokens of within
/// the lease time; for sparse keys it only strands tokens.
///
/// # Invalid options
///
/// [`RedisStore::new`] does not fail: an option the local builder would refuse is
/// reported by [`Store::validate`], which
/// [`build_with`](crate::rate_limit::Builder::build_with) calls, so that `build_with` returns the
/// [`RateLimitConfigError`] (`batch(0)` is [`RateLimitConfigError::ZeroBatch`], `fallback_max_keys(0)` and
/// `lease_max_keys(0)` are [`RateLimitConfigError::ZeroMaxKeys`], a `lease_for` above 4.5 years
/// or a quota too large for the script is [`RateLimitConfigError::TooLarge`]). A store used
/// without `build_with` treats such values as the nearest valid one (zero as one,
/// `lease_for` as 4.5 years) and never panics.
///
/// # Handle
///
/// [`RateLimitHandle::available`](crate::rate_limit::RateLimitHandle::available) answers from the
/// shared bucket's last decision seen by this replica, and
/// [`available_for`](crate::rate_limit::RateLimitHandle::available_for) from the local fallback
/// while it is in use, else the capacity (per-key state lives on Redis).
///
/// # Runtime changes
///
/// [`set_rate`](crate::rate_limit::RateLimitHandle::set_rate),
/// [`set_capacity`](crate::rate_limit::RateLimitHandle::set_capacity) and
/// [`reload`](crate::rate_limit::RateLimitHandle::reload) (feature `serde`) change this
/// replica's quota, from its next request on: apply them on every replica (each replica
/// decides with its own quota, on the shared buckets, until they all have). A reload
/// keeps every option of the `redis` section as the store was built (each one refused
/// with [`NotReloadable`](crate::config::NotReloadable) at its field, `redis.prefix`,
/// `redis.batch`, ...), and refuses a quota the scripts cannot count exactly.
///
/// A bucket on Redis is the time until it is full again (its TAT, on the server's
/// clock), which no quota change rewrites: the next request reads it under the new
/// quota, as that much time's worth of the new refill owed, at most a full bucket's
/// time and `max_wait` (the most a bucket can owe under its own quota; beyond that it
/// counts as empty with its queue full, and is stored so). So the state on Redis means
/// the same to replicas that do not agree on the quota yet, and:
///
/// - A change that keeps the time to fill the bucket (capacity and rate scaled
///   together) keeps the bucket as full as a fraction, as in process.
/// - A change of capacity alone keeps the tokens owed: a bucket of 10 holding 4 owes 6,
///   and holds 94 of 100, or none of 5.
/// - A change of rate alone keeps the time owed: half full of 10 at 1/s owes 5 s, which
///   at 10/s is beyond the full bucket's second, so it is empty, and full a second later.
///
/// Tokens [leased](#local-batching) under the old quota are forfeited (the next request
/// asks Redis), and the [local fallback](WhenUnavailable::Local) moves to its share of the
/// new quota as an in-process store does (as a fraction).
pub struct RedisStore<K = ()> {
    shared: Arc<Shared<K>>,
}

struct Shared<K> {
    connection: RedisConnection,
    /// What it was built with (a reload checks that they stay).
    options: RedisOptions,
    quota: RwLock<Scaled>,
    /// The first invalid option, for [`Store::validate`].
    invalid: Option<RateLimitConfigError>,
    /// Only for [`WhenUnavailable::Local`].
    fallback: Option<LocalStore<K>>,
    health: Health,
    /// The tokens the shared bucket held after its last decision.
    shared_available: AtomicU64,
    /// Only with [`batch`](RedisOptions::batch) above one.
    leases: Option<Arc<Leases<K>>>,
}

impl<K> RedisStore<K>
where
    K: RedisKey + Hash + Eq + Clone + Send + Sync + 'static,
{
    /// A store on the server (or [cluster](RedisStore#on-redis-cluster)) behind
    /// `connection`, for `quota` (the closure given to
    /// [`build_with`](crate::rate_limit::Builder::build_with) receives it).
    ///
    /// Never fails: an invalid option is reported by [`Store::validate`] (and so by
    /// `build_with`); see [invalid options](RedisStore#invalid-options).
    pub fn new(
        connection: impl Into<RedisConnection>,
        quota: Quota,
        options: RedisOptions,
    ) -> Self {
        let connection = connection.into();
        let invalid = options.invalid().or(Scaled::of(quota).err());
        let fallback = match options.when_unavailable {
            WhenUnavailable::Local { replicas } => Some(LocalStore::keyed(
                local_share(quota, replicas),
                options.fallback_max_keys.max(1),
            )),
            WhenUnavailable::Admit | WhenUnavailable::Reject => None,
        };
        let leases = (options.batch > 1).then(|| {
            Arc::new(Leases::new(
                u64::from(options.batch),
                options
                    .lease_for
                    .map(|lease_for| lease_for.min(MAX_LEASE_FOR)),
                options.lease_max_keys.max(1),
            ))
        });
        Self {
            shared: Arc::new(Shared {
                connection,
                quota: RwLock::new(Scaled::unchecked(quota)),
                invalid,
                fallback,
                health: Health::new(options.recheck),
                shared_available: AtomicU64::new(quota.capacity()),
                leases,
                options,
            }),
        }
    }
}

impl<K> RedisStore<K> {
    /// Whether requests go to Redis now (false while the
    /// [`WhenUnavailable`] policy stands in for it).
    pub fn is_redis_up(&self) -> bool {
        !self.shared.health.is_down()
    }
}

/// One replica's share of the fleet's quota.
fn local_share(quota: Quota, replicas: NonZeroU32) -> Quota {
    let replicas = u64::from(replicas.get());
    // The same tokens in `replicas` times the time: the rate divided exactly.
    let (tokens, nanos) = quota.rate();
    nanos
        .checked_mul(replicas)
        .and_then(|nanos| {
            let capacity = quota.capacity().div_ceil(replicas);
            Quota::new(capacity, tokens, Duration::from_nanos(nanos)).ok()
        })
        // Only quotas spanning years do not divide; they keep the fleet's quota.
        .unwrap_or(quota)
}

/// What one request asks of the store, with the quota in force when it asked.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ask {
    pub(super) cost: u64,
    pub(super) max_wait: Duration,
    pub(super) status: StatusWanted,
    pub(super) scaled: Scaled,
}

impl Ask {
    pub(super) fn quota(&self) -> Quota {
        self.scaled.quota
    }
}

type Decided<K> = Result<Admission<RedisReservation<K>>, BoxError>;

impl<K> Shared<K>
where
    K: RedisKey + Hash + Eq + Clone + Send + Sync + 'static,
{
    fn scaled(&self) -> Scaled {
        *read(&self.quota)
    }

    fn quota(&self) -> Quota {
        self.scaled().quota
    }

    fn bucket_key(&self, key: Option<&K>) -> Vec<u8> {
        let mut bucket = Vec::with_capacity(self.options.prefix.len() + 32);
        bucket.extend_from_slice(&self.options.prefix);
        match key {
            Some(key) => {
                bucket.push(b'{');
                key.write_redis_key(&mut bucket);
                bucket.push(b'}');
            }
            None => bucket.extend_from_slice(b"shared"),
        }
        bucket
    }

    /// One round trip; with `refill` when this request fetches its key's next batch.
    async fn decide(
        self: Arc<Self>,
        key: Option<K>,
        ask: Ask,
        refill: Option<Refilling<K>>,
    ) -> Decided<K> {
        let sent = Instant::now();
        let batch = refill.as_ref().map_or(1, Refilling::batch);
        let bucket = self.bucket_key(key.as_ref());
        let invocation = script::gcra(&bucket, &ask, batch);
        let mut connection = self.connection.clone();
        let answer = tokio::time::timeout(
            self.options.timeout,
            invocation.invoke_async::<Reply>(&mut connection),
        )
        .await;
        let unavailable = match answer {
            Ok(Ok(mut reply)) => {
                self.report_up();
                if key.is_none() {
                    self.shared_available.store(reply.left, Ordering::Relaxed);
                }
                if let Some(refill) = refill
                    && reply.taken > 1
                {
                    let left = (reply.taken - 1).saturating_mul(ask.cost);
                    let expires = refill.expiry(sent, ask.quota());
                    refill.fill(Batch {
                        left,
                        expires,
                        bucket_left: reply.left,
                        full_at: sent + reply.until_full,
                        quota: ask.quota(),
                    });
                    // This request's status counts the tokens its replica holds.
                    reply.left = reply.left.saturating_add(left);
                }
                let increment = ask.scaled.token.saturating_mul(ask.cost);
                return Ok(reply.into_admission(bucket, increment, &ask));
            }
            Ok(Err(error)) => RedisUnavailable::failed(error, self.options.recheck),
            Err(_elapsed) => {
                RedisUnavailable::no_answer(self.options.timeout, self.options.recheck)
            }
        };
        self.report_down(&unavailable);
        self.unavailable(key.as_ref(), ask, unavailable)
    }

    /// The [`WhenUnavailable`] policy's decision.
    fn unavailable(&self, key: Option<&K>, ask: Ask, unavailable: RedisUnavailable) -> Decided<K> {
        let Some(fallback) = &self.fallback else {
            return match self.options.when_unavailable {
                WhenUnavailable::Reject => Err(unavailable.into()),
                _ => Ok(Admission::Admitted { status: None }),
            };
        };
        let request = Acquire::new(key, ask.cost)
            .max_wait(ask.max_wait)
            .status(ask.status);
        let admission = fallback.acquire(request).into_now()?;
        Ok(admission.map_reservation(|reservation| RedisReservation {
            reserved_on: ReservedOn::Fallback(reservation),
        }))
    }

    fn report_down(&self, unavailable: &RedisUnavailable) {
        let switched = self.health.failed();
        #[cfg(feature = "tracing")]
        if switched {
            tracing::warn!(
                error = %unavailable,
                policy = ?self.options.when_unavailable,
                recheck = ?self.options.recheck,
                "deciding rate limits by the fallback policy until Redis answers"
            );
        }
        #[cfg(not(feature = "tracing"))]
        let _ = (switched, unavailable);
    }

    fn report_up(&self) {
        let switched = self.health.answered();
        #[cfg(feature = "tracing")]
        if switched {
            tracing::info!("Redis rate limit store answers again; deciding on Redis");
        }
        #[cfg(not(feature = "tracing"))]
        let _ = switched;
    }

    /// Gives a dropped waiter's tokens back on Redis, in the background.
    fn give_back(&self, slot: RedisSlot) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut connection = self.connection.clone();
        let timeout = self.options.timeout;
        runtime.spawn(async move {
            let invocation = script::give_back(&slot);
            // Best effort: if Redis does not answer, the slot stays spent.
            let _ = tokio::time::timeout(timeout, invocation.invoke_async::<i64>(&mut connection))
                .await;
        });
    }
}

impl<K> Store for RedisStore<K>
where
    K: RedisKey + Hash + Eq + Clone + Send + Sync + 'static,
{
    type Key = K;
    type Reservation = RedisReservation<K>;
    type Pending = RedisRoundTrip<K>;

    fn acquire(&self, request: Acquire<'_, K>) -> Answer<Self> {
        let key = shared_or(request.key);
        let scaled = self.shared.scaled();
        let quota = scaled.quota;
        let cost = request.cost;
        if cost > quota.capacity() {
            return Answer::Now(Ok(Admission::Denied(Denied::CostExceedsCapacity {
                cost,
                capacity: quota.capacity(),
            })));
        }
        let ask = Ask {
            cost,
            max_wait: request.max_wait,
            status: request.status,
            scaled,
        };
        let leases = self.shared.leases.as_ref();
        let now = Instant::now();
        if let Some(spent) = leases.and_then(|leases| leases.spend(key, cost, now, quota)) {
            return Answer::Now(Ok(Admission::Admitted {
                status: request.status.report(|| RateLimitStatus {
                    quota,
                    remaining: spent.remaining,
                    reset: spent.reset,
                }),
            }));
        }
        match self.shared.health.route() {
            Route::Redis => {
                // Only an immediate admission fetches a batch: a reservation is one slot.
                let refill = leases
                    .filter(|_| request.max_wait.is_zero())
                    .and_then(|leases| leases.start_refill(key, now));
                let round_trip = self.shared.clone().decide(key.cloned(), ask, refill);
                Answer::Later(RedisRoundTrip {
                    round_trip: Box::pin(round_trip),
                })
            }
            Route::Fallback => {
                let down = RedisUnavailable::down(self.shared.options.recheck);
                Answer::Now(self.shared.unavailable(key, ask, down))
            }
        }
    }

    fn cancel(&self, reservation: RedisReservation<K>) {
        match (reservation.reserved_on, &self.shared.fallback) {
            (ReservedOn::Redis(slot), _) => self.shared.give_back(slot),
            (ReservedOn::Fallback(reservation), Some(fallback)) => fallback.cancel(reservation),
            (ReservedOn::Fallback(_), None) => {}
        }
    }

    fn quota(&self) -> Quota {
        self.shared.quota()
    }

    fn update_quota<F>(&self, change: F) -> Result<(), RateLimitConfigError>
    where
        F: FnOnce(Quota) -> Result<Quota, RateLimitConfigError>,
    {
        let mut quota = write(&self.shared.quota);
        let changed = Scaled::of(change(quota.quota)?)?;
        if let (Some(fallback), WhenUnavailable::Local { replicas }) =
            (&self.shared.fallback, self.shared.options.when_unavailable)
        {
            fallback.update_quota(|_| Ok(local_share(changed.quota, replicas)))?;
        }
        *quota = changed;
        Ok(())
    }

    fn validate(&self) -> Result<(), RateLimitConfigError> {
        self.shared.invalid.clone().map_or(Ok(()), Err)
    }

    /// The `redis` section must be the one the store was built with, field by field, and
    /// the quota one the scripts count exactly.
    #[cfg(feature = "serde")]
    fn check_reload(
        &self,
        config: &crate::config::RateLimitConfig,
        quota: Quota,
    ) -> Result<(), crate::config::ConfigError> {
        config.check_redis_reload(&self.shared.options)?;
        Scaled::of(quota)
            .map(drop)
            .map_err(|error| crate::config::ConfigError::new("capacity", error))
    }

    fn available(&self, key: Option<&K>) -> u64 {
        match (shared_or(key), &self.shared.fallback) {
            (_, Some(fallback)) if self.shared.health.is_down() => fallback.available(key),
            (None, _) => self.shared.shared_available.load(Ordering::Relaxed),
            (Some(_), _) => self.shared.quota().capacity(),
        }
    }

    fn tracked_keys(&self) -> usize {
        self.shared
            .fallback
            .as_ref()
            .map_or(0, LocalStore::tracked_keys)
    }
}

/// A global limiter's key means its shared bucket.
fn shared_or<K: RedisKey>(key: Option<&K>) -> Option<&K> {
    key.filter(|_| !K::GLOBAL)
}

impl<K> Clone for RedisStore<K> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<K> std::fmt::Debug for RedisStore<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field(
                "prefix",
                &String::from_utf8_lossy(&self.shared.options.prefix),
            )
            .field("timeout", &self.shared.options.timeout)
            .field("when_unavailable", &self.shared.options.when_unavailable)
            .field("redis_up", &self.is_redis_up())
            .finish_non_exhaustive()
    }
}

/// A slot a waiting request holds in a [`RedisStore`].
#[derive(Debug)]
pub struct RedisReservation<K> {
    pub(super) reserved_on: ReservedOn<K>,
}

/// Where a [`RedisReservation`] holds its slot.
#[derive(Debug)]
pub(super) enum ReservedOn<K> {
    /// In a bucket on Redis.
    Redis(RedisSlot),
    /// In the local fallback's bucket (reserved while Redis was away).
    Fallback(LocalReservation<K>),
}

/// A slot reserved on Redis: the bucket's key, the TAT the reservation left (as stored)
/// and its increment, in units of which a microsecond is `unit`.
#[derive(Debug)]
pub(super) struct RedisSlot {
    pub(super) bucket: Vec<u8>,
    pub(super) tat: String,
    pub(super) increment: u64,
    pub(super) unit: u64,
}

/// A [`RedisStore`]'s answer still to come: the round trip to Redis (boxed: an `async`
/// block's type has no name), and the fallback policy's decision if Redis does not
/// answer within the timeout.
pub struct RedisRoundTrip<K> {
    round_trip: Pin<Box<dyn Future<Output = Decided<K>> + Send>>,
}

impl<K> Future for RedisRoundTrip<K> {
    type Output = Decided<K>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Decided<K>> {
        self.round_trip.as_mut().poll(cx)
    }
}

impl<K> std::fmt::Debug for RedisRoundTrip<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRoundTrip").finish_non_exhaustive()
    }
}
