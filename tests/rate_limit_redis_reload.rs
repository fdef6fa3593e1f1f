//! Live reload of a limiter on a real `redis-server` (started by each test, as in
//! `tests/rate_limit_redis.rs`): a tightened limit applies to the next request, a bucket
//! keeps the time until it is full again under the new quota (at most a full bucket's
//! time), leases of the old quota are forfeited, the shadow switch is live, and a
//! refused configuration changes nothing.
//!
//! Real time, as every Redis test: the refill is one token a minute wherever a count
//! must not move while the test runs.
#![cfg(all(feature = "redis", feature = "serde"))]

// Shared with tests/rate_limit_redis.rs, which uses the rest of it.
#[allow(dead_code)]
#[path = "rate_limit_redis/server.rs"]
mod server;

use std::time::Duration;

use palisade::config::{NotReloadable, RateLimitConfig};
use palisade::rate_limit::{RateLimitHandle, RateLimited, RedisStore};
use tokio::time::{sleep, timeout};
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

use self::server::RedisServer;

/// A limiter on Redis: `capacity` and `refill`, then `rest` (more fields, the `redis`
/// section's own last), with a generous timeout and refusals rather than silent
/// admissions if Redis is slow on a loaded machine.
fn config(capacity: u64, refill: &str, rest: &str) -> RateLimitConfig {
    let text = format!(
        "capacity = {capacity}\nrefill = \"{refill}\"\n{rest}\n[redis]\nprefix = \"reload:\"\n\
         timeout = \"2s\"\nwhen_unavailable = \"reject\"\n"
    );
    toml::from_str(&text).unwrap_or_else(|error| panic!("{text}\n{error}"))
}

/// `config` with `line` added to its `redis` section.
fn with_redis(config: &RateLimitConfig, line: &str) -> RateLimitConfig {
    let text = format!("{}{line}\n", toml::to_string(config).unwrap());
    toml::from_str(&text).unwrap_or_else(|error| panic!("{text}\n{error}"))
}

type Limited = (
    tower::util::BoxCloneSyncService<u32, u32, BoxError>,
    RateLimitHandle<RedisStore>,
);

async fn limiter(server: &RedisServer, config: &RateLimitConfig) -> Limited {
    let layer = config.build_on_redis(server.manager().await).unwrap();
    let handle = layer.handle();
    let echo = service_fn(|request: u32| async move { Ok::<_, BoxError>(request) });
    (
        tower::util::BoxCloneSyncService::new(layer.layer(echo)),
        handle,
    )
}

async fn send(limited: &mut Limited) -> Result<u32, BoxError> {
    timeout(Duration::from_secs(5), limited.0.ready().await?.call(7))
        .await
        .expect("the layer answers within 5 s")
}

/// The refusal of a request that must be refused.
async fn refused(limited: &mut Limited) -> RateLimited {
    let error = send(limited).await.expect_err("refused");
    *error.downcast::<RateLimited>().expect("rate limited")
}

