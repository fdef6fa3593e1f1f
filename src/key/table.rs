//! The one table every keyed layer keeps its per-key state in: sharded, bounded by a key
//! count, and swept of idle entries without a background task.
//!
//! A key is hashed once (SipHash with random keys: keys are client-controlled, so a
//! predictable hash would let a client pile its keys into one bucket of the table), and
//! the hash both picks the shard and finds the key in it. A shard is locked for the few
//! instructions an entry's update takes; what a layer does after its decision (a round
//! trip, a call) runs outside of it.
//!
//! # Bounded
//!
//! A shard holds at most its share of `max_keys`. It sweeps out [idle](Idle) entries when
//! it has doubled in size since its last sweep (amortised constant time per new key) and
//! when it is full. When a sweep of a full shard frees nothing, the new key is refused
//! (the layer decides what an untracked key gets: a shared overflow bucket, a round trip
//! of its own) and the shard does not sweep again before the time its caller named, so
//! that a flood of fresh keys cannot make every request pay for a scan. No live entry is
//! ever evicted: a flood can neither grow the table past its cap nor reset the state of a
//! real client (or of an open breaker).

use crate::sync::{Mutex, MutexGuard};
use std::hash::{BuildHasher, Hash, RandomState};
use std::time::Duration;

use hashbrown::HashTable;

use crate::sync::{CachePadded, lock};

const MAX_SHARDS: usize = 64;
/// Shards are added only while each keeps at least this many keys: with a few keys per
/// shard, hashing puts two clients in one shard long before the table is full, and the
/// second one is refused.
const MIN_KEYS_PER_SHARD: usize = 1024;
const MIN_SWEEP: usize = 64;
/// The shortest pause between two sweeps of a full shard that freed nothing.
pub(crate) const MIN_SWEEP_SPACING: Duration = Duration::from_millis(1);

/// An entry a sweep may drop.
pub(crate) trait Idle {
    /// The clock the entry is read at.
    type Now: Copy + Ord;

    /// Whether dropping the entry at `now` loses nothing, because a fresh entry for the
    /// same key would behave the same: a full bucket, an expired lease, a closed breaker
    /// with an empty window. Never an entry that holds something: an open breaker, a
    /// reserved slot, a lease being fetched.
    fn is_idle(&self, now: Self::Now) -> bool;
}

/// A sharded table of at most `max_keys` entries.
pub(crate) struct KeyedTable<K, V: Idle> {
    /// Padded so that threads working on different shards do not share cache lines.
    shards: Box<[PaddedShard<K, V>]>,
    hasher: RandomState,
    shard_cap: usize,
    /// Whether a growing shard also sweeps before it is full (see
    /// [`KeyedTable::sweeping_when_full`]).
    early_sweeps: bool,
}

type PaddedShard<K, V> = CachePadded<Mutex<Shard<K, V>>>;

struct Shard<K, V: Idle> {
    /// Each key with its hash, so that growing the table does not hash keys again.
    entries: HashTable<(K, u64, V)>,
    /// The length at which the next insert sweeps.
    sweep_at: usize,
    /// Set when a sweep of the full shard freed nothing: no full sweep before then.
    next_full_sweep: Option<V::Now>,
}

impl<K: Hash + Eq + Clone, V: Idle> KeyedTable<K, V> {
    /// A table that never holds more than `max_keys` keys (`max_keys >= 1`), and holds
    /// exactly `max_keys` when that is under two shards' worth (one shard then).
    pub(crate) fn new(max_keys: usize) -> Self {
        let shards = prev_power_of_two((max_keys / MIN_KEYS_PER_SHARD).clamp(1, MAX_SHARDS));
        Self {
            shards: (0..shards)
                .map(|_| {
                    CachePadded(Mutex::new(Shard {
                        entries: HashTable::new(),
                        sweep_at: MIN_SWEEP,
                        next_full_sweep: None,
                    }))
                })
                .collect(),
            hasher: RandomState::new(),
            shard_cap: max_keys / shards,
            early_sweeps: true,
        }
    }

