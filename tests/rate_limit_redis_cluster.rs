//! The Redis store on a real Redis Cluster: three masters and three replicas started by
//! each test on 127.0.0.1 (see `rate_limit_redis/cluster.rs`). Keys spread over every
//! master, a master killed mid-run fails over to its replica, a slot migrated mid-run
//! (`ASK`, then `MOVED`) keeps limits exact, a flushed script cache is reloaded, and
//! leases work as on one node. The fleet-wide count also runs on a single node, so that
//! both connections pass the same check.
//!
//! Real time, as the single-node tests: the buckets are timed by the servers' clocks.
#![cfg(feature = "redis-cluster")]

#[path = "rate_limit_redis/cluster.rs"]
mod cluster;
// Shared with tests/rate_limit_redis.rs, which uses the rest of it.
#[allow(dead_code)]
#[path = "rate_limit_redis/server.rs"]
mod server;

use std::collections::BTreeSet;
use std::time::Duration;

use palisade::rate_limit::{
    RateLimitLayer, RateLimited, RedisConnection, RedisOptions, RedisStore, RedisUnavailable,
    WhenUnavailable,
};
use tokio::time::{Instant, sleep, timeout};
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

use self::cluster::RedisCluster;
use self::server::RedisServer;

/// Requests carry their client's name.
type Request = String;

fn strict(prefix: &str) -> RedisOptions {
    RedisOptions::default()
        .prefix(prefix)
        .timeout(Duration::from_secs(2))
        .when_unavailable(WhenUnavailable::Reject)
}

/// A keyed limiter replica on `connection`: `capacity` tokens per client, refilled one
/// an hour (so that a test's run adds none: every bucket admits exactly its capacity).
fn replica(
    connection: impl Into<RedisConnection>,
    capacity: u64,
    options: RedisOptions,
) -> impl Service<Request, Response = Request, Error = BoxError, Future: Send> + Clone + Send + 'static
{
    let connection = connection.into();
    RateLimitLayer::builder()
        .capacity(capacity)
        .refill(1, Duration::from_secs(3600))
        .keyed(|client: &Request| Some(client.clone()))
        .build_with(|quota| RedisStore::new(connection, quota, options))
        .expect("a valid limiter")
        .layer(service_fn(|request: Request| async move {
            Ok::<_, BoxError>(request)
        }))
}

/// Sends `request`; the layer must answer within 5 s (more than any store timeout here),
/// so that a hanging request fails the test.
async fn send<S>(service: &mut S, request: &str) -> Result<Request, BoxError>
where
    S: Service<Request, Response = Request, Error = BoxError>,
{
    timeout(
        Duration::from_secs(5),
        service.ready().await?.call(request.to_owned()),
    )
    .await
    .expect("the layer answers within 5 s")
}

fn is_limited(result: &Result<Request, BoxError>) -> bool {
    matches!(result, Err(error) if error.is::<RateLimited>())
}

const CLIENTS: usize = 30;
const CAPACITY: u64 = 4;

