//! Where bucket state lives: the [`Store`] trait and the in-process [`LocalStore`].

use std::convert::Infallible;
use std::future::Future;
use std::hash::Hash;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower::BoxError;

use super::bucket::{Claim, Denied, Quota, TokenBucket, Verdict};
use super::error::RateLimitConfigError;
use super::keyed::{Clock, KeyedBuckets, KeyedClaim};
use super::layer::RateLimitStatus;

/// The bucket state behind a [`RateLimitLayer`](super::RateLimitLayer).
///
/// The layer asks the store for one [`Admission`] per request and otherwise knows
/// nothing of where the buckets live. A store answers [at once](Answer::Now) (the
/// in-process [`LocalStore`], whose answer is a few atomic operations) or
/// [later](Answer::Later), through a future the layer's response future polls (a
/// fleet-wide store such as `RedisStore`, after its round trip). Its
/// [`Pending`](Store::Pending) type says which: a store that always answers at once
/// names [`NeverPending`], which cannot be made, and the layer carries no pending state
/// for it. A store may answer at once for some requests and later for others.
///
/// `request.key` is `None` for the shared bucket: the only bucket of a global limiter,
/// and the fallback bucket of a keyed one.
///
/// A store that admits a request for later ([`Admission::Reserved`]) holds its slot in a
/// [`Reservation`](Store::Reservation). The layer makes the request wait, and hands the
/// reservation back to [`cancel`](Store::cancel) if the request is dropped before its
/// turn; a reservation whose request went ahead is dropped.
///
/// # Example
///
/// A store that decides on "another server": a task that owns the bucket and answers
/// over a channel, as a remote store would after a round trip.
///
/// ```
/// use std::future::Future;
/// use std::pin::Pin;
/// use std::sync::Arc;
/// use std::task::{Context, Poll};
/// use std::time::Duration;
///
/// use palisade::rate_limit::{
///     Acquire, Admission, Answer, Quota, RateLimitConfigError, RateLimitLayer, RateLimited,
///     Reservation, Store, TokenBucket,
/// };
/// use tokio::sync::{mpsc, oneshot};
/// use tokio::time::Instant;
/// use tower::{BoxError, Service, ServiceExt, service_fn};
///
/// /// What the "server" is asked.
/// enum Message {
///     Acquire { cost: u64, max_wait: Duration, reply: oneshot::Sender<Admission<Reservation>> },
///     Cancel(Reservation),
/// }
///
/// struct ServerStore {
///     /// The server's bucket, which this example also reads and reconfigures directly.
///     bucket: Arc<TokenBucket>,
///     server: mpsc::UnboundedSender<Message>,
/// }
///
/// impl ServerStore {
///     /// Starts the "server" (it runs until the store is dropped).
///     fn start(quota: Quota) -> Self {
///         let bucket = Arc::new(TokenBucket::new(quota, Instant::now()));
///         let (server, mut inbox) = mpsc::unbounded_channel();
///         let on_server = bucket.clone();
///         tokio::spawn(async move {
///             let bucket = on_server;
///             while let Some(message) = inbox.recv().await {
///                 match message {
///                     Message::Acquire { cost, max_wait, reply } => {
///                         let admission = match bucket.reserve(cost, max_wait, Instant::now()) {
///                             Ok(slot) if slot.wait().is_zero() => Admission::Admitted { status: None },
///                             Ok(slot) => Admission::Reserved { wait: slot.wait(), reservation: slot },
///                             Err(denied) => Admission::Denied(denied),
///                         };
///                         let _ = reply.send(admission);
///                     }
///                     Message::Cancel(slot) => bucket.cancel(slot),
///                 }
///             }
///         });
///         Self { bucket, server }
///     }
/// }
///
/// /// The answer on its way back.
/// struct Reply(oneshot::Receiver<Admission<Reservation>>);
///
/// impl Future for Reply {
///     type Output = Result<Admission<Reservation>, BoxError>;
///
///     fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
///         Pin::new(&mut self.0).poll(cx).map_err(|_| "the server went away".into())
///     }
/// }
///
/// impl Store for ServerStore {
///     type Key = ();
///     type Reservation = Reservation;
///     type Pending = Reply;
///
///     fn acquire(&self, request: Acquire<'_, ()>) -> Answer<Self> {
///         let (reply, answer) = oneshot::channel();
///         let message = Message::Acquire { cost: request.cost, max_wait: request.max_wait, reply };
///         if self.server.send(message).is_err() {
///             return Answer::Now(Err("the server went away".into()));
///         }
///         Answer::Later(Reply(answer))
///     }
///
///     fn cancel(&self, reservation: Reservation) {
///         let _ = self.server.send(Message::Cancel(reservation));
///     }
///
///     fn quota(&self) -> Quota {
///         self.bucket.quota()
///     }
///
///     fn update_quota<F>(&self, change: F) -> Result<(), RateLimitConfigError>
///     where
///         F: FnOnce(Quota) -> Result<Quota, RateLimitConfigError>,
///     {
///         self.bucket.set_quota(change(self.bucket.quota())?, Instant::now());
///         Ok(())
///     }
///
///     fn available(&self, _key: Option<&()>) -> u64 {
///         self.bucket.available(Instant::now())
///     }
///
///     fn tracked_keys(&self) -> usize {
///         0
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), BoxError> {
/// let limit = RateLimitLayer::builder()
///     .capacity(1)
///     .refill(1, Duration::from_secs(1))
///     .build_with(ServerStore::start)?;
/// let mut service = tower::ServiceBuilder::new()
///     .layer(limit)
///     .service(service_fn(|request: u32| async move { Ok::<_, BoxError>(request) }));
/// assert_eq!(service.ready().await?.call(1).await?, 1);
/// let refused = service.ready().await?.call(2).await.unwrap_err();
/// assert!(refused.is::<RateLimited>());
/// # Ok(())
/// # }
/// ```
///
/// `tests/rate_limit_store.rs` runs such a store with reservations, and checks that a
/// request dropped while the store decides or while it waits leaks nothing.
pub trait Store: Send + Sync + 'static {
    /// The key type of a keyed limiter (`()` for a global one).
    type Key;
    /// A slot a waiting request holds; handed to [`cancel`](Store::cancel) when the
    /// request is dropped before its turn.
    type Reservation: Send + 'static;
    /// An answer still to come ([`Answer::Later`]); [`NeverPending`] for a store that
    /// always answers at once.
    type Pending: Future<Output = Result<Admission<Self::Reservation>, BoxError>>;

    /// Charges `request.cost` tokens to `request.key`'s bucket, or reserves them within
    /// `request.max_wait`. The status on admission is asked for only when
    /// `request.status` is [`StatusWanted::Yes`] (the layer asks when it adds the
    /// `RateLimit` fields to responses).
    fn acquire(&self, request: Acquire<'_, Self::Key>) -> Answer<Self>;

    /// Hands back the slot of a request that gave up waiting (best effort).
    fn cancel(&self, reservation: Self::Reservation);

    /// The quota in force.
    fn quota(&self) -> Quota;

    /// Replaces the quota with `change(current)`, in one step (a request is decided under
    /// the old quota or the new one). The in-process store carries the tokens over as the
    /// [module docs](super#runtime-changes) describe; a remote store documents its own
    /// rule.
    fn update_quota<F>(&self, change: F) -> Result<(), RateLimitConfigError>
    where
        F: FnOnce(Quota) -> Result<Quota, RateLimitConfigError>;

    /// The tokens `key`'s bucket holds now (a remote store may answer from what it last
    /// saw).
    fn available(&self, key: Option<&Self::Key>) -> u64;

    /// How many per-key buckets the store holds (zero for a global limiter).
    fn tracked_keys(&self) -> usize;

    /// Checks the store's own options (the quota it was made for included):
    /// [`build_with`](super::Builder::build_with) returns this error. The default accepts
    /// everything.
    fn validate(&self) -> Result<(), RateLimitConfigError> {
        Ok(())
    }

    /// Checks, before anything changes, that a live
    /// [`reload`](super::RateLimitHandle::reload) to `config` can switch this store to
    /// `quota` (which passed the builder's own validation): the store's options, which a
    /// reload cannot change, are what it was built with, and `quota` is one it can
    /// enforce. An error names its field (a difference is a
    /// [`NotReloadable`](crate::config::NotReloadable)); it is the reload's error, and
    /// nothing changes. The default accepts every quota and refuses a `redis` section: a
    /// store of your own (like [`LocalStore`]) is built without one. (Feature `serde`.)
    #[cfg(feature = "serde")]
    fn check_reload(
        &self,
        config: &crate::config::RateLimitConfig,
        quota: Quota,
    ) -> Result<(), crate::config::ConfigError> {
        let _ = quota;
        config.check_not_on_redis()
    }
}

/// What the layer asks a [`Store`] for one request.
#[derive(Debug)]
#[non_exhaustive]
pub struct Acquire<'a, K> {
    /// The request's bucket: `None` for the shared bucket.
    pub key: Option<&'a K>,
    /// The tokens the request costs.
    pub cost: u64,
    /// How long the request may wait for its tokens (zero: admit now or refuse).
    pub max_wait: Duration,
    /// Whether to report the bucket's state on admission.
    pub status: StatusWanted,
}

