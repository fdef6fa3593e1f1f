//! Per-request cost of a never-throttled rate limiter: ours (global, keyed with 1 and
//! 10,000 keys) against a bare service and the peers, plus two threads sharing one
//! limiter against one thread.
//!
//! Every measurement runs its requests in one `block_on` (criterion's `iter_custom`),
//! so the numbers are the service stack's, not the executor's.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main};
use governor::DefaultDirectRateLimiter;
use palisade::rate_limit::RateLimitLayer;
use palisade_bench::stacks::{
    bare, bare_http, governor_direct, governor_keyed, keyed_request, never_throttled,
    rate_limit_global, rate_limit_keyed_http, tower_governor_keyed,
};
use tower::{Layer, Service, ServiceExt};

const KEYS: u64 = 10_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

/// Runs `iters` requests `request(i)` through `service` and returns the time taken.
fn drive<S, Req>(
    runtime: &tokio::runtime::Runtime,
    service: &mut S,
    iters: u64,
    request: impl Fn(u64) -> Req,
) -> Duration
where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    runtime.block_on(async {
        let start = Instant::now();
        for i in 0..iters {
            let ready = service.ready().await.expect("ready");
            black_box(ready.call(request(i)).await.expect("admitted"));
        }
        start.elapsed()
    })
}

fn measure(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    mut run: impl FnMut(u64) -> Duration,
) {
    group.bench_function(name, |b| b.iter_custom(&mut run));
}

fn single_thread(c: &mut Criterion) {
    let runtime = &runtime();
    let mut group = c.benchmark_group("rate_limit");

    let mut bare_service = bare();
    measure(&mut group, "bare", |iters| {
        drive(runtime, &mut bare_service, iters, |i| i)
    });

    let mut global = rate_limit_global().layer(bare());
    measure(&mut group, "ours_global", |iters| {
        drive(runtime, &mut global, iters, |i| i)
    });

    for (label, keys) in [("ours_keyed_1_key", 1), ("ours_keyed_10k_keys", KEYS)] {
        let mut keyed = RateLimitLayer::builder()
            .capacity(1_000_000_000_000)
            .refill(1_000_000_000, Duration::from_secs(1))
            .keyed(|request: &u64| Some(*request))
            .build()
            .expect("config")
            .layer(bare());
        measure(&mut group, label, move |iters| {
            drive(runtime, &mut keyed, iters, |i| i % keys)
        });
    }

    let mut direct = governor_direct(
        bare(),
        Arc::new(DefaultDirectRateLimiter::direct(never_throttled())),
    );
    measure(&mut group, "governor_direct", |iters| {
        drive(runtime, &mut direct, iters, |i| i)
    });

    for (label, keys) in [
        ("governor_keyed_1_key", 1),
        ("governor_keyed_10k_keys", KEYS),
    ] {
        let mut keyed = governor_keyed(bare());
        measure(&mut group, label, move |iters| {
            drive(runtime, &mut keyed, iters, |i| i % keys)
        });
    }

    // tower's RateLimit arms its sleep on construction: it needs the runtime's context.
    let _context = runtime.enter();
    let mut tower_limit =
        tower::limit::RateLimitLayer::new(u64::MAX, Duration::from_secs(1)).layer(bare());
    measure(&mut group, "tower_rate_limit", |iters| {
        drive(runtime, &mut tower_limit, iters, |i| i)
    });

    let mut resilience = tower_resilience::ratelimiter::RateLimiterLayer::burst(
        1_000_000_000_000,
        1_000_000_000_000,
    )
    .build()
    .expect("config")
    .layer(bare());
    measure(&mut group, "tower_resilience", |iters| {
        drive(runtime, &mut resilience, iters, |i| i)
    });
    group.finish();
}

/// tower_governor only takes `http::Request`s: compared with an HTTP bare service and our
/// keyed limiter on the same requests, keyed on a `u64` request extension.
fn http(c: &mut Criterion) {
    let runtime = runtime();
    let mut group = c.benchmark_group("rate_limit_http");
    let mut bare_service = bare_http::<Body>();
    group.bench_function("bare_http", |b| {
        b.iter_custom(|iters| drive(&runtime, &mut bare_service, iters, keyed_request))
    });
    for (suffix, keys) in [("1_key", 1), ("10k_keys", KEYS)] {
        let mut ours = rate_limit_keyed_http(bare_http::<Body>());
        group.bench_function(format!("ours_keyed_{suffix}"), |b| {
            b.iter_custom(|iters| drive(&runtime, &mut ours, iters, |i| keyed_request(i % keys)))
        });
        let mut theirs = tower_governor_keyed(bare_http::<Body>());
        group.bench_function(format!("tower_governor_keyed_{suffix}"), |b| {
            b.iter_custom(|iters| drive(&runtime, &mut theirs, iters, |i| keyed_request(i % keys)))
        });
    }
    group.finish();
}

