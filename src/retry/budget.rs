//! The retry budget: a lock-free, sans-io core shared by every clone of a layer.

use crate::sync::{AtomicBool, AtomicU64, Ordering};
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
    ttl: Duration,
    min_per_sec: u32,
    ratio: f64,
    start: Instant,
    slice_nanos: u64,
    deposit: i64,
    /// The newest slice; whoever moves it forward closes it and expires the slices it
    /// skips.
    epoch: AtomicU64,
    /// Held (never waited for) by the caller moving `epoch` forward.
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
    /// Tells this budget's entry in [`SliceEnd`] from another budget's.
    id: u64,
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
        // Clamped, every amount stays far from the ends of an i64: the reserve is at
        // most 6·10¹⁰ thousandths and a deposit 10⁶, so the balance would need 9·10¹²
        // requests within one ttl to overflow.
        let window = ttl.clamp(Self::MIN_TTL, Self::MAX_TTL);
        let slice_nanos = u64::try_from(window.as_nanos() / SLICES as u128).unwrap_or(u64::MAX);
        let reserve =
            thousandths(f64::from(min_per_sec.min(Self::MAX_MIN_PER_SEC)) * window.as_secs_f64());
        let deposit = if ratio.is_nan() {
            0
        } else {
            thousandths(ratio.clamp(0.0, Self::MAX_RATIO))
        };
        Self {
            ttl,
            min_per_sec,
            ratio,
            start: Instant::now(),
            slice_nanos,
            deposit,
            epoch: AtomicU64::new(0),
            advancing: AtomicBool::new(false),
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
            baseline: AtomicU64::new(reserve as u64),
            balance: AtomicU64::new(reserve as u64),
            id: SliceEnd::new_id(),
        }
    }

    /// How long deposits and withdrawals count.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The retries per second allowed whatever the traffic.
    pub fn min_per_sec(&self) -> u32 {
        self.min_per_sec
    }

    /// The share of requests that may be retried.
    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    pub(crate) fn validate(&self) -> Result<(), super::RetryConfigError> {
        use super::RetryConfigError;
        if !(Self::MIN_TTL..=Self::MAX_TTL).contains(&self.ttl) {
            return Err(RetryConfigError::BudgetTtl(self.ttl));
        }
        if self.min_per_sec > Self::MAX_MIN_PER_SEC {
            return Err(RetryConfigError::BudgetMinPerSec(self.min_per_sec));
        }
        // NaN fails the range check too.
        if !(0.0..=Self::MAX_RATIO).contains(&self.ratio) {
            return Err(RetryConfigError::BudgetRatio(self.ratio));
        }
        Ok(())
    }

    /// Records one request. Called once per request, on its first attempt.
    #[inline]
    pub fn deposit(&self, now: Instant) {
        if self.deposit > 0 {
            self.advance(now);
            self.balance
                .fetch_add(self.deposit as u64, Ordering::AcqRel);
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
        if SliceEnd::is_after(self.id, now) {
            return self.epoch.load(Ordering::Acquire);
        }
        let epoch = self.advance_from_clock(now);
        SliceEnd::remember(self.id, self.end_of(epoch));
        epoch
    }

    /// When slice `epoch` ends, if that instant can be represented.
    fn end_of(&self, epoch: u64) -> Option<Instant> {
        let next_start = epoch.checked_add(1)?.checked_mul(self.slice_nanos)?;
        self.start.checked_add(Duration::from_nanos(next_start))
    }

    /// [`advance`](Self::advance) from the time elapsed since `start`.
    #[inline(never)]
    fn advance_from_clock(&self, now: Instant) -> u64 {
        // u64 nanoseconds last 584 years; u128 division would cost more than the rest.
        let elapsed =
            u64::try_from(now.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX);
        let seen = self.epoch.load(Ordering::Acquire);
        // Nearly every call falls within the newest slice: a multiplication tells,
        // where the division below would cost more than the rest of a deposit.
        if seen
            .checked_add(1)
            .and_then(|next| next.checked_mul(self.slice_nanos))
            .is_none_or(|next_start| elapsed < next_start)
        {
            return seen;
        }
        let target = elapsed / self.slice_nanos;
        // One caller at a time moves the window, and publishes the new slice only once
        // its slots are ready: nobody records into a slot while it is being expired.
        // The others never wait; they record into the newest open slice meanwhile.
        if target <= seen
            || self
                .advancing
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return seen;
        }
        let seen = self.epoch.load(Ordering::Acquire);
        if target > seen {
            let baseline = self.baseline.load(Ordering::Acquire);
            let deposits = self.balance.load(Ordering::Acquire).wrapping_sub(baseline);
            self.slots[slot(seen)].fetch_add(deposits, Ordering::AcqRel);
            self.baseline.fetch_add(deposits, Ordering::AcqRel);
            // The slices of epochs seen+1..=target reuse the slots of the epochs a
            // window earlier: those amounts expire now.
            let reused = (target - seen).min(SLICES as u64);
            for offset in 1..=reused {
                let expired = self.slots[slot(seen + offset)].swap(0, Ordering::AcqRel);
                self.baseline.fetch_sub(expired, Ordering::AcqRel);
                self.balance.fetch_sub(expired, Ordering::AcqRel);
            }
            self.epoch.store(target, Ordering::Release);
        }
        self.advancing.store(false, Ordering::Release);
        target.max(seen)
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

/// A per-thread note of when the slice that a budget was last seen in ends, so that a
/// call well inside the newest slice (nearly every call) compares two instants instead
/// of measuring the time since the budget's start (a subtraction of two `timespec`s and
/// a conversion to nanoseconds: most of a deposit).
///
/// It is only ever a shortcut to the answer [`RetryBudget::advance`] would reach: the
/// noted end is that of a slice no newer than the budget's newest, so a `now` before it
/// is also before the end of the newest slice, where `advance` moves nothing and
/// returns the newest slice. A stale or missing note only costs the full computation.
/// Under loom it is off, so that the models explore every read of the atomics.
struct SliceEnd;

#[cfg(not(loom))]
thread_local! {
    static SLICE_END: std::cell::Cell<(u64, Option<Instant>)> = const { std::cell::Cell::new((0, None)) };
}

impl SliceEnd {
    /// A budget id no other budget has (0 is never one, so an empty note matches none).
    fn new_id() -> u64 {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    #[cfg(not(loom))]
    #[inline]
    fn is_after(id: u64, now: Instant) -> bool {
        SLICE_END
            .try_with(|note| matches!(note.get(), (noted, Some(end)) if noted == id && now < end))
            .unwrap_or(false)
    }

    #[cfg(not(loom))]
    fn remember(id: u64, end: Option<Instant>) {
        // Only fails while the thread is torn down; the note is then simply not kept.
        let _ = SLICE_END.try_with(|note| note.set((id, end)));
    }

    #[cfg(loom)]
    fn is_after(_: u64, _: Instant) -> bool {
        false
    }

    #[cfg(loom)]
    fn remember(_: u64, _: Option<Instant>) {}
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

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
