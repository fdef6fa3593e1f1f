//! Decision cost of the Redis store against the in-process store and a bare service:
//! one request at a time (latency: one round trip each) and 64 requests in flight at
//! once (throughput: the multiplexed connection pipelines them), without and with local
//! batching (8 requests' tokens leased per round trip).
//!
//! The server is a `redis-server` started on 127.0.0.1 for the run, and beside it a
//! Redis Cluster of three masters and three replicas (on loopback: a network hop adds
//! its round-trip time to every decision).

use std::future::ready;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::future::join_all;
use palisade::rate_limit::{
    RateLimitLayer, RedisConnection, RedisOptions, RedisStore, WhenUnavailable,
};
use tokio::runtime::Runtime;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

#[path = "../../tests/rate_limit_redis/server.rs"]
#[allow(dead_code)]
mod server;

#[path = "../../tests/rate_limit_redis/cluster.rs"]
#[allow(dead_code)]
mod cluster;

const IN_FLIGHT: usize = 64;

type Boxed = tower::util::BoxCloneSyncService<u64, u64, BoxError>;

fn bare() -> impl Service<u64, Response = u64, Error = BoxError, Future: Send> + Clone + Send + Sync
{
    service_fn(|request: u64| ready(Ok::<_, BoxError>(request)))
}

/// Never throttled: the numbers are the decision's cost, not the limit's.
fn builder() -> palisade::rate_limit::Builder {
    RateLimitLayer::builder()
        .capacity(1_000_000_000)
        .refill(1_000_000, Duration::from_secs(1))
}

fn services(
    runtime: &Runtime,
    server: &server::RedisServer,
    cluster: &cluster::RedisCluster,
) -> Vec<(&'static str, Boxed)> {
    let local = builder().build().expect("config");
    let node = || RedisConnection::from(runtime.block_on(server.manager()));
    let on_cluster = || RedisConnection::from(runtime.block_on(cluster.connection()));
    let redis = |connection: RedisConnection, batch: u32| {
        // Errors, not silent admissions, if Redis is slow: a timed-out decision must not
        // pass for a fast one. The lease outlives the default (8 refill intervals, 8 µs
        // at this rate) so that a batch serves the requests that follow it.
        let options = RedisOptions::default()
            .prefix(format!("bench{batch}:"))
            .timeout(Duration::from_secs(1))
            .when_unavailable(WhenUnavailable::Reject)
            .batch(batch)
            .lease_for(Duration::from_millis(100));
        let layer = builder()
            .build_with(|quota| RedisStore::new(connection, quota, options))
            .expect("config");
        Boxed::new(layer.layer(bare()))
    };
    vec![
        ("bare", Boxed::new(bare())),
        ("in-process store", Boxed::new(local.layer(bare()))),
        ("redis store", redis(node(), 1)),
        ("redis store, batch 8", redis(node(), 8)),
        ("redis cluster store", redis(on_cluster(), 1)),
        ("redis cluster store, batch 8", redis(on_cluster(), 8)),
    ]
}

fn measure(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, run: impl Fn(u64) -> Duration) {
    group.bench_function(name, |b| b.iter_custom(&run));
}

fn compare(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let server = runtime.block_on(server::RedisServer::start());
    let cluster = runtime.block_on(cluster::RedisCluster::start());
    let services = services(&runtime, &server, &cluster);

    let mut group = c.benchmark_group("one at a time");
    group.throughput(Throughput::Elements(1));
    for (name, service) in &services {
        measure(&mut group, name, |iters| {
            let mut service = service.clone();
            runtime.block_on(async {
                let start = Instant::now();
                for i in 0..iters {
                    let ready = service.ready().await.expect("ready");
                    black_box(ready.call(i).await.expect("admitted"));
                }
                start.elapsed()
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("64 in flight");
    group.throughput(Throughput::Elements(IN_FLIGHT as u64));
    for (name, service) in &services {
        measure(&mut group, name, |iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let calls = (0..IN_FLIGHT as u64).map(|i| service.clone().oneshot(i));
                    for answer in join_all(calls).await {
                        black_box(answer.expect("admitted"));
                    }
                }
                start.elapsed()
            })
        });
    }
    group.finish();
    drop((server, cluster));
}

criterion_group!(benches, compare);
criterion_main!(benches);
