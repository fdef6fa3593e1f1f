//! The retry budget: a lock-free, sans-io core shared by every clone of a layer.

use crate::sync::{AtomicBool, AtomicU64, Mutex, Ordering, lock};
use std::time::Duration;
use tokio::time::Instant;

/// Fixed-point scale: balances are kept in thousandths of a retry so that a ratio such
/// as 0.2 deposits an exact whole number.
const SCALE: i64 = 1000;

/// The window is cut into this many slices; deposits expire a slice at a time.
const SLICES: usize = 10;

/// A Finagle-style retry budget: retries are allowed in proportion to requests.
///
/// Every request (first attempt) deposits `ratio` of a retry; every retry withdraws
/// one. Deposits and withdrawals count for `ttl`, then expire, and a reserve of
/// `min_per_sec · ttl` retries is always there so that a quiet client can still retry.
/// Within any window of `ttl`, at most `min_per_sec · ttl + ratio · requests` retries
/// are allowed: an outage costs a bounded fraction of extra load instead of multiplying
/// it by the number of attempts.
///
/// The layer uses a budget by default (10 s, 10 retries per second, 20 %, Finagle's
/// defaults), shared by every service it builds and every clone. The core is public so
/// that it can be driven, with explicit times, outside the layer:
///
/// ```
/// use palisade::retry::RetryBudget;
/// use std::time::Duration;
/// use tokio::time::Instant;
///
/// // No reserve, one retry per two requests.
/// let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.5);
/// let now = Instant::now();
/// assert!(budget.withdraw(now).is_none());
/// budget.deposit(now);
/// budget.deposit(now);
/// assert!(budget.withdraw(now).is_some());
/// assert!(budget.withdraw(now).is_none());
/// // Deposits expire after the ttl.
/// budget.deposit(now);
/// budget.deposit(now);
/// assert!(budget.withdraw(now + Duration::from_secs(11)).is_none());
/// ```
///
/// It is lock-free and allocation-free: a deposit is one atomic add (and, once per
/// slice, closing the slice), and a withdrawal is a compare-and-swap that never takes
/// the balance below what one retry costs, however many tasks race for it.
#[derive(Debug)]
pub struct RetryBudget {
    /// As given (the getters'): read only by them, written by a reconfiguration.
    settings: Mutex<Settings>,
    start: Instant,
    /// The length of a slice, a tenth of the ttl (clamped). Read and written only by
    /// the holder of `advancing`.
    slice_nanos: AtomicU64,
    /// When the slice after the newest begins, in nanoseconds since `start`: a caller
    /// whose clock reading is before it records into the newest slice without
    /// dividing. Written, after `epoch`, by the holder of `advancing`.
    next_start: AtomicU64,
    /// Tells this budget's notes in [`SliceEnd`] from another budget's, and from its own
    /// before a reconfiguration (which can move `next_start` back).
    id: AtomicU64,
    /// What one request deposits, in thousandths of a retry (an `i64`).
    deposit: AtomicU64,
    /// The part of `baseline` that never expires, `min_per_sec · ttl` in thousandths
    /// (an `i64`). Written only by the holder of `advancing`.
    #[cfg_attr(not(any(test, feature = "serde")), allow(dead_code))]
    reserve: AtomicU64,
    /// The newest slice; whoever moves it forward closes it and expires the slices it
    /// skips.
    epoch: AtomicU64,
    /// Held (never waited for) by the caller moving `epoch` forward; waited for only
    /// by a reconfiguration, which holds it just as briefly.
    advancing: AtomicBool,
    /// Net amount (deposits − withdrawals) recorded in each closed live slice, and the
    /// withdrawals of the newest; an `i64` stored two's-complement so that wrapping
    /// adds are signed adds. The bounds `new` clamps to keep every sum far from
    /// wrapping, so a deposit stays one atomic add rather than a saturating CAS loop.
    slots: [AtomicU64; SLICES],
    /// `reserve + Σ slots`: everything but the newest slice's deposits, which go to
    /// `balance` alone (one atomic add per request) and move to their slot when the
    /// slice closes.
    baseline: AtomicU64,
    /// `baseline` + the newest slice's deposits: what is available now.
    balance: AtomicU64,
}

