//! One bucket per key, in the crate's bounded keyed table (the module docs of
//! `rate_limit` describe eviction and the cap).

use std::hash::Hash;
use std::time::Duration;

use super::bucket::{Frame, Verdict};
use crate::key::{Idle, KeyedTable, MIN_SWEEP_SPACING};

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
}

impl Idle for Entry {
    /// Nanoseconds since the store's base.
    type Now = u64;

    /// A full bucket: a fresh one would be full too.
    fn is_idle(&self, now: u64) -> bool {
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

/// The slot a waiting request holds in its key's bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyedClaim {
    claimed: Entry,
    increment: u64,
}

/// The per-key buckets of a keyed limiter.
pub(crate) struct KeyedBuckets<K> {
    table: KeyedTable<K, Entry>,
}

impl<K: Hash + Eq + Clone> KeyedBuckets<K> {
    /// Buckets for at most `max_keys` keys (`max_keys >= 1`).
    pub(crate) fn new(max_keys: usize) -> Self {
        Self {
            table: KeyedTable::new(max_keys),
        }
    }

    /// Charges `key`'s bucket; `None` when the key is new and the table is at its cap
    /// (the caller charges the overflow bucket instead).
    #[inline]
    pub(crate) fn acquire(
        &self,
        key: &K,
        clock: Clock,
        cost: u64,
        max_wait: Duration,
    ) -> Option<(Verdict, KeyedClaim)> {
        let mut slot = self.table.slot(key);
        if let Some(entry) = slot.get_mut() {
            let entry_now = entry.moved_to(clock.frame, clock.nanos);
            let (verdict, claim) = charge(entry_now, clock.units, cost, max_wait);
            if claim.increment > 0 {
                *entry = claim.claimed;
            }
            return Some((verdict, claim));
        }
        let (verdict, claim) = charge(Entry::full(clock.frame), clock.units, cost, max_wait);
        // A refused request leaves the fresh (full) bucket as it was: nothing to track.
        if claim.increment > 0 && !slot.insert(claim.claimed, clock.nanos, || next_sweep(clock)) {
            return None;
        }
        Some((verdict, claim))
    }

    /// Gives a reserved slot back if the key's bucket has not moved since (see
    /// [`AtomicBucket::cancel`](super::bucket::AtomicBucket::cancel)).
    pub(crate) fn cancel(&self, key: &K, claim: KeyedClaim) {
        let mut slot = self.table.slot(key);
        if let Some(entry) = slot.get_mut()
            && *entry == claim.claimed
        {
            entry.tat = entry.tat.saturating_sub(claim.increment);
        }
    }

    /// The tokens `key`'s bucket holds at `clock`; `None` for an untracked key.
    pub(crate) fn available(&self, key: &K, clock: Clock) -> Option<u64> {
        let entry = self
            .table
            .slot(key)
            .get()?
            .moved_to(clock.frame, clock.nanos);
        Some(clock.frame.quota.available(entry.tat, clock.units))
    }

    /// Whether a request for the untracked `key` would find room in its shard (after a
    /// sweep, which this does not run): false when it would be charged to the overflow
    /// bucket.
    pub(crate) fn has_room_for(&self, key: &K, now: u64) -> bool {
        self.table.slot(key).has_room(now)
    }

    /// How many keys the table holds.
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }
}

/// When a full shard that a sweep could not thin may sweep again: once a bucket has had
/// time to refill a token (and so perhaps to fill up), and not within a millisecond.
fn next_sweep(clock: Clock) -> u64 {
    let spacing = clock.frame.quota.refill_interval().max(MIN_SWEEP_SPACING);
    clock
        .nanos
        .saturating_add(u64::try_from(spacing.as_nanos()).unwrap_or(u64::MAX))
}

/// Decides on `entry`; the claim is the entry to store when admitted (`increment > 0`).
#[inline]
fn charge(entry: Entry, now: u64, cost: u64, max_wait: Duration) -> (Verdict, KeyedClaim) {
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
