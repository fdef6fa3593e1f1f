//! The sans-io token bucket against a reference model, and under threads.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use palisade::rate_limit::{Denied, Quota, RateLimitConfigError, Reservation, TokenBucket};
use proptest::prelude::*;
use tokio::time::Instant;

/// The textbook token bucket, in exact integer arithmetic: `credit` is the time-worth of
/// tokens held (one token = `interval` nanoseconds), capped at `capacity * interval`.
struct Model {
    capacity: u64,
    interval: u64,
    credit: u64,
    last: u64,
}

impl Model {
    fn new(capacity: u64, interval: u64) -> Self {
        Self {
            capacity,
            interval,
            credit: capacity * interval,
            last: 0,
        }
    }

    /// `Ok(())` if admitted, else how long until the request would be.
    fn acquire(&mut self, cost: u64, now: u64) -> Result<(), u64> {
        self.credit = (self.credit + (now - self.last)).min(self.capacity * self.interval);
        self.last = now;
        let price = cost * self.interval;
        if self.credit >= price {
            self.credit -= price;
            Ok(())
        } else {
            Err(price - self.credit)
        }
    }
}

/// The token bucket in exact rational arithmetic, for `tokens` per `period` ns: credit is
/// counted in `1 / tokens` nanoseconds, so a token is worth exactly `period` of them.
struct ExactModel {
    capacity: u128,
    tokens: u128,
    period: u128,
    credit: u128,
    last: u64,
}

impl ExactModel {
    fn new(capacity: u64, tokens: u64, period: u64) -> Self {
        let (capacity, tokens, period) = (capacity.into(), tokens.into(), period.into());
        Self {
            capacity,
            tokens,
            period,
            credit: capacity * period,
            last: 0,
        }
    }

    /// `Ok(())` if admitted, else how long (ns, rounded up) until the request would be.
    fn acquire(&mut self, cost: u64, now: u64) -> Result<(), u64> {
        let elapsed = u128::from(now - self.last) * self.tokens;
        self.credit = (self.credit + elapsed).min(self.capacity * self.period);
        self.last = now;
        let price = u128::from(cost) * self.period;
        if self.credit >= price {
            self.credit -= price;
            Ok(())
        } else {
            Err(u64::try_from((price - self.credit).div_ceil(self.tokens)).unwrap())
        }
    }
}

/// Runs `arrivals` (gap, cost) through a bucket and the exact model side by side.
fn against_the_exact_model(
    capacity: u64,
    tokens: u64,
    period: u64,
    arrivals: &[(u64, u64)],
) -> Result<(), TestCaseError> {
    let start = Instant::now();
    let quota = Quota::new(capacity, tokens, Duration::from_nanos(period))?;
    let bucket = TokenBucket::new(quota, start);
    let mut model = ExactModel::new(capacity, tokens, period);
    let mut now = 0;
    for &(gap, cost) in arrivals {
        now += gap;
        let expected = model.acquire(cost, now);
        match bucket.acquire(cost, at(start, now)) {
            Ok(_) => prop_assert_eq!(expected, Ok(()), "admitted at {}", now),
            Err(Denied::Limited { retry_after, .. }) => {
                prop_assert_eq!(expected, Err(retry_after.as_nanos() as u64), "at {}", now);
            }
            Err(Denied::CostExceedsCapacity { .. }) => prop_assert!(cost > capacity),
        }
    }
    Ok(())
}

fn at(start: Instant, nanos: u64) -> Instant {
    start + Duration::from_nanos(nanos)
}