/// A budget's settings, as given.
#[derive(Debug, Clone, Copy)]
struct Settings {
    ttl: Duration,
    min_per_sec: u32,
    ratio: f64,
}

impl Settings {
    /// The slice length, the reserve and the deposit, in the budget's units. Clamped,
    /// every amount stays far from the ends of an i64: the reserve is at most 6·10¹⁰
    /// thousandths and a deposit 10⁶, so the balance would need 9·10¹² requests within
    /// one ttl to overflow.
    fn amounts(&self) -> (u64, i64, i64) {
        let window = self.ttl.clamp(RetryBudget::MIN_TTL, RetryBudget::MAX_TTL);
        let slice_nanos = u64::try_from(window.as_nanos() / SLICES as u128).unwrap_or(u64::MAX);
        let min_per_sec = self.min_per_sec.min(RetryBudget::MAX_MIN_PER_SEC);
        let reserve = thousandths(f64::from(min_per_sec) * window.as_secs_f64());
        let deposit = if self.ratio.is_nan() {
            0
        } else {
            thousandths(self.ratio.clamp(0.0, RetryBudget::MAX_RATIO))
        };
        (slice_nanos, reserve, deposit)
    }
}

/// One retry's withdrawal from a [`RetryBudget`], handed back with
/// [`RetryBudget::refund`] when the retry is called off before it is sent, and simply
/// dropped (spent) once it is.
#[derive(Debug)]
#[must_use = "a withdrawal is either spent by a retry or refunded"]
pub struct Withdrawal {
    epoch: u64,
}

impl RetryBudget {
    /// The shortest `ttl` the layer's `build()` accepts (tower's and Finagle's bound).
    pub const MIN_TTL: Duration = Duration::from_secs(1);
    /// The longest `ttl` the layer's `build()` accepts (tower's and Finagle's bound).
    pub const MAX_TTL: Duration = Duration::from_secs(60);
    /// The largest `min_per_sec` the layer's `build()` accepts.
    pub const MAX_MIN_PER_SEC: u32 = 1_000_000;
    /// The largest `ratio` the layer's `build()` accepts (Finagle's bound).
    pub const MAX_RATIO: f64 = 1000.0;

    /// A budget keeping deposits for `ttl`, with a reserve of `min_per_sec` retries per
    /// second of `ttl`, and letting `ratio` of requests be retried (0.2 = one retry per
    /// five requests; may exceed 1).
    ///
    /// The layer's `build()` rejects a `ttl` outside
    /// [`MIN_TTL`](Self::MIN_TTL)`..=`[`MAX_TTL`](Self::MAX_TTL) (1 s to 60 s), a
    /// `min_per_sec` above [`MAX_MIN_PER_SEC`](Self::MAX_MIN_PER_SEC) and a `ratio`
    /// outside `0.0..=`[`MAX_RATIO`](Self::MAX_RATIO) (NaN included). Used directly,
    /// such a budget behaves as if the values were clamped into those ranges (a NaN
    /// ratio as 0).
    pub fn new(ttl: Duration, min_per_sec: u32, ratio: f64) -> Self {
        let settings = Settings {
            ttl,
            min_per_sec,
            ratio,
        };
        let (slice_nanos, reserve, deposit) = settings.amounts();
        Self {
            settings: Mutex::new(settings),
            start: Instant::now(),
            slice_nanos: AtomicU64::new(slice_nanos),
            next_start: AtomicU64::new(slice_nanos),
            id: AtomicU64::new(SliceEnd::new_id()),
            deposit: AtomicU64::new(deposit as u64),
            reserve: AtomicU64::new(reserve as u64),
            epoch: AtomicU64::new(0),
            advancing: AtomicBool::new(false),
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
            baseline: AtomicU64::new(reserve as u64),
            balance: AtomicU64::new(reserve as u64),
        }
    }

    /// How long deposits and withdrawals count.
    pub fn ttl(&self) -> Duration {
        lock(&self.settings).ttl
    }