    /// A table like [`new`](Self::new) whose shards sweep only when full: for entries
    /// that are idle as soon as they are made (a breaker with only successes in its
    /// window), which a sweep at every doubling would drop and make again on the key's
    /// next request, while there is room for them.
    pub(crate) fn sweeping_when_full(max_keys: usize) -> Self {
        Self {
            early_sweeps: false,
            ..Self::new(max_keys)
        }
    }

    /// `key`'s slot, with its shard locked until the slot is dropped.
    #[inline]
    pub(crate) fn slot<'a>(&'a self, key: &'a K) -> Slot<'a, K, V> {
        let hash = self.hasher.hash_one(key);
        // The shard takes bits the table does not lean on: it indexes with the low bits
        // and tags with the top seven.
        let index = (hash >> 32) as usize & (self.shards.len() - 1);
        Slot {
            key,
            hash,
            cap: self.shard_cap,
            early_sweeps: self.early_sweeps,
            shard: lock(&self.shards[index]),
        }
    }

    /// Calls `visit` with every entry, locking each shard in turn (so keep `visit` short,
    /// and never call into the table or user code from it).
    pub(crate) fn for_each(&self, mut visit: impl FnMut(&K, &V)) {
        for shard in &*self.shards {
            for (key, _, value) in lock(shard).entries.iter() {
                visit(key, value);
            }
        }
    }

    /// How many keys the table holds (locking each shard in turn).
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| lock(shard).entries.len())
            .sum()
    }
}

/// One key's place in a [`KeyedTable`], its shard locked.
pub(crate) struct Slot<'a, K, V: Idle> {
    key: &'a K,
    hash: u64,
    cap: usize,
    early_sweeps: bool,
    shard: MutexGuard<'a, Shard<K, V>>,
}

impl<K: Hash + Eq + Clone, V: Idle> Slot<'_, K, V> {
    /// The key's entry, if the table tracks the key.
    #[inline]
    pub(crate) fn get(&self) -> Option<&V> {
        let key = self.key;
        let (.., value) = self
            .shard
            .entries
            .find(self.hash, |(known, ..)| known == key)?;
        Some(value)
    }

    /// The key's entry, if the table tracks the key.
    #[inline]
    pub(crate) fn get_mut(&mut self) -> Option<&mut V> {
        let key = self.key;
        let (.., value) = self
            .shard
            .entries
            .find_mut(self.hash, |(known, ..)| known == key)?;
        Some(value)
    }

    /// Tracks the key (which the table does not track yet) with `value`, sweeping the
    /// shard first if it is due; false when the shard is full of live entries. Then the
    /// shard sweeps again only once `now` reaches `retry_at()` (at least
    /// [`MIN_SWEEP_SPACING`] on).
    pub(crate) fn insert(
        &mut self,
        value: V,
        now: V::Now,
        retry_at: impl FnOnce() -> V::Now,
    ) -> bool {
        if !self.make_room(now, retry_at) {
            return false;
        }
        self.shard.entries.insert_unique(
            self.hash,
            (self.key.clone(), self.hash, value),
            |(_, hash, _)| *hash,
        );
        true
    }

    /// [`insert`](Self::insert), making the value only once there is room for it (a
    /// value that is costly to make, which a flood of fresh keys at the cap must not make
    /// and drop on every request); the tracked entry, or `None` when the shard is full
    /// of live entries.
    pub(crate) fn insert_with(
        &mut self,
        make: impl FnOnce() -> V,
        now: V::Now,
        retry_at: impl FnOnce() -> V::Now,
    ) -> Option<&V> {
        if !self.make_room(now, retry_at) {
            return None;
        }
        let entry = self.shard.entries.insert_unique(
            self.hash,
            (self.key.clone(), self.hash, make()),
            |(_, hash, _)| *hash,
        );
        let (.., value) = entry.into_mut();
        Some(value)
    }

    /// Whether [`insert`](Self::insert) would find room at `now` (without sweeping).
    pub(crate) fn has_room(&self, now: V::Now) -> bool {
        let shard = &*self.shard;
        shard.entries.len() < self.cap
            || (shard.may_sweep_full(now)
                && shard.entries.iter().any(|(.., value)| value.is_idle(now)))
    }

    fn make_room(&mut self, now: V::Now, retry_at: impl FnOnce() -> V::Now) -> bool {
        let cap = self.cap;
        let shard = &mut *self.shard;
        let len = shard.entries.len();
        let sweep_at = if self.early_sweeps {
            shard.sweep_at.min(cap)
        } else {
            cap
        };
        if len < sweep_at {
            return true;
        }
        if len >= cap && !shard.may_sweep_full(now) {
            return false;
        }
        shard.entries.retain(|(.., value)| !value.is_idle(now));
        let len = shard.entries.len();
        shard.sweep_at = (2 * len).max(MIN_SWEEP);
        if len >= cap {
            shard.next_full_sweep = Some(retry_at());
            return false;
        }
        true
    }
}