#[tokio::test]
async fn a_tightened_limit_applies_to_the_next_request_and_a_refused_one_changes_nothing() {
    let server = RedisServer::start().await;
    let loose = config(10, "1/60s", "");
    let mut limited = limiter(&server, &loose).await;
    for _ in 0..4 {
        send(&mut limited).await.unwrap();
    }
    // Four minutes from full. Under 5 tokens a minute, that is four tokens owed: one left.
    let tight = config(5, "1/60s", "");
    limited.1.reload(&tight).unwrap();
    assert_eq!(limited.1.quota().capacity(), 5);
    send(&mut limited).await.unwrap();
    let limit = refused(&mut limited).await;
    assert_eq!(limit.quota().capacity(), 5);
    assert!(limit.retry_after() <= Duration::from_secs(60));

    // Refusals name their field and change nothing, on Redis either.
    let refusals = [
        (config(0, "1/60s", ""), "capacity"),
        (config(5, "1/60s", "max_wait = \"1s\""), "max_wait"),
        (with_redis(&tight, "batch = 4"), "redis.batch"),
        (with_redis(&tight, "recheck = \"1s\""), "redis.recheck"),
        (
            toml::from_str("capacity = 5\nrefill = \"1/60s\"").unwrap(),
            "redis",
        ),
        (
            toml::from_str(
                &toml::to_string(&tight)
                    .unwrap()
                    .replace("reload:", "other:"),
            )
            .unwrap(),
            "redis.prefix",
        ),
    ];
    for (config, path) in refusals {
        let error = limited.1.reload(&config).unwrap_err();
        assert_eq!(error.path(), path, "{error}");
        if path != "capacity" {
            assert!(error.error().is::<NotReloadable>(), "{error}");
        }
    }
    let error = limited
        .1
        .reload(
            &toml::from_str(
                &toml::to_string(&tight)
                    .unwrap()
                    .replace("reload:", "other:"),
            )
            .unwrap(),
        )
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "redis.prefix: cannot change at run time (the layer was built with \"reload:\"): build a new layer to change it"
    );
    assert_eq!(limited.1.quota().capacity(), 5);
    assert_eq!(refused(&mut limited).await.quota().capacity(), 5);

    // Loosening again: 100 a minute's worth of room, of which the bucket owes the time
    // it spent (about 5 minutes: 5 tokens).
    limited.1.reload(&config(100, "1/60s", "")).unwrap();
    for _ in 0..90 {
        send(&mut limited).await.unwrap();
    }
}

#[tokio::test]
async fn a_faster_quota_reads_a_bucket_as_at_most_a_full_buckets_time_from_full() {
    let server = RedisServer::start().await;
    let mut limited = limiter(&server, &config(10, "1/60s", "")).await;
    for _ in 0..10 {
        send(&mut limited).await.unwrap();
    }
    // Ten minutes from full; the new quota fills in a second: empty, full in a second,
    // not refused for ten minutes.
    limited.1.reload(&config(10, "10/s", "")).unwrap();
    let limit = refused(&mut limited).await;
    assert!(
        limit.retry_after() <= Duration::from_millis(100),
        "{:?}",
        limit.retry_after()
    );
    sleep(Duration::from_millis(300)).await;
    send(&mut limited).await.unwrap();
}

#[tokio::test]
async fn a_reload_forfeits_the_tokens_leased_under_the_old_quota() {
    let server = RedisServer::start().await;
    let batched = with_redis(&config(10, "1/60s", ""), "batch = 4");
    let mut limited = limiter(&server, &batched).await;
    // One round trip takes four tokens: this request's and a lease of three.
    send(&mut limited).await.unwrap();
    assert_eq!(server.script_runs().await, 1);
    // Four minutes from full is beyond a full bucket of 2: empty. The lease would admit
    // three more; the next request goes to Redis instead, and is refused.
    limited
        .1
        .reload(&with_redis(&config(2, "1/60s", ""), "batch = 4"))
        .unwrap();
    refused(&mut limited).await;
    assert_eq!(server.script_runs().await, 2);
}

#[tokio::test]
async fn shadow_mode_is_switched_live_on_redis_too() {
    let server = RedisServer::start().await;
    let enforcing = config(2, "1/60s", "");
    let mut limited = limiter(&server, &enforcing).await;
    for _ in 0..2 {
        send(&mut limited).await.unwrap();
    }
    refused(&mut limited).await;
    limited
        .1
        .reload(&config(2, "1/60s", "shadow = true"))
        .unwrap();
    for _ in 0..3 {
        send(&mut limited).await.unwrap();
    }
    assert_eq!(limited.1.shadow_rejected(), 3);
    limited.1.reload(&enforcing).unwrap();
    refused(&mut limited).await;
    assert_eq!(limited.1.shadow_rejected(), 3);
}
