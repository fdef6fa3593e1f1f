//! A fleet-wide [`Store`] on Redis (feature `redis`).

use std::future::Future;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::{RedisError, Script};
use tokio::time::Instant;
use tower::BoxError;

use self::health::{Health, Route};
pub use self::key::RedisKey;
use self::lease::{Batch, Leases, Refilling};
use super::bucket::{Denied, Quota, gcd};
use super::error::RateLimitConfigError;
use super::layer::RateLimitStatus;
use super::store::{Decision, LocalReservation, LocalStore, Store};
use crate::sync::{AtomicU64, Ordering, read, write};

mod health;
mod key;
mod lease;

static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("bucket.lua"),
        include_str!("gcra.lua")
    ))
});
static GIVE_BACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("bucket.lua"),
        include_str!("give_back.lua")
    ))
});

/// The largest tolerance the scripts count in (units): with a wait capped the same, every
/// number they compute stays below 2^53, exact in Lua's doubles.
const MAX_REDIS_SPAN: u64 = 1 << 51;
/// The longest [`lease_for`](RedisOptions::lease_for): 2^57 ns, 4.5 years, like the
/// longest `max_wait`.
const MAX_LEASE_FOR: Duration = Duration::from_nanos(1 << 57);

/// A [`Store`] that keeps the buckets on a Redis server (or Valkey, or any server that
/// runs Redis Lua scripts), so that every replica of a service draws from the same
/// buckets: a fleet-wide limit.
///
/// Plug it in with [`Builder::build_with`](super::Builder::build_with); the layer's
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
/// [`build_with`](super::Builder::build_with) and from the handle's setters.
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
/// `palisade:rl:shared`. Each script touches one
/// key, so the store works on Redis Cluster; the braces are a hash tag, so a Cluster
/// spreads clients across its nodes (put a hash tag in the prefix instead to keep all of
/// a limiter's buckets on one node). Two limiters sharing a server need different
/// prefixes. Every key expires when its bucket is full again: idle clients cost nothing.
///
/// # When Redis is slow or down
///
/// A request waits at most the [`timeout`](RedisOptions::timeout) (default 5 ms) for
/// Redis. On a timeout or an error the store applies its
/// [`WhenUnavailable`] policy to that request, marks Redis down (logged once, with the
/// `tracing` feature) and sends later requests straight to the policy, letting one
/// request every [`recheck`](RedisOptions::recheck) (default 100 ms) ask Redis again.
/// The first answer switches every request back to Redis (logged once too). The
/// [`ConnectionManager`] reconnects on its own meanwhile; its retry settings bound how
/// soon it notices that the server is back.
///
/// # Waiting
///
/// With [`max_wait`](super::Builder::max_wait), the script reserves a slot on the
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
/// [`max_wait`](super::Builder::max_wait) every request reserves its own slot on Redis.
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
/// [`build_with`](super::Builder::build_with) calls, so that `build_with` returns the
/// [`RateLimitConfigError`] (`batch(0)` is [`RateLimitConfigError::ZeroBatch`], `fallback_max_keys(0)` and
/// `lease_max_keys(0)` are [`RateLimitConfigError::ZeroMaxKeys`], a `lease_for` above 4.5 years
/// or a quota too large for the script is [`RateLimitConfigError::TooLarge`]). A store used
/// without `build_with` treats such values as the nearest valid one (zero as one,
/// `lease_for` as 4.5 years) and never panics.
///
/// # Handle
///
/// [`RateLimitHandle::available`](super::RateLimitHandle::available) answers from the
/// shared bucket's last decision seen by this replica, and
/// [`available_for`](super::RateLimitHandle::available_for) from the local fallback
/// while it is in use, else the capacity (per-key state lives on Redis).
/// [`set_rate`](super::RateLimitHandle::set_rate) and
/// [`set_capacity`](super::RateLimitHandle::set_capacity) change this replica's quota
/// (apply them on every replica); a bucket on Redis keeps the time it needs to be full
/// again, re-read in the new quota on its next request.
pub struct RedisStore<K = ()> {
    shared: Arc<Shared<K>>,
}

