//! One bucket per key, in a sharded table with a hard size bound (the module docs of
//! `rate_limit` describe eviction and the cap).

use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Mutex, MutexGuard};

use crate::sync::{CachePadded, lock};

use hashbrown::HashTable;

use super::bucket::{Frame, Verdict};

const MAX_SHARDS: usize = 64;
/// Shards are added only while each keeps at least this many keys: with a few keys per
/// shard, hashing puts two clients in one shard long before the table is full, and the
/// second is pushed to the shared overflow bucket.
const MIN_KEYS_PER_SHARD: usize = 1024;
const MIN_SWEEP: usize = 64;
const MIN_FULL_SWEEP_SPACING: u64 = 1_000_000;

/// A key's bucket: its TAT and the frame (quota and epoch) that TAT is measured in
/// (rescaled on the next visit after a runtime change or a move of the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    tat: u64,
    frame: Frame,
}

impl Entry {
    fn full(frame: Frame) -> Self {
        Self { tat: 0, frame }
    }

    #[inline]
    fn moved_to(self, frame: Frame, now: u64) -> Self {
        if self.frame == frame {
            return self;
        }
        Self {
            tat: self.frame.rescale(self.tat, now, &frame),
            frame,
        }
    }

    /// Whether the bucket is full at `now` (nanoseconds since the base).
    fn is_full(&self, now: u64) -> bool {
        self.tat <= self.frame.units_saturating(now)
    }
}

/// The time of one decision: the frame in force and `now` in nanoseconds since the base
/// and in the frame's units (below its horizon).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    pub(crate) frame: Frame,
    pub(crate) nanos: u64,
    pub(crate) units: u64,
}

struct Shard<K> {
    /// Each key with its hash (SipHash, randomly keyed: keys are client-controlled).
    buckets: HashTable<(K, u64, Entry)>,
    sweep_at: usize,
    next_full_sweep: u64,
}

impl<K: Hash + Eq> Shard<K> {
    /// Whether [`make_room`](Self::make_room) would find room at `now`.
    fn would_make_room(&self, cap: usize, now: u64) -> bool {
        let len = self.buckets.len();
        len < cap
            || (now >= self.next_full_sweep
                && self.buckets.iter().any(|(_, _, entry)| entry.is_full(now)))
    }

    /// Makes room for one more key if it can; false when the shard is at its cap.
    fn make_room(&mut self, cap: usize, clock: Clock) -> bool {
        let now = clock.nanos;
        let len = self.buckets.len();
        if len < self.sweep_at.min(cap) {
            return true;
        }
        if len >= cap && now < self.next_full_sweep {
            return false;
        }
        self.buckets.retain(|(_, _, entry)| !entry.is_full(now));
        let len = self.buckets.len();
        self.sweep_at = (2 * len).max(MIN_SWEEP);
        if len >= cap {
            let spacing = clock.frame.quota.refill_interval().as_nanos() as u64;
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
        (hash, lock(&self.shards[index]))
    }

    /// Charges `key`'s bucket; `None` when the key is new and the table is at its cap
    /// (the caller charges the overflow bucket instead).
    #[inline]
    pub(crate) fn acquire(
        &self,
        key: &K,
        clock: Clock,
        cost: u64,
        max_wait: u64,
    ) -> Option<(Verdict, KeyedClaim)> {
        let (hash, mut shard) = self.shard(key);
        if let Some((_, _, entry)) = shard.buckets.find_mut(hash, |(known, ..)| known == key) {
            let entry_now = entry.moved_to(clock.frame, clock.nanos);
            let (verdict, claim) = charge(entry_now, clock.units, cost, max_wait);
            if claim.increment > 0 {
                *entry = claim.claimed;
            }
            return Some((verdict, claim));
        }
        let (verdict, claim) = charge(Entry::full(clock.frame), clock.units, cost, max_wait);
        if claim.increment > 0 {
            if !shard.make_room(self.shard_cap, clock) {
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

    /// The tokens `key`'s bucket holds at `clock`; `None` for an untracked key.
    pub(crate) fn available(&self, key: &K, clock: Clock) -> Option<u64> {
        let (hash, shard) = self.shard(key);
        let (_, _, entry) = shard.buckets.find(hash, |(known, ..)| known == key)?;
        let entry = entry.moved_to(clock.frame, clock.nanos);
        Some(clock.frame.quota.available(entry.tat, clock.units))
    }

    /// Whether a request for the untracked `key` would find room in its shard (after a
    /// sweep, which this does not run): false when it would be charged to the overflow
    /// bucket.
    pub(crate) fn has_room_for(&self, key: &K, now: u64) -> bool {
        self.shard(key).1.would_make_room(self.shard_cap, now)
    }

    /// How many keys the table holds.
    pub(crate) fn len(&self) -> usize {
        (0..self.shards.len())
            .map(|index| {
                lock(&self.shards[index]).buckets.len()
            })
            .sum()
    }
}

/// Decides on `entry`; the claim is the entry to store when admitted (`increment > 0`).
#[inline]
fn charge(entry: Entry, now: u64, cost: u64, max_wait: u64) -> (Verdict, KeyedClaim) {
    let verdict = entry.frame.quota.decide(entry.tat, now, cost, max_wait);
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
