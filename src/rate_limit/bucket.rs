//! The sans-io token bucket: GCRA (the generic cell rate algorithm) on one atomic word.
//!
//! A bucket is one number, its *theoretical arrival time* (TAT): the instant at which it
//! would be full again, in nanoseconds since the bucket's base instant. A request of cost
//! `c` moves the TAT `c` refill intervals later; it is admitted when the TAT then lies no
//! more than `capacity` intervals after `now`. A TAT in the past means a full bucket.
//!
//! The word also carries a 4-bit tag naming the [`QuotaRing`] slot whose quota the TAT is
//! measured in, so that a runtime change of rate or capacity and every acquisition agree
//! on the quota without a lock: readers decide with the quota their word names, and the
//! writer republishes the word, rescaled, under the new tag with one compare-and-swap.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::error::ConfigError;
use crate::sync::{AtomicU64, Ordering};

const TAT_BITS: u32 = 60;
const TAT_MASK: u64 = (1 << TAT_BITS) - 1;
/// Clock readings saturate here (18 years after the base instant), so that a TAT plus the
/// largest tolerance and wait still fits in [`TAT_BITS`].
const MAX_NOW: u64 = 1 << 59;
/// The largest tolerance (capacity times interval) and the largest `max_wait`: 4.5 years.
pub(crate) const MAX_SPAN: u64 = 1 << 57;
const SLOTS: usize = 16;

/// A bucket's size and refill rate.
///
/// The refill interval (the time one token takes to come back) is `period / tokens`,
/// rounded *up* to the nanosecond: the limiter may admit a hair less than the configured
/// rate (under one part in a million for intervals above a millisecond), never more, and a
/// client whose requests are each at least `period / tokens` apart is never refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    capacity: u64,
    interval: u64,
}

impl Quota {
    /// `capacity` tokens (the burst), refilled continuously at `refill_tokens` per
    /// `refill_period`.
    pub fn new(
        capacity: u64,
        refill_tokens: u64,
        refill_period: Duration,
    ) -> Result<Self, ConfigError> {
        Self::checked(capacity, interval(refill_tokens, refill_period)?)
    }

    fn checked(capacity: u64, interval: u64) -> Result<Self, ConfigError> {
        if capacity == 0 {
            return Err(ConfigError::ZeroCapacity);
        }
        match capacity.checked_mul(interval) {
            Some(tolerance) if tolerance <= MAX_SPAN => Ok(Self { capacity, interval }),
            _ => Err(ConfigError::TooLarge),
        }
    }

    /// The same rate with another capacity.
    pub fn with_capacity(self, capacity: u64) -> Result<Self, ConfigError> {
        Self::checked(capacity, self.interval)
    }

    /// The same capacity with another refill rate.
    pub fn with_refill(self, tokens: u64, period: Duration) -> Result<Self, ConfigError> {
        Self::checked(self.capacity, interval(tokens, period)?)
    }

    /// The burst size: how many tokens a full bucket holds.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The time one token takes to come back.
    pub fn refill_interval(&self) -> Duration {
        Duration::from_nanos(self.interval)
    }

    /// The time an empty bucket takes to fill up: the window of the IETF `RateLimit-Policy`.
    pub fn period(&self) -> Duration {
        Duration::from_nanos(self.tolerance())
    }

    #[inline]
    fn tolerance(&self) -> u64 {
        self.capacity * self.interval
    }

    /// The tokens a bucket whose TAT is `tat` holds at `now`.
    #[inline]
    pub(crate) fn available(&self, tat: u64, now: u64) -> u64 {
        let debt = tat.saturating_sub(now).min(self.tolerance());
        (self.tolerance() - debt) / self.interval
    }

    /// The GCRA decision for a request of `cost` tokens arriving at `now`, willing to wait
    /// up to `max_wait` nanoseconds.
    #[inline]
    pub(crate) fn decide(&self, tat: u64, now: u64, cost: u64, max_wait: u64) -> Verdict {
        let tolerance = self.tolerance();
        let increment = match cost.checked_mul(self.interval) {
            Some(increment) if increment <= tolerance => increment,
            _ => {
                return Verdict::Deny(Denied::CostExceedsCapacity {
                    cost,
                    capacity: self.capacity,
                });
            }
        };
        let new_tat = tat.max(now) + increment;
        let wait = new_tat.saturating_sub(tolerance).saturating_sub(now);
        if wait > max_wait {
            return Verdict::Deny(Denied::Limited {
                retry_after: Duration::from_nanos(wait),
                remaining: self.available(tat, now),
            });
        }
        Verdict::Admit {
            tat: new_tat,
            wait,
            increment,
            quota: *self,
        }
    }

