//! Shadow mode side by side with an enforcing concurrency limit on the same traffic, on
//! paused time: the shadow limit sends every request, counts exactly the requests the
//! enforcing one refuses with `Overloaded`, and its permits in flight, its queue and
//! (adaptive) its limit are the enforcing one's at every step, because the requests it
//! lets through hold no permit and tell the algorithm nothing.

use palisade::concurrency_limit::{
    Aimd, ConcurrencyLimitHandle, ConcurrencyLimitLayer, ConcurrencyLimitLayerBuilder, Overloaded,
};
use proptest::prelude::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

/// A request: its client (for the keyed limit), how long the backend takes, and
/// whether it fails.
#[derive(Debug, Clone, Copy)]
struct Request {
    client: u8,
    millis: u64,
    fails: bool,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Static,
    Queued,
    Adaptive,
    Keyed,
}

fn builder(kind: Kind, shadow: bool) -> ConcurrencyLimitLayerBuilder {
    let builder = ConcurrencyLimitLayer::builder().shadow(shadow);
    match kind {
        Kind::Static | Kind::Keyed => builder.max_in_flight(3),
        Kind::Queued => builder.max_in_flight(2).queue(2, Duration::from_millis(60)),
        Kind::Adaptive => builder.aimd(
            Aimd::new()
                .initial_limit(4)
                .min_limit(1)
                .max_limit(8)
                .backoff_ratio(0.5)
                .latency_threshold(Duration::from_millis(120)),
        ),
    }
}

fn backend(
    reached: Arc<AtomicU64>,
) -> impl Service<Request, Response = (), Error = BoxError, Future: Send> + Clone {
    service_fn(move |request: Request| {
        reached.fetch_add(1, Ordering::Relaxed);
        async move {
            tokio::time::sleep(Duration::from_millis(request.millis)).await;
            if request.fails {
                Err::<(), BoxError>("failed".into())
            } else {
                Ok(())
            }
        }
    })
}

fn traffic() -> impl Strategy<Value = Vec<(u64, Request)>> {
    let request =
        (0u8..3, 1u64..200, prop::bool::weighted(0.2)).prop_map(|(client, millis, fails)| {
            Request {
                client,
                millis,
                fails,
            }
        });
    prop::collection::vec((0u64..60, request), 1..100)
}

fn same(step: usize, enforcing: &ConcurrencyLimitHandle, shadow: &ConcurrencyLimitHandle) {
    assert_eq!(
        shadow.shadow_rejected(),
        enforcing.rejected(),
        "step {step}: counts what the enforcing limit refused"
    );
    assert_eq!(shadow.rejected(), 0, "step {step}");
    assert_eq!(shadow.limit(), enforcing.limit(), "step {step}: the limit");
    assert_eq!(shadow.in_flight(), enforcing.in_flight(), "step {step}");
    assert_eq!(shadow.queued(), enforcing.queued(), "step {step}");
    assert_eq!(shadow.active_keys(), enforcing.active_keys(), "step {step}");
}

/// Runs `traffic` through an enforcing and a shadow limit of `kind`, each request's two
/// futures polled together in one task: how many requests the enforcing one refused.
fn side_by_side(kind: Kind, traffic: &[(u64, Request)]) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let reached = Arc::new(AtomicU64::new(0));
        if let Kind::Keyed = kind {
            let build = |shadow| {
                builder(kind, shadow)
                    .keyed::<_, u8>(|request: &Request| Some(request.client))
                    .max_keys(4)
                    .build()
                    .expect("a valid limit")
            };
            let (enforcing, shadow) = (build(false), build(true));
            let handles = (enforcing.handle(), shadow.handle());
            let services = (
                enforcing.layer(backend(Arc::default())),
                shadow.layer(backend(Arc::clone(&reached))),
            );
            run(traffic, services, handles, &reached).await
        } else {
            let build = |shadow| builder(kind, shadow).build().expect("a valid limit");
            let (enforcing, shadow) = (build(false), build(true));
            let handles = (enforcing.handle(), shadow.handle());
            let services = (
                enforcing.layer(backend(Arc::default())),
                shadow.layer(backend(Arc::clone(&reached))),
            );
            run(traffic, services, handles, &reached).await
        }
    })
}

