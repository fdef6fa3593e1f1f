//! The sliding windows of the closed state: lock-free, O(1) per call, memory fixed at
//! build time.

use super::config::{SlidingWindow, WindowKind};
use super::lanes::Cursor;
use crate::sync::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// What the window holds: the number of calls recorded, and how many of them failed
/// or were slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Counts {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

/// One recorded call: a failure, a slow call, both or neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    pub(crate) failure: bool,
    pub(crate) slow: bool,
}

// One per breaker, inside its Arc: the padding that makes the count window large is
// the point.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

impl Window {
    pub(crate) fn new(window: SlidingWindow, base: Instant) -> Self {
        match window.kind {
            WindowKind::Count(size) => Window::Count(CountWindow::new(size)),
            WindowKind::Time { span, buckets } => {
                Window::Time(TimeWindow::new(span, buckets, base))
            }
        }
    }

    /// Records a sample and returns the window's counts afterwards, or `None` when the
    /// counts did not change (a count window overwriting an identical sample), in
    /// which case no verdict can have changed either.
    #[inline]
    pub(crate) fn record(&self, sample: Sample, now: impl FnOnce() -> Instant) -> Option<Counts> {
        match self {
            Window::Count(window) => window.record(sample),
            Window::Time(window) => Some(window.record(sample, now())),
        }
    }

    pub(crate) fn counts(&self, now: Instant) -> Counts {
        match self {
            Window::Count(window) => window.counts(),
            Window::Time(window) => window.counts(now),
        }
    }

    pub(crate) fn clear(&self) {
        match self {
            Window::Count(window) => window.clear(),
            Window::Time(window) => window.clear(),
        }
    }

    /// Fills this fresh window, of another size than `old`, with what `old` holds that
    /// still means something in it, as of `now`: a count window the latest outcomes
    /// that fit, in order; a time window the counts of the spans it still covers. False
    /// (nothing carried) when the kinds differ. The window must not be in use yet.
    #[cfg(any(feature = "serde", loom))]
    pub(crate) fn carry(&self, old: &Window, now: Instant) -> bool {
        match (self, old) {
            (Window::Count(new), Window::Count(old)) => new.carry(old),
            (Window::Time(new), Window::Time(old)) => new.carry(old, now),
            _ => return false,
        }
        true
    }
}

/// Positions in a ring of `len` slots: `n % len` without a hardware division, which
/// would cost more than the rest of a call (Lemire's fastmod, exact for every `u32`).
struct Ring {
    len: usize,
    magic: u64,
}

impl Ring {
    fn new(len: usize) -> Self {
        Self {
            len,
            magic: (u64::MAX / len as u64).wrapping_add(1),
        }
    }

    fn index(&self, n: u32) -> usize {
        let low = self.magic.wrapping_mul(u64::from(n));
        ((u128::from(low) * self.len as u128) >> 64) as usize
    }
}

/// The last `N` outcomes, as a ring of slots filled in cursor order, plus the running
/// counts packed in one word so that one `fetch_add` both updates and reads them.
pub(crate) struct CountWindow {
    slots: Box<[AtomicU32]>,
    /// Wraps at 2^32: once every four billion calls one slot is written twice and one
    /// skipped, which the counts stay consistent through.
    cursor: Cursor,
    ring: Ring,
    counts: AtomicU64,
}

const RECORDED: u32 = 1;
const FAILED: u32 = 2;
const SLOW: u32 = 4;

/// Bits per packed count: a count window holds at most `MAX_COUNT_WINDOW` calls, and
/// one spare bit keeps a field that is briefly negative (two racing writers of one
/// slot applying their deltas out of order) from corrupting its neighbour.
const FIELD_BITS: u32 = 21;
pub(crate) const MAX_COUNT_WINDOW: usize = (1 << (FIELD_BITS - 1)) - 1;

impl CountWindow {
    fn new(size: usize) -> Self {
        Self {
            slots: (0..size).map(|_| AtomicU32::new(0)).collect(),
            cursor: Cursor::new(size),
            ring: Ring::new(size),
            counts: AtomicU64::new(0),
        }
    }

