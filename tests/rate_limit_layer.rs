//! The layer: reject and wait modes, costs, runtime changes, keyed buckets, memory bound,
//! HTTP answers. Time is paused.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use palisade::rate_limit::{
    CostExceedsCapacity, MissingKey, RateLimitConfigError, RateLimitLayer, RateLimited,
    WhenKeyMissing,
};
use tokio::time::advance;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

const SECOND: Duration = Duration::from_secs(1);

/// An inner service that counts its calls and echoes the request.
fn counting<Req: Send + 'static>(
    calls: &Arc<AtomicUsize>,
) -> impl Service<Req, Response = Req, Error = BoxError, Future: Send> + Clone + use<Req> {
    let calls = calls.clone();
    service_fn(move |request: Req| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(request) }
    })
}

async fn send<S, Req>(service: &mut S, request: Req) -> Result<S::Response, BoxError>
where
    S: Service<Req, Error = BoxError>,
{
    service.ready().await?.call(request).await
}

/// A builder for a bucket of `capacity` refilled one token per `every`.
fn bucket(capacity: u64, every: Duration) -> palisade::rate_limit::Builder {
    RateLimitLayer::builder()
        .capacity(capacity)
        .refill(1, every)
}

fn limited(error: &BoxError) -> &RateLimited {
    error.downcast_ref::<RateLimited>().expect("RateLimited")
}

#[tokio::test(start_paused = true)]
async fn reject_mode_refuses_at_once_without_calling_inner() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = bucket(3, SECOND).build().unwrap();
    let mut service = layer.layer(counting::<u32>(&calls));
    for i in 0..3 {
        assert_eq!(send(&mut service, i).await.unwrap(), i);
    }
    let error = send(&mut service, 3).await.unwrap_err();
    let error = limited(&error);
    assert_eq!(error.retry_after(), SECOND);
    assert_eq!((error.limit(), error.remaining()), (3, 0));
    assert_eq!(error.period(), 3 * SECOND);
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    advance(SECOND - Duration::from_millis(1)).await;
    assert!(send(&mut service, 4).await.is_err());
    advance(Duration::from_millis(1)).await;
    assert_eq!(send(&mut service, 5).await.unwrap(), 5);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn every_service_and_clone_shares_the_bucket() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = bucket(4, SECOND).build().unwrap();
    let mut one = layer.layer(counting::<u32>(&calls));
    let mut two = layer.clone().layer(counting::<u32>(&calls));
    let mut three = one.clone();
    let mut admitted = 0;
    for _ in 0..4 {
        for service in [&mut one, &mut two, &mut three] {
            admitted += usize::from(send(service, 0).await.is_ok());
        }
    }
    assert_eq!(admitted, 4);
    assert_eq!(layer.handle().available(), 0);
}

