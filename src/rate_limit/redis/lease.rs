//! Tokens a replica took from a Redis bucket in one batch, spent in process until they
//! run out or expire ([`RedisOptions::batch`](super::RedisOptions::batch)).
//!
//! One lease per bucket, in the crate's bounded keyed table. Each lease is held under
//! its shard's mutex for a few instructions (a compare and a subtraction); the round trip
//! that refills a lease runs outside of it.

use crate::sync::Mutex;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::super::bucket::Quota;
use crate::key::{Idle, KeyedTable, MIN_SWEEP_SPACING};
use crate::sync::{CachePadded, lock};

/// A bucket's lease.
#[derive(Debug, Clone, Copy)]
struct Lease {
    /// Tokens not spent yet.
    left: u64,
    /// When the tokens are forfeited (measured from when the leasing request was sent,
    /// so never later than the lease time after Redis handed them out).
    expires: Instant,
    /// A request is fetching a new batch: the others go to Redis one by one meanwhile,
    /// rather than each fetching a batch of its own.
    refilling: bool,
    /// The tokens the Redis bucket held after the lease, and when it is full again: what
    /// a request admitted from the lease reports.
    bucket_left: u64,
    full_at: Instant,
    /// The quota the tokens were taken under: after a change of quota they are forfeited,
    /// so that the next request is decided by the new quota.
    quota: Option<Quota>,
}

impl Lease {
    fn refilling(now: Instant) -> Self {
        Self {
            left: 0,
            expires: now,
            refilling: true,
            bucket_left: 0,
            full_at: now,
            quota: None,
        }
    }
}

impl Idle for Lease {
    type Now = Instant;

    /// Expired and not being refilled: what no lease at all means too.
    fn is_idle(&self, now: Instant) -> bool {
        !self.refilling && now >= self.expires
    }
}

/// The state of the bucket reported to a request admitted from a lease.
#[derive(Debug, Clone, Copy)]
pub(super) struct Spent {
    /// The bucket's tokens at the lease plus the lease's tokens still unspent.
    pub(super) remaining: u64,
    pub(super) reset: Duration,
}

/// What came back from a batched round trip.
#[derive(Debug, Clone, Copy)]
pub(super) struct Batch {
    /// The tokens left of the batch once the leasing request took its own.
    pub(super) left: u64,
    pub(super) expires: Instant,
    pub(super) bucket_left: u64,
    pub(super) full_at: Instant,
    /// The quota the batch was taken under.
    pub(super) quota: Quota,
}

/// The leases of one store.
pub(super) struct Leases<K> {
    batch: u64,
    lease_for: Option<Duration>,
    /// The shared bucket's lease lives apart from the keys'.
    shared: CachePadded<Mutex<Option<Lease>>>,
    keyed: KeyedTable<K, Lease>,
}

impl<K: Hash + Eq + Clone> Leases<K> {
    /// Leases of `batch` requests' worth of tokens (`batch >= 2`), for at most `max_keys`
    /// keys (`max_keys >= 1`) besides the shared bucket.
    pub(super) fn new(batch: u64, lease_for: Option<Duration>, max_keys: usize) -> Self {
        Self {
            batch,
            lease_for,
            shared: CachePadded(Mutex::new(None)),
            keyed: KeyedTable::new(max_keys),
        }
    }

    /// How many requests' worth of tokens one round trip leases.
    pub(super) fn batch(&self) -> u64 {
        self.batch
    }

    /// How long a lease taken now lives under `quota`: the configured time, else the
    /// time the batch takes to refill (exactly, rounded down), at most a second.
    pub(super) fn lease_for(&self, quota: Quota) -> Duration {
        self.lease_for.unwrap_or_else(|| {
            let (tokens, nanos) = quota.rate();
            let refill = u128::from(self.batch) * u128::from(nanos) / u128::from(tokens);
            Duration::from_nanos(u64::try_from(refill).unwrap_or(u64::MAX))
                .min(Duration::from_secs(1))
        })
    }

    /// When a lease fetched by a request sent at `sent` expires. (The lease time is
    /// capped at 4.5 years, so this never overflows; if it did, the lease would expire at
    /// once, which only strands tokens.)
    pub(super) fn expiry(&self, sent: Instant, quota: Quota) -> Instant {
        sent.checked_add(self.lease_for(quota)).unwrap_or(sent)
    }

