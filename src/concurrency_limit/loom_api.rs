//! The permit counter, as the loom model checks in `src/loom_tests.rs`
//! drive it. Only built for them (`--cfg loom`, tests).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::fair::{FairAdmission, FairShares};
use super::limiter::{Admission, Limit, Limiter, Policy, Waiter};
use super::release::Permit;

/// A concurrency limit's counter, with an optional queue.
#[derive(Debug)]
pub(crate) struct Permits(Limiter);

/// What [`Permits::admit`] decided.
#[derive(Debug)]
pub(crate) enum Admit {
    /// A permit, to give back with [`Permits::release`].
    Permit,
    /// A place in the queue.
    Queued(Place),
    /// Refused.
    Rejected,
}

/// A place in the queue.
#[derive(Debug)]
pub(crate) struct Place(Arc<Waiter>);

impl Place {
    /// Whether a permit was handed to this place.
    pub(crate) fn is_granted(&self) -> bool {
        self.0.is_granted()
    }
}

impl Permits {
    /// `limit` permits, and a queue of `queue` places (none for zero).
    pub(crate) fn new(limit: u32, queue: usize) -> Self {
        let policy = Policy {
            waiters: queue,
            max_wait: Duration::from_secs(1),
            ..Policy::default()
        };
        Self(Limiter::new(Limit::Fixed(limit), policy))
    }

    /// `limit` permits, no queue, refused requests told to come back after `retry_after`.
    pub(crate) fn with_retry_after(limit: u32, retry_after: Duration) -> Self {
        let policy = Policy {
            retry_after,
            ..Policy::default()
        };
        Self(Limiter::new(Limit::Fixed(limit), policy))
    }

    /// A live reload to a static `limit` and `retry_after` (no queue).
    pub(crate) fn reload(&self, limit: u32, retry_after: Duration) {
        let policy = Policy {
            retry_after,
            ..Policy::default()
        };
        self.0.reload(Some(Limit::Fixed(limit)), policy);
    }

    /// Takes a permit, or says the limit and `retry_after` it was refused with.
    pub(crate) fn admit_or_refusal(&self) -> Result<(), (u32, Duration)> {
        match self.0.try_admit() {
            Admission::Admitted(_) => Ok(()),
            Admission::Rejected(refusal) => Err((refusal.limit, refusal.retry_after)),
            Admission::Queued { .. } => panic!("no queue"),
        }
    }

    /// Takes a permit, a place, or nothing.
    pub(crate) fn admit(&self) -> Admit {
        match self.0.try_admit() {
            Admission::Admitted(_) => Admit::Permit,
            Admission::Queued { waiter, .. } => Admit::Queued(Place(waiter)),
            Admission::Rejected(_) => Admit::Rejected,
        }
    }

    /// Gives a permit back.
    pub(crate) fn release(&self) {
        self.0.release();
    }

    /// Leaves the queue (a dropped waiter): `true` when it was granted a permit
    /// meanwhile, which the caller must release.
    pub(crate) fn leave(&self, place: &Place) -> bool {
        self.0.leave(&place.0)
    }

    /// Moves the limit.
    pub(crate) fn set_limit(&self, limit: u32) {
        self.0.set_limit(limit);
    }

    /// The permits held.
    pub(crate) fn in_flight(&self) -> u32 {
        self.0.in_flight()
    }

    /// The places taken in the queue.
    pub(crate) fn queued(&self) -> usize {
        self.0.queued()
    }
}

/// A keyed concurrency limit's admission: the permit counter, the key table and the
/// fair shares, at one instant (no time passes in a model).
#[derive(Debug)]
pub(crate) struct FairPermits {
    limiter: Arc<Limiter>,
    shares: FairShares<u8>,
    now: Instant,
}

/// A keyed permit: given back, the key's count and the counter's, when dropped.
#[derive(Debug)]
pub(crate) struct KeyPermit(#[allow(dead_code)] Permit);

impl FairPermits {
    /// `limit` permits shared fairly between at most `max_keys` keys.
    pub(crate) fn new(limit: u32, max_keys: usize) -> Self {
        let now = Instant::now();
        Self {
            limiter: Arc::new(Limiter::fixed(limit)),
            shares: FairShares::new(max_keys, Duration::from_secs(1), now),
            now,
        }
    }

    /// A permit for `key`, or `None` when refused.
    pub(crate) fn admit(&self, key: u8) -> Option<KeyPermit> {
        match self.shares.admit(&self.limiter, Some(&key), self.now) {
            FairAdmission::Admitted(_, cell) => {
                Some(KeyPermit(Permit::keyed(Arc::clone(&self.limiter), cell)))
            }
            FairAdmission::Rejected(_) => None,
        }
    }

    /// The permits held.
    pub(crate) fn in_flight(&self) -> u32 {
        self.limiter.in_flight()
    }

    /// The keys holding a permit.
    pub(crate) fn active_keys(&self) -> u32 {
        self.shares.active_keys()
    }
}
