//! Property tests of the retry cores: backoff bounds and the budget against a model.
use palisade::retry::{Backoff, ExponentialBackoff, Jitter, RetryBudget};
use proptest::prelude::*;
use std::time::Duration;
use tokio::time::Instant;

fn jitter() -> impl Strategy<Value = Jitter> {
    prop_oneof![
        Just(Jitter::None),
        Just(Jitter::Full),
        Just(Jitter::Equal),
        Just(Jitter::Decorrelated),
        (0.0..=1.0f64).prop_map(Jitter::Proportional),
    ]
}

fn backoff() -> impl Strategy<Value = (Backoff, Jitter)> {
    let base = (0u64..5_000).prop_map(Duration::from_millis);
    (base, 0u64..100_000, 0usize..3, 1.0..10.0f64, jitter()).prop_map(
        |(base, extra, kind, multiplier, jitter)| {
            let backoff = match kind {
                0 => Backoff::constant(base),
                1 => Backoff::linear(base),
                _ => Backoff::exponential(base).multiplier(multiplier).into(),
            };
            (
                backoff
                    .max(base + Duration::from_millis(extra))
                    .jitter(jitter),
                jitter,
            )
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Every delay is within its jitter's documented bounds and never above the cap.
    #[test]
    fn backoff_delays_stay_within_bounds(
        (backoff, jitter) in backoff(),
        randoms in proptest::collection::vec(any::<u64>(), 1..40),
    ) {
        let (base, cap) = (backoff.base(), backoff.cap());
        let mut previous = Duration::ZERO;
        let mut last_scheduled = Duration::ZERO;
        for (index, random) in randoms.into_iter().enumerate() {
            let retry = index as u32 + 1;
            let scheduled = backoff.scheduled(retry);
            prop_assert!(scheduled <= cap);
            prop_assert!(scheduled >= last_scheduled, "the schedule never shrinks");
            last_scheduled = scheduled;
            let delay = backoff.delay(retry, previous, random);
            prop_assert!(delay <= cap, "{delay:?} above the cap {cap:?}");
            let (low, high) = match jitter {
                Jitter::None => (scheduled, scheduled),
                Jitter::Full => (Duration::ZERO, scheduled),
                Jitter::Equal => (scheduled / 2, scheduled),
                Jitter::Decorrelated => (base, previous.max(base).saturating_mul(3).min(cap)),
                Jitter::Proportional(spread) => (
                    scheduled.mul_f64(1.0 - spread).saturating_sub(Duration::from_nanos(1)),
                    scheduled.mul_f64(1.0 + spread).min(cap),
                ),
            };
            prop_assert!(delay >= low && delay <= high, "{delay:?} outside [{low:?}, {high:?}]");
            previous = delay;
        }
    }

    /// A zero base stays zero for every retry number, and a huge exponent saturates at
    /// the cap (or `Duration::MAX`) instead of reading 0 · ∞ = NaN as an overflow.
    #[test]
    fn exponential_growth_saturates_without_nan(
        retry in any::<u32>(),
        multiplier in 1.0..10.0f64,
        cap in proptest::option::of(1u64..10_000),
        random in any::<u64>(),
    ) {
        let capped = |backoff: ExponentialBackoff| match cap {
            Some(millis) => backoff.max(Duration::from_millis(millis)),
            None => backoff.jitter(Jitter::None),
        };
        let zero = capped(Backoff::exponential(Duration::ZERO).multiplier(multiplier));
        prop_assert_eq!(zero.scheduled(retry), Duration::ZERO);
        prop_assert_eq!(zero.delay(retry, Duration::ZERO, random), Duration::ZERO);
        let one = capped(Backoff::exponential(Duration::from_millis(1)).multiplier(multiplier));
        let later = one.scheduled(retry.saturating_add(1));
        prop_assert!(later >= one.scheduled(retry), "the schedule never shrinks");
        if retry > 2_000 && multiplier >= 1.5 {
            prop_assert_eq!(later, one.cap());
        }
    }

    /// The first decorrelated retry is drawn from `[base, 3 · base]` like the later
    /// ones, so that clients that failed together do not retry together.
    #[test]
    fn decorrelated_jitter_spreads_the_first_retry(
        base_millis in 1u64..5_000,
        randoms in proptest::collection::vec(any::<u64>(), 64),
    ) {
        let base = Duration::from_millis(base_millis);
        let backoff = Backoff::exponential(base).jitter(Jitter::Decorrelated);
        let firsts: std::collections::BTreeSet<Duration> = randoms
            .into_iter()
            .map(|random| backoff.delay(1, Duration::ZERO, random))
            .collect();
        prop_assert!(firsts.iter().all(|first| (base..=base * 3).contains(first)));
        prop_assert!(firsts.len() > 1, "every client retries after exactly {:?}", base);
        prop_assert_eq!(backoff.delay(1, Duration::ZERO, 1 << 63), base * 2);
    }

    /// Used directly, a budget with any values behaves as if they were clamped into
    /// the ranges `build()` accepts: its balance is the reserve plus the deposits,
    /// never wrapped.
    #[test]
    fn any_budget_behaves_as_clamped(
        ttl_secs in any::<u64>(),
        ttl_nanos in 0u32..1_000_000_000,
        min_per_sec in any::<u32>(),
        ratio in any::<f64>(),
        deposits in 0u64..1000,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        let _clock = runtime.enter();
        let ttl = Duration::new(ttl_secs, ttl_nanos);
        let budget = RetryBudget::new(ttl, min_per_sec, ratio);
        let now = Instant::now();
        for _ in 0..deposits {
            budget.deposit(now);
        }
        let window = ttl.clamp(RetryBudget::MIN_TTL, RetryBudget::MAX_TTL);
        let min = f64::from(min_per_sec.min(RetryBudget::MAX_MIN_PER_SEC));
        let ratio = if ratio.is_nan() { 0.0 } else { ratio.clamp(0.0, RetryBudget::MAX_RATIO) };
        let reserve = (min * window.as_secs_f64() * 1000.0 + 1e-6).floor() as u64;
        let deposit = (ratio * 1000.0 + 1e-6).floor() as u64;
        prop_assert_eq!(budget.available(now), (reserve + deposits * deposit) / 1000);
    }

    /// Within one ttl the budget never allows more than `min · ttl + ratio · requests`
    /// retries, and it allows exactly what a plain reference model allows.
    #[test]
    fn budget_matches_the_reference_model(
        ttl_secs in 1u64..20,
        min_per_sec in 0u32..5,
        ratio_percent in 0u32..150,
        ttl_millis in 0u64..1000,
        ops in proptest::collection::vec((any::<bool>(), 0u64..400), 1..400),
    ) {
        let ttl = Duration::from_secs(ttl_secs) + Duration::from_millis(ttl_millis);
        let ratio = f64::from(ratio_percent) / 100.0;
        // A paused clock makes the budget's creation time and `start` the same
        // instant, so slice boundaries line up with the model's.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        let _clock = runtime.enter();
        let budget = RetryBudget::new(ttl, min_per_sec, ratio);
        let start = Instant::now();
        let mut model = Model::new(ttl, min_per_sec, ratio_percent);
        let (mut requests, mut retries) = (0u64, 0u64);
        let mut clock = Duration::ZERO;
        for (is_request, step_millis) in ops {
            clock += Duration::from_millis(step_millis);
            let now = start + clock;
            if is_request {
                budget.deposit(now);
                model.deposit(clock);
                requests += 1;
            } else {
                let allowed = budget.withdraw(now).is_some();
                prop_assert_eq!(allowed, model.withdraw(clock), "at {:?}", clock);
                retries += u64::from(allowed);
            }
            if clock < ttl / 10 {
                // Nothing has expired yet: the closed-form bound holds.
                let bound = f64::from(min_per_sec) * ttl.as_secs_f64() + ratio * requests as f64;
                prop_assert!(retries as f64 <= bound + 1e-9, "{retries} retries > {bound}");
            }
        }
    }
}

/// The values of the reports: once built they wrapped their balance negative on
/// the first deposit and refused every retry for ever.
#[test]
fn extreme_budgets_used_directly_do_not_wrap() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    let _clock = runtime.enter();
    let now = Instant::now();
    for (ttl, min_per_sec, ratio) in [
        (Duration::MAX, 1, 0.2),
        (Duration::from_secs(10), 10, 1e300),
        (Duration::MAX, u32::MAX, 0.2),
    ] {
        let budget = RetryBudget::new(ttl, min_per_sec, ratio);
        let before = budget.available(now);
        budget.deposit(now);
        assert!(
            budget.available(now) >= before,
            "{ttl:?}, {min_per_sec}, {ratio}"
        );
        assert!(
            budget.withdraw(now).is_some(),
            "{ttl:?}, {min_per_sec}, {ratio}"
        );
    }
}

/// The budget as a plain list of (slice, amount) records: a slice is a tenth of the
/// ttl, and a record counts while it is less than ten slices old.
struct Model {
    slice: Duration,
    reserve: i64,
    deposit: i64,
    records: Vec<(u128, i64)>,
}

impl Model {
    fn new(ttl: Duration, min_per_sec: u32, ratio_percent: u32) -> Self {
        Self {
            slice: ttl / 10,
            reserve: (f64::from(min_per_sec) * ttl.as_secs_f64() * 1000.0 + 1e-6).floor() as i64,
            deposit: i64::from(ratio_percent) * 10,
            records: Vec::new(),
        }
    }

    fn slice_of(&self, clock: Duration) -> u128 {
        clock.as_nanos() / self.slice.as_nanos()
    }

    fn balance(&self, clock: Duration) -> i64 {
        let now = self.slice_of(clock);
        self.reserve
            + self
                .records
                .iter()
                .filter(|(slice, _)| now - slice < 10)
                .map(|(_, amount)| amount)
                .sum::<i64>()
    }

    fn deposit(&mut self, clock: Duration) {
        self.records.push((self.slice_of(clock), self.deposit));
    }

    fn withdraw(&mut self, clock: Duration) -> bool {
        let allowed = self.balance(clock) >= 1000;
        if allowed {
            self.records.push((self.slice_of(clock), -1000));
        }
        allowed
    }
}