    /// Spends `cost` tokens of `key`'s lease, if it holds them, is not expired, and was
    /// taken under `quota` (the quota in force).
    pub(super) fn spend(
        &self,
        key: Option<&K>,
        cost: u64,
        now: Instant,
        quota: Quota,
    ) -> Option<Spent> {
        self.with_lease(key, |lease| {
            let lease = lease?;
            if now >= lease.expires || lease.left < cost || lease.quota != Some(quota) {
                return None;
            }
            lease.left -= cost;
            Some(Spent {
                remaining: lease.bucket_left.saturating_add(lease.left),
                reset: lease.full_at.saturating_duration_since(now),
            })
        })
    }

    /// Claims the right to fetch `key`'s next batch: `None` if another request is
    /// fetching it, or the table is full of live leases (the request then goes to Redis
    /// alone). Whatever the old lease held is forfeited. The claim is owned, so that it
    /// lets go even if the round trip it is for is dropped before it starts.
    pub(super) fn start_refill(
        self: &Arc<Self>,
        key: Option<&K>,
        now: Instant,
    ) -> Option<Refilling<K>> {
        self.claim_refill(key, now).then(|| Refilling {
            leases: self.clone(),
            key: key.cloned(),
            filled: false,
        })
    }

    fn claim_refill(&self, key: Option<&K>, now: Instant) -> bool {
        let Some(key) = key else {
            let mut shared = lock(&self.shared);
            if shared.is_some_and(|lease| lease.refilling) {
                return false;
            }
            *shared = Some(Lease::refilling(now));
            return true;
        };
        let mut slot = self.keyed.slot(key);
        if let Some(lease) = slot.get_mut() {
            if lease.refilling {
                return false;
            }
            *lease = Lease::refilling(now);
            return true;
        }
        // Leases expire within the lease time, so a full table is worth another look
        // soon.
        let retry_at = || now.checked_add(MIN_SWEEP_SPACING).unwrap_or(now);
        slot.insert(Lease::refilling(now), now, retry_at)
    }

    /// Stores the batch fetched by the request that [started the
    /// refill](Self::start_refill).
    pub(super) fn fill(&self, key: Option<&K>, batch: Batch) {
        self.with_lease(key, |lease| {
            if let Some(lease) = lease {
                *lease = Lease {
                    left: batch.left,
                    expires: batch.expires,
                    refilling: false,
                    bucket_left: batch.bucket_left,
                    full_at: batch.full_at,
                    quota: Some(batch.quota),
                };
            }
        });
    }

    /// Lets another request fetch `key`'s batch: this one got none.
    pub(super) fn abandon(&self, key: Option<&K>) {
        self.with_lease(key, |lease| {
            if let Some(lease) = lease {
                lease.refilling = false;
            }
        });
    }

    /// How many keys hold a lease (or a slot for one), the shared bucket aside.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.keyed.len()
    }

    fn with_lease<T>(&self, key: Option<&K>, f: impl FnOnce(Option<&mut Lease>) -> T) -> T {
        let Some(key) = key else {
            return f(lock(&self.shared).as_mut());
        };
        f(self.keyed.slot(key).get_mut())
    }
}

/// The right to fetch a key's next batch. Hands the refill back to other requests unless
/// the batch arrived: a request dropped or refused mid-refill (or before its round trip
/// started) must not leave its key refilling for ever.
pub(super) struct Refilling<K: Hash + Eq + Clone> {
    leases: Arc<Leases<K>>,
    key: Option<K>,
    filled: bool,
}

impl<K: Hash + Eq + Clone> Refilling<K> {
    /// How many requests' worth of tokens to fetch.
    pub(super) fn batch(&self) -> u64 {
        self.leases.batch()
    }

    /// When the batch fetched by a request sent at `sent` expires.
    pub(super) fn expiry(&self, sent: Instant, quota: Quota) -> Instant {
        self.leases.expiry(sent, quota)
    }

    pub(super) fn fill(mut self, batch: Batch) {
        self.leases.fill(self.key.as_ref(), batch);
        self.filled = true;
    }
}