    /// The latest outcomes of `old` that fit, oldest first at position 0, the cursor
    /// after them: the window a breaker of this size would hold had it seen the same
    /// calls (a shrink keeps the newest, a growth keeps them all and fills up from
    /// there). Positions reserved by other lanes and not used yet carry what they held,
    /// as they would in `old` (the usual slack of a shared window).
    #[cfg(any(feature = "serde", loom))]
    fn carry(&self, old: &CountWindow) {
        let end = old.cursor.position();
        let start = end.saturating_sub(self.slots.len().min(old.slots.len()) as u32);
        for (slot, position) in self.slots.iter().zip(start..end) {
            let value = old.slots[old.ring.index(position)].load(Ordering::Acquire);
            let empty = slot.swap(value, Ordering::AcqRel);
            self.apply(empty, value);
        }
        self.cursor.restart_at(end - start);
    }

    #[inline]
    fn record(&self, sample: Sample) -> Option<Counts> {
        let slot = &self.slots[self.ring.index(self.cursor.next())];
        let new =
            RECORDED | if sample.failure { FAILED } else { 0 } | if sample.slow { SLOW } else { 0 };
        // The common case, a success replacing a success, writes nothing shared but the
        // cursor, so threads sharing the breaker do not fight over the ring.
        if slot.load(Ordering::Relaxed) == new {
            return None;
        }
        let old = slot.swap(new, Ordering::AcqRel);
        self.apply(old, new)
    }

    /// Moves the counts from `old`'s contribution to `new`'s.
    fn apply(&self, old: u32, new: u32) -> Option<Counts> {
        if old == new {
            return None;
        }
        let delta = packed(new).wrapping_sub(packed(old));
        let previous = self.counts.fetch_add(delta, Ordering::AcqRel);
        Some(unpack(previous.wrapping_add(delta)))
    }

    fn counts(&self) -> Counts {
        unpack(self.counts.load(Ordering::Acquire))
    }

    /// Empties every slot through the same delta bookkeeping as a record, so that a
    /// straggler recording while we clear leaves the counts consistent with the slots.
    fn clear(&self) {
        for slot in self.slots.iter() {
            let old = slot.swap(0, Ordering::AcqRel);
            self.apply(old, 0);
        }
    }
}

fn packed(slot: u32) -> u64 {
    u64::from(slot & RECORDED)
        | u64::from((slot & FAILED) >> 1) << FIELD_BITS
        | u64::from((slot & SLOW) >> 2) << (2 * FIELD_BITS)
}

/// Reads the three signed fields back, clamping a transiently negative one to zero.
fn unpack(mut word: u64) -> Counts {
    let mut fields = [0u64; 3];
    for field in &mut fields {
        let low = word & ((1 << FIELD_BITS) - 1);
        let signed = if low >> (FIELD_BITS - 1) == 1 {
            low as i64 - (1 << FIELD_BITS)
        } else {
            low as i64
        };
        word = word.wrapping_sub(signed as u64) >> FIELD_BITS;
        *field = signed.max(0) as u64;
    }
    Counts {
        calls: fields[0],
        failures: fields[1],
        slow: fields[2],
    }
}

/// The last `span`, as a fixed number of buckets. Each counter is one word holding the
/// bucket's epoch next to its count, so a bucket is recycled for a new epoch by the
/// same compare-and-swap that counts into it, without losing a concurrent record.
///
/// Running totals of the live buckets make a call O(1): a record adds to its bucket
/// and to the totals, and the compare-and-swap that takes a counter out of the window
/// (recycling it for a newer epoch, or retiring it once the window has moved past it)
/// subtracts what it held. The first call of each new epoch retires every counter the
/// window has left behind, so an idle stretch cannot leave stale counts in the totals;
/// that sweep happens once per bucket width, not per call.
pub(crate) struct TimeWindow {
    buckets: Box<[Bucket]>,
    ring: Ring,
    width_nanos: u64,
    base: Instant,
    /// The newest epoch a call was recorded in.
    newest: AtomicU32,
    /// The live buckets' counts, summed. Each is the two's complement of a signed sum
    /// that can dip below zero for an instant (a retirement subtracting before the
    /// record it covers added), read as zero then.
    totals: Totals,
}

#[derive(Default)]
struct Bucket {
    calls: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
}

#[derive(Default)]
struct Totals {
    calls: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
}

/// The most buckets a time window has: 24 KiB of counters, a minute by the tenth of a
/// second or 17 minutes by the second (resilience4j keeps one bucket per second of its
/// window, 100 by default). Memory is fixed at build time, and the sweep at each new
/// epoch reads every bucket, so the count a user asks for must not be unbounded.
pub(crate) const MAX_BUCKETS: u32 = 1024;