    /// The retries per second allowed whatever the traffic.
    pub fn min_per_sec(&self) -> u32 {
        lock(&self.settings).min_per_sec
    }

    /// The share of requests that may be retried.
    pub fn ratio(&self) -> f64 {
        lock(&self.settings).ratio
    }

    pub(crate) fn validate(&self) -> Result<(), super::RetryConfigError> {
        use super::RetryConfigError;
        let Settings {
            ttl,
            min_per_sec,
            ratio,
        } = *lock(&self.settings);
        if !(Self::MIN_TTL..=Self::MAX_TTL).contains(&ttl) {
            return Err(RetryConfigError::BudgetTtl(ttl));
        }
        if min_per_sec > Self::MAX_MIN_PER_SEC {
            return Err(RetryConfigError::BudgetMinPerSec(min_per_sec));
        }
        // NaN fails the range check too.
        if !(0.0..=Self::MAX_RATIO).contains(&ratio) {
            return Err(RetryConfigError::BudgetRatio(ratio));
        }
        Ok(())
    }

    #[cfg(any(test, feature = "serde"))]
    /// Takes new settings from `now` on, keeping what the budget holds (a live
    /// reload's budget, `RetryHandle::reload`):
    ///
    /// - the retries deposited and withdrawn within the window stay, each slice's net
    ///   amount in its place: it expires once as many slices have passed as it would
    ///   have, slices now a tenth of the new `ttl` long (the current one counted from
    ///   when it began);
    /// - the reserve becomes the new `min_per_sec · ttl` (a smaller one can leave the
    ///   balance below zero until withdrawals funded by the old reserve expire);
    /// - requests deposit the new `ratio` from now on.
    ///
    /// Each deposit and withdrawal racing it is counted under the old settings or the
    /// new ones. Withdrawals taken before stay refundable.
    pub(crate) fn reconfigure(&self, ttl: Duration, min_per_sec: u32, ratio: f64, now: Instant) {
        let settings = Settings {
            ttl,
            min_per_sec,
            ratio,
        };
        let (slice_nanos, reserve, deposit) = settings.amounts();
        let elapsed = self.elapsed(now);
        // Excludes the window's moves, the one thing that reads the balance and the
        // baseline together: the reserve goes into both as one change.
        while self
            .advancing
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            crate::sync::spin_loop();
        }
        // A shorter slice moves `next_start` back: the notes taken before no longer hold.
        self.id.store(SliceEnd::new_id(), Ordering::Release);
        // Closes the window to now under the old slices first.
        self.advance_held(elapsed);
        let old_reserve = self.reserve.swap(reserve as u64, Ordering::Relaxed);
        let change = (reserve as u64).wrapping_sub(old_reserve);
        self.baseline.fetch_add(change, Ordering::AcqRel);
        self.balance.fetch_add(change, Ordering::AcqRel);
        self.deposit.store(deposit as u64, Ordering::Relaxed);
        let old_slice = self.slice_nanos.swap(slice_nanos, Ordering::Relaxed);
        let begun = self
            .next_start
            .load(Ordering::Relaxed)
            .saturating_sub(old_slice);
        self.next_start
            .store(begun.saturating_add(slice_nanos), Ordering::Release);
        // A shorter slice may have ended already.
        self.advance_held(elapsed);
        *lock(&self.settings) = settings;
        self.advancing.store(false, Ordering::Release);
    }

    /// Records one request. Called once per request, on its first attempt.
    pub fn deposit(&self, now: Instant) {
        let deposit = self.deposit.load(Ordering::Relaxed);
        if deposit > 0 {
            self.advance(now);
            self.balance.fetch_add(deposit, Ordering::AcqRel);
        }
    }

    /// Takes one retry out of the budget, or `None` when the budget is spent.
    pub fn withdraw(&self, now: Instant) -> Option<Withdrawal> {
        let epoch = self.advance(now);
        let mut balance = self.balance.load(Ordering::Acquire);
        loop {
            if (balance as i64) < SCALE {
                return None;
            }
            match self.balance.compare_exchange_weak(
                balance,
                balance.wrapping_sub(SCALE as u64),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(actual) => balance = actual,
            }
        }
        self.slots[slot(epoch)].fetch_sub(SCALE as u64, Ordering::AcqRel);
        self.baseline.fetch_sub(SCALE as u64, Ordering::AcqRel);
        Some(Withdrawal { epoch })
    }

    /// Hands back a withdrawal whose retry was never sent: the caller went away, or the
    /// deadline passed, during the backoff delay or while the service was not ready.
    ///
    /// A retry handed to the service is spent even if its answer is never awaited (the
    /// caller's timeout over a hanging dependency): the server did the work, and a
    /// refund would let a retry storm go unbudgeted. The layer refunds exactly this way.
    ///
    /// A withdrawal older than `ttl` has already expired and been given back, so
    /// refunding it changes nothing. So does one that cannot come from this budget (a
    /// withdrawal from another budget, made later in its window than this one's now);
    /// other mix-ups cannot be told apart, so hand a withdrawal to the budget it came
    /// from.
    pub fn refund(&self, withdrawal: Withdrawal, now: Instant) {
        let epoch = self.advance(now);
        let age = epoch.checked_sub(withdrawal.epoch);
        if age.is_some_and(|age| age < SLICES as u64) {
            // Racing the expiry of that very slice can leave this refund in the slice
            // that replaced it, for at most one more ttl: one retry of slack, once.
            self.slots[slot(withdrawal.epoch)].fetch_add(SCALE as u64, Ordering::AcqRel);
            self.baseline.fetch_add(SCALE as u64, Ordering::AcqRel);
            self.balance.fetch_add(SCALE as u64, Ordering::AcqRel);
        }
    }

    /// Whole retries available now.
    pub fn available(&self, now: Instant) -> u64 {
        self.advance(now);
        u64::try_from(self.balance.load(Ordering::Acquire) as i64 / SCALE).unwrap_or(0)
    }

    /// Nanoseconds from `start` to `now` (u64 nanoseconds last 584 years; u128
    /// division would cost more than the rest).
    fn elapsed(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Moves the window to `now`, closing the newest slice and expiring the slices it
    /// leaves behind, and returns the current slice. A caller whose clock reading is
    /// already behind the window records into the current slice, so each amount is
    /// expired exactly once.
    ///
    /// Closing moves the deposits made since the slice opened (`balance − baseline`)
    /// into its slot. Every change is an add of the same amount to both sides, so an
    /// operation racing the boundary can only land in the neighbouring slice, never be
    /// lost or counted twice.
    #[inline]
    fn advance(&self, now: Instant) -> u64 {
        let id = self.id.load(Ordering::Acquire);
        if SliceEnd::is_before(id, now) {
            return self.epoch.load(Ordering::Acquire);
        }
        let elapsed = self.elapsed(now);
        // Nearly every call falls within the newest slice. `next_start` is published
        // after `epoch`: one read before the other is a slice that had begun.
        let next_start = self.next_start.load(Ordering::Acquire);
        if elapsed < next_start {
            SliceEnd::remember(id, self.start.checked_add(Duration::from_nanos(next_start)));
            return self.epoch.load(Ordering::Acquire);
        }
        self.advance_slow(elapsed)
    }

    #[cold]
    #[inline(never)]
    fn advance_slow(&self, elapsed: u64) -> u64 {
        // One caller at a time moves the window, and publishes the new slice only once
        // its slots are ready: nobody records into a slot while it is being expired.
        // The others never wait; they record into the newest open slice meanwhile.
        if self
            .advancing
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return self.epoch.load(Ordering::Acquire);
        }
        let epoch = self.advance_held(elapsed);
        self.advancing.store(false, Ordering::Release);
        epoch
    }

    /// [`advance`](Self::advance), by the holder of `advancing`.
    fn advance_held(&self, elapsed: u64) -> u64 {
        let seen = self.epoch.load(Ordering::Acquire);
        let next_start = self.next_start.load(Ordering::Relaxed);
        if elapsed < next_start {
            return seen;
        }
        let slice_nanos = self.slice_nanos.load(Ordering::Relaxed);
        let passed = (elapsed - next_start) / slice_nanos + 1;
        let target = seen.saturating_add(passed);
        let baseline = self.baseline.load(Ordering::Acquire);
        let deposits = self.balance.load(Ordering::Acquire).wrapping_sub(baseline);
        self.slots[slot(seen)].fetch_add(deposits, Ordering::AcqRel);
        self.baseline.fetch_add(deposits, Ordering::AcqRel);
        // The slices of epochs seen+1..=target reuse the slots of the epochs a window
        // earlier: those amounts expire now.
        let reused = (target - seen).min(SLICES as u64);
        for offset in 1..=reused {
            let expired = self.slots[slot(seen + offset)].swap(0, Ordering::AcqRel);
            self.baseline.fetch_sub(expired, Ordering::AcqRel);
            self.balance.fetch_sub(expired, Ordering::AcqRel);
        }
        self.epoch.store(target, Ordering::Release);
        let next = next_start.saturating_add(passed.saturating_mul(slice_nanos));
        self.next_start.store(next, Ordering::Release);
        target
    }
}

