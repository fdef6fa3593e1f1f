//! The sans-io token bucket: GCRA (the generic cell rate algorithm) on one atomic word.
//!
//! A bucket is one number, its *theoretical arrival time* (TAT): the instant at which it
//! would be full again. A request of cost `c` moves the TAT `c` refill intervals later;
//! it is admitted when the TAT then lies no more than `capacity` intervals after `now`.
//! A TAT in the past means a full bucket.
//!
//! Time is counted exactly: for `refill(n, period)` with `g = gcd(n, period_ns)`, one
//! token costs `period_ns / g` *units* and one nanosecond is `n / g` units, so `n`
//! intervals add up to exactly `period` (a nanosecond-rounded interval would not, and
//! a client keeping exactly to the rate would be refused now and then).
//!
//! The TAT is counted in units since its *frame*'s epoch. The word carries a 4-bit tag
//! naming the [`QuotaRing`] slot that holds the frame (quota and epoch) the TAT is
//! measured in, so that a runtime change of rate or capacity, a move of the epoch, and
//! every acquisition agree on the frame without a lock: readers decide with the frame
//! their word names, and the writer republishes the word, rescaled, under the new tag
//! with one compare-and-swap. The epoch moves forward (a *rebase*) whenever `now` would
//! lie [`HORIZON`] units past it, so the 60 bits of a TAT never run out, however long the
//! process lives and however fine the units.

use crate::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::error::RateLimitConfigError;
use crate::sync::{AtomicU64, CachePadded, Ordering, lock};

const TAT_BITS: u32 = 60;
const TAT_MASK: u64 = (1 << TAT_BITS) - 1;
/// A frame serves clock readings up to this many units past its epoch; then the epoch
/// moves. With tolerance and wait at most [`MAX_SPAN`] each, a TAT stays below 2^59.
const HORIZON: u64 = 1 << 58;
/// A rebase puts `now` this many units past the new epoch, so that a reader whose clock
/// reading is older (but not by this much) still counts it exactly.
const REBASE_SLACK: u64 = HORIZON / 2;
/// The largest tolerance (capacity times the units of a token) and the largest wait, in
/// units: 4.5 years when a nanosecond is one unit.
pub(crate) const MAX_SPAN: u64 = 1 << 57;
/// The most units per nanosecond: a frame then lasts at least 2^33 ns (8.6 s) between
/// rebases, and `max_wait` can reach at least that far.
const MAX_UNITS_PER_NANO: u64 = 1 << 24;
/// Clock readings saturate here, 146 years after the base instant.
const MAX_NOW: u64 = 1 << 62;
const SLOTS: usize = 16;

/// A bucket's size and refill rate.
///
/// `refill(tokens, period)` is kept exactly: the bucket counts time in units of
/// `1 / tokens` of a nanosecond (reduced by their common factor with the period), so
/// `tokens` refills add up to exactly `period` and a client whose requests are each at
/// least `period / tokens` apart (as a real number) is never refused. Equal rates are
/// equal quotas: `refill(2, 2s)` is `refill(1, 1s)`.
///
/// A quota is [`RateLimitConfigError::TooLarge`] when its capacity times `period / g` exceeds
/// 2^57 (4.5 years of tolerance when `period` is a whole number of `tokens`
/// nanoseconds), or when `tokens / g` exceeds 2^24, where `g` is the greatest common
/// divisor of `tokens` and the period in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    capacity: u64,
    /// The units one token costs.
    token: u64,
    /// The units in one nanosecond.
    unit: u64,
}

impl Quota {
    /// `capacity` tokens (the burst), refilled continuously at `refill_tokens` per
    /// `refill_period`.
    pub fn new(
        capacity: u64,
        refill_tokens: u64,
        refill_period: Duration,
    ) -> Result<Self, RateLimitConfigError> {
        let (token, unit) = scale(refill_tokens, refill_period)?;
        Self::checked(capacity, token, unit)
    }