/// Checks that the requests that went ahead, as (start time, cost) sorted by time, spent
/// at most `capacity + tokens * (t + slack) / period` over every window of length `t`
/// (`slack`: how much later than its slot a request may have started).
fn within_capacity_plus_rate(
    went: &[(u64, u64)],
    capacity: u64,
    tokens: u64,
    period: u64,
    slack: u64,
) -> Result<(), TestCaseError> {
    for (i, &(from, _)) in went.iter().enumerate() {
        let mut spent = 0u128;
        for &(to, cost) in &went[i..] {
            spent += u128::from(cost);
            // spent <= capacity + tokens * (to - from) / period, without division.
            let allowed = u128::from(capacity) * u128::from(period)
                + u128::from(tokens) * u128::from(to - from + slack);
            prop_assert!(
                spent * u128::from(period) <= allowed,
                "{spent} went ahead in {} ns: {went:?}",
                to - from
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Same decisions and same retry_after as the model, for random arrivals and costs.
    #[test]
    fn matches_the_reference_model(
        capacity in 1u64..8,
        interval in 1u64..5_000,
        arrivals in prop::collection::vec((0u64..3_000, 1u64..4), 1..200),
    ) {
        let start = Instant::now();
        let bucket = TokenBucket::new(Quota::new(capacity, 1, Duration::from_nanos(interval))?, start);
        let mut model = Model::new(capacity, interval);
        let mut now = 0;
        for (gap, cost) in arrivals {
            now += gap;
            let expected = model.acquire(cost, now);
            match bucket.acquire(cost, at(start, now)) {
                Ok(_) => prop_assert_eq!(expected, Ok(())),
                Err(Denied::Limited { retry_after, .. }) => {
                    prop_assert_eq!(expected, Err(retry_after.as_nanos() as u64));
                }
                Err(Denied::CostExceedsCapacity { .. }) => prop_assert!(cost > capacity),
            }
        }
    }

    /// Over any window of length t the admitted cost is at most capacity + rate * t,
    /// including rates that do not divide the period evenly.
    #[test]
    fn never_exceeds_capacity_plus_rate_times_t(
        capacity in 1u64..6,
        tokens in 1u64..7,
        period in 1_000u64..20_000,
        arrivals in prop::collection::vec((0u64..2_000, 1u64..3), 1..250),
    ) {
        let start = Instant::now();
        let bucket = TokenBucket::new(Quota::new(capacity, tokens, Duration::from_nanos(period))?, start);
        let mut admitted = Vec::new();
        let mut now = 0;
        for (gap, cost) in arrivals {
            now += gap;
            if bucket.acquire(cost, at(start, now)).is_ok() {
                admitted.push((now, cost));
            }
        }
        within_capacity_plus_rate(&admitted, capacity, tokens, period, 0)?;
    }

    /// Reservations given back at random, in any order, never let the requests that do go
    /// ahead exceed capacity + rate * t over any window of their slots. (A slot may lie
    /// between two nanoseconds; the wait is rounded up, so each start is less than a
    /// nanosecond after its slot.)
    #[test]
    fn cancellations_never_exceed_capacity_plus_rate_times_t(
        capacity in 1u64..6,
        tokens in 1u64..4,
        period in 1_000u64..10_000,
        steps in prop::collection::vec((0u64..1_500, 1u64..3, any::<bool>(), any::<prop::sample::Index>()), 1..150),
    ) {
        let start = Instant::now();
        let bucket = TokenBucket::new(Quota::new(capacity, tokens, Duration::from_nanos(period))?, start);
        let max_wait = Duration::from_nanos(4 * period);
        // Every request that holds tokens: (start time, cost, reservation if still pending).
        let mut held: Vec<(u64, u64, Option<Reservation>)> = Vec::new();
        let mut now = 0;
        for (gap, cost, give_up, pick) in steps {
            now += gap;
            // Waiters whose turn came went ahead: their tokens are spent for good.
            for (go, _, reservation) in &mut held {
                if *go <= now {
                    *reservation = None;
                }
            }
            let pending: Vec<usize> = (0..held.len()).filter(|&i| held[i].2.is_some()).collect();
            if give_up && !pending.is_empty() {
                let index = pending[pick.index(pending.len())];
                let (_, _, reservation) = held.swap_remove(index);
                bucket.cancel(reservation.unwrap());
            } else if let Ok(reservation) = bucket.reserve(cost, max_wait, at(start, now)) {
                let go = now + reservation.wait().as_nanos() as u64;
                held.push((go, cost, Some(reservation)));
            }
        }
        let mut went: Vec<(u64, u64)> = held.iter().map(|&(go, cost, _)| (go, cost)).collect();
        went.sort_unstable();
        within_capacity_plus_rate(&went, capacity, tokens, period, 1)?;
    }

    /// A client whose requests are each at least period / tokens apart is never refused,
    /// whatever it did before (starting from a drained bucket).
    #[test]
    fn steady_client_is_never_refused(
        capacity in 1u64..6,
        tokens in 1u64..7,
        period in 1_000u64..20_000,
        extra in prop::collection::vec(0u64..500, 1..200),
    ) {
        let start = Instant::now();
        let bucket = TokenBucket::new(Quota::new(capacity, tokens, Duration::from_nanos(period))?, start);
        while bucket.acquire(1, start).is_ok() {}
        let spacing = period.div_ceil(tokens);
        let mut now = 0;
        for extra in extra {
            now += spacing + extra;
            prop_assert!(bucket.acquire(1, at(start, now)).is_ok(), "refused at {now}");
        }
    }

    /// Same decisions and retry_after as exact rational arithmetic, for rates whose
    /// interval is no whole number of nanoseconds.
    #[test]
    fn matches_the_exact_rational_model(
        capacity in 1u64..8,
        tokens in 1u64..13,
        period in prop_oneof![1_000u64..60_000, (1u64..60).prop_map(|ms| ms * 1_000_000)],
        arrivals in prop::collection::vec((0u64..30_000, 1u64..4), 1..200),
    ) {
        let arrivals: Vec<_> =
            arrivals.into_iter().map(|(gap, cost)| (gap * period / 20_000, cost)).collect();
        against_the_exact_model(capacity, tokens, period, &arrivals)?;
    }

    /// The finest units there are (2^24 of them per nanosecond) move the epoch every few
    /// seconds: decisions across many such moves stay exact.
    #[test]
    fn stays_exact_across_epoch_moves(
        capacity in 1u64..5,
        arrivals in prop::collection::vec((0u64..6_000_000_000, 1u64..3), 1..60),
    ) {
        let tokens = (1 << 24) - 3;
        against_the_exact_model(capacity, tokens, tokens + 1, &arrivals)?;
    }

    /// A client that sends exactly `tokens` requests at every whole `period` is never
    /// refused, whatever the period (2 of 3 went through at 1 s with the interval rounded
    /// up to the nanosecond).
    #[test]
    fn a_client_at_exactly_the_rate_is_never_refused(
        tokens in 1u64..20,
        extra in 0u64..3,
        period in prop_oneof![1_000u64..100_000, (1u64..3_600).prop_map(|s| s * 1_000_000_000)],
        periods in 1u64..40,
    ) {
        let start = Instant::now();
        let quota = Quota::new(tokens + extra, tokens, Duration::from_nanos(period))?;
        let bucket = TokenBucket::new(quota, start);
        for round in 0..periods {
            for request in 0..tokens {
                prop_assert!(
                    bucket.acquire(1, at(start, round * period)).is_ok(),
                    "request {} of round {} refused", request, round
                );
            }
        }
    }

    /// A retry after exactly retry_after succeeds; one a nanosecond earlier does not.
    #[test]
    fn retry_after_is_exact(
        capacity in 1u64..6,
        tokens in 1u64..7,
        period in 1_000u64..20_000,
        arrivals in prop::collection::vec((0u64..1_000, 1u64..3), 1..60),
        cost in 1u64..3,
    ) {
        prop_assume!(cost <= capacity);
        let start = Instant::now();
        let bucket = TokenBucket::new(Quota::new(capacity, tokens, Duration::from_nanos(period))?, start);
        let mut now = 0;
        for (gap, cost) in arrivals {
            now += gap;
            let _ = bucket.acquire(cost, at(start, now));
        }
        while bucket.acquire(cost, at(start, now)).is_ok() {}
        let Err(Denied::Limited { retry_after, .. }) = bucket.acquire(cost, at(start, now)) else {
            return Err(TestCaseError::fail("expected a denial"));
        };
        let retry = now + retry_after.as_nanos() as u64;
        prop_assert!(bucket.acquire(cost, at(start, retry - 1)).is_err());
        prop_assert!(bucket.acquire(cost, at(start, retry)).is_ok());
    }
}

#[test]
fn three_per_second_admits_three_at_each_whole_second() {
    for tokens in [3, 7] {
        let start = Instant::now();
        let quota = Quota::new(tokens, tokens, Duration::from_secs(1)).unwrap();
        let bucket = TokenBucket::new(quota, start);
        for second in 0..4 {
            let now = start + Duration::from_secs(second);
            let admitted = (0..tokens + 1)
                .filter(|_| bucket.acquire(1, now).is_ok())
                .count() as u64;
            assert_eq!(admitted, tokens, "refill({tokens}, 1s) at {second} s");
        }
    }
}

#[test]
fn equal_rates_are_equal_quotas() {
    let second = Duration::from_secs(1);
    assert_eq!(
        Quota::new(5, 2, 2 * second).unwrap(),
        Quota::new(5, 1, second).unwrap()
    );
    let third = Quota::new(3, 3, second).unwrap();
    assert_eq!(third.period(), second);
    // Shown rounded up; counted exactly.
    assert_eq!(third.refill_interval(), Duration::from_nanos(333_333_334));
}

#[test]
fn reservations_queue_in_order_and_give_back_only_the_last() {
    let start = Instant::now();
    let bucket = TokenBucket::new(Quota::new(1, 1, Duration::from_secs(1)).unwrap(), start);
    let max_wait = Duration::from_secs(10);
    assert_eq!(
        bucket.reserve(1, max_wait, start).unwrap().wait(),
        Duration::ZERO
    );
    let first = bucket.reserve(1, max_wait, start).unwrap();
    let second = bucket.reserve(1, max_wait, start).unwrap();
    assert_eq!(first.wait(), Duration::from_secs(1));
    assert_eq!(second.wait(), Duration::from_secs(2));

    // The first is not the last reservation: its slot stays spent.
    bucket.cancel(first);
    assert_eq!(
        bucket.reserve(1, max_wait, start).unwrap().wait(),
        Duration::from_secs(3)
    );
}

#[test]
fn cancelling_the_last_reservation_restores_the_bucket() {
    let start = Instant::now();
    let bucket = TokenBucket::new(Quota::new(2, 1, Duration::from_secs(1)).unwrap(), start);
    let max_wait = Duration::from_secs(10);
    bucket.acquire(2, start).unwrap();
    let reserved = bucket.reserve(1, max_wait, start).unwrap();
    assert_eq!(reserved.wait(), Duration::from_secs(1));
    bucket.cancel(reserved);
    assert_eq!(
        bucket.reserve(1, max_wait, start).unwrap().wait(),
        Duration::from_secs(1)
    );
}

#[test]
fn a_reservation_beyond_max_wait_is_refused_without_spending() {
    let start = Instant::now();
    let bucket = TokenBucket::new(Quota::new(1, 1, Duration::from_secs(1)).unwrap(), start);
    bucket.acquire(1, start).unwrap();
    let refused = bucket
        .reserve(1, Duration::from_millis(999), start)
        .unwrap_err();
    assert_eq!(
        refused,
        Denied::Limited {
            retry_after: Duration::from_secs(1),
            remaining: 0
        }
    );
    assert_eq!(
        bucket
            .reserve(1, Duration::from_secs(1), start)
            .unwrap()
            .wait(),
        Duration::from_secs(1)
    );
}

#[test]
fn cost_above_capacity_is_refused_for_good() {
    let start = Instant::now();
    let bucket = TokenBucket::new(Quota::new(3, 1, Duration::from_secs(1)).unwrap(), start);
    assert_eq!(
        bucket.reserve(4, Duration::from_secs(3600), start),
        Err(Denied::CostExceedsCapacity {
            cost: 4,
            capacity: 3
        })
    );
    assert_eq!(bucket.available(start), 3);
}

#[test]
fn quota_changes_carry_the_tokens_over() {
    let start = Instant::now();
    let bucket = TokenBucket::new(Quota::new(10, 10, Duration::from_secs(1)).unwrap(), start);
    bucket.acquire(10, start).unwrap();
    assert_eq!(bucket.available(start), 0);

    // Slower refill: the empty bucket stays empty, and refills at the new rate.
    bucket.set_quota(Quota::new(10, 1, Duration::from_secs(1)).unwrap(), start);
    assert_eq!(bucket.available(start), 0);
    assert_eq!(bucket.available(at(start, 999_999_999)), 0);
    assert_eq!(bucket.available(start + Duration::from_secs(1)), 1);

    // Half full, then a smaller capacity: as full as a fraction (half of 4), not
    // clamped to a full bucket of the new size.
    let later = start + Duration::from_secs(5);
    assert_eq!(bucket.available(later), 5);
    bucket.set_quota(Quota::new(4, 1, Duration::from_secs(1)).unwrap(), later);
    assert_eq!(bucket.available(later), 2);

    // A larger capacity keeps the fraction too: half of 6, and the rest at the refill
    // rate.
    bucket.set_quota(Quota::new(6, 1, Duration::from_secs(1)).unwrap(), later);
    assert_eq!(bucket.available(later), 3);
    assert_eq!(bucket.available(later + Duration::from_secs(2)), 5);
    assert_eq!(bucket.available(later + Duration::from_secs(3)), 6);
    assert_eq!(bucket.quota().capacity(), 6);
}

#[test]
fn invalid_quotas_are_errors() {
    let second = Duration::from_secs(1);
    assert_eq!(
        Quota::new(0, 1, second),
        Err(RateLimitConfigError::ZeroCapacity)
    );
    assert_eq!(
        Quota::new(1, 0, second),
        Err(RateLimitConfigError::ZeroRefillTokens)
    );
    assert_eq!(
        Quota::new(1, 1, Duration::ZERO),
        Err(RateLimitConfigError::ZeroRefillPeriod)
    );
    assert_eq!(
        Quota::new(1, 2, Duration::from_nanos(1)),
        Err(RateLimitConfigError::RateTooHigh)
    );
    assert_eq!(
        Quota::new(u64::MAX, 1, second),
        Err(RateLimitConfigError::TooLarge)
    );
    // Units finer than 2^-24 ns.
    let tokens = (1 << 24) + 1;
    assert_eq!(
        Quota::new(1, tokens, Duration::from_nanos(tokens + 1)),
        Err(RateLimitConfigError::TooLarge)
    );
    // Capacity times the units of a token above 2^57: seven per second in units of a
    // seventh of a nanosecond allow at most 2^57 / 10^9 tokens.
    let most = (1u64 << 57) / 1_000_000_000;
    assert!(Quota::new(most, 7, second).is_ok());
    assert_eq!(
        Quota::new(most + 1, 7, second),
        Err(RateLimitConfigError::TooLarge)
    );
}

#[test]
fn threads_sharing_one_bucket_never_over_admit() {
    let start = Instant::now();
    let bucket = Arc::new(TokenBucket::new(
        Quota::new(1_000, 1, Duration::from_secs(3600)).unwrap(),
        start,
    ));
    let admitted = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..8)
        .map(|thread| {
            let bucket = bucket.clone();
            let admitted = admitted.clone();
            std::thread::spawn(move || {
                // Time moves a little per thread, never enough for a token (1 per hour).
                for step in 0..500u64 {
                    let now = at(start, thread * 1_000 + step);
                    if bucket.acquire(1, now).is_ok() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    // Never more than the capacity. Threads' clocks differ by up to 7.5 µs and a request
    // is judged at its own `now`: when a thread with a later clock moved the bucket
    // first, the last token is only there for requests at least that late, which may
    // all have been spent already. So at most one token (the skew, under one interval)
    // can go unclaimed.
    let admitted = admitted.load(Ordering::Relaxed);
    assert!((999..=1_000).contains(&admitted), "{admitted}");
}

#[test]
fn an_unbounded_max_wait_cannot_overflow_the_bucket() {
    let start = Instant::now();
    // One token per 2^57 ns (4.5 years), the slowest rate a quota allows.
    let slowest = Duration::from_nanos(1 << 57);
    let bucket = TokenBucket::new(Quota::new(1, 1, slowest).unwrap(), start);
    bucket.acquire(1, start).unwrap();
    let mut reservations = Vec::new();
    for _ in 0..64 {
        if let Ok(reservation) = bucket.reserve(1, Duration::MAX, start) {
            reservations.push(reservation);
        }
    }
    // Waits beyond 2^57 ns are refused as if max_wait were that long.
    assert_eq!(reservations.len(), 1);
    assert_eq!(reservations[0].wait(), slowest);
    assert_eq!(bucket.available(start), 0);
    assert!(bucket.acquire(1, start).is_err());
    for reservation in reservations.into_iter().rev() {
        bucket.cancel(reservation);
    }
    assert_eq!(bucket.available(start), 0);
    assert_eq!(bucket.available(start + slowest), 1);
}

/// Flips `bucket` between `from` (the quota in force) and `to` `flips` times at `now`,
/// checking that it holds `in_to` tokens every time it is in `to`.
fn flip(bucket: &TokenBucket, from: Quota, to: Quota, flips: usize, in_to: u64, now: Instant) {
    for _ in 0..flips {
        bucket.set_quota(to, now);
        assert_eq!(bucket.available(now), in_to);
        bucket.set_quota(from, now);
    }
}

#[test]
fn flipping_between_two_capacities_a_thousand_times_ends_where_it_started() {
    let start = Instant::now();
    let second = Duration::from_secs(1);
    // A token of 100/s is 10^7 units: every fraction here is a whole number of units.
    let (large, small) = (
        Quota::new(1000, 100, second).unwrap(),
        Quota::new(7, 100, second).unwrap(),
    );
    let bucket = TokenBucket::new(large, start);
    bucket.acquire(333, start).unwrap();
    // 667 of 1000 is 4.669 of 7.
    flip(&bucket, large, small, 1000, 4, start);
    assert_eq!(bucket.available(start), 667);
    // From the small side: 3 of 7 is 428.57... of 1000, and back.
    let bucket = TokenBucket::new(small, start);
    bucket.acquire(4, start).unwrap();
    flip(&bucket, small, large, 1000, 428, start);
    assert_eq!(bucket.available(start), 3);
}

#[test]
fn where_a_fraction_needs_finer_units_a_round_trip_loses_less_than_a_unit_once() {
    let start = Instant::now();
    // One token per nanosecond: a token is one unit, so 7 tokens have 7 units and most
    // fractions of 1000 fall between two of them.
    let nanosecond = Duration::from_nanos(1);
    let (large, small) = (
        Quota::new(1000, 1, nanosecond).unwrap(),
        Quota::new(7, 1, nanosecond).unwrap(),
    );
    // Through the larger quota and back: exact. 3 of 7 is 428.57 of 1000, rounded up
    // (a growth rounds up), and 429 of 1000 is 3.003 of 7, rounded down (a shrink).
    let bucket = TokenBucket::new(small, start);
    bucket.acquire(4, start).unwrap();
    flip(&bucket, small, large, 1000, 429, start);
    assert_eq!(bucket.available(start), 3);
    // Through the smaller one and back: 667 of 1000 is 4.669 of 7, rounded down to 4,
    // which is 571.43 of 1000, rounded up to 572: less than one unit of 7 (1000 / 7
    // tokens of 1000) lost, once; from there on 572 and 4 map onto each other.
    let bucket = TokenBucket::new(large, start);
    bucket.acquire(333, start).unwrap();
    bucket.set_quota(small, start);
    bucket.set_quota(large, start);
    assert_eq!(bucket.available(start), 572);
    flip(&bucket, large, small, 1000, 4, start);
    assert_eq!(bucket.available(start), 572);
}
