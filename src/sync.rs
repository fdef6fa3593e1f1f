//! The atomics and locks the lock-free cores use: std's, or loom's under `--cfg loom` so
//! that the model checks in `tests/loom.rs` explore every interleaving.

#[cfg(loom)]
#[allow(unused_imports)] // each core takes what it needs
pub(crate) use loom::sync::{
    Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
};

#[cfg(not(loom))]
#[allow(unused_imports)] // each core takes what it needs
pub(crate) use std::sync::{
    Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
};
