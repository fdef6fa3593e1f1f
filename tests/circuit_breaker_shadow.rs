//! Shadow mode side by side with an enforcing breaker on the same traffic, on paused
//! time: the shadow breaker sends every call to the dependency, counts exactly the calls
//! the enforcing one rejects, and goes through the same states (same transitions, same
//! instants, same reasons, same window) at every step, because the calls it lets
//! through are not recorded.

use palisade::circuit_breaker::{
    CircuitBreakerLayer, CircuitOpen, Metrics, SlidingWindow, State, Transition,
};
use proptest::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

/// A call: which upstream (for the keyed breaker), how long the dependency takes, and
/// whether it fails.
#[derive(Debug, Clone, Copy)]
struct Call {
    key: u8,
    millis: u64,
    fails: bool,
}

type Transitions = Arc<Mutex<Vec<(Option<u8>, Transition)>>>;

fn builder() -> palisade::circuit_breaker::CircuitBreakerLayerBuilder {
    CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count(4))
        .minimum_calls(2)
        .failure_rate_threshold(0.5)
        .slow_calls(Duration::from_millis(150), 0.75)
        .open_for(Duration::from_millis(400))
        .half_open_probes(2)
}

/// The dependency: answers after `millis`, and counts the calls that reach it.
fn dependency(
    reached: Arc<AtomicU64>,
) -> impl Service<Call, Response = (), Error = BoxError, Future: Send> + Clone {
    service_fn(move |call: Call| {
        reached.fetch_add(1, Ordering::Relaxed);
        async move {
            tokio::time::sleep(Duration::from_millis(call.millis)).await;
            if call.fails {
                Err::<(), BoxError>("down".into())
            } else {
                Ok(())
            }
        }
    })
}

fn traffic() -> impl Strategy<Value = Vec<(u64, Call)>> {
    let call = (0u8..2, 0u64..250, prop::bool::weighted(0.4))
        .prop_map(|(key, millis, fails)| Call { key, millis, fails });
    prop::collection::vec((0u64..200, call), 1..120)
}

/// What an enforcing breaker's metrics would be if its rejections were shadow ones.
fn as_shadow(mut metrics: Metrics) -> Metrics {
    metrics.shadow_rejected = metrics.rejected;
    metrics.rejected = 0;
    metrics
}

/// Sends every call of `traffic` through both (a pair of services and a way to read
/// their metrics), each call's two futures polled together in one task, so that the
/// two breakers see decisions and outcomes in the same order at the same instants.
async fn side_by_side<E, S>(
    traffic: &[(u64, Call)],
    enforcing: E,
    shadow: S,
    reached: &AtomicU64,
    check: impl Fn(usize),
) -> u64
where
    E: Service<Call, Error = BoxError, Response: Send> + Clone + Send + 'static,
    E::Future: Send + 'static,
    S: Service<Call, Error = BoxError, Response: Send> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let rejected = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (step, &(gap, call)) in traffic.iter().enumerate() {
        // A sleep, not `advance`: the paused clock then stops at every instant a call
        // ends on the way, so each outcome is recorded when it happens.
        tokio::time::sleep(Duration::from_millis(gap)).await;
        let mut enforcing = enforcing.clone();
        let mut shadow = shadow.clone();
        let enforced = enforcing.ready().await.unwrap().call(call);
        let watched = shadow.ready().await.unwrap().call(call);
        let rejected = Arc::clone(&rejected);
        tasks.push(tokio::spawn(async move {
            let (enforced, watched) = tokio::join!(enforced, watched);
            if let Err(error) = &enforced
                && error.is::<CircuitOpen>()
            {
                rejected.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(error) = &watched {
                assert!(
                    !error.is::<CircuitOpen>(),
                    "step {step}: shadow mode rejects nothing"
                );
            }
        }));
        tokio::task::yield_now().await;
        assert_eq!(
            reached.load(Ordering::Relaxed),
            step as u64 + 1,
            "step {step}: every call reaches the dependency behind the shadow breaker"
        );
        check(step);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for task in tasks {
        task.await.expect("no assertion failed");
    }
    check(traffic.len());
    rejected.load(Ordering::Relaxed)
}

/// Runs `traffic` through a global enforcing and shadow breaker: how many calls the
/// enforcing one rejected.
fn global(traffic: &[(u64, Call)]) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let heard: [Transitions; 2] = Default::default();
        let layer = |shadow: bool, heard: &Transitions| {
            let heard = Arc::clone(heard);
            builder()
                .shadow(shadow)
                .on_transition(move |transition| heard.lock().unwrap().push((None, *transition)))
                .build()
                .expect("a valid breaker")
        };
        let (enforcing, shadow) = (layer(false, &heard[0]), layer(true, &heard[1]));
        let (enforcing_handle, shadow_handle) = (enforcing.handle(), shadow.handle());
        assert!(shadow_handle.is_shadow() && !enforcing_handle.is_shadow());
        let (unused, reached) = (Arc::default(), Arc::new(AtomicU64::new(0)));
        let enforcing = enforcing.layer(dependency(unused));
        let shadow = shadow.layer(dependency(Arc::clone(&reached)));
        let rejected = side_by_side(traffic, enforcing, shadow, &reached, |step| {
            let enforced = enforcing_handle.metrics();
            assert_eq!(
                shadow_handle.shadow_rejected(),
                enforced.rejected,
                "step {step}: counts what the enforcing breaker rejected"
            );
            assert_eq!(shadow_handle.metrics(), as_shadow(enforced), "step {step}");
        })
        .await;
        assert_eq!(enforcing_handle.shadow_rejected(), 0);
        let heard = heard.map(|heard| heard.lock().unwrap().clone());
        assert_eq!(
            heard[1], heard[0],
            "the same transitions at the same instants"
        );
        rejected
    })
}

