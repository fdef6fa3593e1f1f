//! The layer on stores of our own that answer later (as a fleet-wide store does): the
//! `Store` trait and its docs are enough to write one, answers that come later work, and
//! a request dropped while the store decides or while it waits leaks nothing and never
//! reaches the inner service. `ServerStore` is one written from the docs alone: its
//! bucket lives on another task ("another server") that answers over channels.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use palisade::rate_limit::{
    Acquire, Admission, Answer, Quota, RateLimitConfigError, RateLimitLayer, RateLimited,
    Reservation, Store, TokenBucket,
};
use tokio::sync::{mpsc, oneshot};
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
    type Output = Result<Admission<Reservation>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.sent {
            self.sent = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let decision = admission(&self.bucket, self.cost, self.max_wait);
        Poll::Ready(Ok(decision))
    }
}

impl Store for RoundTripStore {
    type Key = ();
    type Reservation = Reservation;
    type Pending = RoundTrip;

    fn acquire(&self, request: Acquire<'_, ()>) -> Answer<Self> {
        self.round_trips.fetch_add(1, Ordering::SeqCst);
        Answer::Later(RoundTrip {
            bucket: self.bucket.clone(),
            cost: request.cost,
            max_wait: request.max_wait,
            sent: false,
        })
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

/// The bucket's decision on a request of `cost` that may wait `max_wait`.
fn admission(bucket: &TokenBucket, cost: u64, max_wait: Duration) -> Admission<Reservation> {
    match bucket.reserve(cost, max_wait, Instant::now()) {
        Ok(reservation) if reservation.wait().is_zero() => Admission::Admitted { status: None },
        Ok(reservation) => Admission::Reserved {
            wait: reservation.wait(),
            reservation,
        },
        Err(denied) => Admission::Denied(denied),
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

/// What `ServerStore` asks its server.
enum Message {
    Acquire {
        cost: u64,
        max_wait: Duration,
        reply: oneshot::Sender<Admission<Reservation>>,
    },
    Cancel(Reservation),
    Available(oneshot::Sender<u64>),
    Shutdown,
}

/// A store whose bucket lives on another task: every decision is a message there and an
/// answer back, a cancelled reservation a message there. (Clones talk to the same
/// server: the tests keep one to look at it.)
#[derive(Clone)]
struct ServerStore {
    quota: Quota,
    server: mpsc::UnboundedSender<Message>,
    cancelled: Arc<AtomicUsize>,
}

impl ServerStore {
    fn start(quota: Quota) -> Self {
        let (server, mut inbox) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let bucket = TokenBucket::new(quota, Instant::now());
            while let Some(message) = inbox.recv().await {
                match message {
                    Message::Acquire {
                        cost,
                        max_wait,
                        reply,
                    } => {
                        let _ = reply.send(admission(&bucket, cost, max_wait));
                    }
                    Message::Cancel(reservation) => bucket.cancel(reservation),
                    Message::Available(reply) => {
                        let _ = reply.send(bucket.available(Instant::now()));
                    }
                    Message::Shutdown => break,
                }
            }
        });
        Self {
            quota,
            server,
            cancelled: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Asks the server how many tokens its bucket holds.
    async fn available_on_server(&self) -> u64 {
        let (reply, answer) = oneshot::channel();
        self.server.send(Message::Available(reply)).unwrap();
        answer.await.unwrap()
    }
}

/// The server's answer on its way back.
struct ServerReply(oneshot::Receiver<Admission<Reservation>>);

impl Future for ServerReply {
    type Output = Result<Admission<Reservation>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map_err(|_| "the rate limit server went away".into())
    }
}

impl Store for ServerStore {
    type Key = ();
    type Reservation = Reservation;
    type Pending = ServerReply;

    fn acquire(&self, request: Acquire<'_, ()>) -> Answer<Self> {
        // A request that can never pass is refused without a round trip.
        if request.cost > self.quota.capacity() {
            return Answer::Now(Ok(Admission::Denied(
                palisade::rate_limit::Denied::CostExceedsCapacity {
                    cost: request.cost,
                    capacity: self.quota.capacity(),
                },
            )));
        }
        let (reply, answer) = oneshot::channel();
        let message = Message::Acquire {
            cost: request.cost,
            max_wait: request.max_wait,
            reply,
        };
        match self.server.send(message) {
            Ok(()) => Answer::Later(ServerReply(answer)),
            Err(_) => Answer::Now(Err("the rate limit server went away".into())),
        }
    }

    fn cancel(&self, reservation: Reservation) {
        self.cancelled.fetch_add(1, Ordering::SeqCst);
        let _ = self.server.send(Message::Cancel(reservation));
    }

    fn quota(&self) -> Quota {
        self.quota
    }

    fn update_quota<F>(&self, _: F) -> Result<(), RateLimitConfigError>
    where
        F: FnOnce(Quota) -> Result<Quota, RateLimitConfigError>,
    {
        Ok(())
    }

    fn available(&self, _: Option<&()>) -> u64 {
        self.quota.capacity()
    }

    fn tracked_keys(&self) -> usize {
        0
    }
}

/// A service limited on a server of its own, the server, and the service's call count.
fn on_server(
    max_wait: Duration,
) -> (
    impl Service<u32, Response = u32, Error = BoxError> + use<>,
    ServerStore,
    Arc<AtomicUsize>,
) {
    let mut store = None;
    let layer = RateLimitLayer::builder()
        .capacity(2)
        .refill(1, Duration::from_secs(1))
        .max_wait(max_wait)
        .build_with(|quota| {
            let started = ServerStore::start(quota);
            store = Some(started.clone());
            started
        })
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let service = layer.layer(counting(&calls));
    (service, store.unwrap(), calls)
}

#[tokio::test(start_paused = true)]
async fn a_store_on_another_task_admits_refuses_and_reserves() {
    let (mut service, server, calls) = on_server(Duration::from_secs(5));
    for i in 0..2 {
        assert_eq!(service.ready().await.unwrap().call(i).await.unwrap(), i);
    }
    // The third reserves the slot the server refills at 1 s, and waits for it.
    let start = Instant::now();
    assert_eq!(service.ready().await.unwrap().call(2).await.unwrap(), 2);
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(
        server.cancelled.load(Ordering::SeqCst),
        0,
        "used, not cancelled"
    );
}

#[tokio::test(start_paused = true)]
async fn a_reservation_on_another_task_is_cancelled_when_its_request_is_dropped() {
    let (mut service, server, calls) = on_server(Duration::from_secs(5));
    for i in 0..2 {
        service.ready().await.unwrap().call(i).await.unwrap();
    }
    let waiter = service.ready().await.unwrap().call(2);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), waiter)
            .await
            .is_err()
    );
    assert_eq!(server.cancelled.load(Ordering::SeqCst), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // The server got the slot back: at 1 s its bucket holds the token again.
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(server.available_on_server().await, 1);
}

#[tokio::test(start_paused = true)]
async fn a_store_on_another_task_refuses_with_the_servers_retry_after() {
    let (mut service, server, calls) = on_server(Duration::ZERO);
    for i in 0..2 {
        service.ready().await.unwrap().call(i).await.unwrap();
    }
    let error = service.ready().await.unwrap().call(2).await.unwrap_err();
    let limited = error.downcast_ref::<RateLimited>().unwrap();
    assert_eq!(limited.retry_after(), Duration::from_secs(1));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(server.cancelled.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_server_that_went_away_is_an_error_not_a_call() {
    let (mut service, server, calls) = on_server(Duration::ZERO);
    service.ready().await.unwrap().call(0).await.unwrap();
    server.server.send(Message::Shutdown).unwrap();
    let error = service.ready().await.unwrap().call(1).await.unwrap_err();
    assert_eq!(error.to_string(), "the rate limit server went away");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