impl<'a, K> Acquire<'a, K> {
    /// `cost` tokens from `key`'s bucket, now or never, without the status.
    pub fn new(key: Option<&'a K>, cost: u64) -> Self {
        Self {
            key,
            cost,
            max_wait: Duration::ZERO,
            status: StatusWanted::No,
        }
    }

    /// Lets the request wait up to `max_wait` for its tokens.
    pub fn max_wait(self, max_wait: Duration) -> Self {
        Self { max_wait, ..self }
    }

    /// Asks for the bucket's state on admission, or not.
    pub fn status(self, status: StatusWanted) -> Self {
        Self { status, ..self }
    }
}

// Not derived: a derive would ask `K: Clone` of a request that holds only `&K`.
impl<K> Clone for Acquire<'_, K> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K> Copy for Acquire<'_, K> {}

/// Whether a [`Store`] reports the bucket's [`RateLimitStatus`] with an admission: only
/// when something reads it, since computing it costs a local store a little.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusWanted {
    /// Report it ([`Admission::Admitted`]'s `status` is `Some`).
    Yes,
    /// Nobody reads it: leave it out.
    No,
}

impl StatusWanted {
    /// `status()` if the status is wanted, else `None` (without calling `status`).
    #[inline]
    pub fn report(self, status: impl FnOnce() -> RateLimitStatus) -> Option<RateLimitStatus> {
        match self {
            StatusWanted::Yes => Some(status()),
            StatusWanted::No => None,
        }
    }
}