/// Throughput of two threads hammering one shared limiter, reported as time per request
/// (so half the one-thread time would be perfect scaling): global against governor,
/// keyed with one key (every request on the same entry) against tower_governor.
fn two_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("rate_limit_threads");
    let ours = rate_limit_global();
    let governor = Arc::new(DefaultDirectRateLimiter::direct(never_throttled()));
    let ours_keyed = rate_limit_keyed_http(bare_http::<Body>());
    let theirs_keyed = tower_governor_keyed(bare_http::<Body>());
    for threads in [1u32, 2] {
        group.bench_function(format!("ours_global_{threads}_threads"), |b| {
            b.iter_custom(|iters| run_threads(threads, iters, || ours.layer(bare()), |i| i))
        });
        group.bench_function(format!("governor_direct_{threads}_threads"), |b| {
            b.iter_custom(|iters| {
                run_threads(
                    threads,
                    iters,
                    || governor_direct(bare(), governor.clone()),
                    |i| i,
                )
            })
        });
        group.bench_function(format!("ours_keyed_1_key_{threads}_threads"), |b| {
            b.iter_custom(|iters| {
                run_threads(threads, iters, || ours_keyed.clone(), |_| keyed_request(0))
            })
        });
        group.bench_function(
            format!("tower_governor_keyed_1_key_{threads}_threads"),
            |b| {
                b.iter_custom(|iters| {
                    run_threads(
                        threads,
                        iters,
                        || theirs_keyed.clone(),
                        |_| keyed_request(0),
                    )
                })
            },
        );
    }
    group.finish();
}

fn run_threads<S, Req>(
    threads: u32,
    iters: u64,
    make: impl Fn() -> S + Sync,
    request: impl Fn(u64) -> Req + Copy + Send,
) -> Duration
where
    S: Service<Req> + Send,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let mut service = make();
            scope.spawn(move || drive(&runtime(), &mut service, iters, request));
        }
    });
    start.elapsed() / threads
}

/// The clock read every limiter decision starts with. With tokio's `test-util` feature
/// (on in this crate's dev-dependencies, so in these benches) tokio's `Instant::now()`
/// first checks a global "was any clock ever paused" flag and, as none was here, reads
/// std's clock: one atomic load more than a user's build without `test-util`.
/// governor reads the TSC through quanta instead.
fn clocks(c: &mut Criterion) {
    let runtime = runtime();
    let _context = runtime.enter();
    let mut group = c.benchmark_group("clock");
    group.bench_function("std_instant_now", |b| b.iter(Instant::now));
    group.bench_function("tokio_instant_now", |b| b.iter(tokio::time::Instant::now));
    let governor_clock = governor::clock::DefaultClock::default();
    group.bench_function("governor_clock_now", |b| {
        b.iter(|| governor::clock::Clock::now(&governor_clock))
    });
    // The cores alone, clock read included: what the layers add on top of them.
    let bucket = palisade::rate_limit::TokenBucket::new(
        palisade::rate_limit::Quota::new(1_000_000_000_000, 1_000_000_000, Duration::from_secs(1))
            .expect("quota"),
        tokio::time::Instant::now(),
    );
    group.bench_function("ours_token_bucket_acquire", |b| {
        b.iter(|| black_box(bucket.acquire(1, tokio::time::Instant::now())).is_ok())
    });
    group.bench_function("ours_token_bucket_acquire_std_clock", |b| {
        b.iter(|| {
            let now = tokio::time::Instant::from_std(Instant::now());
            black_box(bucket.acquire(1, now)).is_ok()
        })
    });
    let limiter = DefaultDirectRateLimiter::direct(never_throttled());
    group.bench_function("governor_check", |b| {
        b.iter(|| black_box(limiter.check()).is_ok())
    });
    group.finish();
}

criterion_group!(benches, single_thread, http, two_threads, clocks);
criterion_main!(benches);
