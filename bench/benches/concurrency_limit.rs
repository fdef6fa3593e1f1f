//! The admit/release cost of an uncontended concurrency limit that sheds rather than
//! queues: palisade's static limit against a bare service, tower's `ConcurrencyLimit`
//! under `LoadShed` (the tower way to shed), and tower-resilience's bulkhead in
//! fail-fast mode, all with a limit of 1024; then the same shared by two and four
//! threads (one limit, one cache line, every thread admitting and releasing on it).
//! `palisade/keyed_one_key` is the fair-per-client limit, every request of one key.
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use palisade::concurrency_limit::ConcurrencyLimitLayer;
use std::hint::black_box;
use std::time::{Duration, Instant};
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt, service_fn};

const LIMIT: usize = 1024;

fn bare()
-> impl Service<u64, Response = u64, Error = BoxError, Future: Send> + Clone + Send + 'static {
    service_fn(|request: u64| async move { Ok::<_, BoxError>(request) })
}

fn palisade_limit() -> ConcurrencyLimitLayer {
    ConcurrencyLimitLayer::builder()
        .max_in_flight(LIMIT as u32)
        .build()
        .expect("valid")
}

/// Fair per client, every request of one key (the keyed path's whole cost: a hash, a
/// shard lock, a clock read, the key's count).
type KeyedLimit = ConcurrencyLimitLayer<
    palisade::classify::ErrorsAsFailures,
    palisade::concurrency_limit::ReleaseOnResponse,
    fn(&u64) -> Option<u64>,
    u64,
>;

fn palisade_keyed() -> KeyedLimit {
    ConcurrencyLimitLayer::builder()
        .max_in_flight(LIMIT as u32)
        .keyed((|request: &u64| Some(*request)) as fn(&u64) -> Option<u64>)
        .build()
        .expect("valid")
}

/// tower's shedding stack: `LoadShed` turns `ConcurrencyLimit`'s not-ready into an
/// error. Its clones share one semaphore, as palisade's share one limit.
fn tower_shed<S>(service: S) -> tower::load_shed::LoadShed<tower::limit::ConcurrencyLimit<S>> {
    ServiceBuilder::new()
        .load_shed()
        .concurrency_limit(LIMIT)
        .service(service)
}

fn bulkhead<S>(service: S) -> <tower_resilience::bulkhead::BulkheadLayer as Layer<S>>::Service
where
    tower_resilience::bulkhead::BulkheadLayer: Layer<S>,
{
    tower_resilience::bulkhead::BulkheadLayer::builder()
        .max_concurrent_calls(LIMIT)
        .reject_when_full()
        .build()
        .expect("valid")
        .layer(service)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

/// One call per iteration inside a running runtime, so that what is measured is the
/// service, not the runtime's entry cost.
fn bench_service<S>(c: &mut Criterion, name: &str, mut service: S)
where
    S: Service<u64>,
    S::Error: std::fmt::Debug,
{
    let runtime = runtime();
    c.bench_function(name, |b| {
        b.to_async(&runtime).iter(|| {
            let ready = futures_util::FutureExt::now_or_never(service.ready())
                .expect("ready at once")
                .expect("ready");
            let call = ready.call(black_box(1));
            async move { black_box(call.await.expect("call")) }
        })
    });
}

fn single_thread(c: &mut Criterion) {
    bench_service(c, "bare", bare());
    bench_service(c, "palisade/static", palisade_limit().layer(bare()));
    bench_service(c, "palisade/keyed_one_key", palisade_keyed().layer(bare()));
    bench_service(c, "tower/concurrency_limit+load_shed", tower_shed(bare()));
    bench_service(c, "tower_resilience/bulkhead", bulkhead(bare()));
}

/// `threads` threads, each with its own clone of `service` (sharing whatever state the
/// clones share), each making `iters` calls.
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
    for threads in [2u64, 4] {
        group.throughput(Throughput::Elements(threads));
        let bare = bare();
        group.bench_function(format!("bare/{threads}"), |b| {
            b.iter_custom(|iters| run_threads(&bare, threads, iters))
        });
        let ours = palisade_limit().layer(bare.clone());
        group.bench_function(format!("palisade/{threads}"), |b| {
            b.iter_custom(|iters| run_threads(&ours, threads, iters))
        });
        let tower = tower_shed(bare.clone());
        group.bench_function(format!("tower/{threads}"), |b| {
            b.iter_custom(|iters| run_threads(&tower, threads, iters))
        });
        let theirs = bulkhead(bare.clone());
        group.bench_function(format!("tower_resilience/{threads}"), |b| {
            b.iter_custom(|iters| run_threads(&theirs, threads, iters))
        });
    }
    group.finish();
}

criterion_group!(benches, single_thread, shared_between_threads);
criterion_main!(benches);