    /// Re-expresses a TAT measured in `self` in `to`, keeping the tokens the bucket holds at
    /// `now` (clamped to the new capacity) and any debt beyond empty (queued reservations).
    pub(crate) fn rescale(&self, tat: u64, now: u64, to: &Quota) -> u64 {
        let held = i128::from(self.tolerance()) - i128::from(tat.saturating_sub(now));
        let held = (held * i128::from(to.interval)).div_euclid(i128::from(self.interval));
        let debt = i128::from(to.tolerance()) - held.min(i128::from(to.tolerance()));
        let room = i128::from(TAT_MASK - now);
        now + u64::try_from(debt.min(room)).unwrap_or(0)
    }
}

fn interval(tokens: u64, period: Duration) -> Result<u64, ConfigError> {
    if tokens == 0 {
        return Err(ConfigError::ZeroRefillTokens);
    }
    if period.is_zero() {
        return Err(ConfigError::ZeroRefillPeriod);
    }
    let nanos = period.as_nanos();
    if nanos < u128::from(tokens) {
        return Err(ConfigError::RateTooHigh);
    }
    u64::try_from(nanos.div_ceil(u128::from(tokens))).map_err(|_| ConfigError::TooLarge)
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Not enough tokens now, nor within the allowed wait.
    Limited {
        /// How long until a request of the same cost would be admitted at once (if nobody
        /// else takes the tokens first): a retry after exactly this long succeeds.
        retry_after: Duration,
        /// The tokens the bucket holds now.
        remaining: u64,
    },
    /// The request costs more than a full bucket holds: it can never be admitted.
    CostExceedsCapacity {
        /// The request's cost.
        cost: u64,
        /// The bucket's capacity.
        capacity: u64,
    },
}

/// The outcome of [`Quota::decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Admitted, at once (`wait == 0`) or after `wait` nanoseconds; `tat` is the new TAT,
    /// measured in `quota`. (The tokens left are not computed here: that takes a
    /// division, which the success path only pays for when someone reads them.)
    Admit {
        tat: u64,
        wait: u64,
        increment: u64,
        quota: Quota,
    },
    Deny(Denied),
}

/// `max_wait` in nanoseconds, capped at [`MAX_SPAN`] so that an admitted TAT always fits
/// in [`TAT_BITS`] (a longer wait is refused, as if the request had asked for 4.5 years).
#[inline]
pub(crate) fn max_wait_nanos(max_wait: Duration) -> u64 {
    u64::try_from(max_wait.as_nanos()).map_or(MAX_SPAN, |nanos| nanos.min(MAX_SPAN))
}

/// Nanoseconds from `base` to `now`, saturating at both ends.
#[inline]
pub(crate) fn nanos_since(base: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(base).as_nanos())
        .unwrap_or(MAX_NOW)
        .min(MAX_NOW)
}

struct Slot {
    capacity: AtomicU64,
    interval: AtomicU64,
}

/// The quotas in force, published without a lock for readers.
///
/// Each change goes to the next of sixteen slots; a slot is overwritten only sixteen
/// changes after it was current, by which time every atomic bucket has been moved off it
/// by the writer (so a reader whose word still names it fails its compare-and-swap).
pub(crate) struct QuotaRing {
    slots: [Slot; SLOTS],
    generation: AtomicU64,
    writer: Mutex<()>,
}

impl QuotaRing {
    pub(crate) fn new(quota: Quota) -> Self {
        Self {
            slots: std::array::from_fn(|_| Slot {
                capacity: AtomicU64::new(quota.capacity),
                interval: AtomicU64::new(quota.interval),
            }),
            generation: AtomicU64::new(0),
            writer: Mutex::new(()),
        }
    }

    fn store(&self, tag: usize, quota: Quota) {
        self.slots[tag]
            .capacity
            .store(quota.capacity, Ordering::Release);
        self.slots[tag]
            .interval
            .store(quota.interval, Ordering::Release);
    }

    #[inline]
    fn load(&self, tag: usize) -> Quota {
        Quota {
            capacity: self.slots[tag].capacity.load(Ordering::Acquire),
            interval: self.slots[tag].interval.load(Ordering::Acquire),
        }
    }

    /// The quota in force now.
    #[inline]
    pub(crate) fn current(&self) -> Quota {
        loop {
            let generation = self.generation.load(Ordering::Acquire);
            let quota = self.load(slot_of(generation));
            // The slot was not rewritten under us unless a full turn of changes happened.
            let later = self.generation.load(Ordering::Acquire);
            if later.wrapping_sub(generation) < SLOTS as u64 - 1 {
                return quota;
            }
        }
    }

