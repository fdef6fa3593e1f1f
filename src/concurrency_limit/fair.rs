//! Fair shares per key: the policy a keyed concurrency limit applies on top of the permit
//! counter (the [module docs](super#fair-per-client) state it for users).
//!
//! Each key has a [`KeyCell`]: how many permits it holds (an atomic, given back without a
//! lock by the permit's drop) and the last window in which it asked while the layer was
//! contended. The cells live in the crate's bounded [`KeyedTable`]; keys it cannot track
//! (the table full of live keys) and requests without a key share one overflow cell, so
//! that they count as one client. The decision takes `now` as an argument: the model tests
//! drive it without a runtime.

use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::limiter::{Admission, Limiter, Refusal};
use crate::key::{Idle, KeyedTable, MIN_SWEEP_SPACING};
use crate::sync::{AtomicU32, AtomicU64, Mutex, Ordering, lock};

/// One key's permits, and when it last asked during contention.
#[derive(Debug)]
pub(crate) struct KeyCell {
    held: AtomicU32,
    /// The last window in which the key asked while contended, plus one (0: never).
    counted: AtomicU64,
    /// The layer's count of keys holding a permit, kept in step with `held`.
    core: Arc<FairCore>,
}

impl KeyCell {
    fn new(core: Arc<FairCore>) -> Self {
        Self {
            held: AtomicU32::new(0),
            counted: AtomicU64::new(0),
            core,
        }
    }

    /// Takes one more permit for the key if it holds fewer than `cap`.
    fn try_hold(&self, cap: u32) -> bool {
        let held = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < cap).then(|| held + 1)
            });
        match held {
            Ok(0) => {
                self.core.holders.fetch_add(1, Ordering::Relaxed);
                true
            }
            Ok(_) => true,
            Err(_) => false,
        }
    }

    /// Gives one of the key's permits back (a permit's drop, or a hold the counter
    /// refused).
    pub(crate) fn unhold(&self) {
        if self.held.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.core.holders.fetch_sub(1, Ordering::Relaxed);
        }
    }

    #[cfg(all(test, not(loom)))]
    pub(crate) fn held(&self) -> u32 {
        self.held.load(Ordering::Acquire)
    }
}

/// A table entry: dropped by a sweep once the key holds nothing and has not asked during
/// contention in the current or the previous window (a fresh cell would behave the same).
struct Share(Arc<KeyCell>);

impl Idle for Share {
    /// The window index.
    type Now = u64;

    fn is_idle(&self, window: u64) -> bool {
        let counted = self.0.counted.load(Ordering::Acquire);
        self.0.held.load(Ordering::Acquire) == 0 && (counted == 0 || counted < window)
    }
}

/// The state every key shares: not generic, so that a permit can reach it.
#[derive(Debug)]
pub(crate) struct FairCore {
    /// Keys holding at least one permit (for the handle).
    holders: AtomicU32,
    /// Nanoseconds since `base` until which the layer is contended.
    contended_until: AtomicU64,
    windows: Mutex<Windows>,
    window_nanos: u64,
    base: Instant,
}

/// The distinct keys that asked while contended, in the current and the previous window.
#[derive(Debug, Default)]
struct Windows {
    window: u64,
    current: u32,
    previous: u32,
}

impl Windows {
    fn roll(&mut self, window: u64) {
        if window == self.window {
            return;
        }
        self.previous = if window == self.window + 1 {
            self.current
        } else {
            0
        };
        self.current = 0;
        self.window = window;
    }
}

impl FairCore {
    /// Counts `cell` as competing in `window`; the competing keys.
    fn compete(&self, cell: &KeyCell, window: u64) -> u32 {
        let mut windows = lock(&self.windows);
        windows.roll(window);
        if cell.counted.load(Ordering::Acquire) != window + 1 {
            cell.counted.store(window + 1, Ordering::Release);
            windows.current = windows.current.saturating_add(1);
        }
        windows.current.max(windows.previous).max(1)
    }
}

/// What a keyed request got.
pub(crate) enum FairAdmission {
    /// A permit (the requests in flight, this one included) and the key's share of it.
    Admitted(u32, Arc<KeyCell>),
    /// Refused (and counted): no free slot, or the key holds its share while the layer
    /// is contended.
    Rejected(Refusal),
}

/// The per-key shares of one keyed concurrency limit.
pub(crate) struct FairShares<K> {
    table: KeyedTable<K, Share>,
    overflow: Arc<KeyCell>,
    core: Arc<FairCore>,
}