/// The same with keyed breakers (one per `Call::key`).
fn keyed(traffic: &[(u64, Call)]) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let heard: [Transitions; 2] = Default::default();
        let layer = |shadow: bool, heard: &Transitions| {
            let heard = Arc::clone(heard);
            builder()
                .shadow(shadow)
                .keyed::<_, u8>(|call: &Call| Some(call.key))
                .max_keys(4)
                .on_transition(move |key: Option<&u8>, transition: &Transition| {
                    heard.lock().unwrap().push((key.copied(), *transition))
                })
                .build()
                .expect("a valid breaker")
        };
        let (enforcing, shadow) = (layer(false, &heard[0]), layer(true, &heard[1]));
        let (enforcing_handle, shadow_handle) = (enforcing.handle(), shadow.handle());
        assert!(shadow_handle.is_shadow() && !enforcing_handle.is_shadow());
        let (unused, reached) = (Arc::default(), Arc::new(AtomicU64::new(0)));
        let enforcing = enforcing.layer(dependency(unused));
        let shadow = shadow.layer(dependency(Arc::clone(&reached)));
        let rejected = side_by_side(traffic, enforcing, shadow, &reached, |step| {
            let mut total = 0;
            for key in 0..2 {
                let enforced = enforcing_handle.metrics_for(&key);
                total += enforced.map_or(0, |metrics| metrics.rejected);
                assert_eq!(
                    shadow_handle.metrics_for(&key),
                    enforced.map(as_shadow),
                    "step {step}: key {key}"
                );
            }
            assert_eq!(
                shadow_handle.shadow_rejected(),
                total,
                "step {step}: counts what the enforcing breakers rejected"
            );
        })
        .await;
        assert_eq!(enforcing_handle.shadow_rejected(), 0);
        let heard = heard.map(|heard| heard.lock().unwrap().clone());
        assert_eq!(
            heard[1], heard[0],
            "the same transitions at the same instants"
        );
        rejected
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_shadow_breaker_counts_exactly_what_an_enforcing_one_rejects(traffic in traffic()) {
        global(&traffic);
    }

    #[test]
    fn keyed_shadow_breakers_count_exactly_what_enforcing_ones_reject(traffic in traffic()) {
        keyed(&traffic);
    }
}

#[test]
fn a_failing_dependency_is_rejected_by_the_enforcing_breaker_and_counted_by_the_shadow() {
    // The same checks on traffic written out, so that they do not rest on what proptest
    // drew: four failures trip both; the next calls are refused (counted), the open time
    // passes, two probes fail and reopen, two more succeed and close.
    let call = |millis, fails| Call {
        key: 0,
        millis,
        fails,
    };
    let mut traffic = vec![(0, call(10, true)); 4];
    traffic.extend([(20, call(10, false)); 3]);
    traffic.extend([
        (500, call(50, true)),
        (0, call(50, true)),
        (0, call(1, false)),
    ]);
    traffic.extend([
        (500, call(10, false)),
        (0, call(10, false)),
        (0, call(1, false)),
    ]);
    traffic.push((100, call(1, false)));
    // Three while open, then one in each half-open phase while both probes are out.
    assert_eq!(global(&traffic), 5);
    assert_eq!(keyed(&traffic), 5);
}

#[tokio::test(start_paused = true)]
async fn metrics_and_the_handle_show_what_would_have_been_rejected() {
    let layer = builder().shadow(true).build().unwrap();
    let handle = layer.handle();
    let reached = Arc::new(AtomicU64::new(0));
    let mut service = layer.layer(dependency(Arc::clone(&reached)));
    let down = Call {
        key: 0,
        millis: 0,
        fails: true,
    };
    for _ in 0..5 {
        let error = service.ready().await.unwrap().call(down).await.unwrap_err();
        assert_eq!(error.to_string(), "down");
    }
    assert_eq!(reached.load(Ordering::Relaxed), 5);
    let metrics = handle.metrics();
    assert_eq!(metrics.state, State::Open);
    assert_eq!((metrics.rejected, metrics.shadow_rejected), (0, 3));
    assert_eq!(metrics.calls, 2, "the calls let through are not recorded");
    handle.reset();
    assert_eq!(
        handle.shadow_rejected(),
        0,
        "a reset starts the count afresh"
    );
}

#[tokio::test(start_paused = true)]
async fn a_shadow_endpoint_stays_in_the_balancer_s_pool() {
    use palisade::circuit_breaker::EjectionGroup;

    let layer = builder().shadow(true).build().unwrap();
    let handle = layer.handle();
    let group = EjectionGroup::new();
    let reached = Arc::new(AtomicU64::new(0));
    let mut endpoint = layer
        .ejecting(&group)
        .layer(dependency(Arc::clone(&reached)));
    let down = Call {
        key: 0,
        millis: 0,
        fails: true,
    };
    for _ in 0..5 {
        // An enforcing endpoint would be not ready once open; a shadow one stays ready.
        let ready = futures_util::FutureExt::now_or_never(endpoint.ready());
        let error = ready
            .expect("ready at once")
            .unwrap()
            .call(down)
            .await
            .unwrap_err();
        assert!(!error.is::<CircuitOpen>());
    }
    assert_eq!(reached.load(Ordering::Relaxed), 5);
    assert_eq!(handle.state(), State::Open);
    assert_eq!(handle.shadow_rejected(), 3);
}
