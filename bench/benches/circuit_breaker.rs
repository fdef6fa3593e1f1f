//! The success-path cost of a closed circuit breaker: ours against a bare service and
//! against the peers, with the same settings (trip at 50% over 100 calls or 30 s, at
//! least 20 calls, 30 s open, 5 probes); then two threads sharing one breaker.
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use palisade::circuit_breaker::{CircuitBreakerLayer, SlidingWindow};
use std::hint::black_box;
use std::time::{Duration, Instant};
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

fn bare()
-> impl Service<u64, Response = u64, Error = BoxError, Future: Send> + Clone + Send + 'static {
    service_fn(|request: u64| async move { Ok::<_, BoxError>(request) })
}

fn count_breaker() -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .minimum_calls(20)
        .sliding_window(SlidingWindow::count(100))
        .open_for(Duration::from_secs(30))
        .half_open_probes(5)
        .build()
        .expect("valid")
}

fn time_breaker() -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .minimum_calls(20)
        .sliding_window(SlidingWindow::time(Duration::from_secs(30)))
        .slow_calls(Duration::from_secs(2), 0.8)
        .open_for(Duration::from_secs(30))
        .half_open_probes(5)
        .build()
        .expect("valid")
}

fn tower_resilience_breaker<S>(
    service: S,
) -> tower_resilience::circuitbreaker::CircuitBreaker<
    S,
    tower_resilience::circuitbreaker::DefaultClassifier,
>
where
    S: Clone,
{
    tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .minimum_number_of_calls(20)
        .sliding_window_size(100)
        .wait_duration_in_open(Duration::from_secs(30))
        .permitted_calls_in_half_open(5)
        .build()
        .expect("valid")
        .layer(service)
}

fn failsafe_breaker() -> impl failsafe::futures::CircuitBreaker + Clone + Send + 'static {
    let backoff = failsafe::backoff::constant(Duration::from_secs(30));
    let policy = failsafe::failure_policy::success_rate_over_time_window(
        0.5,
        20,
        Duration::from_secs(30),
        backoff,
    );
    failsafe::Config::new().failure_policy(policy).build()
}

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
    bench_service(c, "palisade/count_window", count_breaker().layer(bare()));
    bench_service(
        c,
        "palisade/time_window_slow_calls",
        time_breaker().layer(bare()),
    );
    bench_service(c, "tower_resilience", tower_resilience_breaker(bare()));
    let breaker = failsafe_breaker();
    bench_service(
        c,
        "failsafe",
        service_fn(move |request: u64| {
            use failsafe::futures::CircuitBreaker;
            breaker.call(async move { Ok::<_, BoxError>(request) })
        }),
    );
}

/// `threads` threads, each with its own clone of `service` (sharing whatever state the
/// clones share), each making `iters` calls: criterion's throughput is calls per second
/// across all threads.
fn run_threads<S>(service: &S, threads: u64, iters: u64) -> Duration
where
    S: Service<u64> + Clone + Send + 'static,
    S::Future: Send,
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
        let ours = count_breaker().layer(bare.clone());
        group.bench_function(format!("palisade/{threads}"), |b| {
            b.iter_custom(|iters| run_threads(&ours, threads, iters))
        });
        let theirs = tower_resilience_breaker(bare.clone());
        group.bench_function(format!("tower_resilience/{threads}"), |b| {
            b.iter_custom(|iters| run_threads(&theirs, threads, iters))
        });
    }
    group.finish();
}

criterion_group!(benches, single_thread, shared_between_threads);
criterion_main!(benches);
