//! The adaptive-limit algorithms against reference models written from their
//! documentation, on random streams of samples, and the invariants every stream keeps.

use palisade::concurrency_limit::{Aimd, Gradient, LimitAlgorithm, Sample};
use proptest::prelude::*;
use std::time::Duration;
use tokio::time::Instant;

/// `(ms since the previous sample, rtt in ms, in flight, congested)`.
type Step = (u64, u64, u32, bool);

fn steps(max_in_flight: u32) -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(
        (
            0u64..60,
            0u64..400,
            1u32..max_in_flight,
            proptest::bool::weighted(0.15),
        ),
        1..300,
    )
}

fn samples(steps: &[Step]) -> Vec<Sample> {
    // Far enough from the clock's start that every `now - rtt` exists.
    let mut now = Instant::now() + Duration::from_secs(3600);
    steps
        .iter()
        .map(|&(dt, rtt, in_flight, congested)| {
            now += Duration::from_millis(dt);
            Sample::new(Duration::from_millis(rtt), in_flight, congested, now)
        })
        .collect()
}

/// AIMD as its documentation states it.
struct AimdModel {
    limit: u64,
    min: u64,
    max: u64,
    ratio: f64,
    threshold: Duration,
    good: u64,
    last_decrease: Option<Instant>,
}

impl AimdModel {
    fn update(&mut self, sample: &Sample) -> u64 {
        let bad = sample.congested || sample.rtt > self.threshold;
        if bad {
            let admitted = sample.now - sample.rtt;
            if self.last_decrease.is_none_or(|at| admitted >= at) {
                self.limit = ((self.limit as f64 * self.ratio) as u64).max(self.min);
                self.good = 0;
                self.last_decrease = Some(sample.now);
            }
        } else if 2 * u64::from(sample.in_flight) >= self.limit {
            self.good += 1;
            if self.good == self.limit {
                self.limit = (self.limit + 1).min(self.max);
                self.good = 0;
            }
        }
        self.limit
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn aimd_follows_its_model(
        (min, initial, max) in (1u32..10).prop_flat_map(|min| (Just(min), min..40)).prop_flat_map(|(min, initial)| (Just(min), Just(initial), initial..80)),
        ratio in 0.5f64..0.99,
        threshold_ms in 1u64..300,
        steps in steps(100),
    ) {
        let threshold = Duration::from_millis(threshold_ms);
        let mut aimd = Aimd::new()
            .min_limit(min)
            .max_limit(max)
            .initial_limit(initial)
            .backoff_ratio(ratio)
            .latency_threshold(threshold);
        let mut model = AimdModel {
            limit: u64::from(initial),
            min: u64::from(min),
            max: u64::from(max),
            ratio,
            threshold,
            good: 0,
            last_decrease: None,
        };
        prop_assert_eq!(aimd.starting_limit(), initial);
        let mut previous = initial;
        for sample in samples(&steps) {
            let limit = aimd.update(sample);
            prop_assert_eq!(u64::from(limit), model.update(&sample));
            prop_assert!((min..=max).contains(&limit));
            prop_assert!(limit <= previous + 1, "grows by one at most");
            if limit < previous {
                prop_assert!(sample.congested || sample.rtt > threshold, "shrinks only on congestion");
            }
            previous = limit;
        }
    }
}

/// Envoy's gradient controller as the documentation of `Gradient` states it.
struct GradientModel {
    min: u32,
    max: u32,
    interval: Duration,
    percentile: f64,
    buffer: f64,
    min_rtt_interval: Duration,
    min_rtt_requests: usize,
    limit: u32,
    /// `Some((since, restore))` while measuring the minimum RTT.
    measuring: Option<(Option<Instant>, u32)>,
    min_rtt: Duration,
    window_end: Instant,
    next_measurement: Instant,
    window: Vec<Duration>,
    windows_at_min: u32,
}

impl GradientModel {
    fn nearest_rank(&self, values: &[Duration]) -> Duration {
        let mut sorted = values.to_vec();
        sorted.sort();
        let n = sorted.len();
        let mut rank = 1;
        while (rank as f64) < self.percentile * n as f64 && rank < n {
            rank += 1;
        }
        sorted[rank - 1]
    }

    fn start_measuring(&mut self, now: Instant) {
        self.measuring = Some((Some(now), self.limit));
        self.limit = self.min;
        self.window.clear();
        self.windows_at_min = 0;
    }

