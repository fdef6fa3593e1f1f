//! Cancellation everywhere: random request mixes through the full stack (rate limit →
//! circuit breaker → retry → inner), each response future dropped at a random moment
//! (before it is first polled, while waiting for a bucket slot, during a retry's
//! backoff, during an attempt). Afterwards, through the handles: no half-open probe
//! slot is held (the breaker can always close again), the bucket holds no stale
//! reservation (it refills to capacity), every budget withdrawal was either spent by a
//! retry the backend received or given back, and no task is left. Time is paused.
//!
//! The correlation layer holds nothing but a task-local; its drop case is in
//! tests/correlation.rs (`a_dropped_response_future_leaves_no_id_behind`).

use palisade::circuit_breaker::{CircuitBreakerLayer, CircuitOpen, SlidingWindow, State};
use palisade::rate_limit::RateLimitLayer;
use palisade::retry::{Backoff, RetryBudget, RetryLayer};
use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{advance, sleep, timeout};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};

const MS: Duration = Duration::from_millis(1);
const CAPACITY: u64 = 4;
const PROBES: u32 = 2;

/// What the backend does with one attempt.
#[derive(Debug, Clone, Copy)]
enum Attempt {
    Ok(u64),
    Fail(u64),
}

#[derive(Debug, Clone)]
struct Req {
    id: usize,
    /// The attempts in order (the last repeats).
    script: Vec<Attempt>,
    start_ms: u64,
    /// When the caller gives up (drops the response future); `Some(0)`: before the
    /// first poll.
    drop_after_ms: Option<u64>,
}

fn attempt() -> impl Strategy<Value = Attempt> {
    prop_oneof![
        (0u64..40).prop_map(Attempt::Ok),
        (0u64..40).prop_map(Attempt::Fail)
    ]
}

fn requests() -> impl Strategy<Value = Vec<Req>> {
    proptest::collection::vec(
        (
            proptest::collection::vec(attempt(), 1..4),
            0u64..300,
            prop::option::of(0u64..120),
        ),
        1..24,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(id, (script, start_ms, drop_after_ms))| Req {
                id,
                script,
                start_ms,
                drop_after_ms,
            })
            .collect()
    })
}

fn run_case(requests: Vec<Req>) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async move {
        let limiter = RateLimitLayer::builder()
            .capacity(CAPACITY)
            .refill(1, 20 * MS)
            .max_wait(60 * MS)
            .build()
            .unwrap();
        let breaker = CircuitBreakerLayer::builder()
            .sliding_window(SlidingWindow::count(4))
            .minimum_calls(4)
            .open_for(50 * MS)
            .half_open_probes(PROBES)
            .build()
            .unwrap();
        // A reserve of 3600 retries and no deposits, all kept for a minute: every
        // withdrawal shows in the balance for the whole test.
        let retry = RetryLayer::builder()
            .max_attempts(3)
            .backoff(Backoff::constant(15 * MS))
            .budget(RetryBudget::new(Duration::from_secs(60), 60, 0.0))
            .build()
            .unwrap();
        let (limit_handle, breaker_handle, retry_handle) =
            (limiter.handle(), breaker.handle(), retry.handle());
        let budget_at_start = retry_handle.budget_available();

        let retries_received = Arc::new(AtomicUsize::new(0));
        let attempts_by_id: Arc<Mutex<HashMap<usize, usize>>> = Arc::default();
        let backend = {
            let retries_received = retries_received.clone();
            service_fn(move |request: Req| {
                let number = {
                    let mut seen = attempts_by_id.lock().unwrap();
                    let n = seen.entry(request.id).or_default();
                    *n += 1;
                    *n
                };
                // Counted as the retry layer hands the request over, whether or not
                // its caller stays for the answer.
                if number > 1 {
                    retries_received.fetch_add(1, Ordering::SeqCst);
                }
                let attempt = request.script[(number - 1).min(request.script.len() - 1)];
                async move {
                    match attempt {
                        Attempt::Ok(ms) => {
                            sleep(Duration::from_millis(ms)).await;
                            Ok(request.id)
                        }
                        Attempt::Fail(ms) => {
                            sleep(Duration::from_millis(ms)).await;
                            Err::<usize, BoxError>("backend failed".into())
                        }
                    }
                }
            })
        };
        let stack = ServiceBuilder::new()
            .layer(limiter)
            .layer(breaker)
            .layer(retry)
            .service(backend);

        let tasks: Vec<_> = requests
            .into_iter()
            .map(|request| {
                let stack = stack.clone();
                async move {
                    sleep(Duration::from_millis(request.start_ms)).await;
                    let drop_after = request.drop_after_ms;
                    let call = stack.oneshot(request);
                    match drop_after {
                        Some(0) => drop(call),
                        Some(ms) => {
                            let _ = timeout(Duration::from_millis(ms), call).await;
                        }
                        None => {
                            let _ = call.await;
                        }
                    }
                }
            })
            .collect();
        // Every request concurrently, on the paused clock, until all are done.
        futures_util::future::join_all(tasks).await;

        // Budget: a withdrawal is kept by every retry the backend received, answered
        // or not; one dropped before it was sent (during its delay or while the stack
        // was not ready) is refunded (the retry layer's contract).
        let retries = retries_received.load(Ordering::SeqCst) as u64;
        prop_assert_eq!(
            retry_handle.budget_available(),
            budget_at_start - retries,
            "budget: {} retries received",
            retries
        );
        // Bucket: once the longest wait and a full refill have passed, it is full: no
        // reservation outlived the request that held it.
        advance(60 * MS + CAPACITY as u32 * 20 * MS).await;
        prop_assert_eq!(limit_handle.available(), CAPACITY);
        // Breaker: whatever state the drops left it in, successful calls close it
        // again within a few open periods. A leaked probe slot would keep a half-open
        // breaker refusing (with no wait) for ever.
        let mut stack = stack;
        for id in 0..20 {
            if breaker_handle.state() == State::Closed {
                break;
            }
            let request = Req {
                id: 10_000 + id,
                script: vec![Attempt::Ok(0)],
                start_ms: 0,
                drop_after_ms: None,
            };
            match stack.ready().await.unwrap().call(request).await {
                Ok(_) => {}
                Err(error) => {
                    let open = error.downcast_ref::<CircuitOpen>();
                    prop_assert!(open.is_some(), "{}", error);
                    advance(open.unwrap().retry_after().max(MS)).await;
                }
            }
        }
        prop_assert_eq!(breaker_handle.state(), State::Closed);
        // palisade spawned nothing that outlives the requests.
        prop_assert_eq!(
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks(),
            0
        );
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn dropped_calls_hold_no_slot_reservation_or_budget(requests in requests()) {
        run_case(requests)?;
    }
}