impl<K> std::fmt::Debug for FairShares<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FairShares")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone> FairShares<K> {
    /// Shares for at most `max_keys` keys (`max_keys >= 1`), in windows of `window` (at
    /// least [`MIN_SWEEP_SPACING`]), from `base` on.
    pub(crate) fn new(max_keys: usize, window: Duration, base: Instant) -> Self {
        let window_nanos = u64::try_from(window.max(MIN_SWEEP_SPACING).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let core = Arc::new(FairCore {
            holders: AtomicU32::new(0),
            contended_until: AtomicU64::new(0),
            windows: Mutex::new(Windows::default()),
            window_nanos,
            base,
        });
        Self {
            table: KeyedTable::new(max_keys),
            overflow: Arc::new(KeyCell::new(Arc::clone(&core))),
            core,
        }
    }

    /// Decides a request of `key` (`None`: no key) at `now`.
    pub(crate) fn admit(&self, limiter: &Limiter, key: Option<&K>, now: Instant) -> FairAdmission {
        let nanos = u64::try_from(now.saturating_duration_since(self.core.base).as_nanos())
            .unwrap_or(u64::MAX);
        let window = nanos / self.core.window_nanos;
        let Some(key) = key else {
            return self.admit_cell(limiter, &self.overflow, nanos, window);
        };
        // The shard stays locked while the key's cell is decided, so that a sweep cannot
        // drop the cell between the look-up and the hold.
        let mut slot = self.table.slot(key);
        if slot.get().is_none() {
            let cell = Share(Arc::new(KeyCell::new(Arc::clone(&self.core))));
            if !slot.insert(cell, window, || window.saturating_add(1)) {
                drop(slot);
                return self.admit_cell(limiter, &self.overflow, nanos, window);
            }
        }
        match slot.get() {
            Some(Share(cell)) => self.admit_cell(limiter, cell, nanos, window),
            None => self.admit_cell(limiter, &self.overflow, nanos, window),
        }
    }

    fn admit_cell(
        &self,
        limiter: &Limiter,
        cell: &Arc<KeyCell>,
        nanos: u64,
        window: u64,
    ) -> FairAdmission {
        let contended = nanos < self.core.contended_until.load(Ordering::Acquire);
        let (cap, share) = if contended {
            // The share and its refusal under one policy.
            let refusal = limiter.refusal();
            let competing = self.core.compete(cell, window);
            (refusal.limit.div_ceil(competing), Some(refusal))
        } else {
            (u32::MAX, None)
        };
        if !cell.try_hold(cap) {
            let refusal = share.unwrap_or_else(|| limiter.refusal());
            limiter.count(&refusal);
            return FairAdmission::Rejected(refusal);
        }
        let refusal = match limiter.try_admit() {
            Admission::Admitted(in_flight) => {
                return FairAdmission::Admitted(in_flight, Arc::clone(cell));
            }
            Admission::Rejected(refusal) => refusal,
            // A keyed limit has no queue (`build` and a reload refuse one); should a
            // waiter come back all the same, it leaves at once.
            Admission::Queued {
                waiter, refusal, ..
            } => {
                if limiter.leave(&waiter) {
                    limiter.release();
                }
                limiter.count(&refusal);
                refusal
            }
        };
        cell.unhold();
        self.contend(nanos);
        self.core.compete(cell, window);
        FairAdmission::Rejected(refusal)
    }

    /// A request found no free slot: the layer is contended for two windows from now.
    fn contend(&self, nanos: u64) {
        let until = nanos.saturating_add(self.core.window_nanos.saturating_mul(2));
        self.core.contended_until.fetch_max(until, Ordering::AcqRel);
    }

    /// Keys holding at least one permit now (the overflow counting as one).
    pub(crate) fn active_keys(&self) -> u32 {
        self.core.holders.load(Ordering::Relaxed)
    }

    /// Keys the table tracks now.
    pub(crate) fn tracked_keys(&self) -> usize {
        self.table.len()
    }
}

/// What the handle reads of a keyed limit, whatever its key type.
pub(crate) trait KeyCounts: Send + Sync {
    fn active_keys(&self) -> u32;
    fn tracked_keys(&self) -> usize;
}

/// A keyed limit's extractor and shares, shared by every service of the layer.
pub(crate) struct Keyed<X, K> {
    pub(crate) extractor: X,
    pub(crate) shares: FairShares<K>,
}

impl<X, K> std::fmt::Debug for Keyed<X, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shares.fmt(f)
    }
}

impl<X: Send + Sync, K: Hash + Eq + Clone + Send + Sync> KeyCounts for Keyed<X, K> {
    fn active_keys(&self) -> u32 {
        self.shares.active_keys()
    }

    fn tracked_keys(&self) -> usize {
        self.shares.tracked_keys()
    }
}