    fn checked(capacity: u64, token: u64, unit: u64) -> Result<Self, RateLimitConfigError> {
        if capacity == 0 {
            return Err(RateLimitConfigError::ZeroCapacity);
        }
        match capacity.checked_mul(token) {
            Some(tolerance) if tolerance <= MAX_SPAN && unit <= MAX_UNITS_PER_NANO => Ok(Self {
                capacity,
                token,
                unit,
            }),
            _ => Err(RateLimitConfigError::TooLarge),
        }
    }

    /// The same rate with another capacity.
    pub fn with_capacity(self, capacity: u64) -> Result<Self, RateLimitConfigError> {
        Self::checked(capacity, self.token, self.unit)
    }

    /// The same capacity with another refill rate.
    pub fn with_refill(self, tokens: u64, period: Duration) -> Result<Self, RateLimitConfigError> {
        Self::new(self.capacity, tokens, period)
    }

    /// The burst size: how many tokens a full bucket holds.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The time one token takes to come back, rounded up to the nanosecond (the bucket
    /// itself counts it exactly).
    pub fn refill_interval(&self) -> Duration {
        Duration::from_nanos(self.nanos_up(self.token))
    }

    /// The time an empty bucket takes to fill up, rounded up to the nanosecond: the
    /// window of the IETF `RateLimit-Policy`.
    pub fn period(&self) -> Duration {
        Duration::from_nanos(self.nanos_up(self.tolerance()))
    }

    /// The rate as `(tokens, nanoseconds)` in lowest terms: `tokens` refills take exactly
    /// `nanoseconds`. (What the Redis store scales its scripts' units by.)
    #[cfg(feature = "redis")]
    pub(crate) fn rate(&self) -> (u64, u64) {
        (self.unit, self.token)
    }

    /// Whether a wait of `max_wait` fits in a TAT (see [`MAX_SPAN`]).
    pub(crate) fn fits_wait(&self, max_wait: Duration) -> bool {
        max_wait.as_nanos() * u128::from(self.unit) <= u128::from(MAX_SPAN)
    }

    #[inline]
    fn tolerance(&self) -> u64 {
        self.capacity * self.token
    }

    /// `units` as nanoseconds, rounded up: a wait never ends before its slot.
    #[inline]
    fn nanos_up(&self, units: u64) -> u64 {
        if units == 0 {
            0
        } else {
            units.div_ceil(self.unit)
        }
    }

    /// Whether a wait of `wait` units is longer than `max_wait` allows (which is capped
    /// at [`MAX_SPAN`] units). Out of line: only a request that cannot go at once asks.
    #[cold]
    #[inline(never)]
    fn waits_too_long(&self, wait: u64, max_wait: Duration) -> bool {
        wait > max_wait_nanos(max_wait)
            .saturating_mul(self.unit)
            .min(MAX_SPAN)
    }

    /// The tokens a bucket whose TAT is `tat` holds at `now` (both in units).
    #[inline]
    pub(crate) fn available(&self, tat: u64, now: u64) -> u64 {
        let debt = tat.saturating_sub(now).min(self.tolerance());
        (self.tolerance() - debt) / self.token
    }