    fn update(&mut self, sample: &Sample) -> u32 {
        if let Some((since, restore)) = self.measuring {
            let fresh = since.is_none_or(|since| sample.started() >= since);
            if !sample.congested && fresh {
                if self.window.len() < 1024 {
                    self.window.push(sample.rtt);
                }
                if self.window.len() >= self.min_rtt_requests {
                    self.min_rtt = self.nearest_rank(&self.window.clone());
                    self.window.clear();
                    self.limit = restore;
                    self.measuring = None;
                    self.window_end = sample.now + self.interval;
                    self.next_measurement = sample.now + self.min_rtt_interval;
                }
            }
            return self.limit;
        }
        if sample.now >= self.next_measurement {
            self.start_measuring(sample.now);
            return self.limit;
        }
        if self.window.len() < 1024 {
            self.window.push(if sample.congested {
                Duration::MAX
            } else {
                sample.rtt
            });
        }
        if sample.now >= self.window_end {
            let sample_rtt = self.nearest_rank(&self.window.clone());
            self.window.clear();
            let buffered = self.min_rtt.as_secs_f64() * (1.0 + self.buffer);
            let gradient = if sample_rtt.is_zero() {
                2.0
            } else {
                (buffered / sample_rtt.as_secs_f64()).clamp(0.5, 2.0)
            };
            let scaled = f64::from(self.limit) * gradient;
            let next = (scaled + scaled.sqrt() + 1e-9).floor();
            self.limit = (next.min(f64::from(self.max)) as u32).max(self.min);
            self.window_end = sample.now + self.interval;
            if self.limit == self.min {
                self.windows_at_min += 1;
            } else {
                self.windows_at_min = 0;
            }
            if self.windows_at_min >= 5 {
                self.start_measuring(sample.now);
            }
        }
        self.limit
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn gradient_follows_its_model(
        (min, initial, max) in (1u32..6).prop_flat_map(|min| (Just(min), min..60)).prop_flat_map(|(min, initial)| (Just(min), Just(initial), initial..200)),
        interval_ms in 1u64..200,
        percentile in prop_oneof![Just(0.5), Just(0.9), Just(1.0), 0.01f64..1.0],
        buffer in prop_oneof![Just(0.0), Just(0.25), 0.0f64..2.0],
        min_rtt_interval_ms in 100u64..5000,
        min_rtt_requests in 1u32..12,
        steps in steps(200),
    ) {
        let mut gradient = Gradient::new()
            .min_limit(min)
            .max_limit(max)
            .initial_limit(initial)
            .interval(Duration::from_millis(interval_ms))
            .percentile(percentile)
            .buffer(buffer)
            .min_rtt_interval(Duration::from_millis(min_rtt_interval_ms))
            .min_rtt_requests(min_rtt_requests);
        let start = Instant::now();
        let mut model = GradientModel {
            min,
            max,
            interval: Duration::from_millis(interval_ms),
            percentile,
            buffer,
            min_rtt_interval: Duration::from_millis(min_rtt_interval_ms),
            min_rtt_requests: min_rtt_requests as usize,
            limit: min,
            measuring: Some((None, initial)),
            min_rtt: Duration::ZERO,
            window_end: start,
            next_measurement: start,
            window: Vec::new(),
            windows_at_min: 0,
        };
        prop_assert_eq!(gradient.starting_limit(), min, "the first minimum RTT is measured at min_limit");
        let mut highest = initial;
        for sample in samples(&steps) {
            let limit = gradient.update(sample);
            prop_assert_eq!(limit, model.update(&sample));
            prop_assert!((min..=max).contains(&limit));
            // A window at most doubles the limit, plus headroom (a measurement only
            // restores a limit it had).
            let doubled = 2 * u64::from(highest);
            prop_assert!(u64::from(limit) <= doubled + doubled.isqrt() + 1);
            highest = highest.max(limit);
        }
    }
}

#[test]
fn gradient_halves_when_most_of_a_window_is_congested() {
    let ms = Duration::from_millis;
    let mut gradient = Gradient::new().initial_limit(100).min_rtt_requests(1);
    let start = Instant::now() + Duration::from_secs(1);
    gradient.update(Sample::new(ms(10), 1, false, start));
    // A window of failures: an endlessly slow percentile, the gradient floor of 0.5.
    for i in 0..3 {
        gradient.update(Sample::new(ms(10), 100, true, start + ms(50 + i)));
    }
    let limit = gradient.update(Sample::new(ms(10), 100, true, start + ms(100)));
    assert_eq!(limit, 57); // 100 * 0.5 = 50, + sqrt(50)
}

#[test]
fn gradient_measures_again_after_five_windows_at_the_minimum() {
    let ms = Duration::from_millis;
    let mut gradient = Gradient::new().initial_limit(3).min_rtt_requests(1);
    let mut now = Instant::now() + Duration::from_secs(1);
    gradient.update(Sample::new(ms(10), 1, false, now));
    for _ in 0..5 {
        now += ms(100);
        assert_eq!(gradient.update(Sample::new(ms(1000), 3, false, now)), 3);
    }
    // Measuring: a request admitted before the measurement began is not counted...
    now += ms(5);
    assert_eq!(gradient.update(Sample::new(ms(1000), 3, false, now)), 3);
    // ...one admitted after it is, and it ends the measurement at the old limit.
    now += ms(30);
    assert_eq!(gradient.update(Sample::new(ms(20), 3, false, now)), 3);
    now += ms(100);
    let grown = gradient.update(Sample::new(ms(20), 3, false, now));
    assert_eq!(
        grown, 5,
        "3 * 1.25 + sqrt(3.75): the latency is within the buffer"
    );
}

#[test]
fn aimd_backs_off_once_per_round() {
    let ms = Duration::from_millis;
    let mut aimd = Aimd::new().initial_limit(100).latency_threshold(ms(100));
    let now = Instant::now() + Duration::from_secs(1);
    assert_eq!(aimd.update(Sample::new(ms(200), 100, false, now)), 90);
    // Admitted before that decrease: ran under the old limit.
    assert_eq!(
        aimd.update(Sample::new(ms(200), 100, true, now + ms(50))),
        90
    );
    // Admitted after it: the new limit is too high as well.
    assert_eq!(
        aimd.update(Sample::new(ms(200), 90, true, now + ms(250))),
        81
    );
    // Light traffic does not grow the limit; a round of 81 good requests does.
    for _ in 0..100 {
        assert_eq!(
            aimd.update(Sample::new(ms(10), 10, false, now + ms(300))),
            81
        );
    }
    for _ in 0..80 {
        assert_eq!(
            aimd.update(Sample::new(ms(10), 41, false, now + ms(300))),
            81
        );
    }
    assert_eq!(
        aimd.update(Sample::new(ms(10), 41, false, now + ms(300))),
        82
    );
}