impl<K, V: Idle> Shard<K, V> {
    fn may_sweep_full(&self, now: V::Now) -> bool {
        self.next_full_sweep.is_none_or(|at| now >= at)
    }
}

fn prev_power_of_two(n: usize) -> usize {
    1 << (usize::BITS - 1 - n.leading_zeros())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// An entry idle from `idle_from` on.
    struct Until(u64);

    impl Idle for Until {
        type Now = u64;

        fn is_idle(&self, now: u64) -> bool {
            now >= self.0
        }
    }

    fn insert(table: &KeyedTable<u32, Until>, key: u32, idle_from: u64, now: u64) -> bool {
        table.slot(&key).insert(Until(idle_from), now, || now + 10)
    }

    #[test]
    fn a_full_table_refuses_new_keys_and_keeps_its_live_ones() {
        let table = KeyedTable::new(3);
        for key in 0..3 {
            assert!(insert(&table, key, 100, 0));
        }
        assert!(!table.slot(&9).has_room(0));
        assert!(!insert(&table, 9, 100, 0), "full of live entries");
        assert_eq!(table.len(), 3);
        assert!(table.slot(&1).get().is_some(), "nothing was evicted");
        // Once the entries are idle, a new key makes room for itself.
        assert!(table.slot(&9).has_room(100));
        assert!(insert(&table, 9, 200, 100));
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn a_full_shard_that_swept_in_vain_waits_before_sweeping_again() {
        let table = KeyedTable::new(2);
        assert!(insert(&table, 0, 5, 0));
        assert!(insert(&table, 1, 100, 0));
        assert!(!insert(&table, 2, 100, 0), "nothing idle at 0: retry at 10");
        // Key 0 is idle from 5 on, but the shard does not look before 10.
        assert!(!table.slot(&2).has_room(5));
        assert!(!insert(&table, 2, 100, 5));
        assert!(insert(&table, 2, 100, 10));
        assert!(table.slot(&0).get().is_none());
        assert!(table.slot(&1).get().is_some());
    }

    #[test]
    fn a_growing_shard_sweeps_idle_entries_before_its_cap() {
        let table = KeyedTable::new(1000);
        for key in 0..MIN_SWEEP as u32 {
            assert!(insert(&table, key, 1, 0));
        }
        assert_eq!(table.len(), MIN_SWEEP);
        assert!(insert(&table, 1000, 10, 1));
        assert_eq!(
            table.len(),
            1,
            "the idle entries went at the doubling sweep"
        );
    }

    #[test]
    fn a_table_sweeping_when_full_keeps_idle_entries_while_there_is_room() {
        let table = KeyedTable::sweeping_when_full(1000);
        for key in 0..=MIN_SWEEP as u32 {
            assert!(insert(&table, key, 0, 1));
        }
        assert_eq!(table.len(), MIN_SWEEP + 1, "no sweep at the doubling");
    }

    #[test]
    fn shards_are_a_power_of_two_and_never_exceed_max_keys() {
        for max_keys in [1, 2, 1023, 1024, 3000, 100_000, 1 << 20] {
            let table = KeyedTable::<u32, Until>::new(max_keys);
            assert!(table.shards.len().is_power_of_two());
            assert!(table.shards.len() * table.shard_cap <= max_keys);
        }
    }
}
