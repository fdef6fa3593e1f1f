//! The success-path cost of a closed circuit breaker: ours against a bare service and
//! against the peers, with the same settings (trip at 50% over 100 calls or 30 s, at
//! least 20 calls, 30 s open, 5 probes); then two threads sharing one breaker.
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use palisade_bench::stacks::{
    bare, breaker_count, breaker_time_slow, failsafe_breaker, tower_resilience_breaker,
};
use std::hint::black_box;
use std::time::{Duration, Instant};
use tower::{Layer, Service, ServiceExt};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

/// One call per iteration, inside a running runtime (criterion's async bencher polls
/// the whole batch in one `block_on`), so what is measured is the service, not the
/// runtime's entry cost.
fn bench_service<S>(c: &mut Criterion, name: &str, mut service: S)
where
    S: Service<u64>,
    S::Error: std::fmt::Debug,
{
    let runtime = runtime();
    c.bench_function(name, |b| {
        b.to_async(&runtime).iter(|| {
            let ready = futures_util::FutureExt::now_or_never(service.ready())
                .expect("a service_fn is always ready")
                .expect("ready");
            let call = ready.call(black_box(1));
            async move { black_box(call.await.expect("call")) }
        })
    });
}

fn single_thread(c: &mut Criterion) {
    bench_service(c, "bare", bare());
    bench_service(c, "palisade/count_window", breaker_count().layer(bare()));
    bench_service(
        c,
        "palisade/time_window_slow_calls",
        breaker_time_slow().layer(bare()),
    );
    bench_service(c, "tower_resilience", tower_resilience_breaker(bare()));
    bench_service(c, "failsafe", failsafe_breaker());
}

/// `threads` threads, each with its own clone of `service` (sharing whatever state the
/// clones share), each making `iters` calls: criterion's throughput is calls per second
/// across all threads.
fn run_threads<S>(service: &S, threads: u64, iters: u64) -> Duration
where
    S: Service<u64> + Clone + Send + 'static,
    S::Error: std::fmt::Debug,
{
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(threads as usize + 1));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let mut service = service.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let runtime = runtime();
                barrier.wait();
                runtime.block_on(async {
                    for _ in 0..iters {
                        let ready = service.ready().await.expect("ready");
                        black_box(ready.call(black_box(1)).await.expect("call"));
                    }
                });
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for worker in workers {
        worker.join().expect("worker");
    }
    start.elapsed()
}

fn shared_between_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("threads");
    for threads in [1u64, 2] {
        group.throughput(Throughput::Elements(threads));
        let bare = bare();
        group.bench_function(format!("bare/{threads}"), |b| {
            b.iter_custom(|iters| run_threads(&bare, threads, iters))
        });
        let ours = breaker_count().layer(bare.clone());
        group.bench_function(format!("palisade/{threads}"), |b| {
            b.iter_custom(|iters| run_threads(&ours, threads, iters))
        });
        let theirs = tower_resilience_breaker(bare.clone());
        group.bench_function(format!("tower_resilience/{threads}"), |b| {
            b.iter_custom(|iters| run_threads(&theirs, threads, iters))
        });
        let failsafe = failsafe_breaker();
        group.bench_function(format!("failsafe/{threads}"), |b| {
            b.iter_custom(|iters| run_threads(&failsafe, threads, iters))
        });
    }
    group.finish();
}

criterion_group!(benches, single_thread, shared_between_threads);
criterion_main!(benches);