/// `value` in thousandths, rounded down, except that a decimal such as 0.57 (stored as
/// 0.569999…) is not pushed below its written value. (The cast saturates.)
fn thousandths(value: f64) -> i64 {
    (value * SCALE as f64 + 1e-6).floor() as i64
}

fn slot(epoch: u64) -> usize {
    (epoch % SLICES as u64) as usize
}

/// A per-thread note of when a budget's newest slice ended when the thread last looked,
/// so that a call before then (nearly every call) compares two instants instead of
/// measuring the time since the budget's start (a subtraction of two `timespec`s and a
/// conversion to nanoseconds: most of a deposit).
///
/// It is only ever a shortcut to the answer [`RetryBudget::advance`] would reach: under
/// one id, `next_start` only grows, so a `now` before a noted end is also before the
/// newest slice's end, where `advance` moves nothing and returns the newest slice. A
/// reconfiguration, which can move the end back, gives the budget a new id. A stale or
/// missing note only costs the full computation. Under loom it is off, so that the
/// models explore every read of the atomics.
struct SliceEnd;

#[cfg(not(loom))]
thread_local! {
    static SLICE_END: std::cell::Cell<(u64, Option<Instant>)> =
        const { std::cell::Cell::new((0, None)) };
}

impl SliceEnd {
    /// An id no budget has had (0 is never one, so an empty note matches none).
    fn new_id() -> u64 {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    #[cfg(not(loom))]
    #[inline]
    fn is_before(id: u64, now: Instant) -> bool {
        SLICE_END
            .try_with(|note| matches!(note.get(), (noted, Some(end)) if noted == id && now < end))
            .unwrap_or(false)
    }

    #[cfg(not(loom))]
    #[inline]
    fn remember(id: u64, end: Option<Instant>) {
        // Only fails while the thread is torn down; the note is then simply not kept.
        let _ = SLICE_END.try_with(|note| note.set((id, end)));
    }

    #[cfg(loom)]
    fn is_before(_: u64, _: Instant) -> bool {
        false
    }

    #[cfg(loom)]
    fn remember(_: u64, _: Option<Instant>) {}
}

#[cfg(all(test, not(loom)))]
mod model_tests {
    //! The budget against a reference model that keeps every amount with the slice it
    //! was recorded in: random deposits, withdrawals, refunds, waits and
    //! reconfigurations, and the balance after each.

    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Op {
        Deposit,
        Withdraw,
        /// Refunds the `n`th withdrawal still held (modulo their number).
        Refund(usize),
        Wait(u64),
        Reconfigure(Duration, u32, f64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Deposit),
            3 => Just(Op::Withdraw),
            1 => any::<usize>().prop_map(Op::Refund),
            3 => (0u64..4_000).prop_map(Op::Wait),
            1 => (1_000u64..=60_000, 0u32..5, 0.0f64..2.0)
                .prop_map(|(ttl, min, ratio)| Op::Reconfigure(Duration::from_millis(ttl), min, ratio)),
        ]
    }

