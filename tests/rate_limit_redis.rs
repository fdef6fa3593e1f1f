//! The Redis store against a real `redis-server` (started by each test on 127.0.0.1 with
//! a free port and a temporary directory, killed when the test ends): replicas share one
//! bucket, keyed buckets stay apart, keys expire, and a dead server is survived by each
//! policy and left again when it is back.
//!
//! These tests run in real time, unlike the rest of the suite: the buckets are timed by
//! the Redis server's clock (`TIME` in the script), which `tokio::time::pause` cannot
//! stop. Periods are kept to a second or two, and every window a test must act within
//! leaves room for the machine to stall half a second (CI runs on 2 loaded cores).
#![cfg(feature = "redis")]

#[path = "rate_limit_redis/server.rs"]
mod server;

use std::num::NonZeroU32;
use std::time::Duration;

use palisade::rate_limit::{
    CostExceedsCapacity, RateLimitConfigError, RateLimitLayer, RateLimited, RedisOptions,
    RedisStore, RedisUnavailable, Store, WhenUnavailable,
};
use tokio::time::{Instant, sleep, timeout};
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

use self::server::RedisServer;

/// Options for tests that count admissions exactly: a generous timeout, and an error
/// rather than a silent admission if Redis is slow on a loaded machine anyway.
fn strict(prefix: &str) -> RedisOptions {
    RedisOptions::default()
        .prefix(prefix)
        .timeout(Duration::from_secs(2))
        .when_unavailable(WhenUnavailable::Reject)
}

fn echo<T: Send + 'static>()
-> impl Service<T, Response = T, Error = BoxError, Future: Send> + Clone + Send + use<T> {
    service_fn(|request: T| async move { Ok::<_, BoxError>(request) })
}

/// Sends `request`, failing the test if the layer takes longer than 5 s to answer (more
/// than [`strict`]'s timeout, so that a slow Redis fails the request, not the test).
async fn send<S, T>(service: &mut S, request: T) -> Result<T, BoxError>
where
    S: Service<T, Response = T, Error = BoxError>,
{
    timeout(Duration::from_secs(5), service.ready().await?.call(request))
        .await
        .expect("the layer answers within 5 s")
}

fn is_limited(result: &Result<impl Sized, BoxError>) -> bool {
    matches!(result, Err(error) if error.is::<RateLimited>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_admit_together_what_one_bucket_allows() {
    let server = RedisServer::start().await;
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let manager = server.manager().await;
        let layer = RateLimitLayer::builder()
            .capacity(10)
            .refill(1, Duration::from_secs(60))
            .build_with(|quota| RedisStore::new(manager, quota, strict("fleet:")))
            .unwrap();
        replicas.push(layer.layer(echo::<u32>()));
    }
    // 40 concurrent requests, half through each replica.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let mut service = replicas[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            let i = u32::try_from(i).unwrap();
            send(&mut service, i).await
        }));
    }
    let mut admitted = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => admitted += 1,
            Err(error) => {
                let limited = error
                    .downcast_ref::<RateLimited>()
                    .expect("only rate limited");
                assert!(limited.retry_after() > Duration::ZERO);
                assert!(limited.retry_after() <= Duration::from_secs(60));
                assert_eq!(limited.limit(), 10);
            }
        }
    }
    assert_eq!(admitted, 10);
    assert_eq!(server.keys("fleet:*").await, ["fleet:shared"]);
}

