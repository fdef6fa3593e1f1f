//! The concurrency limit as a tower layer: refusing in `call`, sharing one limit across
//! clones, giving permits back on completion and on every kind of drop (futures, queued
//! waiters, response bodies), the FIFO queue and its `max_wait`, the samples an adaptive
//! algorithm sees, the protocol answers and the configuration errors. Time is paused.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use palisade::ServiceBuilderExt;
use palisade::classify::Outcome;
use palisade::concurrency_limit::{
    Aimd, ConcurrencyLimitConfigError, ConcurrencyLimitLayer, Gradient, LimitAlgorithm, Overloaded,
    Sample,
};
use tokio::sync::{Notify, oneshot};
use tokio::time::{Instant, advance};
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt, service_fn};

const MS: Duration = Duration::from_millis(1);

/// A backend whose requests end when the test says: each call waits on a channel.
type Done = oneshot::Receiver<Result<&'static str, &'static str>>;

fn backend(
    calls: Arc<AtomicUsize>,
) -> impl Service<Done, Response = &'static str, Error = BoxError, Future: Send> + Clone {
    service_fn(move |done: Done| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            match done.await {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(error)) => Err(error.into()),
                Err(_) => Err("the test dropped the request".into()),
            }
        }
    })
}

fn request() -> (oneshot::Sender<Result<&'static str, &'static str>>, Done) {
    oneshot::channel()
}

fn static_limit(limit: u32) -> ConcurrencyLimitLayer {
    ConcurrencyLimitLayer::builder()
        .max_in_flight(limit)
        .build()
        .expect("a valid limit")
}

fn overloaded(error: &BoxError) -> &Overloaded {
    error.downcast_ref::<Overloaded>().expect("Overloaded")
}

#[tokio::test(start_paused = true)]
async fn over_the_limit_a_request_is_refused_in_call_without_reaching_the_backend() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(2)
        .retry_after(Duration::from_millis(1500))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut service = layer.layer(backend(calls.clone()));

    let (finish_a, a) = request();
    let (_finish_b, b) = request();
    let first = service.ready().await.unwrap().call(a);
    let second = service.ready().await.unwrap().call(b);
    assert_eq!(handle.in_flight(), 2);

    // poll_ready is the backend's: ready, even at the limit.
    assert!(service.ready().now_or_never().is_some());
    let (_, c) = request();
    let refused = service.call(c).now_or_never().expect("refused at once");
    let error = refused.unwrap_err();
    assert_eq!(
        overloaded(&error).retry_after(),
        Duration::from_millis(1500)
    );
    assert_eq!(overloaded(&error).limit(), 2);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the refused request never reached the backend"
    );
    assert_eq!(handle.rejected(), 1);

    finish_a.send(Ok("a")).unwrap();
    assert_eq!(first.await.unwrap(), "a");
    assert_eq!(handle.in_flight(), 1);
    let (finish_d, d) = request();
    let fourth = service.ready().await.unwrap().call(d);
    finish_d.send(Ok("d")).unwrap();
    assert_eq!(fourth.await.unwrap(), "d");
    drop(second);
    assert_eq!(handle.in_flight(), 0);
}

/// A backend that is not ready: the layer says so, and refuses nothing.
#[derive(Clone)]
struct NotReady;

impl Service<()> for NotReady {
    type Response = ();
    type Error = BoxError;
    type Future = std::future::Ready<Result<(), BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Pending
    }

    fn call(&mut self, (): ()) -> Self::Future {
        std::future::ready(Ok(()))
    }
}

#[tokio::test(start_paused = true)]
async fn poll_ready_is_the_inner_services() {
    let layer = static_limit(1);
    let mut service = layer.layer(NotReady);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    assert!(service.poll_ready(&mut cx).is_pending());
    assert_eq!(layer.handle().rejected(), 0);
}