    /// Slices as numbers, each holding the net amount recorded in it; an amount counts
    /// until the slice is `SLICES` slices old.
    #[derive(Debug)]
    struct Model {
        slice: u64,
        next_start: u64,
        epoch: u64,
        reserve: i64,
        deposit: i64,
        amounts: BTreeMap<u64, i64>,
    }

    impl Model {
        fn new(settings: Settings) -> Self {
            let (slice, reserve, deposit) = settings.amounts();
            Self {
                slice,
                next_start: slice,
                epoch: 0,
                reserve,
                deposit,
                amounts: BTreeMap::new(),
            }
        }

        fn advance(&mut self, elapsed: u64) {
            if elapsed >= self.next_start {
                let passed = (elapsed - self.next_start) / self.slice + 1;
                self.epoch += passed;
                self.next_start += passed * self.slice;
            }
            let oldest = self.epoch.saturating_sub(SLICES as u64 - 1);
            self.amounts.retain(|&epoch, _| epoch >= oldest);
        }

        fn balance(&self) -> i64 {
            self.reserve + self.amounts.values().sum::<i64>()
        }

        fn record(&mut self, epoch: u64, amount: i64) {
            *self.amounts.entry(epoch).or_default() += amount;
        }

        fn available(&self) -> u64 {
            u64::try_from(self.balance() / SCALE).unwrap_or(0)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn the_budget_follows_the_model_across_reconfigurations(
            (ttl, min, ratio) in (1_000u64..=60_000, 0u32..5, 0.0f64..2.0),
            ops in proptest::collection::vec(op(), 1..150),
        ) {
            let settings = Settings { ttl: Duration::from_millis(ttl), min_per_sec: min, ratio };
            let budget = RetryBudget::new(settings.ttl, min, ratio);
            let mut model = Model::new(settings);
            let mut elapsed = 0u64;
            let mut held: Vec<(Withdrawal, u64)> = Vec::new();
            for op in ops {
                let now = budget.start + Duration::from_nanos(elapsed);
                match op {
                    Op::Deposit => {
                        budget.deposit(now);
                        if model.deposit > 0 {
                            model.advance(elapsed);
                            let epoch = model.epoch;
                            model.record(epoch, model.deposit);
                        }
                    }
                    Op::Withdraw => {
                        model.advance(elapsed);
                        let granted = budget.withdraw(now);
                        prop_assert_eq!(granted.is_some(), model.balance() >= SCALE);
                        if let Some(withdrawal) = granted {
                            let epoch = model.epoch;
                            model.record(epoch, -SCALE);
                            held.push((withdrawal, epoch));
                        }
                    }
                    Op::Refund(n) if !held.is_empty() => {
                        let (withdrawal, epoch) = held.remove(n % held.len());
                        budget.refund(withdrawal, now);
                        model.advance(elapsed);
                        if model.epoch - epoch < SLICES as u64 {
                            model.record(epoch, SCALE);
                        }
                    }
                    Op::Refund(_) => {}
                    Op::Wait(ms) => elapsed += ms * 1_000_000,
                    Op::Reconfigure(ttl, min_per_sec, ratio) => {
                        budget.reconfigure(ttl, min_per_sec, ratio, now);
                        model.advance(elapsed);
                        let (slice, reserve, deposit) =
                            Settings { ttl, min_per_sec, ratio }.amounts();
                        let begun = model.next_start - model.slice;
                        model.slice = slice;
                        model.next_start = begun + slice;
                        model.reserve = reserve;
                        model.deposit = deposit;
                        model.advance(elapsed);
                        prop_assert_eq!(budget.ttl(), ttl);
                        prop_assert_eq!(budget.min_per_sec(), min_per_sec);
                    }
                }
                let now = budget.start + Duration::from_nanos(elapsed);
                model.advance(elapsed);
                prop_assert_eq!(budget.available(now), model.available(), "{:?}", model);
            }
        }
    }

