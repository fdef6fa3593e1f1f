//! Where bucket state lives: the [`Store`] trait and the in-process [`LocalStore`].

use std::future::{Ready, ready};
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;
use tower::BoxError;

use super::bucket::{Claim, Denied, Quota, TokenBucket, Verdict, max_wait_nanos};
use super::error::RateLimitConfigError;
use super::keyed::{Clock, KeyedBuckets, KeyedClaim};
use super::layer::RateLimitStatus;

/// The bucket state behind a [`RateLimitLayer`](super::RateLimitLayer).
///
/// The layer asks the store for one decision per request and otherwise knows nothing of
/// where the buckets live. The in-process [`LocalStore`] is the default; a fleet-wide
/// store (Redis) implements the same trait with one round trip per decision and its own
/// clock.
///
/// `key` is `None` for the shared bucket: the only bucket of a global limiter, and the
/// fallback bucket of a keyed one.
pub trait Store: Send + Sync + 'static {
    /// The key type of a keyed limiter (`()` for a global one).
    type Key;
    /// A slot a waiting request holds; handed to [`cancel`](Store::cancel) when the
    /// request is dropped before its turn.
    type Reservation: Send + 'static;
    /// The decision. `Unpin` so that the layer can poll it once in `call` and, when it is
    /// ready at once (the in-process store's `std::future::Ready` always is), call the
    /// inner service without cloning it. A remote store may box its future.
    type Future: Future<Output = Result<Decision<Self::Reservation>, BoxError>> + Unpin;

    /// Charges `cost` tokens to `key`'s bucket, or reserves them within `max_wait`.
    /// `with_status` asks for the bucket's [`RateLimitStatus`] on admission (the layer
    /// asks only when it adds the `RateLimit` fields to responses).
    fn acquire(
        &self,
        key: Option<&Self::Key>,
        cost: u64,
        max_wait: Duration,
        with_status: bool,
    ) -> Self::Future;

    /// Hands back the slot of a request that gave up waiting (best effort).
    fn cancel(&self, reservation: Self::Reservation);

    /// The quota in force.
    fn quota(&self) -> Quota;

    /// Replaces the quota with `change(current)`; buckets keep the tokens they hold,
    /// clamped to the new capacity.
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
}

/// A [`Store`]'s answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<R> {
    /// Go ahead now.
    Admitted {
        /// The bucket's state after the request, if asked for.
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

impl<R> Decision<R> {
    #[inline]
    fn from_verdict(verdict: Verdict, with_status: bool, reserve: impl FnOnce() -> R) -> Self {
        match verdict {
            Verdict::Admit {
                wait: 0,
                tat,
                now,
                quota,
                ..
            } => Decision::Admitted {
                status: with_status.then(|| {
                    let (remaining, reset) = quota.status(tat, now);
                    RateLimitStatus {
                        quota,
                        remaining,
                        reset,
                    }
                }),
            },
            Verdict::Admit { wait, .. } => Decision::Reserved {
                wait: Duration::from_nanos(wait),
                reservation: reserve(),
            },
            Verdict::Deny(denied) => Decision::Denied(denied),
        }
    }
}

/// The in-process store: one lock-free bucket, plus (for a keyed limiter) a sharded table
/// of per-key buckets bounded by `max_keys` (see the [module docs](super#memory)).
///
/// The shared bucket is the whole limiter when it is global; for a keyed limiter it is
/// the bucket of requests without a key (when so configured) and of new keys beyond
/// `max_keys`.
pub struct LocalStore<K = ()> {
    shared: TokenBucket,
    keyed: Option<KeyedBuckets<K>>,
}

/// A slot held in a [`LocalStore`].
#[derive(Debug)]
pub struct LocalReservation<K> {
    held: Held<K>,
}

#[derive(Debug)]
enum Held<K> {
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
    fn decide(
        &self,
        key: Option<&K>,
        cost: u64,
        max_wait: u64,
        with_status: bool,
    ) -> Decision<LocalReservation<K>> {
        let now = self.shared.nanos(Instant::now());
        if let (Some(key), Some(keyed)) = (key, &self.keyed)
            && let Some((verdict, claim)) = keyed.acquire(key, self.clock(now), cost, max_wait)
        {
            return Decision::from_verdict(verdict, with_status, || LocalReservation {
                held: Held::Keyed(key.clone(), claim),
            });
        }
        let (verdict, claim) = self.shared.take(cost, max_wait, now);
        Decision::from_verdict(verdict, with_status, || LocalReservation {
            held: Held::Shared(claim),
        })
    }
}

impl<K> Store for LocalStore<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Key = K;
    type Reservation = LocalReservation<K>;
    type Future = Ready<Result<Decision<LocalReservation<K>>, BoxError>>;

    #[inline]
    fn acquire(
        &self,
        key: Option<&K>,
        cost: u64,
        max_wait: Duration,
        with_status: bool,
    ) -> Self::Future {
        ready(Ok(self.decide(
            key,
            cost,
            max_wait_nanos(max_wait),
            with_status,
        )))
    }

    fn cancel(&self, reservation: LocalReservation<K>) {
        match (reservation.held, &self.keyed) {
            (Held::Keyed(key, claim), Some(keyed)) => keyed.cancel(&key, claim),
            (Held::Shared(claim), _) => self.shared.give_back(claim),
            (Held::Keyed(..), None) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Admissions out of 200 requests that would each wait for ever.
    fn admitted_with_unbounded_wait(store: &LocalStore<u8>, key: Option<&u8>) -> usize {
        (0..200)
            .filter(|_| {
                let decision = store.acquire(key, 1, Duration::MAX, false).into_inner();
                !matches!(decision, Ok(Decision::Denied(_)))
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
            let drained = store.acquire(key, 1000, Duration::ZERO, false).into_inner();
            assert!(matches!(drained, Ok(Decision::Admitted { .. })));
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
            .acquire(Some(&1), 1000, Duration::ZERO, false)
            .into_inner()
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