/// The smallest bucket width: epochs are 32 bits, which at this width last 49 days.
/// Wider buckets last longer in proportion.
pub(crate) const MIN_BUCKET_WIDTH: Duration = Duration::from_millis(1);

impl TimeWindow {
    fn new(span: Duration, buckets: u32, base: Instant) -> Self {
        Self {
            buckets: (0..buckets).map(|_| Bucket::default()).collect(),
            ring: Ring::new(buckets as usize),
            width_nanos: (span / buckets).as_nanos() as u64,
            base,
            newest: AtomicU32::new(0),
            totals: Totals::default(),
        }
    }

    #[inline]
    fn epoch(&self, now: Instant) -> u32 {
        let elapsed = now.saturating_duration_since(self.base).as_nanos() as u64;
        (elapsed / self.width_nanos) as u32
    }

    fn live(&self) -> u32 {
        self.buckets.len() as u32
    }

    /// Every live counter of `old`, as of `now`, in the bucket of this window where its
    /// span starts, if this window still covers that: a wider window keeps all the old
    /// one saw, a narrower one the newest part, and no count lingers longer than the
    /// span it was recorded in allows. (A count is placed by the start of its old
    /// bucket, so it leaves the new window no later than it would have left the old.)
    #[cfg(any(feature = "serde", loom))]
    fn carry(&self, old: &TimeWindow, now: Instant) {
        let elapsed = now.saturating_duration_since(self.base).as_nanos() as u64;
        let (old_now, new_now) = (elapsed / old.width_nanos, elapsed / self.width_nanos);
        self.newest.store(new_now as u32, Ordering::Release);
        let pairs = old.buckets.iter().flat_map(|bucket| {
            [
                (&bucket.calls, &self.totals.calls, 0),
                (&bucket.failures, &self.totals.failures, 1),
                (&bucket.slow, &self.totals.slow, 2),
            ]
        });
        for (counter, total, field) in pairs {
            let word = Word::of(counter.load(Ordering::Acquire));
            let age = age(old_now as u32, word.stamp);
            if word.retired || word.count == 0 || !(0..i64::from(old.live())).contains(&age) {
                continue;
            }
            let start = (old_now - age as u64).saturating_mul(old.width_nanos);
            let epoch = start / self.width_nanos;
            if new_now - epoch >= u64::from(self.live()) {
                continue;
            }
            let bucket = &self.buckets[self.ring.index(epoch as u32)];
            let into = [&bucket.calls, &bucket.failures, &bucket.slow][field];
            let held = Word::of(into.load(Ordering::Acquire));
            let before = if held.stamp == epoch as u32 {
                held.count
            } else {
                0
            };
            let count = before.saturating_add(word.count).min(MAX_BUCKET_COUNT);
            let placed = Word {
                stamp: epoch as u32,
                retired: false,
                count,
            };
            into.store(placed.bits(), Ordering::Release);
            total.fetch_add(u64::from(count - before), Ordering::AcqRel);
        }
    }

    #[inline]
    fn record(&self, sample: Sample, now: Instant) -> Counts {
        let epoch = self.epoch(now);
        let live = self.live();
        let newest = self.newest.load(Ordering::Acquire);
        if age(newest, epoch) < 0
            && self
                .newest
                .compare_exchange(newest, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.retire_older_than(epoch);
        } else if age(newest, epoch) >= i64::from(live) {
            // Read the clock before the window moved past its epoch: out of the window.
            return self.totals();
        }
        let bucket = &self.buckets[self.ring.index(epoch)];
        let calls = add(&bucket.calls, &self.totals.calls, epoch);
        if sample.failure {
            add(&bucket.failures, &self.totals.failures, epoch);
        }
        if sample.slow {
            add(&bucket.slow, &self.totals.slow, epoch);
        }
        Counts {
            calls,
            failures: total(&self.totals.failures),
            slow: total(&self.totals.slow),
        }
    }

    /// Takes every counter the window has moved past, as of `epoch`, out of the totals.
    fn retire_older_than(&self, epoch: u32) {
        let live = self.live();
        for bucket in self.buckets.iter() {
            retire(&bucket.calls, &self.totals.calls, epoch, live);
            retire(&bucket.failures, &self.totals.failures, epoch, live);
            retire(&bucket.slow, &self.totals.slow, epoch, live);
        }
    }