    /// A lower reserve can leave the balance below zero: nothing is withdrawn until the
    /// withdrawals it funded expire, a ttl later.
    #[test]
    fn a_lower_reserve_owes_what_the_old_one_lent() {
        let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.0);
        let now = budget.start;
        let spent: Vec<_> = std::iter::from_fn(|| budget.withdraw(now)).collect();
        assert_eq!(spent.len(), 10);
        budget.reconfigure(Duration::from_secs(10), 0, 0.0, now);
        assert_eq!(budget.available(now), 0);
        budget.reconfigure(Duration::from_secs(10), 1, 0.0, now);
        assert_eq!(budget.available(now), 0, "the old reserve is spent");
        assert_eq!(budget.available(now + Duration::from_secs(10)), 10);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_budget_never_reads_another_budgets_note() {
        // No reserve, one retry per request, deposits expire after 1 s.
        let (a, b) = (
            RetryBudget::new(Duration::from_secs(1), 0, 1.0),
            RetryBudget::new(Duration::from_secs(1), 0, 1.0),
        );
        let now = Instant::now();
        b.deposit(now);
        // `a` notes a slice ending 100 s from now, on this thread.
        a.deposit(now + Duration::from_secs(100));
        // `b`'s deposit has expired: the note of `a`'s slice must not say otherwise.
        assert!(b.withdraw(now + Duration::from_secs(2)).is_none());
        assert!(a.withdraw(now + Duration::from_secs(100)).is_some());
    }