struct Shared<K> {
    connection: ConnectionManager,
    prefix: Vec<u8>,
    timeout: Duration,
    recheck: Duration,
    when_unavailable: WhenUnavailable,
    quota: RwLock<Scaled>,
    /// The first invalid option, for [`Store::validate`].
    invalid: Option<RateLimitConfigError>,
    /// Only for [`WhenUnavailable::Local`].
    fallback: Option<LocalStore<K>>,
    health: Health,
    /// The tokens the shared bucket held after its last decision.
    shared_available: AtomicU64,
    /// Only with [`batch`](RedisOptions::batch) above one.
    leases: Option<Leases<K>>,
}

/// What a [`RedisStore`] does with a request when Redis does not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhenUnavailable {
    /// Admit it (fail open; the default): the limit lapses while Redis is away, the
    /// service does not.
    Admit,
    /// Refuse it with [`RedisUnavailable`] (fail closed).
    Reject,
    /// Decide in process, on buckets with the capacity and the rate divided by
    /// `replicas` (the capacity rounded up), so that the fleet as a whole keeps roughly
    /// its limit. Only requests decided while Redis is away touch these buckets (full
    /// at the first outage; later outages find them refilled since the last).
    Local {
        /// How many replicas share the limit.
        replicas: NonZeroU32,
    },
}

/// How a [`RedisStore`] names its keys and copes with a slow or absent Redis.
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisOptions {
    prefix: Vec<u8>,
    timeout: Duration,
    recheck: Duration,
    when_unavailable: WhenUnavailable,
    fallback_max_keys: usize,
    batch: u32,
    lease_for: Option<Duration>,
    lease_max_keys: usize,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            prefix: b"palisade:rl:".to_vec(),
            timeout: Duration::from_millis(5),
            recheck: Duration::from_millis(100),
            when_unavailable: WhenUnavailable::Admit,
            fallback_max_keys: 100_000,
            batch: 1,
            lease_for: None,
            lease_max_keys: 10_000,
        }
    }
}

