//! Whether Redis is answering, so that a dead server costs one timeout per `recheck`
//! rather than one per request, and the switch is logged once each way.

use std::time::Duration;

use tokio::time::Instant;

use super::super::bucket::nanos_since;
use crate::sync::{AtomicU64, Ordering};

/// `down_until` is zero while Redis answers; otherwise the instant (nanoseconds since
/// `base`, plus one so that it is never zero) from which the next request asks Redis
/// again.
pub(super) struct Health {
    base: Instant,
    down_until: AtomicU64,
    recheck: u64,
}

/// Where one request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// To Redis (it answers, or this request is the one that checks whether it is back).
    Redis,
    /// Straight to the fallback policy.
    Fallback,
}

impl Health {
    pub(super) fn new(recheck: Duration) -> Self {
        Self {
            base: Instant::now(),
            down_until: AtomicU64::new(0),
            recheck: u64::try_from(recheck.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    fn now(&self) -> u64 {
        nanos_since(self.base, Instant::now()) + 1
    }

    pub(super) fn route(&self) -> Route {
        let down_until = self.down_until.load(Ordering::Acquire);
        if down_until == 0 {
            return Route::Redis;
        }
        let now = self.now();
        // One request per `recheck` wins the right to ask Redis whether it is back.
        let won = now >= down_until
            && self
                .down_until
                .compare_exchange(
                    down_until,
                    now.saturating_add(self.recheck),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok();
        if won { Route::Redis } else { Route::Fallback }
    }

    /// Records a failed or late answer; true if Redis was considered up until now.
    pub(super) fn failed(&self) -> bool {
        let until = self.now().saturating_add(self.recheck);
        self.down_until
            .compare_exchange(0, until, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Records an answer; true if Redis was considered down until now.
    pub(super) fn answered(&self) -> bool {
        self.down_until.load(Ordering::Acquire) != 0
            && self.down_until.swap(0, Ordering::AcqRel) != 0
    }

    /// Whether requests go to the fallback policy now.
    pub(super) fn is_down(&self) -> bool {
        self.down_until.load(Ordering::Acquire) != 0
    }
}