/// A [`Store`]'s answer to [`acquire`](Store::acquire): known now, or still to come.
pub enum Answer<St: Store + ?Sized> {
    /// Decided at once: the layer calls the inner service (or refuses) within `call`.
    Now(Result<Admission<St::Reservation>, BoxError>),
    /// Decided when this future resolves: the response future polls it.
    Later(St::Pending),
}

impl<St> Answer<St>
where
    St: Store<Pending = NeverPending<<St as Store>::Reservation>> + ?Sized,
{
    /// The answer of a store that always answers at once.
    pub fn into_now(self) -> Result<Admission<St::Reservation>, BoxError> {
        match self {
            Answer::Now(decided) => decided,
            Answer::Later(never) => match never.never {},
        }
    }
}

impl<St> std::fmt::Debug for Answer<St>
where
    St: Store + ?Sized,
    St::Reservation: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Now(decided) => f.debug_tuple("Now").field(decided).finish(),
            Answer::Later(_) => f.debug_tuple("Later").finish_non_exhaustive(),
        }
    }
}

/// The [`Pending`](Store::Pending) type of a store that always answers at once: it has
/// no values, so [`Answer::Later`] cannot be made with it and a layer on such a store
/// carries no pending state.
pub struct NeverPending<R> {
    never: Infallible,
    // `fn() -> R`: what the future would yield, without asking `R: Send + Sync + Unpin`.
    reservation: PhantomData<fn() -> R>,
}

impl<R> Future for NeverPending<R> {
    type Output = Result<Admission<R>, BoxError>;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        match self.never {}
    }
}

impl<R> std::fmt::Debug for NeverPending<R> {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.never {}
    }
}

/// A [`Store`]'s decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission<R> {
    /// Go ahead now.
    Admitted {
        /// The bucket's state after the request, if [wanted](StatusWanted).
        status: Option<RateLimitStatus>,
    },
    /// Go ahead after `wait`; the slot is held by `reservation` until then.
    Reserved {
        /// How long to wait.
        wait: Duration,
        /// The slot, to hand back if the request gives up.
        reservation: R,
    },
    /// Refused.
    Denied(Denied),
}

