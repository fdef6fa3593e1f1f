//! Shadow mode side by side with an enforcing limiter on the same traffic: the shadow
//! limiter lets every request through, counts exactly the requests the enforcing one
//! refuses, and its buckets hold what the enforcing one's hold, at every step.

use palisade::rate_limit::{RateLimitLayer, WhenKeyMissing};
use proptest::prelude::*;
use std::time::Duration;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

/// A request: the client it comes from (none: no key) and what it costs.
#[derive(Debug, Clone, Copy)]
struct Request {
    client: Option<u32>,
    cost: u64,
}

fn limiter(
    shadow: bool,
    max_wait: Duration,
) -> RateLimitLayer<
    impl Fn(&Request) -> Option<u32> + Clone,
    impl Fn(&Request) -> u64 + Clone,
    palisade::rate_limit::LocalStore<u32>,
> {
    RateLimitLayer::builder()
        .capacity(5)
        .refill(2, Duration::from_secs(1))
        .max_wait(max_wait)
        .max_keys(2)
        .when_key_missing(WhenKeyMissing::Reject)
        .shadow(shadow)
        .keyed::<_, u32>(|request: &Request| request.client)
        .cost(|request: &Request| request.cost)
        .build()
        .expect("a valid limiter")
}

fn traffic() -> impl Strategy<Value = Vec<(u64, Request)>> {
    let request = (prop::option::weighted(0.95, 0u32..4), 1u64..=6)
        .prop_map(|(client, cost)| Request { client, cost });
    prop::collection::vec((0u64..400, request), 1..80)
}

/// Runs `traffic` through an enforcing limiter and a watched one at the same instants,
/// the watched one in shadow mode at step `i` when `shadow[i]` (its switch turned by its
/// handle between steps; in shadow mode throughout when `shadow` is shorter).
fn side_by_side(traffic: &[(u64, Request)], max_wait: Duration, shadow: &[bool]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let (enforcing, watched) = (limiter(false, max_wait), limiter(true, max_wait));
        let (enforcing_handle, watched_handle) = (enforcing.handle(), watched.handle());
        let echo = || service_fn(|request: Request| async move { Ok::<_, BoxError>(request) });
        let (mut enforcing, mut watched) = (enforcing.layer(echo()), watched.layer(echo()));
        assert!(watched_handle.is_shadow() && !enforcing_handle.is_shadow());
        let mut refused = 0;
        for (step, &(gap, request)) in traffic.iter().enumerate() {
            tokio::time::advance(Duration::from_millis(gap)).await;
            let in_shadow = shadow.get(step).copied().unwrap_or(true);
            watched_handle.set_shadow(in_shadow);
            assert_eq!(watched_handle.is_shadow(), in_shadow);
            // Both decide in `call`, at this instant; then both answers are awaited
            // together (an enforcing limiter may wait for its slot).
            let watching = watched.ready().await.unwrap().call(request);
            let enforced = enforcing.ready().await.unwrap().call(request);
            let (passed, enforced) = futures_util::future::join(watching, enforced).await;
            if in_shadow {
                assert!(
                    passed.is_ok(),
                    "step {step}: shadow mode lets {request:?} through"
                );
                refused += u64::from(enforced.is_err());
            } else {
                assert_eq!(
                    passed.is_ok(),
                    enforced.is_ok(),
                    "step {step}: enforcing again, it decides {request:?} as the other"
                );
            }
            assert_eq!(
                watched_handle.shadow_rejected(),
                refused,
                "step {step}: counts what the enforcing limiter refused while in shadow mode"
            );
            for client in 0..4 {
                assert_eq!(
                    watched_handle.available_for(&client),
                    enforcing_handle.available_for(&client),
                    "step {step}: client {client}'s bucket"
                );
            }
            assert_eq!(
                watched_handle.available(),
                enforcing_handle.available(),
                "step {step}"
            );
        }
        assert_eq!(enforcing_handle.shadow_rejected(), 0);
    });
}

