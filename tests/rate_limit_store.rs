//! The layer on a store of our own that answers after a round trip (as a fleet-wide
//! store will): the `Store` trait is enough to plug one in, decisions that are not ready
//! at once work, and a request dropped while the store decides or while it waits
//! leaks nothing and never reaches the inner service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use palisade::rate_limit::{
    Decision, Quota, RateLimitConfigError, RateLimitLayer, RateLimited, Reservation, Store,
    TokenBucket,
};
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

/// One bucket behind a "network": every decision takes one extra poll.
struct RoundTripStore {
    bucket: Arc<TokenBucket>,
    round_trips: Arc<AtomicUsize>,
}

/// Answers on its second poll, like a reply arriving from a server.
struct RoundTrip {
    bucket: Arc<TokenBucket>,
    cost: u64,
    max_wait: Duration,
    sent: bool,
}

impl Future for RoundTrip {
    type Output = Result<Decision<Reservation>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.sent {
            self.sent = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let decision = match self
            .bucket
            .reserve(self.cost, self.max_wait, Instant::now())
        {
            Ok(reservation) if reservation.wait().is_zero() => Decision::Admitted { status: None },
            Ok(reservation) => Decision::Reserved {
                wait: reservation.wait(),
                reservation,
            },
            Err(denied) => Decision::Denied(denied),
        };
        Poll::Ready(Ok(decision))
    }
}

impl Store for RoundTripStore {
    type Key = ();
    type Reservation = Reservation;
    type Future = RoundTrip;

    fn acquire(&self, _: Option<&()>, cost: u64, max_wait: Duration, _: bool) -> RoundTrip {
        self.round_trips.fetch_add(1, Ordering::SeqCst);
        RoundTrip {
            bucket: self.bucket.clone(),
            cost,
            max_wait,
            sent: false,
        }
    }

    fn cancel(&self, reservation: Reservation) {
        self.bucket.cancel(reservation);
    }

    fn quota(&self) -> Quota {
        self.bucket.quota()
    }

    fn update_quota<F>(&self, change: F) -> Result<(), RateLimitConfigError>
    where
        F: FnOnce(Quota) -> Result<Quota, RateLimitConfigError>,
    {
        self.bucket
            .set_quota(change(self.bucket.quota())?, Instant::now());
        Ok(())
    }

    fn available(&self, _: Option<&()>) -> u64 {
        self.bucket.available(Instant::now())
    }

    fn tracked_keys(&self) -> usize {
        0
    }
}

fn layer(
    max_wait: Duration,
) -> (
    RateLimitLayer<
        palisade::rate_limit::key::Global,
        palisade::rate_limit::UnitCost,
        RoundTripStore,
    >,
    Arc<AtomicUsize>,
) {
    let round_trips = Arc::new(AtomicUsize::new(0));
    let layer = RateLimitLayer::builder()
        .capacity(2)
        .refill(1, Duration::from_secs(1))
        .max_wait(max_wait)
        .build_with(|quota| RoundTripStore {
            bucket: Arc::new(TokenBucket::new(quota, Instant::now())),
            round_trips: round_trips.clone(),
        })
        .unwrap();
    (layer, round_trips)
}

fn counting(
    calls: &Arc<AtomicUsize>,
) -> impl Service<u32, Response = u32, Error = BoxError> + Clone + use<> {
    let calls = calls.clone();
    service_fn(move |request: u32| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(request) }
    })
}

#[tokio::test(start_paused = true)]
async fn a_remote_store_decides_after_its_round_trip() {
    let (layer, round_trips) = layer(Duration::ZERO);
    let calls = Arc::new(AtomicUsize::new(0));
    let handle = layer.handle();
    let mut service = layer.layer(counting(&calls));
    for i in 0..2 {
        assert_eq!(service.ready().await.unwrap().call(i).await.unwrap(), i);
    }
    let error = service.ready().await.unwrap().call(2).await.unwrap_err();
    let limited = error.downcast_ref::<RateLimited>().unwrap();
    assert_eq!(limited.retry_after(), Duration::from_secs(1));
    assert_eq!(limited.limit(), 2);
    assert_eq!(round_trips.load(Ordering::SeqCst), 3);
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    handle.set_rate(2, Duration::from_secs(1)).unwrap();
    assert_eq!(handle.quota().refill_interval(), Duration::from_millis(500));
}

#[tokio::test(start_paused = true)]
async fn a_request_dropped_while_the_store_decides_never_reaches_the_service() {
    let (layer, round_trips) = layer(Duration::ZERO);
    let calls = Arc::new(AtomicUsize::new(0));
    let handle = layer.handle();
    let mut service = layer.layer(counting(&calls));
    // `call` sends the "request" to the store (its first poll answers Pending); the
    // caller gives up before the answer.
    let deciding = service.ready().await.unwrap().call(0);
    assert_eq!(round_trips.load(Ordering::SeqCst), 1);
    drop(deciding);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(handle.available(), 2);
    // The service still works, through its next round trip.
    assert_eq!(service.ready().await.unwrap().call(1).await.unwrap(), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_remote_reservation_waits_and_is_given_back_when_dropped() {
    let (layer, _) = layer(Duration::from_secs(5));
    let calls = Arc::new(AtomicUsize::new(0));
    let handle = layer.handle();
    let mut service = layer.layer(counting(&calls));
    for i in 0..2 {
        service.ready().await.unwrap().call(i).await.unwrap();
    }
    // Reserves the slot at 1 s, then is abandoned half-way.
    let waiter = service.ready().await.unwrap().call(2);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), waiter)
            .await
            .is_err()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // The slot came back: at 1 s the bucket holds a token again.
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(handle.available(), 1);
    let start = Instant::now();
    service.ready().await.unwrap().call(3).await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
}
