//! The crate's one small random-number source: retry jitter and trace span ids.

use std::hash::{BuildHasher, Hasher};

/// A random `u64` without a `rand` dependency and without a syscall per draw: std's
/// `RandomState` is seeded from the OS once per thread and stepped on every call, and
/// SipHash scrambles the step.
pub(crate) fn random_u64() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

#[cfg(test)]
mod tests {
    #[test]
    fn draws_differ() {
        let draws: std::collections::HashSet<u64> = (0..64).map(|_| super::random_u64()).collect();
        assert_eq!(draws.len(), 64);
    }
}