    /// The GCRA decision for a request of `cost` tokens arriving at `now` (units, below
    /// [`HORIZON`]), willing to wait up to `max_wait`.
    #[inline]
    pub(crate) fn decide(&self, tat: u64, now: u64, cost: u64, max_wait: Duration) -> Verdict {
        let tolerance = self.tolerance();
        let increment = match cost.checked_mul(self.token) {
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
        // An admission at once (the success path) never converts `max_wait`.
        if wait > 0 && self.waits_too_long(wait, max_wait) {
            return Verdict::Deny(Denied::Limited {
                retry_after: Duration::from_nanos(self.nanos_up(wait)),
                remaining: self.available(tat, now),
            });
        }
        Verdict::Admit {
            tat: new_tat,
            now,
            wait: self.nanos_up(wait),
            increment,
            quota: *self,
        }
    }

    /// What a bucket admitted at `now` with TAT `tat` reports (both in units).
    pub(crate) fn status(&self, tat: u64, now: u64) -> (u64, Duration) {
        let reset = Duration::from_nanos(self.nanos_up(tat.saturating_sub(now)));
        (self.available(tat, now), reset)
    }

    /// Re-expresses a TAT measured in `self` (where the time is `now`) in `to` (where it
    /// is `now_to`), keeping the bucket as full *as a fraction* (a bucket of 100 holding
    /// 50 becomes one of 10 holding 5, or one of 1000 holding 500); a debt beyond empty
    /// (queued reservations) is kept in tokens.
    ///
    /// The held amount is counted in units (a token is `token` of them), and is exact
    /// whenever the new quota's units can express it. Otherwise it is rounded to a unit of
    /// `to`: down when `to` has fewer units in a full bucket (its tolerance), up when it
    /// has more. A unit of a larger tolerance is less than one of the smaller, so a round
    /// trip through a larger tolerance comes back exactly, and one through a smaller
    /// loses less than one unit of the smaller, once: flipping back and forth between two
    /// quotas stays put from the first round trip on (see [`rescaled`]).
    fn rescale(&self, tat: u64, now: u64, to: &Quota, now_to: u64) -> u64 {
        let held = i128::from(self.tolerance()) - i128::from(tat.saturating_sub(now));
        let held = if held > 0 {
            rescaled(held, self.tolerance(), to.tolerance())
        } else {
            rescaled(held, self.token, to.token)
        };
        let debt = i128::from(to.tolerance()) - held.min(i128::from(to.tolerance()));
        let room = i128::from(TAT_MASK.saturating_sub(now_to));
        now_to + u64::try_from(debt.min(room)).unwrap_or(0)
    }
}

/// `amount * to / from` (`from`, `to` >= 1), rounded down when `to < from` and up when
/// `to > from` (exact when they are equal), so that scaling up and back down is the
/// identity: for `to > from`, `y = ceil(x * to / from)` exceeds `x * to / from` by less
/// than one, so `y * from / to` exceeds `x` by less than `from / to < 1`, and its floor is
/// `x`. Scaling down and back up loses less than one unit of the smaller scale, and the
/// two values it reaches then map onto each other: a fixed point.
///
/// The product stays below 2^115: an amount and a tolerance are at most 2^57 each.
fn rescaled(amount: i128, from: u64, to: u64) -> i128 {
    let (product, from) = (amount * i128::from(to), i128::from(from));
    if i128::from(to) < from {
        product.div_euclid(from)
    } else {
        -(-product).div_euclid(from)
    }
}

/// The units of a token and of a nanosecond for `tokens` per `period`.
fn scale(tokens: u64, period: Duration) -> Result<(u64, u64), RateLimitConfigError> {
    if tokens == 0 {
        return Err(RateLimitConfigError::ZeroRefillTokens);
    }
    if period.is_zero() {
        return Err(RateLimitConfigError::ZeroRefillPeriod);
    }
    let nanos = period.as_nanos();
    if nanos < u128::from(tokens) {
        return Err(RateLimitConfigError::RateTooHigh);
    }
    let common = gcd(nanos, u128::from(tokens));
    let token = u64::try_from(nanos / common).map_err(|_| RateLimitConfigError::TooLarge)?;
    // Cannot fail: a divisor of `tokens` fits where `tokens` does.
    let unit =
        u64::try_from(u128::from(tokens) / common).map_err(|_| RateLimitConfigError::TooLarge)?;
    Ok((token, unit))
}

pub(crate) fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// A quota and the epoch its TATs count from (nanoseconds since the bucket's base): what
/// a bucket's tag names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame {
    pub(crate) quota: Quota,
    epoch: u64,
}