/// Three replicas send 12 requests for each of 30 clients, all at once: each client gets
/// exactly its bucket's capacity, whichever replica its requests went through.
async fn three_replicas_admit_exactly_one_bucket_per_client(
    connections: [RedisConnection; 3],
    prefix: &str,
) {
    let replicas = connections.map(|connection| replica(connection, CAPACITY, strict(prefix)));
    let mut tasks = Vec::new();
    for round in 0..12 {
        for client in 0..CLIENTS {
            let mut service = replicas[(round + client) % 3].clone();
            tasks.push(tokio::spawn(async move {
                let result = send(&mut service, &format!("client-{client}")).await;
                (client, result)
            }));
        }
    }
    let mut admitted = [0u64; CLIENTS];
    for task in tasks {
        let (client, result) = task.await.expect("no panic");
        match result {
            Ok(_) => admitted[client] += 1,
            Err(error) => assert!(error.is::<RateLimited>(), "only limited: {error}"),
        }
    }
    assert_eq!(admitted, [CAPACITY; CLIENTS], "each client got its bucket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_a_cluster_admit_one_bucket_per_client_spread_over_every_master() {
    let cluster = RedisCluster::start().await;
    let connections = [
        cluster.connection().await.into(),
        cluster.connection().await.into(),
        cluster.connection().await.into(),
    ];
    three_replicas_admit_exactly_one_bucket_per_client(connections, "spread:").await;

    // The `{client}` hash tag spreads the buckets by client over every master.
    let mut masters = BTreeSet::new();
    for client in 0..CLIENTS {
        let slot = cluster
            .slot_of(&format!("spread:{{client-{client}}}"))
            .await;
        masters.insert(cluster.master_of(slot).await.port);
    }
    assert_eq!(masters.len(), 3, "the clients' slots are on every master");
    assert_eq!(
        cluster.masters_holding("spread:*").await.len(),
        3,
        "every master holds buckets"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_one_node_admit_one_bucket_per_client() {
    let server = RedisServer::start().await;
    let connections = [
        server.manager().await.into(),
        server.manager().await.into(),
        server.manager().await.into(),
    ];
    three_replicas_admit_exactly_one_bucket_per_client(connections, "single:").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_tag_in_the_prefix_keeps_every_bucket_on_one_master() {
    let cluster = RedisCluster::start().await;
    let mut service = replica(cluster.connection().await, 1, strict("{tenant-a}:"));
    for client in 0..CLIENTS {
        send(&mut service, &format!("client-{client}"))
            .await
            .expect("a fresh client is admitted");
    }
    assert_eq!(cluster.masters_holding("{tenant-a}:*").await.len(), 1);
}

/// The first name `name-N` whose bucket under `prefix` is served by the master on
/// `port` (or by any other master, with `on_port` false).
async fn client_on(cluster: &RedisCluster, prefix: &str, port: u16, on_port: bool) -> String {
    for n in 0.. {
        let client = format!("name-{n}");
        let slot = cluster.slot_of(&format!("{prefix}{{{client}}}")).await;
        if (cluster.master_of(slot).await.port == port) == on_port {
            return client;
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_fails_over_and_the_limiter_enforces_on_its_promoted_replica() {
    let mut cluster = RedisCluster::start().await;
    let doomed = cluster.masters().await[0].clone();
    let options = RedisOptions::default()
        .prefix("failover:")
        .timeout(Duration::from_millis(200))
        .recheck(Duration::from_millis(50))
        .when_unavailable(WhenUnavailable::Reject);
    let mut service = replica(cluster.connection().await, CAPACITY, options);
    let victim = client_on(&cluster, "failover:", doomed.port, true).await;
    let bystander = client_on(&cluster, "failover:", doomed.port, false).await;
    send(&mut service, &victim).await.expect("admitted");
    send(&mut service, &bystander).await.expect("admitted");

    cluster.kill(doomed.port);
    // Until a replica takes over, every request follows the policy within the timeout:
    // admitted, limited or unavailable, never hanging and never another error.
    let started = Instant::now();
    let mut unavailable = 0;
    while started.elapsed() < Duration::from_secs(1) {
        let asked = Instant::now();
        match send(&mut service, &victim).await {
            Ok(_) => {}
            Err(error) if error.is::<RedisUnavailable>() => unavailable += 1,
            Err(error) => assert!(error.is::<RateLimited>(), "{error}"),
        }
        // The store's timeout (200 ms), with room for a loaded machine.
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "within the timeout"
        );
        sleep(Duration::from_millis(20)).await;
    }
    assert!(unavailable > 0, "the dead master's clients met the policy");
    cluster.wait_until_ok().await;
    let promoted = cluster
        .master_of(cluster.slot_of(&format!("failover:{{{victim}}}")).await)
        .await;
    assert_ne!(promoted.port, doomed.port, "a replica took over the slots");

    // Once Redis answers again, a fresh client on the promoted master gets exactly its
    // bucket.
    let fresh = client_on(&cluster, "failover:fresh-", promoted.port, true).await;
    let fresh = format!("fresh-{fresh}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut admitted = loop {
        match send(&mut service, &fresh).await {
            Ok(_) => break 1,
            Err(error) if error.is::<RedisUnavailable>() => {
                assert!(Instant::now() < deadline, "Redis is back within 20 s");
                sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("a fresh client is not limited: {error}"),
        }
    };
    loop {
        let result = send(&mut service, &fresh).await;
        if is_limited(&result) {
            break;
        }
        result.expect("admitted or limited once the cluster is ok");
        admitted += 1;
    }
    assert_eq!(admitted, CAPACITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migrated_mid_run_keeps_its_buckets_exact() {
    let cluster = RedisCluster::start().await;
    let masters = cluster.masters().await;
    let mut service = replica(cluster.connection().await, 10, strict("moving:"));
    let client = "ada";
    let key = format!("moving:{{{client}}}");
    let slot = cluster.slot_of(&key).await;
    let source = cluster.master_of(slot).await;
    let target = masters
        .iter()
        .find(|master| master.port != source.port)
        .expect("another master")
        .clone();
    let mut admitted = 0;
    let spend = async |service: &mut _, n: usize| {
        for _ in 0..n {
            send(service, client).await.expect("admitted");
        }
        n
    };
    admitted += spend(&mut service, 3).await;

    // The slot starts moving: the source still serves the key it holds.
    let mut from = cluster.node(source.port).await;
    let mut to = cluster.node(target.port).await;
    setslot(&mut to, slot, "IMPORTING", &source.id).await;
    setslot(&mut from, slot, "MIGRATING", &target.id).await;
    admitted += spend(&mut service, 2).await;

    // The key moves: the source answers `ASK`, and the client asks the target.
    let moved: String = redis::cmd("MIGRATE")
        .arg("127.0.0.1")
        .arg(target.port)
        .arg("")
        .arg(0)
        .arg(5000)
        .arg("KEYS")
        .arg(&key)
        .query_async(&mut from)
        .await
        .expect("MIGRATE");
    assert_eq!(moved, "OK");
    admitted += spend(&mut service, 2).await;

    // The slot is the target's: `MOVED`, then the client's new map.
    for master in &masters {
        let mut connection = cluster.node(master.port).await;
        setslot(&mut connection, slot, "NODE", &target.id).await;
    }
    loop {
        let result = send(&mut service, client).await;
        if is_limited(&result) {
            break;
        }
        result.expect("admitted or limited while the slot moves");
        admitted += 1;
    }
    assert_eq!(admitted, 10, "the bucket moved with its tokens spent");
    assert_eq!(cluster.master_of(slot).await.port, target.port);
}

async fn setslot(
    connection: &mut redis::aio::MultiplexedConnection,
    slot: u16,
    how: &str,
    id: &str,
) {
    let () = redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg(how)
        .arg(id)
        .query_async(connection)
        .await
        .expect("CLUSTER SETSLOT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_script_cache_is_reloaded_on_every_master() {
    let cluster = RedisCluster::start().await;
    let mut service = replica(cluster.connection().await, 2, strict("flushed:"));
    let clients: Vec<String> = (0..CLIENTS).map(|n| format!("c{n}")).collect();
    for client in &clients {
        send(&mut service, client).await.expect("admitted");
    }
    // As after a failover to a replica that never saw the script.
    for master in cluster.masters().await {
        let mut connection = cluster.node(master.port).await;
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut connection)
            .await
            .expect("SCRIPT FLUSH");
    }
    for client in &clients {
        send(&mut service, client)
            .await
            .expect("NOSCRIPT is answered by loading the script, not by an error");
        assert!(is_limited(&send(&mut service, client).await));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_on_a_cluster_take_batches_in_one_round_trip() {
    let cluster = RedisCluster::start().await;
    let options = strict("leased:").batch(4);
    let mut service = replica(cluster.connection().await, 8, options);
    let before = script_runs(&cluster).await;
    let mut admitted = 0;
    loop {
        let result = send(&mut service, "ada").await;
        if is_limited(&result) {
            break;
        }
        result.expect("admitted or limited");
        admitted += 1;
    }
    assert_eq!(admitted, 8);
    // Two batches of four, and the request that found the bucket empty.
    assert_eq!(script_runs(&cluster).await - before, 3);
}

/// The scripts every master ran (`EVALSHA` calls that did not fail).
async fn script_runs(cluster: &RedisCluster) -> u64 {
    let mut runs = 0;
    for master in cluster.masters().await {
        let mut connection = cluster.node(master.port).await;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut connection)
            .await
            .expect("INFO");
        runs += info
            .lines()
            .filter(|line| {
                line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:")
            })
            .map(|line| stat(line, "calls") - stat(line, "failed_calls"))
            .sum::<u64>();
    }
    runs
}

fn stat(line: &str, name: &str) -> u64 {
    line.split([':', ','])
        .find_map(|field| field.strip_prefix(name)?.strip_prefix('='))
        .map_or(0, |value| value.parse().expect("a number"))
}