proptest! {
    #[test]
    fn shadow_mode_counts_exactly_what_enforcing_mode_refuses(traffic in traffic()) {
        side_by_side(&traffic, Duration::ZERO, &[]);
    }

    #[test]
    fn shadow_mode_keeps_the_slots_enforcing_mode_waits_for(traffic in traffic()) {
        side_by_side(&traffic, Duration::from_millis(700), &[]);
    }

    /// The switch turned on and off between requests: in shadow mode the limiter lets
    /// everything through and counts what the enforcing one refuses, enforcing it decides
    /// as the enforcing one does, and the buckets never part.
    #[test]
    fn the_switch_turned_live_takes_effect_on_the_next_request(
        traffic in traffic(),
        shadow in prop::collection::vec(any::<bool>(), 80),
        waits in any::<bool>(),
    ) {
        let max_wait = if waits { Duration::from_millis(700) } else { Duration::ZERO };
        side_by_side(&traffic, max_wait, &shadow);
    }
}

#[test]
fn a_burst_is_refused_by_the_enforcing_limiter_and_counted_by_the_shadow() {
    // The same check on traffic written out, so that it does not rest on what proptest
    // happened to draw: a burst of 12 from one client, and 2 without a key.
    let one = Request {
        client: Some(1),
        cost: 1,
    };
    let nobody = Request {
        client: None,
        cost: 1,
    };
    let mut traffic = vec![(0, one); 12];
    traffic.extend([(10, nobody), (10, nobody), (0, Request { cost: 6, ..one })]);
    side_by_side(&traffic, Duration::ZERO, &[]);
    // And with the switch off for the burst's first half and the key-less requests.
    let shadow: Vec<bool> = (0..traffic.len())
        .map(|step| (6..12).contains(&step) || step == 14)
        .collect();
    side_by_side(&traffic, Duration::ZERO, &shadow);
}

#[cfg(feature = "http")]
#[tokio::test(start_paused = true)]
async fn a_request_let_through_carries_the_fields_its_refusal_would_have() {
    use palisade::rate_limit::{RateLimited, headers};

    let build = |shadow| {
        RateLimitLayer::builder()
            .capacity(2)
            .refill(1, Duration::from_secs(3))
            .shadow(shadow)
            .headers_on_success()
            .build()
            .unwrap()
    };
    let ok = || service_fn(|_: ()| async { Ok::<_, BoxError>(http::Response::new(())) });
    let mut enforcing = build(false).layer(ok());
    let mut shadow = build(true).layer(ok());
    for _ in 0..2 {
        let admitted = enforcing.ready().await.unwrap().call(()).await.unwrap();
        let watched = shadow.ready().await.unwrap().call(()).await.unwrap();
        assert_eq!(watched.headers(), admitted.headers());
    }
    let refused = enforcing.ready().await.unwrap().call(()).await.unwrap_err();
    let answer: http::Response<()> =
        headers::too_many_requests(refused.downcast_ref::<RateLimited>().unwrap());
    let watched = shadow.ready().await.unwrap().call(()).await.unwrap();
    assert_eq!(watched.status(), 200, "let through");
    for field in ["ratelimit", "ratelimit-policy"] {
        assert_eq!(
            watched.headers().get(field),
            answer.headers().get(field),
            "{field}"
        );
    }
    assert!(
        watched.headers()["ratelimit"]
            .to_str()
            .unwrap()
            .contains("r=0")
    );
}

#[cfg(feature = "serde")]
#[tokio::test(start_paused = true)]
async fn shadow_mode_comes_from_the_configuration() {
    let policies: palisade::config::Policies = toml::from_str(
        "[limits.new]\ncapacity = 1\nrefill = \"1/s\"\nshadow = true\n\
         [limits.old]\ncapacity = 1\nrefill = \"1/s\"",
    )
    .unwrap();
    let new = policies.rate_limit("new").unwrap();
    let handle = new.handle();
    let service = new.layer(service_fn(|n: u32| async move { Ok::<_, BoxError>(n) }));
    for n in 0..3 {
        assert_eq!(service.clone().oneshot(n).await.unwrap(), n);
    }
    assert_eq!(handle.shadow_rejected(), 2);
    assert!(!policies.rate_limit("old").unwrap().handle().is_shadow());
}