#[tokio::test]
async fn keyed_buckets_stay_independent_across_replicas() {
    let server = RedisServer::start().await;
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let manager = server.manager().await;
        let layer = RateLimitLayer::builder()
            .capacity(2)
            .refill(1, Duration::from_secs(60))
            .keyed(|request: &(&'static str, u32)| Some(request.0))
            .build_with(|quota| RedisStore::new(manager, quota, strict("{api}:")))
            .unwrap();
        replicas.push(layer.layer(echo::<(&'static str, u32)>()));
    }
    // "ada" spends her two tokens, one on each replica; the third request is refused.
    assert!(send(&mut replicas[0], ("ada", 1)).await.is_ok());
    assert!(send(&mut replicas[1], ("ada", 2)).await.is_ok());
    assert!(is_limited(&send(&mut replicas[0], ("ada", 3)).await));
    assert!(is_limited(&send(&mut replicas[1], ("ada", 4)).await));
    // "bob" still has his.
    assert!(send(&mut replicas[1], ("bob", 1)).await.is_ok());
    assert!(send(&mut replicas[0], ("bob", 2)).await.is_ok());
    assert!(is_limited(&send(&mut replicas[1], ("bob", 3)).await));
    assert_eq!(server.keys("{api}:*").await, ["{api}:{ada}", "{api}:{bob}"]);
}

#[tokio::test]
async fn keys_expire_once_their_buckets_are_full_again() {
    let server = RedisServer::start().await;
    let manager = server.manager().await;
    // Two tokens, refilled one a second: an empty bucket is full after 2 s.
    let layer = RateLimitLayer::builder()
        .capacity(2)
        .refill(1, Duration::from_secs(1))
        .keyed(|request: &u32| Some(*request))
        .when_key_missing(palisade::rate_limit::WhenKeyMissing::Share)
        .build_with(|quota| RedisStore::new(manager, quota, strict("idle:")))
        .unwrap();
    let mut service = layer.layer(echo::<u32>());
    for client in [7, 7, 8] {
        send(&mut service, client).await.unwrap();
    }
    // The shorter-lived key first.
    let ttl = server.pttl("idle:{8}").await;
    assert!(
        0 < ttl && ttl <= 1000,
        "a bucket one token down lives 1 s, not {ttl} ms"
    );
    assert_eq!(server.keys("idle:*").await, ["idle:{7}", "idle:{8}"]);
    let ttl = server.pttl("idle:{7}").await;
    assert!(
        0 < ttl && ttl <= 2000,
        "an empty bucket's key lives 2 s, not {ttl} ms"
    );

    sleep(Duration::from_millis(2100)).await;
    assert!(server.keys("idle:*").await.is_empty());
    // A bucket that expired is a full one: two tokens, and no third unless a second went
    // by (a stalled machine) and refilled one.
    let start = Instant::now();
    for _ in 0..2 {
        send(&mut service, 7).await.unwrap();
    }
    let third = send(&mut service, 7).await;
    assert!(is_limited(&third) || start.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn a_waiter_is_served_from_the_servers_clock_and_gives_its_slot_back_when_dropped() {
    let server = RedisServer::start().await;
    let manager = server.manager().await;
    let layer = RateLimitLayer::builder()
        .capacity(1)
        .refill(1, Duration::from_secs(1))
        .max_wait(Duration::from_secs(3))
        .build_with(|quota| RedisStore::new(manager, quota, strict("wait:")))
        .unwrap();
    let mut service = layer.layer(echo::<u32>());
    // The first request's script sets the bucket full again a second later: the second
    // request is let through then.
    let start = Instant::now();
    send(&mut service, 1).await.unwrap();
    send(&mut service, 2).await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(990),
        "the second request waited"
    );

    // The next one reserves the slot a second ahead, and gives up after 250 ms.
    let waiter = service.ready().await.unwrap().call(3);
    assert!(timeout(Duration::from_millis(250), waiter).await.is_err());
    // Its slot comes back: the bucket is full again within a second of the second
    // request (at most 750 ms from now), not 2 s (1750 ms from now, and still more
    // than 800 ms when the deadline passes).
    let deadline = Instant::now() + Duration::from_millis(800);
    while server.pttl("wait:shared").await > 800 {
        assert!(
            Instant::now() < deadline,
            "the dropped waiter's slot came back"
        );
        sleep(Duration::from_millis(5)).await;
    }
}

/// The units past the whole microseconds of a stored TAT (`"…123456.2"`: 2).
fn past_whole(stored: &str) -> u64 {
    stored
        .split_once('.')
        .map_or(0, |(_, past)| past.parse().unwrap())
}

#[tokio::test]
async fn thirds_of_a_second_add_up_to_exactly_a_second_on_redis() {
    let server = RedisServer::start().await;
    let manager = server.manager().await;
    // A token every 333333 1/3 µs: it was rounded up to 333334 µs, so that three took
    // 1.000002 s and a client at exactly the rate was refused.
    let layer = RateLimitLayer::builder()
        .capacity(3)
        .refill(3, Duration::from_secs(1))
        .keyed(|request: &u32| Some(*request))
        .cost(|request: &u32| if *request == 2 { 3 } else { 1 })
        .build_with(|quota| RedisStore::new(manager, quota, strict("thirds:")))
        .unwrap();
    let mut service = layer.layer(echo::<u32>());
    // The TAT moves by exact thirds of a microsecond from whole microseconds (the
    // server's clock), whatever time passes between the requests.
    for third in [1, 2, 0] {
        send(&mut service, 1).await.unwrap();
        let stored = server.get("thirds:{1}").await.unwrap();
        assert_eq!(past_whole(&stored), third, "TAT {stored}");
    }
    // Three at once: the bucket is full again exactly a second later.
    send(&mut service, 2).await.unwrap();
    let stored = server.get("thirds:{2}").await.unwrap();
    assert_eq!(past_whole(&stored), 0, "TAT {stored}");
    let ttl = server.pttl("thirds:{2}").await;
    assert!(0 < ttl && ttl <= 1000, "full again in 1 s, not {ttl} ms");
}

#[tokio::test]
async fn a_dropped_waiter_gives_back_a_fraction_of_a_microsecond_exactly() {
    let server = RedisServer::start().await;
    let manager = server.manager().await;
    let layer = RateLimitLayer::builder()
        .capacity(3)
        .refill(3, Duration::from_secs(1))
        .max_wait(Duration::from_secs(3))
        .build_with(|quota| RedisStore::new(manager, quota, strict("thirdwait:")))
        .unwrap();
    let mut service = layer.layer(echo::<u32>());
    for _ in 0..3 {
        send(&mut service, 1).await.unwrap();
    }
    let drained = server.get("thirdwait:shared").await.unwrap();
    assert_eq!(past_whole(&drained), 0);
    // A waiter reserves the slot a third of a second on, then gives up.
    let waiter = service.ready().await.unwrap().call(2);
    assert!(timeout(Duration::from_millis(100), waiter).await.is_err());
    let deadline = Instant::now() + Duration::from_secs(2);
    while server.get("thirdwait:shared").await.as_deref() != Some(&drained) {
        assert!(Instant::now() < deadline, "the waiter's third came back");
        sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn invalid_redis_options_are_errors_from_build_with_not_panics() {
    let server = RedisServer::start().await;
    let local = || WhenUnavailable::Local {
        replicas: NonZeroU32::new(2).unwrap(),
    };
    let cases = [
        (
            RedisOptions::default().batch(4).lease_for(Duration::MAX),
            RateLimitConfigError::TooLarge,
        ),
        (
            RedisOptions::default().batch(0),
            RateLimitConfigError::ZeroBatch,
        ),
        (
            RedisOptions::default().batch(4).lease_max_keys(0),
            RateLimitConfigError::ZeroMaxKeys,
        ),
        (
            RedisOptions::default()
                .when_unavailable(local())
                .fallback_max_keys(0),
            RateLimitConfigError::ZeroMaxKeys,
        ),
    ];
    for (options, expected) in cases {
        let manager = server.manager().await;
        let built = RateLimitLayer::builder()
            .capacity(4)
            .refill(4, Duration::from_secs(1))
            .build_with(|quota| RedisStore::new(manager, quota, options.clone()));
        assert_eq!(built.err(), Some(expected), "{options:?}");
    }
    // Options that are not used are not checked, as `max_keys` of a global limiter.
    let manager = server.manager().await;
    let unused = RedisOptions::default()
        .lease_max_keys(0)
        .fallback_max_keys(0);
    assert!(
        RateLimitLayer::builder()
            .capacity(4)
            .refill(4, Duration::from_secs(1))
            .build_with(|quota| RedisStore::new(manager, quota, unused))
            .is_ok()
    );

    // A quota too large for the script to count exactly (2^52 tokens of a nanosecond
    // each, in units of a thousandth of a microsecond: 2^52 units, more than 2^51), at
    // build and at runtime.
    let manager = server.manager().await;
    let too_fine = RateLimitLayer::builder()
        .capacity(1 << 52)
        .refill(1, Duration::from_nanos(1))
        .build_with(|quota| RedisStore::new(manager, quota, strict("fine:")));
    assert_eq!(too_fine.err(), Some(RateLimitConfigError::TooLarge));
    // 2^20 tokens of 2^33 + 1 ns each: 2^53 units of a nanosecond (fine in process),
    // and as many of the script's (a thousandth of a microsecond, as 1000 does not divide
    // the interval).
    let manager = server.manager().await;
    let layer = RateLimitLayer::builder()
        .capacity(1 << 20)
        .refill(1, Duration::from_secs(1))
        .build_with(|quota| RedisStore::new(manager, quota, strict("fine:")))
        .unwrap();
    let handle = layer.handle();
    let before = handle.quota();
    assert_eq!(
        handle.set_rate(1, Duration::from_nanos((1 << 33) + 1)),
        Err(RateLimitConfigError::TooLarge)
    );
    assert_eq!(handle.quota(), before);
}

/// Time enough for a store to reach a live Redis on a loaded machine; a dead one refuses
/// connections at once.
const REACHES_REDIS: Duration = Duration::from_secs(1);

/// A store on `server` with capacity 4 (refilled one a minute) that waits `timeout` for
/// Redis, and a clone to watch it.
async fn survivor(
    server: &RedisServer,
    policy: WhenUnavailable,
    timeout: Duration,
) -> (
    impl Service<u32, Response = u32, Error = BoxError, Future: Send> + Clone + use<>,
    RedisStore,
) {
    let manager = server.manager().await;
    let mut watch = None;
    let options = RedisOptions::default()
        .prefix("survive:")
        .timeout(timeout)
        .recheck(Duration::from_millis(20))
        .when_unavailable(policy);
    let layer = RateLimitLayer::builder()
        .capacity(4)
        .refill(1, Duration::from_secs(60))
        .build_with(|quota| {
            let store = RedisStore::new(manager, quota, options);
            watch = Some(store.clone());
            store
        })
        .unwrap();
    (layer.layer(echo::<u32>()), watch.unwrap())
}

/// Spends the bucket on Redis: four admitted, the fifth refused.
async fn spend<S>(service: &mut S)
where
    S: Service<u32, Response = u32, Error = BoxError>,
{
    for i in 0..4 {
        send(service, i).await.expect("admitted by Redis");
    }
    assert!(is_limited(&send(service, 4).await));
}

/// Restarts the dead server and waits until the layer decides on Redis again: the
/// restarted server is empty, so its bucket is full, then spent.
async fn back_on_redis<S>(server: &mut RedisServer, service: &mut S, store: &RedisStore)
where
    S: Service<u32, Response = u32, Error = BoxError>,
{
    server.restart().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.keys("survive:*").await.is_empty() {
        assert!(Instant::now() < deadline, "the layer went back to Redis");
        let _ = send(service, 0).await;
        sleep(Duration::from_millis(20)).await;
    }
    assert!(store.is_redis_up());
    // The request that found Redis back took the first token.
    for i in 1..4 {
        send(service, i).await.expect("admitted by Redis");
    }
    assert!(is_limited(&send(service, 4).await));
}

/// Sends `n` requests to a layer whose server is dead, each answering within `send`'s
/// bound, and returns their results.
async fn while_down<S>(service: &mut S, n: u32) -> Vec<Result<u32, BoxError>>
where
    S: Service<u32, Response = u32, Error = BoxError>,
{
    let mut results = Vec::new();
    for i in 0..n {
        results.push(send(service, i).await);
    }
    results
}

#[tokio::test]
async fn failing_open_admits_while_redis_is_down_and_goes_back_to_it() {
    let mut server = RedisServer::start().await;
    let (mut service, store) = survivor(&server, WhenUnavailable::Admit, REACHES_REDIS).await;
    spend(&mut service).await;
    server.kill();
    let results = while_down(&mut service, 10).await;
    assert!(results.iter().all(Result::is_ok));
    assert!(!store.is_redis_up());
    back_on_redis(&mut server, &mut service, &store).await;
}

#[tokio::test]
async fn failing_closed_rejects_with_a_clear_error_and_goes_back_to_redis() {
    let mut server = RedisServer::start().await;
    let (mut service, store) = survivor(&server, WhenUnavailable::Reject, REACHES_REDIS).await;
    spend(&mut service).await;
    server.kill();
    for result in while_down(&mut service, 10).await {
        let error = result.unwrap_err();
        let unavailable = error
            .downcast_ref::<RedisUnavailable>()
            .unwrap_or_else(|| panic!("RedisUnavailable, not {error}"));
        assert_eq!(unavailable.retry_after(), Duration::from_millis(20));
    }
    assert!(!store.is_redis_up());
    back_on_redis(&mut server, &mut service, &store).await;
}

#[tokio::test]
async fn the_local_fallback_enforces_a_replicas_share_and_hands_back_to_redis() {
    let mut server = RedisServer::start().await;
    let replicas = NonZeroU32::new(2).unwrap();
    let (mut service, store) =
        survivor(&server, WhenUnavailable::Local { replicas }, REACHES_REDIS).await;
    spend(&mut service).await;
    server.kill();
    // Half of the capacity of 4, in process.
    let results = while_down(&mut service, 4).await;
    assert!(results[..2].iter().all(Result::is_ok));
    assert!(results[2..].iter().all(is_limited));
    assert!(!store.is_redis_up());
    assert_eq!(store.quota().capacity(), 4);
    back_on_redis(&mut server, &mut service, &store).await;
}

#[tokio::test]
async fn a_hung_server_costs_a_request_no_more_than_the_timeout() {
    let server = RedisServer::start().await;
    let (mut service, store) =
        survivor(&server, WhenUnavailable::Admit, Duration::from_millis(200)).await;
    // Freeze the server: it takes requests but answers them only after 10 s.
    let mut connection = server.connection().await.unwrap();
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(10_000)
        .query_async::<()>(&mut connection)
        .await
        .unwrap();
    let start = Instant::now();
    timeout(Duration::from_secs(2), send(&mut service, 1))
        .await
        .expect("answered long before the server")
        .unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(200),
        "waited out the timeout"
    );
    assert!(!store.is_redis_up());
    // Until the next recheck, requests do not wait for Redis at all.
    send(&mut service, 2).await.unwrap();
}

#[cfg(feature = "http")]
#[tokio::test]
async fn admitted_responses_report_the_bucket_on_redis() {
    use http::{HeaderName, Request, Response};
    use palisade::rate_limit::key::Header;

    let server = RedisServer::start().await;
    let manager = server.manager().await;
    let layer = RateLimitLayer::builder()
        .capacity(3)
        .refill(1, Duration::from_secs(10))
        .keyed(Header::new(HeaderName::from_static("x-client")))
        .headers_on_success()
        .build_with(|quota| RedisStore::new(manager, quota, strict("hdr:")))
        .unwrap();
    let mut service = layer.layer(service_fn(|_: Request<()>| async {
        Ok::<_, BoxError>(Response::new(()))
    }));
    let request = || {
        Request::builder()
            .header("x-client", "ada")
            .body(())
            .unwrap()
    };
    for (remaining, reset) in [(2, 10), (1, 20), (0, 30)] {
        let response = service
            .ready()
            .await
            .unwrap()
            .call(request())
            .await
            .unwrap();
        // The reset is rounded up to whole seconds: a stall of a second or more since the
        // first request takes one off.
        let field = response.headers()["ratelimit"].to_str().unwrap();
        assert!(
            [reset, reset - 1]
                .iter()
                .any(|reset| field == format!("\"default\";r={remaining};t={reset}")),
            "remaining {remaining}, reset {reset}: {field}"
        );
        assert_eq!(
            response.headers()["ratelimit-policy"],
            "\"default\";q=3;w=30"
        );
    }
    let error = service
        .ready()
        .await
        .unwrap()
        .call(request())
        .await
        .unwrap_err();
    let limited = error.downcast_ref::<RateLimited>().unwrap();
    assert_eq!(limited.remaining(), 0);
    assert!(limited.retry_after() > Duration::from_secs(9));
    assert_eq!(server.keys("hdr:*").await, ["hdr:{ada}"]);
}

#[tokio::test]
async fn a_request_costing_more_than_the_capacity_is_refused_without_a_round_trip() {
    let mut server = RedisServer::start().await;
    let manager = server.manager().await;
    let layer = RateLimitLayer::builder()
        .capacity(4)
        .refill(1, Duration::from_secs(60))
        .cost(|request: &u32| u64::from(*request))
        .build_with(|quota| RedisStore::new(manager, quota, strict("cost:")))
        .unwrap();
    let mut service = layer.layer(echo::<u32>());
    server.kill();
    // Redis is gone, yet the answer needs no Redis.
    let error = send(&mut service, 5).await.unwrap_err();
    let too_big = error.downcast_ref::<CostExceedsCapacity>().unwrap();
    assert_eq!((too_big.cost(), too_big.capacity()), (5, 4));
    let error = send(&mut service, 1).await.unwrap_err();
    assert!(error.is::<RedisUnavailable>());
}

/// A store leasing `batch` requests' tokens at a time, failing closed (see [`strict`]).
fn batched(prefix: &str, batch: u32) -> RedisOptions {
    strict(prefix).batch(batch)
}

/// Sends requests to `service` until one is refused; returns how many were admitted.
async fn drain<S>(service: &mut S) -> usize
where
    S: Service<u32, Response = u32, Error = BoxError>,
{
    let mut admitted = 0;
    while send(service, 0).await.is_ok() {
        admitted += 1;
        assert!(admitted <= 100, "the bucket ran dry");
    }
    admitted
}

/// Two replicas sharing a bucket of 10 (refilled one a minute), leasing 5 tokens at a
/// time for `lease_for`.
async fn two_batched_replicas(
    server: &RedisServer,
    prefix: &str,
    lease_for: Duration,
) -> Vec<impl Service<u32, Response = u32, Error = BoxError, Future: Send> + Clone + use<>> {
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let manager = server.manager().await;
        let options = batched(prefix, 5).lease_for(lease_for);
        let layer = RateLimitLayer::builder()
            .capacity(10)
            .refill(1, Duration::from_secs(60))
            .build_with(|quota| RedisStore::new(manager, quota, options))
            .unwrap();
        replicas.push(layer.layer(echo::<u32>()));
    }
    replicas
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_replicas_admit_together_exactly_what_one_bucket_allows() {
    let server = RedisServer::start().await;
    let mut replicas = two_batched_replicas(&server, "lease:", Duration::from_secs(10)).await;
    // A burst of 40 concurrent requests, half through each replica: the leases come out
    // of the one bucket, so together they never admit more than it holds.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let mut service = replicas[i % 2].clone();
        tasks.push(tokio::spawn(async move { send(&mut service, 0).await }));
    }
    let mut admitted = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => admitted += 1,
            Err(error) => assert!(error.is::<RateLimited>(), "only rate limited: {error}"),
        }
    }
    assert!(admitted <= 10, "{admitted} admitted out of a bucket of 10");
    // Whatever the burst left in a replica's lease is still there to spend: together,
    // exactly the bucket.
    for replica in &mut replicas {
        admitted += drain(replica).await;
    }
    assert_eq!(admitted, 10);
}

#[tokio::test]
async fn batching_cuts_round_trips() {
    let server = RedisServer::start().await;
    let mut services = Vec::new();
    for batch in [1, 5] {
        let manager = server.manager().await;
        let layer = RateLimitLayer::builder()
            .capacity(100)
            .refill(1, Duration::from_secs(60))
            .keyed(|request: &u32| Some(*request))
            .build_with(|quota| {
                // Leases that cannot expire mid-test, however slow the machine.
                let options =
                    batched(&format!("trips{batch}:"), batch).lease_for(Duration::from_secs(60));
                RedisStore::new(manager, quota, options)
            })
            .unwrap();
        let mut service = layer.layer(echo::<u32>());
        // Loads the script on the server, for a key the count leaves out.
        send(&mut service, 0).await.unwrap();
        services.push(service);
    }
    let mut round_trips = Vec::new();
    for service in &mut services {
        let before = server.script_runs().await;
        for _ in 0..20 {
            send(service, 7).await.unwrap();
        }
        round_trips.push(server.script_runs().await - before);
    }
    assert_eq!(round_trips, [20, 4]);
    // Redis saw every token leased: 20 of each client's 100 are gone on both (full again
    // in 20 minutes, less the few seconds the test took; the TTL is read in whole
    // milliseconds, so a fast run can read the full 20 minutes).
    for key in ["trips1:{7}", "trips5:{7}"] {
        let seconds = server.pttl(key).await / 1000;
        assert!(
            (20 * 60 - 5..=20 * 60).contains(&seconds),
            "{key}: {seconds} s"
        );
    }
}

#[tokio::test]
async fn a_lease_expires_and_its_unspent_tokens_are_lost() {
    let server = RedisServer::start().await;
    let mut replicas = two_batched_replicas(&server, "expire:", Duration::from_secs(1)).await;
    // The first request leases 5 tokens, the second spends one in process.
    let start = server.script_runs().await;
    send(&mut replicas[0], 1).await.unwrap();
    send(&mut replicas[0], 2).await.unwrap();
    assert_eq!(server.script_runs().await - start, 1);

    // Once the lease expires, its 3 unspent tokens are forfeited: the next request
    // leases the bucket's last 5, and the other replica finds nothing left.
    sleep(Duration::from_millis(1500)).await;
    send(&mut replicas[0], 3).await.unwrap();
    assert_eq!(server.script_runs().await - start, 2);
    assert!(is_limited(&send(&mut replicas[1], 4).await));
    // The second lease holds 4 more: 7 admitted out of 10, 3 stranded.
    assert_eq!(drain(&mut replicas[0]).await, 4);
}

#[tokio::test]
async fn a_lease_outlives_redis_and_then_the_policy_decides() {
    let mut server = RedisServer::start().await;
    let manager = server.manager().await;
    let options = batched("outage:", 4).lease_for(Duration::from_secs(10));
    let layer = RateLimitLayer::builder()
        .capacity(8)
        .refill(1, Duration::from_secs(60))
        .build_with(|quota| RedisStore::new(manager, quota, options))
        .unwrap();
    let mut service = layer.layer(echo::<u32>());
    send(&mut service, 0).await.unwrap();
    server.kill();
    // The 3 leased tokens were taken from Redis already; they need no server.
    for i in 1..4 {
        send(&mut service, i)
            .await
            .expect("admitted from the lease");
    }
    let error = send(&mut service, 4).await.unwrap_err();
    assert!(error.is::<RedisUnavailable>(), "fails closed: {error}");
}

#[tokio::test]
async fn waiting_requests_are_not_batched() {
    let server = RedisServer::start().await;
    let manager = server.manager().await;
    let layer = RateLimitLayer::builder()
        .capacity(2)
        .refill(1, Duration::from_millis(200))
        .max_wait(Duration::from_secs(1))
        .build_with(|quota| RedisStore::new(manager, quota, batched("patient:", 5)))
        .unwrap();
    let mut service = layer.layer(echo::<u32>());
    let before = server.script_runs().await;
    let start = Instant::now();
    for i in 0..3 {
        send(&mut service, i).await.unwrap();
    }
    // One slot each on the server: the third waited for a token to come back.
    assert!(start.elapsed() >= Duration::from_millis(150));
    assert_eq!(server.script_runs().await - before, 3);
}

#[tokio::test]
async fn a_batching_request_dropped_before_it_is_polled_lets_the_next_one_fetch_the_batch() {
    let server = RedisServer::start().await;
    let mut replicas = two_batched_replicas(&server, "unpolled:", Duration::from_secs(10)).await;
    // `call` claims the right to fetch the shared bucket's batch; the caller drops the
    // response future before it ever runs its round trip.
    drop(replicas[0].ready().await.unwrap().call(0));
    // The claim went with it: the next request fetches the batch, and the one after
    // spends from it in process.
    let start = server.script_runs().await;
    send(&mut replicas[0], 1).await.unwrap();
    send(&mut replicas[0], 2).await.unwrap();
    assert_eq!(server.script_runs().await - start, 1);
}
