//! One bucket per key, in a sharded table with a hard size bound (the module docs of
//! `rate_limit` describe eviction and the cap).

use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Mutex, MutexGuard};

use hashbrown::HashTable;

use super::bucket::{CachePadded, Quota, Verdict};

const MAX_SHARDS: usize = 64;
/// Shards are added only while each keeps at least this many keys: with a few keys per
/// shard, hashing puts two clients in one shard long before the table is full, and the
/// second is pushed to the shared overflow bucket.
const MIN_KEYS_PER_SHARD: usize = 1024;
const MIN_SWEEP: usize = 64;
const MIN_FULL_SWEEP_SPACING: u64 = 1_000_000;

/// A key's bucket: its TAT and the quota that TAT is measured in (rescaled on the next
/// visit after a runtime change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    tat: u64,
    quota: Quota,
}

impl Entry {
    fn full(quota: Quota) -> Self {
        Self { tat: 0, quota }
    }

    #[inline]
    fn moved_to(self, quota: Quota, now: u64) -> Self {
        if self.quota == quota {
            return self;
        }
        Self {
            tat: self.quota.rescale(self.tat, now, &quota),
            quota,
        }
    }
}

struct Shard<K> {
    /// Each key with its hash (SipHash, randomly keyed: keys are client-controlled).
    buckets: HashTable<(K, u64, Entry)>,
    sweep_at: usize,
    next_full_sweep: u64,
}

impl<K: Hash + Eq> Shard<K> {
    /// Makes room for one more key if it can; false when the shard is at its cap.
    fn make_room(&mut self, cap: usize, quota: Quota, now: u64) -> bool {
        let len = self.buckets.len();
        if len < self.sweep_at.min(cap) {
            return true;
        }
        if len >= cap && now < self.next_full_sweep {
            return false;
        }
        self.buckets.retain(|(_, _, entry)| entry.tat > now);
        let len = self.buckets.len();
        self.sweep_at = (2 * len).max(MIN_SWEEP);
        if len >= cap {
            let spacing = quota.refill_interval().as_nanos() as u64;
            self.next_full_sweep = now + spacing.max(MIN_FULL_SWEEP_SPACING);
            return false;
        }
        true
    }
}

/// The slot a waiting request holds in its key's bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyedClaim {
    claimed: Entry,
    increment: u64,
}

/// The per-key buckets of a keyed limiter.
pub(crate) struct KeyedBuckets<K> {
    /// Padded so that threads working on different shards do not share cache lines.
    shards: Box<[CachePadded<Mutex<Shard<K>>>]>,
    hasher: RandomState,
    shard_cap: usize,
}

impl<K: Hash + Eq + Clone> KeyedBuckets<K> {
    /// A table that never holds more than `max_keys` keys (`max_keys >= 1`), and holds
    /// exactly `max_keys` when that is under two shards' worth (one shard then).
    pub(crate) fn new(max_keys: usize) -> Self {
        let shards = prev_power_of_two((max_keys / MIN_KEYS_PER_SHARD).clamp(1, MAX_SHARDS));
        Self {
            shards: (0..shards)
                .map(|_| {
                    CachePadded(Mutex::new(Shard {
                        buckets: HashTable::new(),
                        sweep_at: MIN_SWEEP,
                        next_full_sweep: 0,
                    }))
                })
                .collect(),
            hasher: RandomState::new(),
            shard_cap: max_keys / shards,
        }
    }

    /// The key's hash and its locked shard.
    #[inline]
    fn shard(&self, key: &K) -> (u64, MutexGuard<'_, Shard<K>>) {
        let hash = self.hasher.hash_one(key);
        // The shard takes bits the table does not lean on: it indexes with the low bits
        // and tags with the top seven.
        let index = (hash >> 32) as usize & (self.shards.len() - 1);
        // A panic cannot leave a shard half-updated (every update is one assignment).
        let shard = self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (hash, shard)
    }

    /// Charges `key`'s bucket; `None` when the key is new and the table is at its cap
    /// (the caller charges the overflow bucket instead).
    #[inline]
    pub(crate) fn acquire(
        &self,
        key: &K,
        quota: Quota,
        now: u64,
        cost: u64,
        max_wait: u64,
    ) -> Option<(Verdict, KeyedClaim)> {
        let (hash, mut shard) = self.shard(key);
        if let Some((_, _, entry)) = shard.buckets.find_mut(hash, |(known, ..)| known == key) {
            let (verdict, claim) = charge(entry.moved_to(quota, now), now, cost, max_wait);
            if claim.increment > 0 {
                *entry = claim.claimed;
            }
            return Some((verdict, claim));
        }
        let (verdict, claim) = charge(Entry::full(quota), now, cost, max_wait);
        if claim.increment > 0 {
            if !shard.make_room(self.shard_cap, quota, now) {
                return None;
            }
            shard.buckets.insert_unique(
                hash,
                (key.clone(), hash, claim.claimed),
                |(.., hash, _)| *hash,
            );
        }
        Some((verdict, claim))
    }

    /// Gives a reserved slot back if the key's bucket has not moved since (see
    /// [`AtomicBucket::cancel`](super::bucket::AtomicBucket::cancel)).
    pub(crate) fn cancel(&self, key: &K, claim: KeyedClaim) {
        let (hash, mut shard) = self.shard(key);
        if let Some((_, _, entry)) = shard.buckets.find_mut(hash, |(known, ..)| known == key)
            && *entry == claim.claimed
        {
            entry.tat = entry.tat.saturating_sub(claim.increment);
        }
    }

    /// The tokens `key`'s bucket holds at `now` (a capacity's worth for an unknown key).
    pub(crate) fn available(&self, key: &K, quota: Quota, now: u64) -> u64 {
        let (hash, shard) = self.shard(key);
        let entry = shard
            .buckets
            .find(hash, |(known, ..)| known == key)
            .map_or(Entry::full(quota), |(_, _, entry)| {
                entry.moved_to(quota, now)
            });
        quota.available(entry.tat, now)
    }

    /// How many keys the table holds.
    pub(crate) fn len(&self) -> usize {
        (0..self.shards.len())
            .map(|index| {
                self.shards[index]
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .buckets
                    .len()
            })
            .sum()
    }
}

/// Decides on `entry`; the claim is the entry to store when admitted (`increment > 0`).
#[inline]
fn charge(entry: Entry, now: u64, cost: u64, max_wait: u64) -> (Verdict, KeyedClaim) {
    let verdict = entry.quota.decide(entry.tat, now, cost, max_wait);
    let claim = match verdict {
        Verdict::Admit { tat, increment, .. } => KeyedClaim {
            claimed: Entry { tat, ..entry },
            increment,
        },
        Verdict::Deny(_) => KeyedClaim {
            claimed: entry,
            increment: 0,
        },
    };
    (verdict, claim)
}

fn prev_power_of_two(n: usize) -> usize {
    1 << (usize::BITS - 1 - n.leading_zeros())
}
