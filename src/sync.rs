//! The synchronisation pieces every layer shares: the atomics the lock-free cores use
//! (std's, or loom's under `--cfg loom` so that the model checks in `src/loom_tests.rs`
//! explore every interleaving), the crate's mutexes (loom's too under `--cfg loom`),
//! cache padding for hot words, and lock recovery.

use std::sync::PoisonError;
#[cfg(feature = "redis")]
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

// `Arc` is loom's too where a core reads its reference count (a keyed table dropping an
// entry nobody holds), so that the model sees the release of the last reference.
#[cfg(loom)]
#[allow(unused_imports)] // each core takes what it needs
pub(crate) use loom::sync::{
    Arc, Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence},
};

#[cfg(not(loom))]
#[allow(unused_imports)] // each core takes what it needs
pub(crate) use std::sync::{
    Arc, Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence},
};

/// A value read on every call and replaced now and then (a live reload), without a lock
/// for readers: [`arc_swap::ArcSwap`], whose readers announce the pointer they hold in a
/// thread-local slot instead of touching a shared reference count. Under loom, a
/// mutex-guarded `Arc` (arc-swap has no loom build): the models treat the swap as the
/// linearizable cell it is and explore what the cores do around it.
pub(crate) struct Swap<T>(
    #[cfg(not(loom))] arc_swap::ArcSwap<T>,
    #[cfg(loom)] Mutex<std::sync::Arc<T>>,
);

/// What [`Swap::load`] gives: the value in force when it was loaded, held for as long as
/// the guard lives (keep it short: it is not a reference count).
#[cfg(not(loom))]
pub(crate) type Loaded<T> = arc_swap::Guard<std::sync::Arc<T>>;
#[cfg(loom)]
pub(crate) type Loaded<T> = std::sync::Arc<T>;

impl<T> Swap<T> {
    pub(crate) fn new(value: std::sync::Arc<T>) -> Self {
        #[cfg(not(loom))]
        return Self(arc_swap::ArcSwap::new(value));
        #[cfg(loom)]
        return Self(Mutex::new(value));
    }

    /// The value in force.
    #[inline]
    pub(crate) fn load(&self) -> Loaded<T> {
        #[cfg(not(loom))]
        return self.0.load();
        #[cfg(loom)]
        return std::sync::Arc::clone(&lock(&self.0));
    }

    /// Puts `value` in force for every later [`load`](Self::load).
    #[cfg(any(feature = "serde", loom))]
    pub(crate) fn store(&self, value: std::sync::Arc<T>) {
        #[cfg(not(loom))]
        self.0.store(value);
        #[cfg(loom)]
        {
            *lock(&self.0) = value;
        }
    }
}

/// Keeps a hot value on a pair of cache lines of its own (adjacent-line prefetchers pull
/// lines in twos), so that threads hammering it do not also evict their neighbours, and
/// threads that only read the neighbours do not steal it from the thread about to write
/// it.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct CachePadded<T>(pub(crate) T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

// Every lock in the crate guards state that each update leaves whole (one assignment, or
// a value rebuilt before it is stored), so a panic elsewhere while the lock was held
// cannot have left it half-written: a poisoned lock is used as is rather than turning
// one user panic into a panic in every later request.

/// Tells the processor (or under loom, the model) that this thread waits in a loop for
/// another to finish something short.
#[cfg(any(test, feature = "serde"))]
pub(crate) fn spin_loop() {
    #[cfg(loom)]
    loom::hint::spin_loop();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}

/// Locks `mutex`, recovering it if a panic poisoned it.
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Locks `lock` for reading, recovering it if a panic poisoned it. (Only the Redis
/// store's quota, read on every request and written by the handle, is an `RwLock`.)
#[cfg(feature = "redis")]
pub(crate) fn read<T: ?Sized>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Locks `lock` for writing, recovering it if a panic poisoned it.
#[cfg(feature = "redis")]
pub(crate) fn write<T: ?Sized>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}
