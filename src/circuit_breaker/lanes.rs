//! Spreading the per-call writes that every thread would otherwise make to one shared
//! cache line over a few lanes, one per CPU: a thread always uses the same lane.
//!
//! The lanes also carry the breaker's policy to its calls. A live reload publishes a new
//! set of lanes holding the new policy; each service keeps the set it last saw and
//! checks with one relaxed load per call whether it is still the one in force
//! ([`arc_swap::Cache`]), and each call holds its lane, and so its policy, to the end.
//! So a call is decided and recorded under one policy, and the success path pays one
//! load and a compare for the reload, not a synchronised read of a shared pointer.

use super::state::{Core, Policy};
use crate::sync::{AtomicU32, AtomicU64, CachePadded, Ordering};
use std::sync::Arc;

/// How many lanes a breaker has: the CPUs (at most 32), rounded up to a power of two.
pub(crate) fn count() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.min(32).next_power_of_two()
}

/// This thread's lane among `lanes` (a power of two).
#[inline]
pub(crate) fn current(lanes: usize) -> usize {
    thread_local! {
        static THREAD: usize = {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        };
    }
    THREAD.with(|thread| *thread) & (lanes - 1)
}

/// The breaker as its services hold it: one core behind a reference-counted handle per
/// lane. Every call holds a reference to its breaker until its outcome is known (a
/// gRPC body may outlive the service); with one shared count, those increments would
/// be the most contended write of a call.
pub(crate) struct CoreRefs {
    lanes: Box<[Arc<CoreRef>]>,
}

/// One lane's reference to the core and the policy it was published with, on cache
/// lines of its own.
#[repr(align(128))]
pub(crate) struct CoreRef {
    pub(crate) core: Arc<Core>,
    pub(crate) policy: Arc<Policy>,
}

impl CoreRefs {
    /// Lanes to `core` with the policy now in force.
    pub(crate) fn new(core: &Arc<Core>) -> Self {
        Self::with(core, &core.current_policy())
    }

    /// Lanes to `core` with `policy`.
    pub(crate) fn with(core: &Arc<Core>, policy: &Arc<Policy>) -> Self {
        Self {
            lanes: (0..count())
                .map(|_| {
                    Arc::new(CoreRef {
                        core: Arc::clone(core),
                        policy: Arc::clone(policy),
                    })
                })
                .collect(),
        }
    }

    #[inline]
    pub(crate) fn core(&self) -> &Core {
        &self.lanes[0].core
    }

    /// A reference for one call, from this thread's lane.
    #[inline]
    pub(crate) fn take(&self) -> Arc<CoreRef> {
        Arc::clone(&self.lanes[current(self.lanes.len())])
    }
}

/// The lanes in force for one breaker, swapped whole by a reload.
pub(crate) type Published = Arc<arc_swap::ArcSwap<CoreRefs>>;

/// Lanes for a new breaker.
pub(crate) fn publish(core: &Arc<Core>) -> Published {
    Arc::new(arc_swap::ArcSwap::from_pointee(CoreRefs::new(core)))
}

/// A service's view of its breaker's lanes: the set it last saw, renewed when a reload
/// published another.
#[derive(Clone)]
pub(crate) struct Lanes(arc_swap::Cache<Published, Arc<CoreRefs>>);

impl Lanes {
    pub(crate) fn new(published: &Published) -> Self {
        Self(arc_swap::Cache::new(Arc::clone(published)))
    }

    /// The lanes in force.
    #[inline]
    pub(crate) fn load(&mut self) -> &Arc<CoreRefs> {
        self.0.load()
    }

    /// The lanes in force, without renewing the view (for `Debug`).
    pub(crate) fn peek(&self) -> arc_swap::Guard<Arc<CoreRefs>> {
        self.0.arc_swap().load()
    }
}

/// Hands out ring positions in order. A single cursor would be one contended write per
/// call, which stops two threads from going faster than one; instead each lane takes a
/// block of positions from the shared cursor at a time and hands them out itself. One
/// thread still fills the ring in exact order; with several, the window holds the last
/// N outcomes give or take the positions reserved but not yet used (at most one block
/// per lane, an eighth of the window), which keep the outcome of the lap before.
pub(crate) struct Cursor {
    shared: CachePadded<AtomicU32>,
    /// Per lane: the next position (high half) and the end of its block (low half).
    blocks: Box<[CachePadded<AtomicU64>]>,
    block: u32,
}

impl Cursor {
    pub(crate) fn new(window: usize) -> Self {
        let lanes = count();
        let block = (window / (8 * lanes)).clamp(1, 64) as u32;
        Self {
            shared: CachePadded(AtomicU32::new(0)),
            blocks: if block == 1 {
                Box::new([])
            } else {
                (0..lanes).map(|_| CachePadded(AtomicU64::new(0))).collect()
            },
            block,
        }
    }

    /// The position after the last one handed out (to a lane's block, used or not).
    #[cfg(any(feature = "serde", loom))]
    pub(crate) fn position(&self) -> u32 {
        self.shared.load(Ordering::Relaxed)
    }

    /// Hands out `position` next, from a cursor nobody uses yet.
    #[cfg(any(feature = "serde", loom))]
    pub(crate) fn restart_at(&self, position: u32) {
        self.shared.store(position, Ordering::Relaxed);
    }

    /// The next position (wrapping at 2^32).
    #[inline]
    pub(crate) fn next(&self) -> u32 {
        if self.blocks.is_empty() {
            return self.shared.fetch_add(1, Ordering::Relaxed);
        }
        let lane = &self.blocks[current(self.blocks.len())];
        let mut current = lane.load(Ordering::Relaxed);
        loop {
            let (next, end) = ((current >> 32) as u32, current as u32);
            let has_positions = end.wrapping_sub(next).wrapping_sub(1) < self.block;
            let (position, end) = if has_positions {
                (next, end)
            } else {
                let start = self.shared.fetch_add(self.block, Ordering::Relaxed);
                (start, start.wrapping_add(self.block))
            };
            let updated = u64::from(position.wrapping_add(1)) << 32 | u64::from(end);
            match lane.compare_exchange_weak(current, updated, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return position,
                // Another thread on this lane moved it; a block taken meanwhile is lost,
                // which costs its positions one lap of staleness and nothing else.
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn one_thread_gets_every_position_in_order() {
        for window in [1, 10, 100, 1000, 100_000] {
            let cursor = Cursor::new(window);
            for expected in 0..5000u32 {
                assert_eq!(cursor.next(), expected);
            }
        }
    }
}