impl RedisOptions {
    /// The start of every key of this limiter (default `palisade:rl:`).
    pub fn prefix(mut self, prefix: impl Into<Vec<u8>>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a request waits for Redis before the
    /// [`when_unavailable`](Self::when_unavailable) policy decides it (default 5 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// While Redis is down, how often one request asks it again (default 100 ms).
    pub fn recheck(mut self, recheck: Duration) -> Self {
        self.recheck = recheck;
        self
    }

    /// What to do with requests while Redis does not answer (default
    /// [`WhenUnavailable::Admit`]).
    pub fn when_unavailable(mut self, policy: WhenUnavailable) -> Self {
        self.when_unavailable = policy;
        self
    }

    /// The most keys the [local fallback](WhenUnavailable::Local) tracks (default
    /// 100,000; 0 is [`RateLimitConfigError::ZeroMaxKeys`]; see
    /// [`Builder::max_keys`](super::Builder::max_keys)).
    pub fn fallback_max_keys(mut self, max_keys: usize) -> Self {
        self.fallback_max_keys = max_keys;
        self
    }

    /// Lease tokens `n` requests at a time (default 1: no batching, one round trip per
    /// request; 0 is [`RateLimitConfigError::ZeroBatch`]). See
    /// [local batching](RedisStore#local-batching).
    pub fn batch(mut self, n: u32) -> Self {
        self.batch = n;
        self
    }

    /// How long a [batch](Self::batch)'s unspent tokens stay usable (default: the time
    /// the bucket takes to refill a batch, `n` refill intervals, at most one second;
    /// above 4.5 years is [`RateLimitConfigError::TooLarge`]; zero: a lease expires at once).
    pub fn lease_for(mut self, lease_for: Duration) -> Self {
        self.lease_for = Some(lease_for);
        self
    }

    /// The most keys holding a [batch](Self::batch) at once (default 10,000; 0 is
    /// [`RateLimitConfigError::ZeroMaxKeys`]): beyond it, the requests of new keys go to Redis one
    /// by one until leases expire.
    pub fn lease_max_keys(mut self, max_keys: usize) -> Self {
        self.lease_max_keys = max_keys;
        self
    }
}

impl<K> RedisStore<K>
where
    K: RedisKey + Hash + Eq + Clone + Send + Sync + 'static,
{
    /// A store on the server behind `connection`, for `quota` (the closure given to
    /// [`build_with`](super::Builder::build_with) receives it).
    ///
    /// Never fails: an invalid option is reported by [`Store::validate`] (and so by
    /// `build_with`); see [invalid options](RedisStore#invalid-options).
    pub fn new(connection: ConnectionManager, quota: Quota, options: RedisOptions) -> Self {
        let invalid = options.invalid().or(Scaled::of(quota).err());
        let fallback = match options.when_unavailable {
            WhenUnavailable::Local { replicas } => Some(LocalStore::keyed(
                local_share(quota, replicas),
                options.fallback_max_keys.max(1),
            )),
            WhenUnavailable::Admit | WhenUnavailable::Reject => None,
        };
        Self {
            shared: Arc::new(Shared {
                connection,
                prefix: options.prefix,
                timeout: options.timeout,
                recheck: options.recheck,
                when_unavailable: options.when_unavailable,
                quota: RwLock::new(Scaled::unchecked(quota)),
                invalid,
                fallback,
                health: Health::new(options.recheck),
                shared_available: AtomicU64::new(quota.capacity()),
                leases: (options.batch > 1).then(|| {
                    Leases::new(
                        u64::from(options.batch),
                        options
                            .lease_for
                            .map(|lease_for| lease_for.min(MAX_LEASE_FOR)),
                        options.lease_max_keys.max(1),
                    )
                }),
            }),
        }
    }
}

impl RedisOptions {
    /// The first option the local builder would refuse too (a value that is ignored, such
    /// as `lease_max_keys` without batching, is not checked).
    fn invalid(&self) -> Option<RateLimitConfigError> {
        let batching = self.batch > 1;
        let local = matches!(self.when_unavailable, WhenUnavailable::Local { .. });
        if self.batch == 0 {
            Some(RateLimitConfigError::ZeroBatch)
        } else if (local && self.fallback_max_keys == 0) || (batching && self.lease_max_keys == 0) {
            Some(RateLimitConfigError::ZeroMaxKeys)
        } else if batching
            && self
                .lease_for
                .is_some_and(|lease_for| lease_for > MAX_LEASE_FOR)
        {
            Some(RateLimitConfigError::TooLarge)
        } else {
            None
        }
    }
}

/// A quota with the units the scripts count it in: a token is `token` units and a
/// microsecond `unit` (the rate in lowest terms, per microsecond).
#[derive(Debug, Clone, Copy)]
struct Scaled {
    quota: Quota,
    token: u64,
    unit: u64,
}

impl Scaled {
    /// `quota` in the scripts' units, if they count it exactly.
    fn of(quota: Quota) -> Result<Self, RateLimitConfigError> {
        let scaled = Self::unchecked(quota);
        match quota.capacity().checked_mul(scaled.token) {
            Some(tolerance) if tolerance <= MAX_REDIS_SPAN => Ok(scaled),
            _ => Err(RateLimitConfigError::TooLarge),
        }
    }

