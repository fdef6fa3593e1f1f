//! Shadow mode: the limiter decides and counts as it would, and lets every request
//! through.

use crate::sync::{AtomicU64, Ordering};

/// What a limiter in shadow mode would have refused, shared by its services and its
/// handle.
#[derive(Debug, Default)]
pub(crate) struct Shadow {
    would_reject: AtomicU64,
}

impl Shadow {
    /// A request the limiter would have refused (`why`), let through instead.
    pub(crate) fn let_through(&self, why: &'static str) {
        self.would_reject.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "tracing")]
        tracing::debug!(
            reason = why,
            "request would be rate limited (shadow mode: let through)"
        );
        #[cfg(not(feature = "tracing"))]
        let _ = why;
        crate::metrics::rate_limited_in_shadow();
    }

    pub(crate) fn would_reject(&self) -> u64 {
        self.would_reject.load(Ordering::Relaxed)
    }
}
