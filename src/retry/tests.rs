//! Rejections from the crate's own layers: constructed here, where their `new` is
//! visible.
use super::{Backoff, RetryLayer, RetryReason};
use crate::circuit_breaker::CircuitOpen;
use crate::rate_limit::RateLimited;
use crate::rejection::RejectionKind;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::{BoxError, Layer, ServiceExt, service_fn};

/// Rejects the first call with `rejection`, answers the next; records call times.
fn rejecting_once(
    rejection: BoxError,
) -> (
    impl tower::Service<(), Response = (), Error = BoxError> + Clone,
    Arc<Mutex<Vec<Duration>>>,
) {
    let start = Instant::now();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let rejection = Arc::new(Mutex::new(Some(rejection)));
    let service = {
        let calls = calls.clone();
        service_fn(move |()| {
            calls.lock().expect("calls").push(start.elapsed());
            let result = match rejection.lock().expect("rejection").take() {
                Some(error) => Err(error),
                None => Ok(()),
            };
            std::future::ready(result)
        })
    };
    (service, calls)
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_is_retried_after_its_retry_after() {
    let reasons = Arc::new(Mutex::new(Vec::new()));
    let layer = RetryLayer::builder()
        .backoff(Backoff::constant(Duration::from_millis(10)))
        // A policy that would retry nothing: local rejections are retried anyway.
        .retry_if(|_: &Result<(), BoxError>| false)
        .on_retry({
            let reasons = reasons.clone();
            move |event| reasons.lock().expect("reasons").push(event.reason)
        })
        .build()
        .expect("config");
    let (service, calls) = rejecting_once(CircuitOpen::new(Duration::from_secs(2)).into());
    layer
        .layer(service)
        .oneshot(())
        .await
        .expect("after the breaker closes");
    assert_eq!(
        *calls.lock().expect("calls"),
        [Duration::ZERO, Duration::from_secs(2)]
    );

    let (service, calls) = rejecting_once(rate_limited(Duration::from_millis(300)).into());
    layer
        .layer(service)
        .oneshot(())
        .await
        .expect("after the limit refills");
    assert_eq!(
        *calls.lock().expect("calls"),
        [Duration::ZERO, Duration::from_millis(300)]
    );
    assert_eq!(
        *reasons.lock().expect("reasons"),
        [
            RetryReason::Rejected(RejectionKind::Unavailable),
            RetryReason::Rejected(RejectionKind::RateLimited)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_zero_retry_after_still_waits_for_the_backoff() {
    let layer = RetryLayer::builder()
        .backoff(Backoff::constant(Duration::from_millis(40)))
        .build()
        .expect("config");
    let (service, calls) = rejecting_once(CircuitOpen::new(Duration::ZERO).into());
    layer
        .layer(service)
        .oneshot(())
        .await
        .expect("second attempt");
    assert_eq!(
        *calls.lock().expect("calls"),
        [Duration::ZERO, Duration::from_millis(40)]
    );
}

#[tokio::test(start_paused = true)]
async fn a_rejection_longer_than_the_cap_is_returned() {
    let layer = RetryLayer::builder()
        .max_server_delay(Duration::from_secs(5))
        .build()
        .expect("config");
    let (service, calls) = rejecting_once(CircuitOpen::new(Duration::from_secs(30)).into());
    let started = Instant::now();
    let error = layer
        .layer(service)
        .oneshot(())
        .await
        .expect_err("rejected");
    let open = error
        .downcast_ref::<CircuitOpen>()
        .expect("the breaker's error");
    assert_eq!(open.retry_after(), Duration::from_secs(30));
    assert_eq!(calls.lock().expect("calls").len(), 1);
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_rejection_on_the_last_attempt_is_returned() {
    let layer = RetryLayer::builder()
        .max_attempts(1)
        .build()
        .expect("config");
    let (service, calls) = rejecting_once(rate_limited(Duration::from_millis(1)).into());
    let error = layer
        .layer(service)
        .oneshot(())
        .await
        .expect_err("rejected");
    assert!(error.is::<RateLimited>());
    assert_eq!(calls.lock().expect("calls").len(), 1);
}

fn rate_limited(retry_after: Duration) -> RateLimited {
    let quota = crate::rate_limit::Quota::new(1, 1, Duration::from_secs(1)).expect("a valid quota");
    RateLimited::new(retry_after, quota, 0)
}