#[tokio::test(start_paused = true)]
async fn wait_mode_serves_waiters_in_order_at_their_slots() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = bucket(1, SECOND).max_wait(3 * SECOND).build().unwrap();
    let service = layer.layer(counting::<u32>(&calls));
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..4u32 {
        let mut service = service.clone();
        let order = order.clone();
        // Each call reserves in call order; the futures then wait in separate tasks.
        let future = service.ready().await.unwrap().call(i);
        tasks.push(tokio::spawn(async move {
            let value = future.await.unwrap();
            order.lock().unwrap().push((value, start.elapsed()));
        }));
    }
    // A fifth would have to wait 4 s: refused at once.
    let mut service = service.clone();
    let error = send(&mut service, 9).await.unwrap_err();
    assert_eq!(limited(&error).retry_after(), 4 * SECOND);
    for task in tasks {
        task.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(
        order,
        vec![
            (0, Duration::ZERO),
            (1, SECOND),
            (2, 2 * SECOND),
            (3, 3 * SECOND)
        ]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn waiters_reach_the_inner_service_at_their_exact_slots() {
    let start = tokio::time::Instant::now();
    let reached = Arc::new(std::sync::Mutex::new(Vec::new()));
    let inner = {
        let reached = reached.clone();
        service_fn(move |request: u32| {
            reached.lock().unwrap().push((request, start.elapsed()));
            async move { Ok::<_, BoxError>(request) }
        })
    };
    let layer = RateLimitLayer::builder()
        .capacity(3)
        .refill(3, Duration::from_millis(10))
        .max_wait(Duration::from_millis(12))
        .build()
        .unwrap();
    let service = layer.layer(inner);
    let mut tasks = Vec::new();
    for i in 0..9u32 {
        let mut service = service.clone();
        let future = service.ready().await.unwrap().call(i);
        tasks.push(tokio::spawn(future));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap().is_ok());
    }
    assert_eq!(
        outcomes,
        [true, true, true, true, true, true, false, false, false]
    );
    let ms = Duration::from_millis;
    // Slots at 10/3 and 20/3 ms are rounded up to tokio's millisecond ticks; the slot at
    // exactly 10 ms is admitted at exactly 10 ms (it was at 11 ms with the refill
    // interval rounded up to the nanosecond).
    let reached = reached.lock().unwrap().clone();
    assert_eq!(
        reached,
        [
            (0, ms(0)),
            (1, ms(0)),
            (2, ms(0)),
            (3, ms(4)),
            (4, ms(7)),
            (5, ms(10))
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_gives_its_slot_back_and_never_calls_inner() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = bucket(1, SECOND).max_wait(5 * SECOND).build().unwrap();
    let mut service = layer.layer(counting::<u32>(&calls));
    send(&mut service, 0).await.unwrap();

    let waiter = service.ready().await.unwrap().call(1);
    // Polled once (reserved and sleeping), then dropped by an outer timeout.
    assert!(
        tokio::time::timeout(SECOND / 2, waiter).await.is_err(),
        "the waiter should still be waiting"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Its slot (at 1 s) is free again: the next request waits only until then.
    let start = tokio::time::Instant::now();
    send(&mut service, 2).await.unwrap();
    assert_eq!(start.elapsed(), SECOND / 2);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn weighted_costs_and_a_cost_above_capacity() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = bucket(10, SECOND)
        .max_wait(Duration::from_secs(60))
        .cost(|request: &u64| *request)
        .build()
        .unwrap();
    let mut service = layer.layer(counting::<u64>(&calls));
    send(&mut service, 6).await.unwrap();
    assert_eq!(layer.handle().available(), 4);
    send(&mut service, 4).await.unwrap();
    assert_eq!(layer.handle().available(), 0);

    // Too costly ever to pass: a clear error at once, no wait.
    let start = tokio::time::Instant::now();
    let error = send(&mut service, 11).await.unwrap_err();
    let error = error.downcast_ref::<CostExceedsCapacity>().unwrap();
    assert_eq!((error.cost(), error.capacity()), (11, 10));
    assert_eq!(start.elapsed(), Duration::ZERO);

    // Three tokens take three seconds to come back.
    send(&mut service, 3).await.unwrap();
    assert_eq!(start.elapsed(), 3 * SECOND);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn runtime_changes_apply_to_later_requests() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = bucket(2, SECOND).build().unwrap();
    let handle = layer.handle();
    let mut service = layer.layer(counting::<u32>(&calls));
    send(&mut service, 0).await.unwrap();
    send(&mut service, 0).await.unwrap();

    handle.set_rate(10, SECOND).unwrap();
    let error = send(&mut service, 0).await.unwrap_err();
    assert_eq!(limited(&error).retry_after(), SECOND / 10);
    advance(SECOND / 10).await;
    send(&mut service, 0).await.unwrap();

    handle.set_capacity(5).unwrap();
    assert_eq!(handle.quota().capacity(), 5);
    advance(SECOND).await;
    assert_eq!(handle.available(), 5);
    for _ in 0..5 {
        send(&mut service, 0).await.unwrap();
    }
    assert!(send(&mut service, 0).await.is_err());

    assert_eq!(
        handle.set_capacity(0),
        Err(RateLimitConfigError::ZeroCapacity)
    );
    assert_eq!(
        handle.set_rate(1, Duration::ZERO),
        Err(RateLimitConfigError::ZeroRefillPeriod)
    );
    assert_eq!(handle.quota().capacity(), 5);
}

#[test]
fn build_rejects_invalid_configuration() {
    let error = |builder: palisade::rate_limit::Builder| builder.build().unwrap_err();
    assert_eq!(
        error(RateLimitLayer::builder().refill(1, SECOND)),
        RateLimitConfigError::ZeroCapacity
    );
    assert_eq!(
        error(RateLimitLayer::builder().capacity(1)),
        RateLimitConfigError::ZeroRefillTokens
    );
    assert_eq!(
        error(bucket(1, Duration::ZERO)),
        RateLimitConfigError::ZeroRefillPeriod
    );
    assert_eq!(
        error(bucket(1, SECOND).max_wait(Duration::MAX)),
        RateLimitConfigError::TooLarge
    );
    let keyed = bucket(1, SECOND)
        .keyed::<_, u32>(|key: &u32| Some(*key))
        .max_keys(0)
        .build();
    assert_eq!(keyed.unwrap_err(), RateLimitConfigError::ZeroMaxKeys);
}

#[tokio::test(start_paused = true)]
async fn keyed_buckets_are_independent() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = bucket(2, SECOND)
        .keyed(|request: &(u32, u32)| Some(request.0))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut service = layer.layer(counting::<(u32, u32)>(&calls));
    for client in 0..3 {
        assert!(send(&mut service, (client, 0)).await.is_ok());
        assert!(send(&mut service, (client, 1)).await.is_ok());
        assert!(send(&mut service, (client, 2)).await.is_err());
    }
    assert_eq!(handle.available_for(&0), 0);
    assert_eq!(handle.available_for(&99), 2);
    assert_eq!(handle.tracked_keys(), 3);
    assert_eq!(calls.load(Ordering::SeqCst), 6);
}

#[tokio::test(start_paused = true)]
async fn a_small_max_keys_tracks_that_many_keys_each_on_its_own() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = bucket(1, 60 * SECOND)
        .keyed(|key: &u32| Some(*key))
        .max_keys(100)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut service = layer.layer(counting::<u32>(&calls));
    // Had any of them gone to the one shared overflow bucket, a second key there would
    // be refused.
    for key in 0..100 {
        assert!(send(&mut service, key).await.is_ok(), "key {key} refused");
    }
    assert_eq!(handle.tracked_keys(), 100);
    for key in 0..100 {
        assert_eq!(handle.available_for(&key), 0, "key {key} not tracked");
    }
    // The 101st key is beyond the cap: it charges the overflow bucket, once.
    assert!(send(&mut service, 100).await.is_ok());
    assert!(send(&mut service, 101).await.is_err());
    assert_eq!(handle.tracked_keys(), 100);
}

#[tokio::test(start_paused = true)]
async fn available_for_an_untracked_key_at_the_cap_reports_the_overflow_bucket() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = bucket(3, 60 * SECOND)
        .keyed(|key: &u32| Some(*key))
        .max_keys(2)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut service = layer.layer(counting::<u32>(&calls));
    // With room in the table, an untracked key would get a fresh, full bucket.
    assert_eq!(handle.available_for(&7), 3);
    for key in [0, 1] {
        send(&mut service, key).await.unwrap();
    }
    // At the cap, key 7 would be charged to the overflow bucket: drain it.
    for _ in 0..3 {
        send(&mut service, 2).await.unwrap();
    }
    assert_eq!(handle.available(), 0);
    assert_eq!(handle.available_for(&7), 0);
    assert!(send(&mut service, 7).await.is_err());
    // Tracked keys still report their own buckets.
    assert_eq!(handle.available_for(&0), 2);
    // Once the table's buckets are full again a sweep would free room: a full bucket.
    advance(3 * 60 * SECOND).await;
    assert_eq!(handle.available_for(&7), 3);
}

#[tokio::test(start_paused = true)]
async fn missing_keys_are_rejected_or_share_the_fallback_bucket() {
    let calls = Arc::new(AtomicUsize::new(0));
    let builder = || bucket(1, SECOND).keyed(|request: &Option<u32>| *request);
    let mut strict = builder().build().unwrap().layer(counting(&calls));
    let error = send(&mut strict, None).await.unwrap_err();
    assert!(error.is::<MissingKey>());
    assert!(send(&mut strict, Some(1)).await.is_ok());

    let sharing = builder()
        .when_key_missing(WhenKeyMissing::Share)
        .build()
        .unwrap();
    let handle = sharing.handle();
    let mut sharing = sharing.layer(counting(&calls));
    assert!(send(&mut sharing, None).await.is_ok());
    assert!(send(&mut sharing, None).await.is_err());
    assert_eq!(handle.available(), 0);
    assert!(send(&mut sharing, Some(1)).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn idle_keys_are_evicted_without_a_background_task() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = bucket(1, SECOND)
        .keyed(|key: &u32| Some(*key))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut service = layer.layer(counting::<u32>(&calls));
    for key in 0..5_000 {
        send(&mut service, key).await.unwrap();
    }
    assert_eq!(handle.tracked_keys(), 5_000);
    assert_eq!(handle.available_for(&0), 0);
    // A second later every bucket is full again: the next new keys sweep them out.
    advance(SECOND).await;
    for key in 10_000..15_000 {
        send(&mut service, key).await.unwrap();
    }
    let tracked = handle.tracked_keys();
    assert!(tracked <= 6_000, "{tracked} keys tracked");
    assert!(tracked >= 5_000, "{tracked}: the busy keys must stay");
    assert_eq!(handle.available_for(&0), 1);
    assert_eq!(handle.available_for(&10_000), 0);
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_fresh_keys_neither_grows_the_table_nor_resets_real_clients() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = bucket(5, Duration::from_secs(60))
        .keyed(|key: &u32| Some(*key))
        .max_keys(1_000)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut service = layer.layer(counting::<u32>(&calls));
    // A real client spends three of its five tokens.
    for _ in 0..3 {
        send(&mut service, 7).await.unwrap();
    }
    // A million spoofed keys, as fast as they come.
    let mut overflow_refusals = 0;
    for key in 1_000_000..2_000_000 {
        overflow_refusals += usize::from(send(&mut service, key).await.is_err());
        if key % 50_000 == 0 {
            assert!(handle.tracked_keys() <= 1_000);
        }
    }
    assert!(handle.tracked_keys() <= 1_000);
    // The flood beyond the cap shared the one overflow bucket: almost all refused.
    assert!(overflow_refusals > 990_000, "{overflow_refusals} refused");
    // The real client still has exactly the two tokens it had.
    assert_eq!(handle.available_for(&7), 2);
    send(&mut service, 7).await.unwrap();
    send(&mut service, 7).await.unwrap();
    assert!(send(&mut service, 7).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn keyed_runtime_changes_reach_every_key() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = bucket(4, SECOND)
        .keyed(|key: &u32| Some(*key))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut service = layer.layer(counting::<u32>(&calls));
    for _ in 0..4 {
        send(&mut service, 1).await.unwrap();
    }
    send(&mut service, 2).await.unwrap();
    handle.set_rate(1, 10 * SECOND).unwrap();
    // Key 1 stays empty and now refills at the new rate.
    let error = send(&mut service, 1).await.unwrap_err();
    assert_eq!(limited(&error).retry_after(), 10 * SECOND);
    // Key 2 keeps its three tokens, then its share of the smaller capacity: 3/4 of 2,
    // rounded down.
    assert_eq!(handle.available_for(&2), 3);
    handle.set_capacity(2).unwrap();
    assert_eq!(handle.available_for(&2), 1);
    send(&mut service, 2).await.unwrap();
    assert!(send(&mut service, 2).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_on_many_threads_never_over_admit() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = bucket(100, Duration::from_secs(360_000)).build().unwrap();
    let service = layer.layer(counting::<u32>(&calls));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let mut service = service.clone();
            tokio::spawn(async move {
                let mut admitted = 0;
                for _ in 0..50 {
                    admitted += usize::from(send(&mut service, 0).await.is_ok());
                    tokio::task::yield_now().await;
                }
                admitted
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        admitted += task.await.unwrap();
    }
    assert_eq!(admitted, 100);
    assert_eq!(calls.load(Ordering::SeqCst), 100);
}

#[cfg(feature = "http")]
mod http_answers {
    use super::*;
    use palisade::rate_limit::headers::too_many_requests;
    use palisade::rate_limit::key::{Forwarded, ForwardedFor, Header, KeyExtractor, PeerIp};
    use palisade::rejection::{rejection_response, whole_seconds};
    use std::net::{IpAddr, SocketAddr};

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::ZERO), 0);
        assert_eq!(whole_seconds(Duration::from_nanos(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1_000)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1_001)), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn too_many_requests_carries_retry_after_and_the_ietf_fields() {
        let layer = bucket(10, Duration::from_millis(1_500)).build().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let mut service = layer.layer(counting::<u32>(&calls));
        for _ in 0..10 {
            send(&mut service, 0).await.unwrap();
        }
        advance(Duration::from_millis(200)).await;
        let error = send(&mut service, 0).await.unwrap_err();
        let response: http::Response<String> = too_many_requests(limited(&error));
        assert_eq!(response.status(), http::StatusCode::TOO_MANY_REQUESTS);
        let header = |name: &str| response.headers()[name].to_str().unwrap().to_owned();
        assert_eq!(header("retry-after"), "2");
        assert_eq!(header("ratelimit-policy"), "\"default\";q=10;w=15");
        assert_eq!(header("ratelimit"), "\"default\";r=0;t=2");
        let mapped: http::Response<String> = rejection_response(&error).unwrap();
        assert_eq!(mapped.headers()["retry-after"], "2");
        let missing: BoxError = MissingKey.into();
        let mapped: http::Response<String> = rejection_response(&missing).unwrap();
        assert_eq!(mapped.status(), http::StatusCode::BAD_REQUEST);
        assert!(rejection_response::<String>(&BoxError::from("other")).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn headers_on_success_add_the_ratelimit_field() {
        let layer = bucket(3, SECOND).headers_on_success().build().unwrap();
        let mut service = layer.layer(service_fn(|_: http::Request<()>| async {
            Ok::<_, BoxError>(http::Response::new(()))
        }));
        let response = send(&mut service, http::Request::new(())).await.unwrap();
        assert_eq!(response.headers()["ratelimit"], "\"default\";r=2;t=1");
        assert_eq!(
            response.headers()["ratelimit-policy"],
            "\"default\";q=3;w=3"
        );
        let response = send(&mut service, http::Request::new(())).await.unwrap();
        assert_eq!(response.headers()["ratelimit"], "\"default\";r=1;t=2");
    }

    fn request_with(headers: &[(&str, &str)], peer: Option<&str>) -> http::Request<()> {
        let mut request = http::Request::new(());
        for (name, value) in headers {
            request.headers_mut().append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_str(value).unwrap(),
            );
        }
        #[cfg(feature = "axum")]
        if let Some(peer) = peer {
            let peer: SocketAddr = peer.parse().unwrap();
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
        }
        request
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn key_extractors_read_peer_header_and_proxies() {
        let peer = Some("10.0.0.9:4000");
        #[cfg(feature = "axum")]
        assert_eq!(PeerIp.extract(&request_with(&[], peer)), ip("10.0.0.9"));
        assert_eq!(PeerIp.extract(&request_with(&[], None)), None);
        let mut plain = http::Request::new(());
        plain
            .extensions_mut()
            .insert("[::1]:80".parse::<SocketAddr>().unwrap());
        assert_eq!(PeerIp.extract(&plain), ip("::1"));

        let api_key = Header::new(http::HeaderName::from_static("x-api-key"));
        assert_eq!(
            api_key.extract(&request_with(&[("x-api-key", "k1")], None)),
            Some(http::HeaderValue::from_static("k1"))
        );
        assert_eq!(
            api_key.extract(&request_with(&[("x-api-key", "")], None)),
            None
        );

        // client, spoofed entry prepended by the client, then our two proxies' entries.
        let xff = [
            ("x-forwarded-for", "6.6.6.6, 1.2.3.4"),
            ("x-forwarded-for", "10.0.0.1"),
        ];
        let request = request_with(&xff, peer);
        #[cfg(feature = "axum")]
        assert_eq!(ForwardedFor::new(0).extract(&request), ip("10.0.0.9"));
        assert_eq!(ForwardedFor::new(1).extract(&request), ip("10.0.0.1"));
        assert_eq!(ForwardedFor::new(2).extract(&request), ip("1.2.3.4"));
        assert_eq!(ForwardedFor::new(4).extract(&request), None);
        let garbage = request_with(&[("x-forwarded-for", "not an ip")], None);
        assert_eq!(ForwardedFor::new(1).extract(&garbage), None);

        let forwarded = request_with(
            &[(
                "forwarded",
                "for=6.6.6.6, for=\"[2001:db8::1]:4711\";proto=https, For=10.0.0.1:80;by=x",
            )],
            None,
        );
        assert_eq!(Forwarded::new(1).extract(&forwarded), ip("10.0.0.1"));
        assert_eq!(Forwarded::new(2).extract(&forwarded), ip("2001:db8::1"));
        let unknown = request_with(&[("forwarded", "for=unknown")], None);
        assert_eq!(Forwarded::new(1).extract(&unknown), None);
    }
}

/// The crate-level `key` module is the one `rate_limit::key` re-exports.
#[cfg(feature = "http")]
mod authority {
    use super::*;
    use palisade::key::{Authority, KeyExtractor};

    fn request(uri: &str, host: Option<&str>) -> http::Request<()> {
        let mut builder = http::Request::get(uri);
        if let Some(host) = host {
            builder = builder.header(http::header::HOST, host);
        }
        builder.body(()).unwrap()
    }

    fn key(uri: &str, host: Option<&str>) -> Option<String> {
        Authority
            .extract(&request(uri, host))
            .map(|authority| authority.to_string())
    }

    #[test]
    fn authority_keys_on_the_uri_else_the_host_header() {
        // A client's request (or an HTTP/2 one) names its authority in the URI, which
        // wins over a `Host` header.
        assert_eq!(
            key("http://orders.internal:8080/v1", Some("other")).as_deref(),
            Some("orders.internal:8080")
        );
        // An HTTP/1.1 request to a server has an origin-form URI and a `Host` header.
        assert_eq!(
            key("/v1", Some("api.example.com")).as_deref(),
            Some("api.example.com")
        );
        assert_eq!(key("/v1", None), None);
        assert_eq!(key("/v1", Some("")), None);
        assert_eq!(key("/v1", Some("bad host")), None);
        // One upstream is one key, however its name is cased.
        let upper = Authority.extract(&request("http://Orders.Internal/", None));
        let lower = Authority.extract(&request("/", Some("orders.internal")));
        assert_eq!(upper, lower);
    }

    #[tokio::test(start_paused = true)]
    async fn a_limiter_keyed_by_authority_limits_each_upstream_alone() {
        let layer = RateLimitLayer::builder()
            .capacity(1)
            .refill(1, SECOND)
            .keyed(palisade::rate_limit::key::Authority)
            .build()
            .unwrap();
        let mut service = layer.layer(service_fn(|_: http::Request<()>| async {
            Ok::<_, BoxError>(())
        }));
        send(&mut service, request("http://a.internal/", None))
            .await
            .unwrap();
        send(&mut service, request("http://b.internal/", None))
            .await
            .unwrap();
        let error = send(&mut service, request("/", Some("A.internal")))
            .await
            .unwrap_err();
        assert!(error.is::<RateLimited>());
    }
}