    /// Publishes `change(current)` and hands the old and new quota (with their tags) to
    /// `migrate` while still holding the writer lock, so that changes apply in order.
    pub(crate) fn update(
        &self,
        change: impl FnOnce(Quota) -> Result<Quota, ConfigError>,
        migrate: impl FnOnce(Migration),
    ) -> Result<(), ConfigError> {
        let _writer = self
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let generation = self.generation.load(Ordering::Acquire);
        let from = self.load(slot_of(generation));
        let to = change(from)?;
        let next = generation.wrapping_add(1);
        self.store(slot_of(next), to);
        self.generation.store(next, Ordering::Release);
        migrate(Migration {
            from,
            from_tag: slot_of(generation) as u64,
            to,
            to_tag: slot_of(next) as u64,
        });
        Ok(())
    }
}

fn slot_of(generation: u64) -> usize {
    (generation % SLOTS as u64) as usize
}

/// A quota change, handed to the buckets that must move to it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    from: Quota,
    from_tag: u64,
    to: Quota,
    to_tag: u64,
}

#[inline]
fn pack(tag: u64, tat: u64) -> u64 {
    debug_assert!(tat <= TAT_MASK, "a TAT must not spill into the quota tag");
    (tag << TAT_BITS) | tat
}

#[inline]
fn unpack(word: u64) -> (u64, u64) {
    (word >> TAT_BITS, word & TAT_MASK)
}

/// One lock-free bucket measured in a [`QuotaRing`]'s quotas.
///
/// Every admission writes the word, so it gets a cache line (a pair: adjacent-line
/// prefetchers pull lines in twos) to itself: threads that read the quota ring or the
/// clock base do not steal it from the thread about to compare-and-swap it.
pub(crate) struct AtomicBucket {
    word: CachePadded<AtomicU64>,
}

/// Aligns (and so pads) a value to a pair of cache lines.
#[repr(align(128))]
pub(crate) struct CachePadded<T>(pub(crate) T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// A slot a waiting request holds in an [`AtomicBucket`] or a keyed bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Claim {
    word: u64,
    increment: u64,
}

impl AtomicBucket {
    /// A full bucket measured in the ring's first quota.
    pub(crate) fn new() -> Self {
        Self {
            word: CachePadded(AtomicU64::new(pack(0, 0))),
        }
    }

    /// Takes `cost` tokens now, or reserves them within `max_wait`.
    #[inline]
    pub(crate) fn acquire(
        &self,
        ring: &QuotaRing,
        now: u64,
        cost: u64,
        max_wait: u64,
    ) -> (Verdict, Claim) {
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            let (tag, tat) = unpack(word);
            let verdict = ring.load(tag as usize).decide(tat, now, cost, max_wait);
            let Verdict::Admit { tat, increment, .. } = verdict else {
                return (verdict, Claim { word, increment: 0 });
            };
            let claimed = pack(tag, tat);
            match self.word.compare_exchange_weak(
                word,
                claimed,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    let slot = Claim {
                        word: claimed,
                        increment,
                    };
                    return (verdict, slot);
                }
                Err(actual) => word = actual,
            }
        }
    }

    /// Gives a reserved slot back if no later reservation or quota change has happened
    /// since: then the bucket is exactly as if the request had never come. Otherwise the
    /// slot stays spent (later waiters keep their times; capacity is under-used, never
    /// over-used).
    pub(crate) fn cancel(&self, slot: Claim) {
        let (tag, tat) = unpack(slot.word);
        let _ = self.word.compare_exchange(
            slot.word,
            pack(tag, tat.saturating_sub(slot.increment)),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    pub(crate) fn available(&self, ring: &QuotaRing, now: u64) -> u64 {
        let (tag, tat) = unpack(self.word.load(Ordering::Acquire));
        ring.load(tag as usize).available(tat, now)
    }

    /// Moves the bucket onto a new quota (called by the ring's writer only).
    pub(crate) fn migrate(&self, migration: Migration, now: u64) {
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            let (tag, tat) = unpack(word);
            debug_assert_eq!(tag, migration.from_tag, "one writer at a time");
            let moved = pack(
                migration.to_tag,
                migration.from.rescale(tat, now, &migration.to),
            );
            match self
                .word
                .compare_exchange_weak(word, moved, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(actual) => word = actual,
            }
        }
    }
}