impl<R> Admission<R> {
    /// The same decision with the reservation (if any) made into another (a store that
    /// wraps another store's reservations in its own).
    pub fn map_reservation<T>(self, f: impl FnOnce(R) -> T) -> Admission<T> {
        match self {
            Admission::Admitted { status } => Admission::Admitted { status },
            Admission::Reserved { wait, reservation } => Admission::Reserved {
                wait,
                reservation: f(reservation),
            },
            Admission::Denied(denied) => Admission::Denied(denied),
        }
    }

    #[inline]
    fn from_verdict(verdict: Verdict, status: StatusWanted, reserve: impl FnOnce() -> R) -> Self {
        match verdict {
            Verdict::Admit {
                wait: 0,
                tat,
                now,
                quota,
                ..
            } => Admission::Admitted {
                status: status.report(|| {
                    let (remaining, reset) = quota.status(tat, now);
                    RateLimitStatus {
                        quota,
                        remaining,
                        reset,
                    }
                }),
            },
            Verdict::Admit { wait, .. } => Admission::Reserved {
                wait: Duration::from_nanos(wait),
                reservation: reserve(),
            },
            Verdict::Deny(denied) => Admission::Denied(denied),
        }
    }
}

/// The in-process store: one lock-free bucket, plus (for a keyed limiter) a sharded table
/// of per-key buckets bounded by `max_keys` (see the [module docs](super#memory)).
///
/// The shared bucket is the whole limiter when it is global; for a keyed limiter it is
/// the bucket of requests without a key (when so configured) and of new keys beyond
/// `max_keys`. It always answers at once ([`Answer::Now`]; its `Pending` is
/// [`NeverPending`]).
pub struct LocalStore<K = ()> {
    shared: TokenBucket,
    keyed: Option<KeyedBuckets<K>>,
}

/// A slot held in a [`LocalStore`].
#[derive(Debug)]
pub struct LocalReservation<K> {
    reserved_in: ReservedIn<K>,
}

/// The bucket a [`LocalReservation`] holds its slot in.
#[derive(Debug)]
enum ReservedIn<K> {
    Shared(Claim),
    Keyed(K, KeyedClaim),
}

impl<K: Hash + Eq + Clone> LocalStore<K> {
    /// The time of a keyed decision at `now` (nanoseconds since the base).
    #[inline]
    fn clock(&self, now: u64) -> Clock {
        let (frame, units) = self.shared.frame(now);
        Clock {
            frame,
            nanos: now,
            units,
        }
    }

    pub(crate) fn global(quota: Quota) -> Self {
        Self {
            shared: TokenBucket::new(quota, Instant::now()),
            keyed: None,
        }
    }

    pub(crate) fn keyed(quota: Quota, max_keys: usize) -> Self {
        Self {
            shared: TokenBucket::new(quota, Instant::now()),
            keyed: Some(KeyedBuckets::new(max_keys)),
        }
    }

    #[inline]
    fn decide(&self, request: Acquire<'_, K>) -> Admission<LocalReservation<K>> {
        let Acquire {
            key,
            cost,
            status,
            max_wait,
        } = request;
        let now = self.shared.nanos(Instant::now());
        if let (Some(key), Some(keyed)) = (key, &self.keyed)
            && let Some((verdict, claim)) = keyed.acquire(key, self.clock(now), cost, max_wait)
        {
            return Admission::from_verdict(verdict, status, || LocalReservation {
                reserved_in: ReservedIn::Keyed(key.clone(), claim),
            });
        }
        let (verdict, claim) = self.shared.take(cost, max_wait, now);
        Admission::from_verdict(verdict, status, || LocalReservation {
            reserved_in: ReservedIn::Shared(claim),
        })
    }
}