#[tokio::test(start_paused = true)]
async fn every_service_and_clone_of_a_layer_share_one_limit() {
    let layer = static_limit(2);
    let handle = layer.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut one = layer.layer(backend(calls.clone()));
    let mut two = layer.clone().layer(backend(calls.clone()));
    let mut three = one.clone();
    let (_a, a) = request();
    let (_b, b) = request();
    let (_c, c) = request();
    let _first = one.ready().await.unwrap().call(a);
    let _second = two.ready().await.unwrap().call(b);
    let refused = three.ready().await.unwrap().call(c).await.unwrap_err();
    overloaded(&refused);
    assert_eq!(handle.in_flight(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_response_future_dropped_mid_flight_gives_its_permit_back() {
    let layer = static_limit(1);
    let handle = layer.handle();
    let mut service = layer.layer(backend(Arc::default()));
    let (_keep, a) = request();
    let mut future = Box::pin(service.ready().await.unwrap().call(a));
    assert!((&mut future).now_or_never().is_none(), "in flight");
    assert_eq!(handle.in_flight(), 1);
    drop(future);
    assert_eq!(handle.in_flight(), 0);
    // Dropped before its first poll: the same.
    let (_keep, b) = request();
    drop(service.ready().await.unwrap().call(b));
    assert_eq!(handle.in_flight(), 0);
    let (finish, c) = request();
    let third = service.ready().await.unwrap().call(c);
    finish.send(Ok("c")).unwrap();
    assert_eq!(third.await.unwrap(), "c");
}

#[tokio::test(start_paused = true)]
async fn an_error_gives_the_permit_back_too() {
    let layer = static_limit(1);
    let handle = layer.handle();
    let mut service = layer.layer(backend(Arc::default()));
    let (finish, a) = request();
    let future = service.ready().await.unwrap().call(a);
    finish.send(Err("boom")).unwrap();
    assert_eq!(future.await.unwrap_err().to_string(), "boom");
    assert_eq!(handle.in_flight(), 0);
}

#[cfg(all(feature = "http", feature = "tonic"))]
#[tokio::test(start_paused = true)]
async fn overloaded_is_a_rejection_answered_503_with_retry_after() {
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .retry_after(Duration::from_millis(2100))
        .build()
        .unwrap();
    let mut service = layer.layer(backend(Arc::default()));
    let (_keep, a) = request();
    let _held = service.ready().await.unwrap().call(a);
    let (_, b) = request();
    let error = service.ready().await.unwrap().call(b).await.unwrap_err();
    use palisade::rejection::{Rejection, RejectionKind};
    let rejection = Rejection::find(&*error).expect("a rejection");
    assert_eq!(rejection.kind(), RejectionKind::Overloaded);
    assert_eq!(rejection.retry_after(), Some(Duration::from_millis(2100)));
    let response = palisade::rejection::http_response::<()>(&error);
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "3", "rounded up");
    let status = palisade::tonic::rejection_status(&*error).expect("a status");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(
        status.metadata().get("grpc-retry-pushback-ms").unwrap(),
        "2100"
    );
}

/// Records the order in which the backend is called.
fn ordered_backend(
    order: Arc<Mutex<Vec<usize>>>,
) -> impl Service<(usize, Done), Response = usize, Error = BoxError, Future: Send> + Clone {
    service_fn(move |(id, done): (usize, Done)| {
        order.lock().unwrap().push(id);
        async move {
            let _ = done.await;
            Ok::<_, BoxError>(id)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn queued_requests_are_served_first_come_first_served() {
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .queue(3, Duration::from_secs(10))
        .build()
        .unwrap();
    let handle = layer.handle();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut service = layer.layer(ordered_backend(order.clone()));
    let mut finishers = VecDeque::new();
    let mut futures = Vec::new();
    for id in 0..4 {
        let (finish, done) = request();
        finishers.push_back(finish);
        let mut future = Box::pin(service.ready().await.unwrap().call((id, done)));
        assert!((&mut future).now_or_never().is_none());
        futures.push(tokio::spawn(future));
    }
    tokio::task::yield_now().await;
    assert_eq!((handle.in_flight(), handle.queued()), (1, 3));
    // The queue is full: the fifth is refused at once.
    let (_, done) = request();
    overloaded(
        &service
            .ready()
            .await
            .unwrap()
            .call((4, done))
            .await
            .unwrap_err(),
    );

    for _ in 0..4 {
        finishers.pop_front().unwrap().send(Ok("")).unwrap();
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
    }
    for (id, future) in futures.into_iter().enumerate() {
        assert_eq!(future.await.unwrap().unwrap(), id);
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
    assert_eq!(
        (handle.in_flight(), handle.queued(), handle.rejected()),
        (0, 0, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn a_newcomer_does_not_overtake_a_waiter() {
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .queue(2, Duration::from_secs(10))
        .build()
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut service = layer.layer(ordered_backend(order.clone()));
    let (finish_0, done) = request();
    let first = service.ready().await.unwrap().call((0, done));
    let (_finish_1, done) = request();
    let mut waiter = Box::pin(service.ready().await.unwrap().call((1, done)));
    assert!((&mut waiter).now_or_never().is_none());
    drop(finish_0);
    let _ = first.await;
    // The permit went to the waiter: a newcomer queues behind it.
    let (_finish_2, done) = request();
    let mut newcomer = Box::pin(service.ready().await.unwrap().call((2, done)));
    assert!((&mut newcomer).now_or_never().is_none());
    assert!((&mut waiter).now_or_never().is_none());
    assert_eq!(*order.lock().unwrap(), vec![0, 1]);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_is_refused_when_max_wait_runs_out_and_not_a_moment_before() {
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .queue(1, Duration::from_millis(300))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut service = layer.layer(backend(Arc::default()));
    let (_keep, a) = request();
    let _held = service.ready().await.unwrap().call(a);
    let (_, b) = request();
    let started = Instant::now();
    let waiter = tokio::spawn(service.ready().await.unwrap().call(b));
    advance(Duration::from_millis(299)).await;
    assert!(!waiter.is_finished());
    assert_eq!(handle.queued(), 1);
    let error = waiter.await.unwrap().unwrap_err();
    overloaded(&error);
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    assert_eq!(
        (handle.queued(), handle.rejected(), handle.in_flight()),
        (0, 1, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_frees_its_place_and_takes_no_permit() {
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .queue(1, Duration::from_secs(5))
        .build()
        .unwrap();
    let handle = layer.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut service = layer.layer(backend(calls.clone()));
    let (finish, a) = request();
    let held = service.ready().await.unwrap().call(a);
    let (_, b) = request();
    let mut waiter = Box::pin(service.ready().await.unwrap().call(b));
    assert!((&mut waiter).now_or_never().is_none());
    drop(waiter);
    assert_eq!(handle.queued(), 0);
    // Its place is free: another request can queue.
    let (finish_c, c) = request();
    let mut next = Box::pin(service.ready().await.unwrap().call(c));
    assert!((&mut next).now_or_never().is_none());
    finish.send(Ok("a")).unwrap();
    held.await.unwrap();
    finish_c.send(Ok("c")).unwrap();
    assert_eq!(next.await.unwrap(), "c");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the dropped waiter never called the backend"
    );
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_dropped_after_its_permit_came_gives_it_back() {
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(1)
        .queue(1, Duration::from_secs(5))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut service = layer.layer(backend(Arc::default()));
    let (finish, a) = request();
    let held = service.ready().await.unwrap().call(a);
    let (_, b) = request();
    let mut waiter = Box::pin(service.ready().await.unwrap().call(b));
    assert!((&mut waiter).now_or_never().is_none());
    finish.send(Ok("a")).unwrap();
    held.await.unwrap();
    assert_eq!(handle.in_flight(), 1, "handed to the waiter");
    drop(waiter); // before it was polled again
    assert_eq!((handle.in_flight(), handle.queued()), (0, 0));
}

struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn many_tasks_through_one_layer_never_exceed_the_limit() {
    const LIMIT: usize = 8;
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(LIMIT as u32)
        .queue(16, Duration::from_millis(5))
        .build()
        .unwrap();
    let handle = layer.handle();
    let current = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let service = layer.layer(service_fn({
        let (current, peak, served) = (current.clone(), peak.clone(), served.clone());
        move |delay: u64| {
            let now = current.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            // Leaves the count when the call ends or is dropped with its caller.
            let running = Running(current.clone());
            let served = served.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                drop(running);
                served.fetch_add(1, Ordering::SeqCst);
                Ok::<_, BoxError>(())
            }
        }
    }));
    let mut tasks = Vec::new();
    for task in 0..64u64 {
        let mut service = service.clone();
        tasks.push(tokio::spawn(async move {
            let mut refused = 0;
            for i in 0..20 {
                let call = service.ready().await.unwrap().call((task + i) % 7);
                // Every third caller gives up early.
                let result = if (task + i) % 3 == 0 {
                    tokio::time::timeout(Duration::from_millis(2), call)
                        .await
                        .ok()
                } else {
                    Some(call.await)
                };
                if let Some(Err(error)) = result {
                    overloaded(&error);
                    refused += 1;
                }
            }
            refused
        }));
    }
    let mut refused = 0;
    for task in tasks {
        refused += task.await.unwrap();
    }
    assert!(
        peak.load(Ordering::SeqCst) <= LIMIT,
        "peak {}",
        peak.load(Ordering::SeqCst)
    );
    assert_eq!(peak.load(Ordering::SeqCst), LIMIT, "the limit was used");
    assert!(refused > 0 && served.load(Ordering::SeqCst) > 0);
    assert_eq!(refused, handle.rejected());
    assert_eq!((handle.in_flight(), handle.queued()), (0, 0));
}

/// Records every sample and answers a scripted limit.
#[derive(Debug, Clone, Default)]
struct Recording {
    samples: Arc<Mutex<Vec<Sample>>>,
    next_limit: Arc<AtomicUsize>,
}

impl LimitAlgorithm for Recording {
    fn starting_limit(&self) -> u32 {
        4
    }

    fn update(&mut self, sample: Sample) -> u32 {
        self.samples.lock().unwrap().push(sample);
        self.next_limit.load(Ordering::SeqCst) as u32
    }
}

#[tokio::test(start_paused = true)]
async fn an_adaptive_limit_sees_latency_errors_and_drops_as_its_classifier_says() {
    let recording = Recording::default();
    recording.next_limit.store(4, Ordering::SeqCst);
    let layer = ConcurrencyLimitLayer::builder()
        .algorithm(recording.clone())
        // "not found" is the client's problem: it says nothing about load.
        .classify(|result: &Result<&'static str, BoxError>| match result {
            Ok(_) => Outcome::Success,
            Err(error) if error.to_string() == "not found" => Outcome::Ignored,
            Err(_) => Outcome::Failure,
        })
        .build()
        .unwrap();
    let handle = layer.handle();
    assert_eq!(handle.limit(), 4);
    let mut service = layer.layer(backend(Arc::default()));

    let (finish, a) = request();
    let future = service.ready().await.unwrap().call(a);
    advance(Duration::from_millis(40)).await;
    finish.send(Ok("fast")).unwrap();
    future.await.unwrap();

    let (finish, b) = request();
    let future = service.ready().await.unwrap().call(b);
    advance(Duration::from_millis(70)).await;
    finish.send(Err("timeout")).unwrap();
    future.await.unwrap_err();

    let (finish, c) = request();
    let future = service.ready().await.unwrap().call(c);
    finish.send(Err("not found")).unwrap();
    future.await.unwrap_err();

    let (_keep, d) = request();
    let (_keep_e, e) = request();
    let held = service.ready().await.unwrap().call(e);
    let mut dropped = Box::pin(service.ready().await.unwrap().call(d));
    assert!((&mut dropped).now_or_never().is_none());
    advance(Duration::from_millis(5)).await;
    recording.next_limit.store(1, Ordering::SeqCst);
    drop(dropped);

    let samples = recording.samples.lock().unwrap().clone();
    let seen: Vec<_> = samples
        .iter()
        .map(|s| (s.rtt, s.congested, s.in_flight))
        .collect();
    assert_eq!(
        seen,
        vec![
            (Duration::from_millis(40), false, 1),
            (Duration::from_millis(70), true, 1),
            // "not found" was ignored; the dropped request is congestion.
            (Duration::from_millis(5), true, 2),
        ]
    );
    // The algorithm lowered the limit below the requests in flight: the one still
    // running goes on, new ones are refused until it ends.
    assert_eq!((handle.limit(), handle.in_flight()), (1, 1));
    let (_, f) = request();
    overloaded(&service.ready().await.unwrap().call(f).await.unwrap_err());
    drop(held);
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_static_limit_reads_no_clock_and_reports_nothing() {
    // Nothing to observe but the counts: an admitted request changes only in_flight.
    let layer = static_limit(3);
    let handle = layer.handle();
    let mut service = layer.layer(backend(Arc::default()));
    let (finish, a) = request();
    let future = service.ready().await.unwrap().call(a);
    finish.send(Ok("a")).unwrap();
    future.await.unwrap();
    assert_eq!(
        (handle.limit(), handle.in_flight(), handle.rejected()),
        (3, 0, 0)
    );
}

#[cfg(feature = "http")]
mod bodies {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use palisade::classify::ServerErrorsAsFailures;

    type Frame = Result<http_body::Frame<Bytes>, BoxError>;
    type Frames = tokio::sync::mpsc::Receiver<Frame>;
    /// A body that yields what the test sends, and ends when the sender is dropped.
    type Streamed = StreamBody<futures_util::stream::BoxStream<'static, Frame>>;

    fn streaming()
    -> impl Service<Frames, Response = http::Response<Streamed>, Error = BoxError> + Clone {
        service_fn(|frames: Frames| async move {
            let stream = futures_util::stream::unfold(frames, |mut frames| async move {
                frames.recv().await.map(|frame| (frame, frames))
            });
            let body: futures_util::stream::BoxStream<'static, _> = Box::pin(stream);
            Ok::<_, BoxError>(http::Response::new(StreamBody::new(body)))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_streaming_body_holds_its_permit_until_it_ends() {
        let layer = ConcurrencyLimitLayer::builder()
            .max_in_flight(1)
            .release_on_body_end()
            .build()
            .unwrap();
        let handle = layer.handle();
        let mut service = layer.layer(streaming());
        let (frames, rx) = tokio::sync::mpsc::channel(4);
        let response = service.ready().await.unwrap().call(rx).await.unwrap();
        let mut body = response.into_body();
        frames
            .send(Ok(http_body::Frame::data(Bytes::from("one"))))
            .await
            .unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        assert_eq!(
            handle.in_flight(),
            1,
            "the head is out, the stream still runs"
        );
        let (_, rx2) = tokio::sync::mpsc::channel(1);
        assert!(
            matches!(service.ready().await.unwrap().call(rx2).await, Err(error) if error.is::<Overloaded>())
        );
        drop(frames);
        assert!(body.frame().await.is_none());
        assert_eq!(handle.in_flight(), 0, "released at the end of the body");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_dropped_mid_stream_gives_its_permit_back() {
        let layer = ConcurrencyLimitLayer::builder()
            .max_in_flight(1)
            .release_on_body_end()
            .build()
            .unwrap();
        let handle = layer.handle();
        let mut service = layer.layer(streaming());
        let (frames, rx) = tokio::sync::mpsc::channel(4);
        let response = service.ready().await.unwrap().call(rx).await.unwrap();
        frames
            .send(Ok(http_body::Frame::data(Bytes::from("one"))))
            .await
            .unwrap();
        assert_eq!(handle.in_flight(), 1);
        drop(response);
        assert_eq!(handle.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_knows_its_end_releases_with_its_last_frame() {
        let layer = ConcurrencyLimitLayer::builder()
            .max_in_flight(1)
            .classify(ServerErrorsAsFailures)
            .release_on_body_end()
            .build()
            .unwrap();
        let handle = layer.handle();
        let mut service = layer.layer(service_fn(|()| async {
            Ok::<_, BoxError>(http::Response::new(http_body_util::Full::new(Bytes::from(
                "all",
            ))))
        }));
        let response = service.ready().await.unwrap().call(()).await.unwrap();
        let mut body = response.into_body();
        assert_eq!(handle.in_flight(), 1);
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "all");
        assert_eq!(handle.in_flight(), 0, "not kept until the drop");
        drop(body);
        assert_eq!(handle.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn without_release_on_body_end_the_permit_goes_back_with_the_head() {
        let layer = static_limit(1);
        let handle = layer.handle();
        let mut service = layer.layer(streaming());
        let (_frames, rx) = tokio::sync::mpsc::channel(4);
        let _response = service.ready().await.unwrap().call(rx).await.unwrap();
        assert_eq!(handle.in_flight(), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn the_service_builder_method_adds_the_layer() {
    let layer = static_limit(1);
    let handle = layer.handle();
    let mut service = ServiceBuilder::new()
        .concurrency_limiter(layer)
        .service(backend(Arc::default()));
    let (_keep, a) = request();
    let _held = service.ready().await.unwrap().call(a);
    assert_eq!(handle.in_flight(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_limit_can_be_raised_while_requests_wait() {
    // An algorithm that doubles the limit when a request finishes.
    #[derive(Debug)]
    struct Doubling(u32);
    impl LimitAlgorithm for Doubling {
        fn starting_limit(&self) -> u32 {
            self.0
        }
        fn update(&mut self, _: Sample) -> u32 {
            self.0 *= 2;
            self.0
        }
    }
    let notify = Arc::new(Notify::new());
    let layer = ConcurrencyLimitLayer::builder()
        .algorithm(Doubling(1))
        .queue(4, Duration::from_secs(1))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut service = layer.layer(service_fn({
        let notify = notify.clone();
        move |()| {
            let notify = notify.clone();
            async move {
                notify.notified().await;
                Ok::<_, BoxError>(())
            }
        }
    }));
    let first = tokio::spawn(service.ready().await.unwrap().call(()));
    let waiting: Vec<_> = (0..2).map(|_| tokio::spawn(service.call(()))).collect();
    tokio::task::yield_now().await;
    assert_eq!((handle.in_flight(), handle.queued()), (1, 2));
    notify.notify_one();
    first.await.unwrap().unwrap();
    tokio::task::yield_now().await;
    // The first sample doubled the limit to 2, and both waiters got in.
    assert_eq!(
        (handle.limit(), handle.in_flight(), handle.queued()),
        (2, 2, 0)
    );
    notify.notify_waiters();
    for waiter in waiting {
        waiter.await.unwrap().unwrap();
    }
}

#[test]
fn invalid_configurations_are_errors() {
    use ConcurrencyLimitConfigError as E;
    let build =
        |builder: palisade::concurrency_limit::ConcurrencyLimitLayerBuilder| builder.build().err();
    let b = ConcurrencyLimitLayer::builder;
    assert_eq!(build(b()), Some(E::NoLimit));
    assert!(matches!(
        build(b().max_in_flight(0)),
        Some(E::Limit { limit: 0, .. })
    ));
    assert!(matches!(
        build(b().max_in_flight(u32::MAX)),
        Some(E::Limit { .. })
    ));
    assert!(build(b().max_in_flight((1 << 31) - 1)).is_none());
    assert_eq!(
        build(b().max_in_flight(1).retry_after(Duration::ZERO)),
        Some(E::RetryAfter(Duration::ZERO))
    );
    let day = Duration::from_secs(86_400);
    assert!(build(b().max_in_flight(1).retry_after(day)).is_none());
    assert!(
        build(
            b().max_in_flight(1)
                .retry_after(day + Duration::from_nanos(1))
        )
        .is_some()
    );
    assert!(matches!(
        build(b().max_in_flight(1).queue(0, MS)),
        Some(E::QueueSize { .. })
    ));
    assert!(matches!(
        build(b().max_in_flight(1).queue(usize::MAX, MS)),
        Some(E::QueueSize { .. })
    ));
    assert_eq!(
        build(b().max_in_flight(1).queue(1, Duration::ZERO)),
        Some(E::MaxWait(Duration::ZERO))
    );
    assert!(build(b().max_in_flight(1).queue(1, Duration::MAX)).is_some());

    let aimd = |aimd: Aimd| build(b().aimd(aimd));
    assert!(aimd(Aimd::new()).is_none());
    for bad in [
        Aimd::new().min_limit(0),
        Aimd::new().initial_limit(0),
        Aimd::new().initial_limit(2000),
        Aimd::new().max_limit(u32::MAX).initial_limit(20),
        Aimd::new().min_limit(30),
        Aimd::new().backoff_ratio(1.0),
        Aimd::new().backoff_ratio(0.4),
        Aimd::new().backoff_ratio(f64::NAN),
        Aimd::new().latency_threshold(Duration::ZERO),
        Aimd::new().latency_threshold(Duration::MAX),
    ] {
        assert!(
            matches!(
                aimd(bad.clone()),
                Some(E::Algorithm {
                    algorithm: "Aimd",
                    ..
                })
            ),
            "{bad:?}"
        );
    }
    let gradient = |gradient: Gradient| build(b().gradient(gradient));
    assert!(gradient(Gradient::new()).is_none());
    for bad in [
        Gradient::new().min_limit(0),
        Gradient::new().initial_limit(1).min_limit(2),
        Gradient::new().max_limit(2),
        Gradient::new().interval(Duration::ZERO),
        Gradient::new().min_rtt_interval(Duration::MAX),
        Gradient::new().percentile(0.0),
        Gradient::new().percentile(1.5),
        Gradient::new().percentile(f64::NAN),
        Gradient::new().buffer(-0.1),
        Gradient::new().buffer(f64::INFINITY),
        Gradient::new().min_rtt_requests(0),
        Gradient::new().min_rtt_requests(1025),
    ] {
        assert!(
            matches!(
                gradient(bad.clone()),
                Some(E::Algorithm {
                    algorithm: "Gradient",
                    ..
                })
            ),
            "{bad:?}"
        );
    }
}