    #[test]
    fn a_call_inside_the_noted_slice_still_sees_every_deposit() {
        let budget = RetryBudget::new(Duration::from_secs(1), 0, 1.0);
        let now = Instant::now();
        budget.deposit(now);
        budget.deposit(now + Duration::from_millis(10));
        assert_eq!(budget.available(now + Duration::from_millis(20)), 2);
        // An earlier clock reading (another task's) records into the newest slice.
        budget.deposit(now);
        assert_eq!(budget.available(now + Duration::from_millis(30)), 3);
        assert_eq!(budget.available(now + Duration::from_secs(2)), 0);
    }

    #[test]
    fn a_reconfiguration_to_shorter_slices_voids_the_note() {
        // Slices of 6 s: the deposit notes that the newest slice ends 6 s on.
        let budget = RetryBudget::new(Duration::from_secs(60), 0, 1.0);
        let now = budget.start;
        budget.deposit(now);
        // Slices of 100 ms from now on: the deposit expires a second later, well
        // before the noted end.
        budget.reconfigure(Duration::from_secs(1), 0, 1.0, now);
        assert_eq!(budget.available(now + Duration::from_millis(500)), 1);
        assert!(budget.withdraw(now + Duration::from_secs(2)).is_none());
    }
    #[test]
    fn reserve_allows_min_per_sec_times_ttl() {
        let budget = RetryBudget::new(Duration::from_secs(2), 3, 0.0);
        let now = Instant::now();
        let allowed = std::iter::from_fn(|| budget.withdraw(now)).count();
        assert_eq!(allowed, 6);
    }

    #[test]
    fn withdrawals_come_back_after_ttl() {
        let budget = RetryBudget::new(Duration::from_secs(1), 1, 0.0);
        let now = Instant::now();
        assert!(budget.withdraw(now).is_some());
        assert!(budget.withdraw(now).is_none());
        assert!(budget.withdraw(now + Duration::from_millis(500)).is_none());
        assert!(budget.withdraw(now + Duration::from_millis(1100)).is_some());
    }

    #[test]
    fn refund_restores_a_withdrawal() {
        let budget = RetryBudget::new(Duration::from_secs(1), 1, 0.0);
        let now = Instant::now();
        let withdrawal = budget.withdraw(now).expect("reserve");
        assert_eq!(budget.available(now), 0);
        budget.refund(withdrawal, now);
        assert_eq!(budget.available(now), 1);
    }

