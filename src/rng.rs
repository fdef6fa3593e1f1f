//! The crate's one source of randomness (jitter for retries and for breakers' open
//! times, fresh trace span ids), without a `rand` dependency.

use std::hash::{BuildHasher, Hasher, RandomState};

/// A random `u64` without a syscall per draw: std's `RandomState` is seeded from the OS
/// once per thread and stepped on every call, and SipHash scrambles the step. Not for
/// cryptography.
pub(crate) fn random_u64() -> u64 {
    RandomState::new().build_hasher().finish()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn random_values_differ() {
        let draws: std::collections::HashSet<u64> = (0..64).map(|_| random_u64()).collect();
        assert_eq!(draws.len(), 64);
    }
}