    fn totals(&self) -> Counts {
        Counts {
            calls: total(&self.totals.calls),
            failures: total(&self.totals.failures),
            slow: total(&self.totals.slow),
        }
    }

    /// The counts as of `now`, read bucket by bucket (for metrics: off the call path).
    fn counts(&self, now: Instant) -> Counts {
        let epoch = self.epoch(now);
        let live = i64::from(self.live());
        let read = |counter: &AtomicU64| {
            let word = Word::of(counter.load(Ordering::Acquire));
            let age = age(epoch, word.stamp);
            if !word.retired && (0..live).contains(&age) {
                u64::from(word.count)
            } else {
                0
            }
        };
        self.buckets
            .iter()
            .fold(Counts::default(), |sum, bucket| Counts {
                calls: sum.calls + read(&bucket.calls),
                failures: sum.failures + read(&bucket.failures),
                slow: sum.slow + read(&bucket.slow),
            })
    }

    fn clear(&self) {
        for bucket in self.buckets.iter() {
            for counter in [&bucket.calls, &bucket.failures, &bucket.slow] {
                counter.store(0, Ordering::Release);
            }
        }
        for total in [&self.totals.calls, &self.totals.failures, &self.totals.slow] {
            total.store(0, Ordering::Release);
        }
    }
}

/// How many epochs `stamp` lies behind `epoch` (negative when it is ahead), across the
/// 32-bit wrap.
#[inline]
fn age(epoch: u32, stamp: u32) -> i64 {
    i64::from(epoch.wrapping_sub(stamp) as i32)
}

/// A counter word: the epoch it counts in, whether the window has moved past it, and
/// its count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Word {
    stamp: u32,
    retired: bool,
    count: u32,
}

const RETIRED_BIT: u32 = 1 << 31;
const MAX_BUCKET_COUNT: u32 = RETIRED_BIT - 1;

impl Word {
    fn of(word: u64) -> Self {
        let low = word as u32;
        Self {
            stamp: (word >> 32) as u32,
            retired: low & RETIRED_BIT != 0,
            count: low & MAX_BUCKET_COUNT,
        }
    }

    fn bits(self) -> u64 {
        let flag = if self.retired { RETIRED_BIT } else { 0 };
        u64::from(self.stamp) << 32 | u64::from(flag | self.count)
    }

    /// What it still adds to the totals.
    fn counted(self) -> u64 {
        if self.retired {
            0
        } else {
            u64::from(self.count)
        }
    }
}

#[inline]
fn total(total: &AtomicU64) -> u64 {
    (total.load(Ordering::Acquire) as i64).max(0) as u64
}

/// Counts one call into `counter` for `epoch` and into `total`, recycling the counter
/// (and taking what it held out of `total`) if it holds an older epoch, and dropping the
/// call if a newer epoch already took the bucket (a racing thread read the clock later;
/// this call is then older than the window) or the window moved past this epoch.
/// Returns `total` afterwards.
#[inline]
fn add(counter: &AtomicU64, total: &AtomicU64, epoch: u32) -> u64 {
    let mut current = counter.load(Ordering::Relaxed);
    loop {
        let word = Word::of(current);
        let age = age(epoch, word.stamp);
        let (next, delta) = if age == 0 {
            if word.retired || word.count == MAX_BUCKET_COUNT {
                return self::total(total);
            }
            (
                Word {
                    count: word.count + 1,
                    ..word
                },
                1u64,
            )
        } else if age < 0 {
            return self::total(total);
        } else {
            let fresh = Word {
                stamp: epoch,
                retired: false,
                count: 1,
            };
            (fresh, 1u64.wrapping_sub(word.counted()))
        };
        match counter.compare_exchange_weak(
            current,
            next.bits(),
            Ordering::AcqRel,
            Ordering::Relaxed,
        ) {
            Ok(_) => {
                let before = total.fetch_add(delta, Ordering::AcqRel);
                return (before.wrapping_add(delta) as i64).max(0) as u64;
            }
            Err(actual) => current = actual,
        }
    }
}