impl Frame {
    /// `quota` with an epoch that puts `now` [`REBASE_SLACK`] units past it.
    fn starting(quota: Quota, now: u64) -> Self {
        Self {
            quota,
            epoch: now.saturating_sub(REBASE_SLACK / quota.unit),
        }
    }

    /// `now` (nanoseconds since the base) in this frame's units; `None` once it lies
    /// [`HORIZON`] units past the epoch (the frame must move on first).
    #[inline]
    pub(crate) fn units(&self, now: u64) -> Option<u64> {
        let units = now
            .saturating_sub(self.epoch)
            .saturating_mul(self.quota.unit);
        (units < HORIZON).then_some(units)
    }

    /// `now` in this frame's units, saturating: past the horizon every TAT of the frame
    /// reads as a full bucket, which it is.
    #[inline]
    pub(crate) fn units_saturating(&self, now: u64) -> u64 {
        now.saturating_sub(self.epoch)
            .saturating_mul(self.quota.unit)
    }

    /// Re-expresses a TAT measured in `self` in `to` at `now` (nanoseconds since the base).
    pub(crate) fn rescale(&self, tat: u64, now: u64, to: &Frame) -> u64 {
        self.quota.rescale(
            tat,
            self.units_saturating(now),
            &to.quota,
            to.units_saturating(now),
        )
    }
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
    /// Admitted, at once (`wait == 0`) or after `wait` nanoseconds (rounded up); `tat` is
    /// the new TAT and `now` the time of the decision, in `quota`'s units. (The tokens
    /// left are not computed here: that takes a division, which the success path only
    /// pays for when someone reads them.)
    Admit {
        tat: u64,
        now: u64,
        wait: u64,
        increment: u64,
        quota: Quota,
    },
    Deny(Denied),
}

/// `max_wait` in nanoseconds, saturating (a quota caps the wait it grants at
/// [`MAX_SPAN`] units: a longer wait is refused, as if the request had asked for that).
#[inline]
fn max_wait_nanos(max_wait: Duration) -> u64 {
    u64::try_from(max_wait.as_nanos()).unwrap_or(u64::MAX)
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
    token: AtomicU64,
    unit: AtomicU64,
    epoch: AtomicU64,
}

/// The frames in force, published without a lock for readers.
///
/// Each change (of quota, or of epoch) goes to the next of sixteen slots; a slot is
/// overwritten only sixteen changes after it was current, by which time every atomic
/// bucket has been moved off it by the writer (so a reader whose word still names it
/// fails its compare-and-swap).
pub(crate) struct QuotaRing {
    slots: [Slot; SLOTS],
    generation: AtomicU64,
    writer: Mutex<()>,
}

impl QuotaRing {
    pub(crate) fn new(quota: Quota) -> Self {
        let frame = Frame::starting(quota, 0);
        Self {
            slots: std::array::from_fn(|_| Slot {
                capacity: AtomicU64::new(frame.quota.capacity),
                token: AtomicU64::new(frame.quota.token),
                unit: AtomicU64::new(frame.quota.unit),
                epoch: AtomicU64::new(frame.epoch),
            }),
            generation: AtomicU64::new(0),
            writer: Mutex::new(()),
        }
    }

    fn store(&self, tag: usize, frame: Frame) {
        let slot = &self.slots[tag];
        slot.capacity.store(frame.quota.capacity, Ordering::Release);
        slot.token.store(frame.quota.token, Ordering::Release);
        slot.unit.store(frame.quota.unit, Ordering::Release);
        slot.epoch.store(frame.epoch, Ordering::Release);
    }

    #[inline]
    fn load(&self, tag: usize) -> Frame {
        let slot = &self.slots[tag];
        Frame {
            quota: Quota {
                capacity: slot.capacity.load(Ordering::Acquire),
                token: slot.token.load(Ordering::Acquire),
                unit: slot.unit.load(Ordering::Acquire),
            },
            epoch: slot.epoch.load(Ordering::Acquire),
        }
    }