impl<K: Hash + Eq + Clone> Drop for Refilling<K> {
    fn drop(&mut self) {
        if !self.filled {
            self.leases.abandon(self.key.as_ref());
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn quota() -> Quota {
        Quota::new(10, 1, Duration::from_millis(100)).unwrap()
    }

    fn filled(left: u64, now: Instant, life: Duration) -> Batch {
        Batch {
            left,
            expires: now + life,
            bucket_left: 10,
            full_at: now + Duration::from_secs(1),
            quota: quota(),
        }
    }

    #[test]
    fn a_lease_is_spent_until_empty_or_expired() {
        let leases = Arc::new(Leases::<u8>::new(4, None, 10));
        let now = Instant::now();
        let life = Duration::from_millis(100);
        assert!(leases.spend(Some(&1), 1, now, quota()).is_none());
        let refill = leases.start_refill(Some(&1), now).unwrap();
        refill.fill(filled(3, now, life));
        let spent = leases.spend(Some(&1), 2, now, quota()).unwrap();
        assert_eq!(spent.remaining, 11);
        assert!(leases.spend(Some(&1), 1, now, quota()).is_some());
        assert!(leases.spend(Some(&1), 1, now, quota()).is_none(), "empty");

        let refill = leases.start_refill(Some(&1), now).unwrap();
        refill.fill(filled(3, now, life));
        assert!(
            leases.spend(Some(&1), 1, now + life, quota()).is_none(),
            "expired"
        );

        let refill = leases.start_refill(Some(&1), now).unwrap();
        refill.fill(filled(3, now, life));
        let other = Quota::new(5, 1, Duration::from_millis(100)).unwrap();
        assert!(
            leases.spend(Some(&1), 1, now, other).is_none(),
            "another quota"
        );
    }

    #[test]
    fn one_request_refills_a_lease_at_a_time_and_a_dropped_one_lets_go() {
        let leases = Arc::new(Leases::<u8>::new(4, None, 10));
        let now = Instant::now();
        let refill = leases.start_refill(None, now).unwrap();
        assert!(
            leases.start_refill(None, now).is_none(),
            "already refilling"
        );
        drop(refill);
        assert!(leases.start_refill(None, now).is_some());
        // A key's claim lets go the same way, and a filled one does not undo its batch.
        let refill = leases.start_refill(Some(&1), now).unwrap();
        drop(refill);
        let refill = leases.start_refill(Some(&1), now).unwrap();
        refill.fill(filled(3, now, Duration::from_millis(100)));
        assert!(leases.spend(Some(&1), 1, now, quota()).is_some());
    }

    #[test]
    fn the_table_holds_at_most_max_keys_live_leases() {
        let leases = Arc::new(Leases::<u8>::new(4, None, 2));
        let now = Instant::now();
        let life = Duration::from_millis(100);
        for key in [1, 2] {
            let refill = leases.start_refill(Some(&key), now).unwrap();
            refill.fill(filled(3, now, life));
        }
        assert!(
            leases.start_refill(Some(&3), now).is_none(),
            "full of live leases"
        );
        assert_eq!(leases.len(), 2);
        // Once they expire, they make room.
        assert!(leases.start_refill(Some(&3), now + life).is_some());
        assert_eq!(leases.len(), 1);
    }

    fn every(interval: Duration) -> Quota {
        Quota::new(1, 1, interval).unwrap()
    }

    #[test]
    fn the_default_lease_time_is_the_batchs_refill_time_at_most_a_second() {
        let leases = Leases::<u8>::new(8, None, 2);
        assert_eq!(
            leases.lease_for(every(Duration::from_millis(10))),
            Duration::from_millis(80)
        );
        assert_eq!(
            leases.lease_for(every(Duration::from_secs(60))),
            Duration::from_secs(1)
        );
        // Exactly: six of 10 / 3 ms are 20 ms (not 20 ms and 2 ns).
        let leases = Leases::<u8>::new(6, None, 2);
        let thirds = Quota::new(3, 3, Duration::from_millis(10)).unwrap();
        assert_eq!(leases.lease_for(thirds), Duration::from_millis(20));
        let configured = Leases::<u8>::new(8, Some(Duration::from_millis(5)), 2);
        assert_eq!(
            configured.lease_for(every(Duration::from_secs(60))),
            Duration::from_millis(5)
        );
    }
}