/// A token bucket you can drive yourself: the core under
/// [`RateLimitLayer`](super::RateLimitLayer), lock-free and shareable across threads.
///
/// Every method takes the current time, so tests (and simulations) control the clock.
///
/// ```
/// use std::time::Duration;
/// use palisade::rate_limit::{Denied, Quota, TokenBucket};
/// use tokio::time::Instant;
///
/// let start = Instant::now();
/// let bucket = TokenBucket::new(Quota::new(2, 1, Duration::from_secs(1))?, start);
/// assert!(bucket.acquire(1, start).is_ok());
/// assert!(bucket.acquire(1, start).is_ok());
/// let Err(Denied::Limited { retry_after, .. }) = bucket.acquire(1, start) else { panic!() };
/// assert_eq!(retry_after, Duration::from_secs(1));
/// assert!(bucket.acquire(1, start + retry_after).is_ok());
/// # Ok::<(), palisade::rate_limit::ConfigError>(())
/// ```
pub struct TokenBucket {
    ring: QuotaRing,
    bucket: AtomicBucket,
    base: Instant,
}

/// A request [`TokenBucket::acquire`] let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// The tokens left after this request.
    pub remaining: u64,
}

/// A future slot held by [`TokenBucket::reserve`]: go ahead after [`wait`](Self::wait), or
/// hand it back with [`TokenBucket::cancel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    wait: Duration,
    slot: Claim,
}

impl Reservation {
    /// How long the holder must wait before going ahead (zero: go now).
    pub fn wait(&self) -> Duration {
        self.wait
    }
}

impl TokenBucket {
    /// A full bucket; `now` is the base its clock counts from.
    pub fn new(quota: Quota, now: Instant) -> Self {
        Self {
            ring: QuotaRing::new(quota),
            bucket: AtomicBucket::new(),
            base: now,
        }
    }

    /// Takes `cost` tokens if the bucket holds them at `now`.
    pub fn acquire(&self, cost: u64, now: Instant) -> Result<Admitted, Denied> {
        let now = self.nanos(now);
        match self.take(cost, 0, now) {
            (Verdict::Admit { tat, quota, .. }, _) => Ok(Admitted {
                remaining: quota.available(tat, now),
            }),
            (Verdict::Deny(denied), _) => Err(denied),
        }
    }

    /// Takes `cost` tokens at `now`, or reserves the earliest slot at which they will be
    /// there if that is no more than `max_wait` away (at most 2^57 ns, about 4.5 years:
    /// a longer `max_wait` counts as that). Reservations are served in order.
    pub fn reserve(
        &self,
        cost: u64,
        max_wait: Duration,
        now: Instant,
    ) -> Result<Reservation, Denied> {
        match self.take(cost, max_wait_nanos(max_wait), self.nanos(now)) {
            (Verdict::Admit { wait, .. }, slot) => Ok(Reservation {
                wait: Duration::from_nanos(wait),
                slot,
            }),
            (Verdict::Deny(denied), _) => Err(denied),
        }
    }

    #[inline]
    pub(crate) fn take(&self, cost: u64, max_wait: u64, now: u64) -> (Verdict, Claim) {
        self.bucket.acquire(&self.ring, now, cost, max_wait)
    }

    #[inline]
    pub(crate) fn nanos(&self, now: Instant) -> u64 {
        nanos_since(self.base, now)
    }

    pub(crate) fn give_back(&self, claim: Claim) {
        self.bucket.cancel(claim);
    }

    /// Hands back a reservation whose holder gave up: the tokens return if no later
    /// reservation or quota change happened since, otherwise the slot stays spent (the
    /// bucket never over-admits either way).
    pub fn cancel(&self, reservation: Reservation) {
        self.give_back(reservation.slot);
    }

    /// The tokens the bucket holds at `now`.
    pub fn available(&self, now: Instant) -> u64 {
        self.available_at(self.nanos(now))
    }

    pub(crate) fn available_at(&self, now: u64) -> u64 {
        self.bucket.available(&self.ring, now)
    }

    /// The quota in force.
    #[inline]
    pub fn quota(&self) -> Quota {
        self.ring.current()
    }

    /// Switches to `quota` at `now`, keeping the tokens the bucket holds (clamped to the
    /// new capacity) and any queued reservations.
    pub fn set_quota(&self, quota: Quota, now: Instant) {
        // Cannot fail: the change itself is infallible.
        let _ = self.update(now, |_| Ok(quota));
    }

    /// Applies `change` to the quota in force and moves the bucket onto it.
    pub(crate) fn update(
        &self,
        now: Instant,
        change: impl FnOnce(Quota) -> Result<Quota, ConfigError>,
    ) -> Result<(), ConfigError> {
        let now = self.nanos(now);
        self.ring
            .update(change, |migration| self.bucket.migrate(migration, now))
    }
}

impl std::fmt::Debug for TokenBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenBucket")
            .field("quota", &self.quota())
            .finish_non_exhaustive()
    }
}