    /// The frame in force now.
    #[inline]
    pub(crate) fn current(&self) -> Frame {
        loop {
            let generation = self.generation.load(Ordering::Acquire);
            let frame = self.load(slot_of(generation));
            // The slot was not rewritten under us unless a full turn of changes happened.
            let later = self.generation.load(Ordering::Acquire);
            if later.wrapping_sub(generation) < SLOTS as u64 - 1 {
                return frame;
            }
        }
    }

    /// Publishes a frame for `change(current quota)` starting at `now`, and hands the old
    /// and new frame (with their tags) to `migrate` while still holding the writer lock,
    /// so that changes apply in order. `change` returning `None` publishes nothing.
    fn publish(
        &self,
        now: u64,
        change: impl FnOnce(Frame) -> Result<Option<Quota>, RateLimitConfigError>,
        migrate: impl FnOnce(Migration),
    ) -> Result<(), RateLimitConfigError> {
        let _writer = lock(&self.writer);
        let generation = self.generation.load(Ordering::Acquire);
        let from = self.load(slot_of(generation));
        let Some(quota) = change(from)? else {
            return Ok(());
        };
        let to = Frame::starting(quota, now);
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

    /// Publishes `change(current)` from `now` on.
    pub(crate) fn update(
        &self,
        now: u64,
        change: impl FnOnce(Quota) -> Result<Quota, RateLimitConfigError>,
        migrate: impl FnOnce(Migration),
    ) -> Result<(), RateLimitConfigError> {
        self.publish(now, |from| change(from.quota).map(Some), migrate)
    }

    /// Moves the epoch forward if `now` lies beyond the current frame's horizon (unless
    /// another thread just did).
    #[cold]
    pub(crate) fn rebase(&self, now: u64, migrate: impl FnOnce(Migration)) {
        let stale = |from: Frame| Ok(from.units(now).is_none().then_some(from.quota));
        // Cannot fail: the quota stays.
        let _ = self.publish(now, stale, migrate);
    }
}

fn slot_of(generation: u64) -> usize {
    (generation % SLOTS as u64) as usize
}

/// A frame change, handed to the buckets that must move to it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    from: Frame,
    from_tag: u64,
    to: Frame,
    to_tag: u64,
}

#[inline]
fn pack(tag: u64, tat: u64) -> u64 {
    debug_assert!(tat <= TAT_MASK, "a TAT must not spill into the frame tag");
    (tag << TAT_BITS) | tat
}

#[inline]
fn unpack(word: u64) -> (u64, u64) {
    (word >> TAT_BITS, word & TAT_MASK)
}

/// One lock-free bucket measured in a [`QuotaRing`]'s frames.
///
/// Every admission writes the word, so it gets a cache line (a pair: adjacent-line
/// prefetchers pull lines in twos) to itself: threads that read the quota ring or the
/// clock base do not steal it from the thread about to compare-and-swap it.
pub(crate) struct AtomicBucket {
    word: CachePadded<AtomicU64>,
}

/// A slot a waiting request holds in an [`AtomicBucket`] or a keyed bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Claim {
    word: u64,
    increment: u64,
}

impl AtomicBucket {
    /// A full bucket measured in the ring's first frame.
    pub(crate) fn new() -> Self {
        Self {
            word: CachePadded(AtomicU64::new(pack(0, 0))),
        }
    }