async fn run<E, S>(
    traffic: &[(u64, Request)],
    (enforcing, shadow): (E, S),
    (enforcing_handle, shadow_handle): (ConcurrencyLimitHandle, ConcurrencyLimitHandle),
    reached: &AtomicU64,
) -> u64
where
    E: Service<Request, Error = BoxError, Response: Send> + Clone + Send + 'static,
    E::Future: Send + 'static,
    S: Service<Request, Error = BoxError, Response: Send> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    {
        assert!(shadow_handle.is_shadow() && !enforcing_handle.is_shadow());
        let refused = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for (step, &(gap, request)) in traffic.iter().enumerate() {
            // A sleep, not `advance`: the clock stops at every instant a request ends.
            tokio::time::sleep(Duration::from_millis(gap)).await;
            let (mut enforcing, mut shadow) = (enforcing.clone(), shadow.clone());
            let enforced = enforcing.ready().await.unwrap().call(request);
            let watched = shadow.ready().await.unwrap().call(request);
            let refused = Arc::clone(&refused);
            tasks.push(tokio::spawn(async move {
                let (enforced, watched) = tokio::join!(enforced, watched);
                if let Err(error) = &enforced
                    && error.is::<Overloaded>()
                {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                if let Err(error) = &watched {
                    assert!(
                        !error.is::<Overloaded>(),
                        "step {step}: shadow mode refuses nothing"
                    );
                }
            }));
            tokio::task::yield_now().await;
            same(step, &enforcing_handle, &shadow_handle);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        for task in tasks {
            task.await.expect("no assertion failed");
        }
        same(traffic.len(), &enforcing_handle, &shadow_handle);
        assert_eq!(
            reached.load(Ordering::Relaxed),
            traffic.len() as u64,
            "every request reached the backend behind the shadow limit"
        );
        assert_eq!(enforcing_handle.shadow_rejected(), 0);
        let refused = refused.load(Ordering::Relaxed);
        assert_eq!(refused, enforcing_handle.rejected());
        refused
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_shadow_limit_counts_exactly_what_an_enforcing_one_refuses(traffic in traffic()) {
        side_by_side(Kind::Static, &traffic);
    }

    #[test]
    fn a_shadow_limit_with_a_queue_counts_the_waits_that_run_out(traffic in traffic()) {
        side_by_side(Kind::Queued, &traffic);
    }

    #[test]
    fn an_adaptive_shadow_limit_adapts_as_the_enforcing_one_does(traffic in traffic()) {
        side_by_side(Kind::Adaptive, &traffic);
    }

    #[test]
    fn a_keyed_shadow_limit_counts_exactly_what_the_enforcing_one_refuses(traffic in traffic()) {
        side_by_side(Kind::Keyed, &traffic);
    }
}

#[test]
fn a_burst_is_refused_by_the_enforcing_limit_and_counted_by_the_shadow() {
    // The same checks on traffic written out: a burst of six slow requests at once, then
    // six more after the first ones ended.
    let slow = Request {
        client: 0,
        millis: 150,
        fails: false,
    };
    let mut traffic = vec![(0, slow); 6];
    traffic.extend([(200, slow); 1]);
    traffic.extend([(0, slow); 5]);
    assert_eq!(side_by_side(Kind::Static, &traffic), 6, "3 of each burst");
    assert_eq!(
        side_by_side(Kind::Keyed, &traffic),
        6,
        "one client: the same"
    );
    assert_eq!(
        side_by_side(Kind::Queued, &traffic),
        8,
        "2 run, 2 wait in vain"
    );
    // AIMD at 4: two refused, and all four slow ones halve the limit to 2 (at most
    // one decrease per round trip); the second burst then gets 2 through.
    assert!(side_by_side(Kind::Adaptive, &traffic) >= 2);
}