impl<K> Store for LocalStore<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Key = K;
    type Reservation = LocalReservation<K>;
    type Pending = NeverPending<LocalReservation<K>>;

    #[inline]
    fn acquire(&self, request: Acquire<'_, K>) -> Answer<Self> {
        Answer::Now(Ok(self.decide(request)))
    }

    fn cancel(&self, reservation: LocalReservation<K>) {
        match (reservation.reserved_in, &self.keyed) {
            (ReservedIn::Keyed(key, claim), Some(keyed)) => keyed.cancel(&key, claim),
            (ReservedIn::Shared(claim), _) => self.shared.give_back(claim),
            (ReservedIn::Keyed(..), None) => {}
        }
    }

    fn quota(&self) -> Quota {
        self.shared.quota()
    }

    fn update_quota<F>(&self, change: F) -> Result<(), RateLimitConfigError>
    where
        F: FnOnce(Quota) -> Result<Quota, RateLimitConfigError>,
    {
        // Keyed buckets remember the quota they were measured in and move on their next
        // request; only the shared bucket must move now.
        self.shared.update(Instant::now(), change)
    }

    /// For a key the table does not track, the bucket its next request would be charged:
    /// a fresh, full one if the table has room for the key, else the shared overflow
    /// bucket (see [at the cap](super#at-the-cap)).
    fn available(&self, key: Option<&K>) -> u64 {
        let now = self.shared.nanos(Instant::now());
        let (Some(key), Some(keyed)) = (key, &self.keyed) else {
            return self.shared.available_at(now);
        };
        match keyed.available(key, self.clock(now)) {
            Some(held) => held,
            None if keyed.has_room_for(key, now) => self.shared.quota().capacity(),
            None => self.shared.available_at(now),
        }
    }

    fn tracked_keys(&self) -> usize {
        self.keyed.as_ref().map_or(0, KeyedBuckets::len)
    }
}

impl<K> std::fmt::Debug for LocalStore<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore")
            .field("quota", &self.shared.quota())
            .field("keyed", &self.keyed.is_some())
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// Admissions out of 200 requests that would each wait for ever.
    fn admitted_with_unbounded_wait(store: &LocalStore<u8>, key: Option<&u8>) -> usize {
        (0..200)
            .filter(|_| {
                let request = Acquire::new(key, 1).max_wait(Duration::MAX);
                !matches!(store.acquire(request).into_now(), Ok(Admission::Denied(_)))
            })
            .count()
    }

    /// The tokens `tokens` per `period` refill in `elapsed`, exactly.
    fn refilled(elapsed: Duration, tokens: u64, period: Duration) -> u64 {
        (elapsed.as_nanos() * u128::from(tokens) / period.as_nanos()) as u64
    }

    #[tokio::test(start_paused = true)]
    async fn keyed_and_shared_buckets_stay_exact_across_epoch_moves() {
        // 2^24 - 3 units per nanosecond: the epoch moves once 2^58 units (17.2 s) have
        // passed since it, and every 8.6 s after.
        let (tokens, period) = ((1 << 24) - 3, Duration::from_secs(3600));
        let quota = Quota::new(1000, tokens, period).unwrap();
        let store = LocalStore::keyed(quota, 10);
        tokio::time::advance(Duration::from_millis(17_150)).await;
        for key in [None, Some(&1), Some(&2)] {
            let drained = store.acquire(Acquire::new(key, 1000)).into_now();
            assert!(matches!(drained, Ok(Admission::Admitted { .. })));
        }
        let elapsed = Duration::from_millis(100);
        tokio::time::advance(elapsed).await;
        let expected = refilled(elapsed, tokens, period);
        assert_eq!(expected, 466);
        // Key 1 is read first (its move drags the others' frame along), key 2 after.
        assert_eq!(store.available(Some(&1)), expected);
        assert_eq!(store.available(None), expected);
        assert_eq!(store.available(Some(&2)), expected);
        // Long idle, many moves later: full, and exact again from there.
        tokio::time::advance(Duration::from_secs(100)).await;
        assert_eq!(store.available(Some(&1)), 1000);
        store
            .acquire(Acquire::new(Some(&1), 1000))
            .into_now()
            .unwrap();
        tokio::time::advance(Duration::from_secs(9)).await;
        let expected = refilled(Duration::from_secs(9), tokens, period).min(1000);
        assert_eq!(store.available(Some(&1)), expected);
    }

    #[test]
    fn an_unbounded_max_wait_is_capped_for_shared_and_keyed_buckets() {
        // One token per 2^57 ns: the first request goes now, one more may wait 2^57 ns.
        let quota = Quota::new(1, 1, Duration::from_nanos(1 << 57)).unwrap();
        let global = LocalStore::<u8>::global(quota);
        assert_eq!(admitted_with_unbounded_wait(&global, None), 2);
        let keyed = LocalStore::keyed(quota, 10);
        assert_eq!(admitted_with_unbounded_wait(&keyed, Some(&1)), 2);
        assert_eq!(keyed.available(Some(&1)), 0);
    }
}