    #[test]
    fn refund_of_an_expired_withdrawal_is_ignored() {
        let budget = RetryBudget::new(Duration::from_secs(1), 1, 0.0);
        let now = Instant::now();
        let withdrawal = budget.withdraw(now).expect("reserve");
        let later = now + Duration::from_secs(3);
        assert_eq!(budget.available(later), 1);
        budget.refund(withdrawal, later);
        assert_eq!(budget.available(later), 1);
    }

    #[test]
    fn a_withdrawal_from_a_budget_further_along_is_ignored() {
        let ahead = RetryBudget::new(Duration::from_secs(1), 1, 0.0);
        let behind = RetryBudget::new(Duration::from_secs(1), 1, 0.0);
        let now = Instant::now();
        // From slice 50 of `ahead`, handed to `behind`, still in its slice 0.
        let foreign = ahead
            .withdraw(now + Duration::from_secs(5))
            .expect("reserve");
        assert_eq!(behind.available(now), 1);
        behind.refund(foreign, now);
        assert_eq!(behind.available(now), 1);
    }

    #[test]
    fn long_idle_gaps_expire_everything_once() {
        let budget = RetryBudget::new(Duration::from_secs(1), 0, 1.0);
        let now = Instant::now();
        for _ in 0..5 {
            budget.deposit(now);
        }
        assert_eq!(budget.available(now), 5);
        assert_eq!(budget.available(now + Duration::from_secs(3600)), 0);
        budget.deposit(now + Duration::from_secs(3600));
        assert_eq!(budget.available(now + Duration::from_secs(3600)), 1);
    }

    #[test]
    fn racing_slice_boundaries_loses_and_duplicates_nothing() {
        let budget = std::sync::Arc::new(RetryBudget::new(Duration::from_secs(10), 1, 0.1));
        let start = Instant::now();
        const ROUNDS: u32 = 50_000;
        let together = std::sync::Arc::new(std::sync::Barrier::new(4));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let budget = budget.clone();
                let together = together.clone();
                std::thread::spawn(move || {
                    together.wait();
                    let (mut granted, mut refunded) = (0u64, 0u64);
                    for round in 0..ROUNDS {
                        // Every thread sweeps the nine slices of the first window, so
                        // that boundaries are crossed by several threads at once.
                        let now = start + Duration::from_secs(9) * round / ROUNDS;
                        budget.deposit(now);
                        if round % 3 == 0
                            && let Some(withdrawal) = budget.withdraw(now)
                        {
                            granted += 1;
                            if round % 2 == 0 {
                                budget.refund(withdrawal, now);
                                refunded += 1;
                            }
                        }
                    }
                    (granted, refunded)
                })
            })
            .collect();
        let (granted, refunded) = handles
            .into_iter()
            .map(|handle| handle.join().expect("thread"))
            .fold((0, 0), |(g, r), (tg, tr)| (g + tg, r + tr));
        // 200,000 requests at 10 % and a reserve of 10: nothing has expired yet, so
        // the balance is exactly what was funded minus what was spent.
        let funded = 20_000 + 10;
        assert!(granted - refunded <= funded);
        let within = start + Duration::from_millis(9_500);
        assert_eq!(budget.available(within), funded - (granted - refunded));
        // A window later everything has expired, exactly: only the reserve is left.
        assert_eq!(budget.available(start + Duration::from_secs(30)), 10);
    }

    #[test]
    fn concurrent_withdrawals_never_overspend() {
        let budget = std::sync::Arc::new(RetryBudget::new(Duration::from_secs(60), 0, 0.25));
        let now = Instant::now();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || {
                    let mut granted = 0;
                    for _ in 0..10_000 {
                        budget.deposit(now);
                        granted += usize::from(budget.withdraw(now).is_some());
                        granted += usize::from(budget.withdraw(now).is_some());
                    }
                    granted
                })
            })
            .collect();
        let granted: usize = handles.into_iter().map(|h| h.join().expect("thread")).sum();
        // 40,000 requests at 25 % may fund 10,000 retries, and the tasks asked for
        // 80,000: exactly the funded amount is granted, never more.
        assert_eq!(granted, 10_000);
        assert_eq!(budget.available(now), 0);
    }
}