/// Takes `counter` out of the window (and what it held out of `total`) if `epoch` has
/// moved past it.
fn retire(counter: &AtomicU64, total: &AtomicU64, epoch: u32, live: u32) {
    let mut current = counter.load(Ordering::Acquire);
    loop {
        let word = Word::of(current);
        if word.retired || age(epoch, word.stamp) < i64::from(live) {
            return;
        }
        let retired = Word {
            retired: true,
            count: 0,
            ..word
        };
        match counter.compare_exchange_weak(
            current,
            retired.bits(),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                if word.count > 0 {
                    total.fetch_sub(u64::from(word.count), Ordering::AcqRel);
                }
                return;
            }
            Err(actual) => current = actual,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn packed_counts_survive_a_transiently_negative_field() {
        let word = packed(RECORDED | FAILED).wrapping_sub(packed(RECORDED | SLOW));
        assert_eq!(
            unpack(word),
            Counts {
                calls: 0,
                failures: 1,
                slow: 0
            }
        );
        let restored = word.wrapping_add(packed(RECORDED | SLOW));
        assert_eq!(
            unpack(restored),
            Counts {
                calls: 1,
                failures: 1,
                slow: 0
            }
        );
    }

    #[test]
    fn ring_index_is_the_remainder() {
        for size in [1, 2, 3, 7, 100, 1000, MAX_COUNT_WINDOW] {
            let ring = Ring::new(size);
            for n in (0..5000).chain([u32::MAX - 1, u32::MAX, 1 << 31, 123_456_789]) {
                assert_eq!(ring.index(n), n as usize % size);
            }
        }
    }

    #[test]
    fn count_window_keeps_exactly_the_last_n() {
        let window = CountWindow::new(3);
        let fail = Sample {
            failure: true,
            slow: false,
        };
        let ok = Sample {
            failure: false,
            slow: false,
        };
        for sample in [fail, fail, fail, ok, ok] {
            window.record(sample);
        }
        assert_eq!(
            window.counts(),
            Counts {
                calls: 3,
                failures: 1,
                slow: 0
            }
        );
        window.clear();
        assert_eq!(window.counts(), Counts::default());
    }

    #[test]
    fn time_window_forgets_old_buckets() {
        let base = Instant::now();
        let window = TimeWindow::new(Duration::from_secs(10), 10, base);
        let fail = Sample {
            failure: true,
            slow: true,
        };
        window.record(fail, base);
        window.record(fail, base + Duration::from_secs(5));
        assert_eq!(window.counts(base + Duration::from_secs(9)).calls, 2);
        assert_eq!(window.counts(base + Duration::from_secs(10)).calls, 1);
        assert_eq!(window.counts(base + Duration::from_secs(15)).calls, 0);
        // The bucket of epoch 0 is recycled for epoch 20 without leftovers.
        let counts = window.record(fail, base + Duration::from_secs(20));
        assert_eq!(
            counts,
            Counts {
                calls: 1,
                failures: 1,
                slow: 1
            }
        );
    }

    proptest::proptest! {
        /// The running totals a call is judged by are exactly the live buckets' counts
        /// of a reference that keeps every sample with its epoch, through idle gaps,
        /// recycled buckets and calls that read the clock late.
        #[test]
        fn time_window_totals_match_a_reference_that_keeps_every_sample(
            buckets in 1u32..6,
            steps in proptest::collection::vec((0u64..2_500, proptest::bool::ANY, proptest::bool::ANY, 0u64..3), 1..80),
        ) {
            let base = Instant::now();
            let width = Duration::from_millis(100);
            let window = TimeWindow::new(width * buckets, buckets, base);
            let mut kept: Vec<(u64, Sample)> = Vec::new();
            let mut clock = 0u64;
            let mut newest = 0u64;
            for (advance_ms, failure, slow, late_buckets) in steps {
                clock += advance_ms;
                // Now and then a call whose clock was read a little earlier.
                let at = clock.saturating_sub(late_buckets * 100);
                let epoch = at / 100;
                let sample = Sample { failure, slow };
                let counts = window.record(sample, base + Duration::from_millis(at));
                let live = u64::from(buckets);
                newest = newest.max(epoch);
                if newest - epoch < live {
                    kept.push((epoch, sample));
                }
                let expected = kept
                    .iter()
                    .filter(|(stamp, _)| newest - stamp < live)
                    .fold(Counts::default(), |sum, (_, sample)| Counts {
                        calls: sum.calls + 1,
                        failures: sum.failures + u64::from(sample.failure),
                        slow: sum.slow + u64::from(sample.slow),
                    });
                proptest::prop_assert_eq!(counts, expected);
                let now = base + Duration::from_millis(newest * 100);
                proptest::prop_assert_eq!(window.counts(now), expected);
            }
        }
    }
}