    /// Takes `cost` tokens now, or reserves them within `max_wait`; `None` when `now`
    /// lies beyond the horizon of the frame the bucket is measured in (rebase, then ask
    /// again).
    // Always: left to itself the compiler keeps this loop out of line for the global
    // limiter's call, and the verdict then goes through memory: about 45 instructions
    // per request (measured with `scripts/instructions`).
    #[inline(always)]
    pub(crate) fn acquire(
        &self,
        ring: &QuotaRing,
        now: u64,
        cost: u64,
        max_wait: Duration,
    ) -> Option<(Verdict, Claim)> {
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            let (tag, tat) = unpack(word);
            let frame = ring.load(tag as usize);
            let verdict = frame.quota.decide(tat, frame.units(now)?, cost, max_wait);
            let Verdict::Admit { tat, increment, .. } = verdict else {
                return Some((verdict, Claim { word, increment: 0 }));
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
                    return Some((verdict, slot));
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
        let frame = ring.load(tag as usize);
        frame.quota.available(tat, frame.units_saturating(now))
    }

    /// Moves the bucket onto a new frame (called by the ring's writer only).
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
/// # Ok::<(), palisade::rate_limit::RateLimitConfigError>(())
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
        match self.take(cost, Duration::ZERO, now) {
            (
                Verdict::Admit {
                    tat, now, quota, ..
                },
                _,
            ) => Ok(Admitted {
                remaining: quota.available(tat, now),
            }),
            (Verdict::Deny(denied), _) => Err(denied),
        }
    }

    /// Takes `cost` tokens at `now`, or reserves the earliest slot at which they will be
    /// there if that is no more than `max_wait` away (at most 2^57 units: 4.5 years when
    /// the refill interval is a whole number of nanoseconds, at least 8.6 s for any quota;
    /// a longer `max_wait` counts as that). The wait is rounded up to the nanosecond.
    /// Reservations are served in order.
    pub fn reserve(
        &self,
        cost: u64,
        max_wait: Duration,
        now: Instant,
    ) -> Result<Reservation, Denied> {
        match self.take(cost, max_wait, self.nanos(now)) {
            (Verdict::Admit { wait, .. }, slot) => Ok(Reservation {
                wait: Duration::from_nanos(wait),
                slot,
            }),
            (Verdict::Deny(denied), _) => Err(denied),
        }
    }

    #[inline]
    pub(crate) fn take(&self, cost: u64, max_wait: Duration, now: u64) -> (Verdict, Claim) {
        loop {
            if let Some(decided) = self.bucket.acquire(&self.ring, now, cost, max_wait) {
                return decided;
            }
            self.rebase(now);
        }
    }

    /// The frame in force at `now` (nanoseconds since the base), moving the epoch first
    /// if `now` lies beyond its horizon. Keyed buckets follow this frame.
    #[inline]
    pub(crate) fn frame(&self, now: u64) -> (Frame, u64) {
        loop {
            let frame = self.ring.current();
            if let Some(units) = frame.units(now) {
                return (frame, units);
            }
            self.rebase(now);
        }
    }

    #[cold]
    fn rebase(&self, now: u64) {
        self.ring
            .rebase(now, |migration| self.bucket.migrate(migration, now));
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
        self.ring.current().quota
    }

    /// Switches to `quota` at `now`, in one step: the bucket stays as full as a fraction
    /// of its capacity (half full stays half full, whether the capacity shrinks or
    /// grows), and queued reservations keep their slots (see
    /// [runtime changes](super#runtime-changes)).
    pub fn set_quota(&self, quota: Quota, now: Instant) {
        // Cannot fail: the change itself is infallible.
        let _ = self.update(now, |_| Ok(quota));
    }

    /// Applies `change` to the quota in force and moves the bucket onto it.
    pub(crate) fn update(
        &self,
        now: Instant,
        change: impl FnOnce(Quota) -> Result<Quota, RateLimitConfigError>,
    ) -> Result<(), RateLimitConfigError> {
        let now = self.nanos(now);
        self.ring
            .update(now, change, |migration| self.bucket.migrate(migration, now))
    }
}

impl std::fmt::Debug for TokenBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenBucket")
            .field("quota", &self.quota())
            .finish_non_exhaustive()
    }
}