    /// `quota` in the scripts' units, even if they cannot count it exactly (a store whose
    /// quota [`validate`](Store::validate) refused still decides, never panics).
    fn unchecked(quota: Quota) -> Self {
        // `tokens` refills take exactly `nanos`, so `1000 * tokens` take `nanos` µs.
        let (tokens, nanos) = quota.rate();
        let per_micro = u128::from(tokens) * 1000;
        let common = gcd(per_micro, u128::from(nanos));
        Self {
            quota,
            // Cannot truncate: each is at most the number it was divided from, and
            // `tokens` is at most 2^24.
            token: (u128::from(nanos) / common) as u64,
            unit: (per_micro / common) as u64,
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

/// What one request asks of the store.
#[derive(Debug, Clone, Copy)]
struct Ask {
    cost: u64,
    max_wait: Duration,
    with_status: bool,
    scaled: Scaled,
}

impl Ask {
    fn quota(&self) -> Quota {
        self.scaled.quota
    }
}

/// The GCRA script's answer: admitted (0/1), wait and time until full (microseconds,
/// rounded up), tokens left, the TAT stored, and how many times the cost it took (a
/// batch).
type Reply = (i64, i64, i64, i64, String, i64);

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
        let mut bucket = Vec::with_capacity(self.prefix.len() + 32);
        bucket.extend_from_slice(&self.prefix);
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

    /// One round trip; `refill` when this request fetches its key's next batch.
    async fn decide(
        self: Arc<Self>,
        key: Option<K>,
        ask: Ask,
        refill: bool,
    ) -> Result<Decision<RedisReservation<K>>, BoxError> {
        let sent = Instant::now();
        let lease = match &self.leases {
            Some(leases) if refill => Some((Refilling::new(leases, key.as_ref()), leases)),
            _ => None,
        };
        let batch = lease.as_ref().map_or(1, |(_, leases)| leases.batch());
        let bucket = self.bucket_key(key.as_ref());
        let scaled = ask.scaled;
        let mut invocation = GCRA.prepare_invoke();
        invocation
            .key(&bucket)
            .arg(scaled.token)
            .arg(scaled.unit)
            .arg(ask.quota().capacity())
            .arg(ask.cost)
            .arg(micros_down(ask.max_wait))
            .arg(batch);
        let mut connection = self.connection.clone();
        let answer = tokio::time::timeout(
            self.timeout,
            invocation.invoke_async::<Reply>(&mut connection),
        )
        .await;
        let cause = match answer {
            Ok(Ok(mut reply)) => {
                self.report_up();
                if key.is_none() {
                    self.shared_available
                        .store(non_negative(reply.2), Ordering::Relaxed);
                }
                if let Some((refilling, leases)) = lease
                    && reply.5 > 1
                {
                    let left = (non_negative(reply.5) - 1) * ask.cost;
                    refilling.fill(Batch {
                        left,
                        expires: leases.expiry(sent, ask.quota()),
                        bucket_left: non_negative(reply.2),
                        full_at: sent + Duration::from_micros(non_negative(reply.3)),
                    });
                    // This request's status counts the tokens its replica holds.
                    reply.2 = reply.2.saturating_add_unsigned(left);
                }
                let increment = scaled.token.saturating_mul(ask.cost);
                return Ok(decision(reply, bucket, increment, ask));
            }
            Ok(Err(error)) => Cause::Failed(error),
            Err(_elapsed) => Cause::TimedOut(self.timeout),
        };
        self.report_down(&cause);
        self.unavailable(key.as_ref(), ask, cause)
    }

    /// The [`WhenUnavailable`] policy's decision.
    fn unavailable(
        &self,
        key: Option<&K>,
        ask: Ask,
        cause: Cause,
    ) -> Result<Decision<RedisReservation<K>>, BoxError> {
        let Some(fallback) = &self.fallback else {
            return match self.when_unavailable {
                WhenUnavailable::Reject => Err(RedisUnavailable {
                    cause,
                    retry_after: self.recheck,
                }
                .into()),
                _ => Ok(Decision::Admitted { status: None }),
            };
        };
        let decision = fallback
            .acquire(key, ask.cost, ask.max_wait, ask.with_status)
            .into_inner()?;
        Ok(match decision {
            Decision::Admitted { status } => Decision::Admitted { status },
            Decision::Reserved { wait, reservation } => Decision::Reserved {
                wait,
                reservation: RedisReservation {
                    held: Held::Local(reservation),
                },
            },
            Decision::Denied(denied) => Decision::Denied(denied),
        })
    }

    fn report_down(&self, cause: &Cause) {
        let switched = self.health.failed();
        #[cfg(feature = "tracing")]
        if switched {
            tracing::warn!(
                %cause,
                policy = ?self.when_unavailable,
                recheck = ?self.recheck,
                "Redis rate limit store unavailable; deciding by the fallback policy until it answers"
            );
        }
        #[cfg(not(feature = "tracing"))]
        let _ = (switched, cause);
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
    fn give_back(&self, held: Remote) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut connection = self.connection.clone();
        let timeout = self.timeout;
        runtime.spawn(async move {
            let mut invocation = GIVE_BACK.prepare_invoke();
            invocation
                .key(held.bucket)
                .arg(held.tat)
                .arg(held.increment)
                .arg(held.unit);
            // Best effort: if Redis does not answer, the slot stays spent.
            let _ = tokio::time::timeout(timeout, invocation.invoke_async::<i64>(&mut connection))
                .await;
        });
    }
}

fn decision<K>(
    reply: Reply,
    bucket: Vec<u8>,
    increment: u64,
    ask: Ask,
) -> Decision<RedisReservation<K>> {
    let (admitted, wait, left, until_full, tat, _) = reply;
    let wait = Duration::from_micros(non_negative(wait));
    let remaining = non_negative(left);
    if admitted == 0 {
        return Decision::Denied(Denied::Limited {
            retry_after: wait,
            remaining,
        });
    }
    if wait.is_zero() {
        return Decision::Admitted {
            status: ask.with_status.then(|| RateLimitStatus {
                quota: ask.quota(),
                remaining,
                reset: Duration::from_micros(non_negative(until_full)),
            }),
        };
    }
    Decision::Reserved {
        wait,
        reservation: RedisReservation {
            held: Held::Remote(Remote {
                bucket,
                tat,
                increment,
                unit: ask.scaled.unit,
            }),
        },
    }
}

fn non_negative(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Rounded down, so that no request waits longer than allowed.
fn micros_down(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

impl<K> Store for RedisStore<K>
where
    K: RedisKey + Hash + Eq + Clone + Send + Sync + 'static,
{
    type Key = K;
    type Reservation = RedisReservation<K>;
    type Future = RedisDecision<K>;

    fn acquire(
        &self,
        key: Option<&K>,
        cost: u64,
        max_wait: Duration,
        with_status: bool,
    ) -> RedisDecision<K> {
        let key = shared_or(key);
        let scaled = self.shared.scaled();
        let quota = scaled.quota;
        if cost > quota.capacity() {
            return RedisDecision::ready(Ok(Decision::Denied(Denied::CostExceedsCapacity {
                cost,
                capacity: quota.capacity(),
            })));
        }
        let ask = Ask {
            cost,
            max_wait,
            with_status,
            scaled,
        };
        let leases = self.shared.leases.as_ref();
        let now = Instant::now();
        if let Some(spent) = leases.and_then(|leases| leases.spend(key, cost, now)) {
            return RedisDecision::ready(Ok(Decision::Admitted {
                status: with_status.then_some(RateLimitStatus {
                    quota,
                    remaining: spent.remaining,
                    reset: spent.reset,
                }),
            }));
        }
        match self.shared.health.route() {
            Route::Redis => {
                // Only an immediate admission fetches a batch: a reservation is one slot.
                let refill = max_wait.is_zero()
                    && leases.is_some_and(|leases| leases.start_refill(key, now));
                RedisDecision {
                    state: DecisionState::Remote(Box::pin(self.shared.clone().decide(
                        key.cloned(),
                        ask,
                        refill,
                    ))),
                }
            }
            Route::Fallback => RedisDecision::ready(self.shared.unavailable(key, ask, Cause::Down)),
        }
    }

    fn cancel(&self, reservation: RedisReservation<K>) {
        match (reservation.held, &self.shared.fallback) {
            (Held::Remote(held), _) => self.shared.give_back(held),
            (Held::Local(reservation), Some(fallback)) => fallback.cancel(reservation),
            (Held::Local(_), None) => {}
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
            (&self.shared.fallback, self.shared.when_unavailable)
        {
            fallback.update_quota(|_| Ok(local_share(changed.quota, replicas)))?;
        }
        *quota = changed;
        Ok(())
    }

    fn validate(&self) -> Result<(), RateLimitConfigError> {
        self.shared.invalid.clone().map_or(Ok(()), Err)
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
            .field("prefix", &String::from_utf8_lossy(&self.shared.prefix))
            .field("timeout", &self.shared.timeout)
            .field("when_unavailable", &self.shared.when_unavailable)
            .field("redis_up", &self.is_redis_up())
            .finish_non_exhaustive()
    }
}

/// A slot a waiting request holds in a [`RedisStore`].
#[derive(Debug)]
pub struct RedisReservation<K> {
    held: Held<K>,
}

#[derive(Debug)]
enum Held<K> {
    /// On Redis.
    Remote(Remote),
    /// In the local fallback.
    Local(LocalReservation<K>),
}

/// A slot reserved on Redis: the bucket's key, the TAT the reservation left (as stored)
/// and its increment, in units of which a microsecond is `unit`.
#[derive(Debug)]
struct Remote {
    bucket: Vec<u8>,
    tat: String,
    increment: u64,
    unit: u64,
}

type Answer<K> = Result<Decision<RedisReservation<K>>, BoxError>;

/// A [`RedisStore`]'s decision: the round trip to Redis, or an answer known at once
/// (while Redis is down, or for a request costing more than the capacity).
pub struct RedisDecision<K> {
    state: DecisionState<K>,
}

enum DecisionState<K> {
    Ready(Option<Answer<K>>),
    Remote(Pin<Box<dyn Future<Output = Answer<K>> + Send>>),
}

impl<K> RedisDecision<K> {
    fn ready(answer: Answer<K>) -> Self {
        Self {
            state: DecisionState::Ready(Some(answer)),
        }
    }
}

// Nothing in here is pinned structurally: the remote future is boxed.
impl<K> Unpin for RedisDecision<K> {}

impl<K> Future for RedisDecision<K> {
    type Output = Answer<K>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer<K>> {
        match &mut self.state {
            DecisionState::Ready(answer) => Poll::Ready(
                answer
                    .take()
                    .unwrap_or_else(|| Err("Redis decision polled after completion".into())),
            ),
            DecisionState::Remote(future) => future.as_mut().poll(cx),
        }
    }
}

impl<K> std::fmt::Debug for RedisDecision<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDecision").finish_non_exhaustive()
    }
}

/// A request refused because Redis did not answer and the store is configured to fail
/// closed ([`WhenUnavailable::Reject`]).
#[derive(Debug)]
pub struct RedisUnavailable {
    cause: Cause,
    retry_after: Duration,
}

#[derive(Debug)]
enum Cause {
    TimedOut(Duration),
    Failed(RedisError),
    /// An earlier request found Redis down; nobody asked it again yet.
    Down,
}

impl RedisUnavailable {
    /// When the store asks Redis again at the latest.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// Whether this request waited the whole timeout for Redis.
    pub fn timed_out(&self) -> bool {
        matches!(self.cause, Cause::TimedOut(_))
    }

    /// How this rejection describes itself: the store is
    /// [`Unavailable`](crate::rejection::RejectionKind::Unavailable) until
    /// [`retry_after`](Self::retry_after). The reason does not name the Redis failure,
    /// which is the server's business.
    pub fn rejection(&self) -> crate::rejection::Rejection {
        crate::rejection::Rejection::new(
            crate::rejection::RejectionKind::Unavailable,
            "rate limit store unavailable",
        )
        .with_retry_after(self.retry_after)
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::TimedOut(timeout) => write!(f, "no answer within {timeout:?}"),
            Cause::Failed(error) => write!(f, "{error}"),
            Cause::Down => f.write_str("not answering"),
        }
    }
}

impl std::fmt::Display for RedisUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rate limit store (Redis) unavailable: {}", self.cause)
    }
}

impl std::error::Error for RedisUnavailable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.cause {
            Cause::Failed(error) => Some(error),
            Cause::TimedOut(_) | Cause::Down => None,
        }
    }
}
