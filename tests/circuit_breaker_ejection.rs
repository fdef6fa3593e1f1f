//! Outlier ejection: breakers on the endpoints of a tower p2c balancer, over real axum
//! servers on 127.0.0.1, and the readiness rules on their own.
#![cfg(feature = "http")]

use axum::Router;
use axum::body::Bytes;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade::circuit_breaker::{
    CircuitBreakerHandle, CircuitBreakerLayer, CircuitOpen, EjectionGroup, SlidingWindow, State,
};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;
use tokio::time::{Instant, advance};
use tower::balance::p2c::Balance;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PendingRequests};
use tower::util::BoxService;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

const OPEN: Duration = Duration::from_secs(60);

/// One upstream: a real axum server that answers 500 while `failing`.
struct Upstream {
    address: SocketAddr,
    failing: Arc<AtomicBool>,
    reached: Arc<AtomicUsize>,
}

impl Upstream {
    async fn spawn(failing: bool) -> Self {
        let failing = Arc::new(AtomicBool::new(failing));
        let reached = Arc::new(AtomicUsize::new(0));
        let handler = {
            let (failing, reached) = (Arc::clone(&failing), Arc::clone(&reached));
            move || async move {
                reached.fetch_add(1, Ordering::SeqCst);
                if failing.load(Ordering::SeqCst) {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                }
            }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let app = Router::new().route("/", get(handler));
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        Self {
            address,
            failing,
            reached,
        }
    }

    fn reached(&self) -> usize {
        self.reached.load(Ordering::SeqCst)
    }
}

fn breaker() -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .minimum_calls(4)
        .sliding_window(SlidingWindow::count(10))
        .open_for(OPEN)
        .half_open_probes(2)
        .build()
        .expect("valid")
}

/// The endpoint for `address`: a GET through a real HTTP client, a 5xx an error.
fn endpoint(
    client: Client<HttpConnector, Empty<Bytes>>,
    address: SocketAddr,
) -> impl Service<(), Response = SocketAddr, Error = BoxError, Future: Send> + Send {
    service_fn(move |()| {
        let client = client.clone();
        async move {
            let request = Request::get(format!("http://{address}/")).body(Empty::new())?;
            let response = client.request(request).await?;
            let status = response.status();
            response.into_body().collect().await?;
            if status.is_server_error() {
                Err(format!("{address} answered {status}").into())
            } else {
                Ok(address)
            }
        }
    })
}

type Pool = Balance<
    ServiceList<Vec<PendingRequests<BoxService<(), SocketAddr, BoxError>, CompleteOnResponse>>>,
    (),
>;

/// A balancer over the upstreams, one breaker each, and the breakers' handles.
fn pool(upstreams: &[Upstream]) -> (Pool, Vec<CircuitBreakerHandle>) {
    let client = Client::builder(TokioExecutor::new()).build_http();
    let group = EjectionGroup::new();
    let (endpoints, handles) = upstreams
        .iter()
        .map(|upstream| {
            let breaker = breaker();
            let handle = breaker.handle();
            let service = breaker
                .ejecting(&group)
                .layer(endpoint(client.clone(), upstream.address));
            (
                PendingRequests::new(BoxService::new(service), CompleteOnResponse::default()),
                handle,
            )
        })
        .unzip();
    (Balance::new(ServiceList::new(endpoints)), handles)
}

/// Keeps the paused clock from jumping ahead on its own while real sockets are in
/// flight (tokio does not auto-advance while a blocking task runs): time moves only by
/// `advance`, so an open time cannot run out behind the test's back.
struct ClockHeld(Option<std::sync::mpsc::Sender<()>>);

fn hold_clock() -> ClockHeld {
    let (release, released) = std::sync::mpsc::channel::<()>();
    tokio::task::spawn_blocking(move || {
        let _ = released.recv();
    });
    ClockHeld(Some(release))
}

impl Drop for ClockHeld {
    fn drop(&mut self) {
        self.0.take();
    }
}

async fn send(pool: &mut Pool) -> Result<SocketAddr, BoxError> {
    pool.ready().await?.call(()).await
}

#[tokio::test(start_paused = true)]
async fn p2c_routes_around_an_open_endpoint_and_back_to_it_after_recovery() {
    let _clock = hold_clock();
    let upstreams = [
        Upstream::spawn(false).await,
        Upstream::spawn(false).await,
        Upstream::spawn(true).await,
    ];
    let failing = &upstreams[2];
    let (mut pool, handles) = pool(&upstreams);

    // Until its breaker opens, the failing upstream takes some requests and fails them.
    let mut sent = 0;
    while handles[2].state() != State::Open {
        sent += 1;
        assert!(sent < 1000, "the failing endpoint's breaker never opened");
        if let Err(error) = send(&mut pool).await {
            assert!(
                error.to_string().contains(&failing.address.to_string()),
                "{error}"
            );
        }
    }
    assert_eq!(failing.reached(), 4, "minimum_calls failures, then open");
    assert_eq!(handles[0].state(), State::Closed);
    assert_eq!(handles[1].state(), State::Closed);

    // Open: no request reaches it, and none fails.
    for _ in 0..200 {
        let served_by = send(&mut pool).await.expect("a healthy endpoint answers");
        assert_ne!(served_by, failing.address);
    }
    assert_eq!(failing.reached(), 4);
    assert_eq!(
        handles[2].metrics().rejected,
        0,
        "no call was made and refused"
    );

    // It recovers; once the open time passes, the timer wakes the balancer, two probes
    // close the breaker and it takes its share again.
    failing.failing.store(false, Ordering::SeqCst);
    advance(OPEN).await;
    for _ in 0..300 {
        send(&mut pool).await.expect("every endpoint is healthy");
    }
    assert_eq!(handles[2].state(), State::Closed);
    assert!(
        failing.reached() > 4 + 50,
        "the recovered endpoint took only {} requests",
        failing.reached() - 4
    );
}

#[tokio::test(start_paused = true)]
async fn a_pool_whose_every_endpoint_is_open_answers_with_the_rejection_at_once() {
    let clock = hold_clock();
    let upstreams = [
        Upstream::spawn(true).await,
        Upstream::spawn(true).await,
        Upstream::spawn(true).await,
    ];
    let (mut pool, handles) = pool(&upstreams);
    let mut sent = 0;
    while handles.iter().any(|handle| handle.state() != State::Open) {
        sent += 1;
        assert!(sent < 1000, "the breakers never all opened");
        let _ = send(&mut pool).await;
    }
    let reached: Vec<usize> = upstreams.iter().map(Upstream::reached).collect();
    // No sockets from here on: the clock may run on its own, so a pool that waited
    // for an open time to pass would show it.
    drop(clock);
    advance(Duration::from_secs(1)).await;
    for _ in 0..100 {
        let started = Instant::now();
        let error = send(&mut pool).await.expect_err("every endpoint is open");
        assert_eq!(Instant::now(), started, "answered at once");
        let open = error
            .downcast_ref::<CircuitOpen>()
            .expect("the breaker's rejection");
        assert_eq!(open.retry_after(), OPEN - Duration::from_secs(1));
    }
    let now: Vec<usize> = upstreams.iter().map(Upstream::reached).collect();
    assert_eq!(now, reached, "no request reached an upstream");
}

/// An endpoint of its own, without a network: answers `Ok` unless told to fail.
fn local(
    breaker: &CircuitBreakerLayer,
    group: &EjectionGroup,
    fail: Arc<AtomicBool>,
) -> impl Service<(), Response = (), Error = BoxError> {
    breaker.ejecting(group).layer(service_fn(move |()| {
        let fail = fail.load(Ordering::SeqCst);
        async move {
            if fail {
                Err::<(), BoxError>("down".into())
            } else {
                Ok(())
            }
        }
    }))
}

fn is_ready<S: Service<()>>(service: &mut S) -> bool {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    matches!(service.poll_ready(&mut cx), Poll::Ready(Ok(())))
}

#[tokio::test(start_paused = true)]
async fn a_reserved_probe_slot_comes_back_when_the_endpoint_is_dropped() {
    let group = EjectionGroup::new();
    let healthy = CircuitBreakerLayer::builder().build().expect("valid");
    let _other = local(&healthy, &group, Arc::default());
    let breaker = CircuitBreakerLayer::builder()
        .minimum_calls(1)
        .open_for(OPEN)
        .half_open_probes(1)
        .build()
        .expect("valid");
    let handle = breaker.handle();
    let mut endpoint = local(&breaker, &group, Arc::new(AtomicBool::new(true)));
    let _ = endpoint.ready().await.expect("ready").call(()).await;
    assert_eq!(handle.state(), State::Open);
    assert!(!is_ready(&mut endpoint), "open: not ready");

    advance(OPEN).await;
    assert!(
        is_ready(&mut endpoint),
        "may probe: ready, holding the slot"
    );
    assert_eq!(handle.state(), State::HalfOpen);
    let mut second = local(&breaker, &group, Arc::default());
    assert!(!is_ready(&mut second), "the one probe slot is reserved");
    drop(endpoint);
    assert_eq!(handle.metrics().probes_in_flight, 0);
    assert!(is_ready(&mut second), "the slot came back");
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_waiting_on_a_forced_open_breaker_is_woken_when_it_is_closed() {
    let group = EjectionGroup::new();
    let healthy = CircuitBreakerLayer::builder().build().expect("valid");
    let _other = local(&healthy, &group, Arc::default());
    let breaker = CircuitBreakerLayer::builder().build().expect("valid");
    let handle = breaker.handle();
    let mut endpoint = local(&breaker, &group, Arc::default());
    handle.force_open();
    let woken = Arc::new(AtomicUsize::new(0));
    let waker = counting_waker(&woken);
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(endpoint.poll_ready(&mut cx).is_pending());
    handle.force_closed();
    assert!(
        woken.load(Ordering::SeqCst) >= 1,
        "the balancer is told to look again"
    );
    assert!(endpoint.poll_ready(&mut cx).is_ready());
}

#[tokio::test(start_paused = true)]
async fn a_departed_endpoint_no_longer_counts_in_its_group() {
    let group = EjectionGroup::new();
    let healthy = CircuitBreakerLayer::builder().build().expect("valid");
    let departing = local(&healthy, &group, Arc::default());
    let breaker = CircuitBreakerLayer::builder().build().expect("valid");
    breaker.handle().force_open();
    let mut endpoint = local(&breaker, &group, Arc::default());
    assert!(
        !is_ready(&mut endpoint),
        "another endpoint of the group is healthy"
    );
    drop(departing);
    assert!(
        is_ready(&mut endpoint),
        "alone and open: it answers with the rejection"
    );
    poll_fn(|cx| endpoint.poll_ready(cx)).await.expect("ready");
    let error = endpoint.call(()).await.expect_err("rejected");
    assert!(error.downcast_ref::<CircuitOpen>().is_some());
    assert_eq!(breaker.handle().metrics().rejected, 1);
}

fn counting_waker(count: &Arc<AtomicUsize>) -> std::task::Waker {
    struct Count(Arc<AtomicUsize>);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    std::task::Waker::from(Arc::new(Count(Arc::clone(count))))
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_holding_a_probe_slot_for_its_next_call_keeps_the_group_from_refusing() {
    // The balancer polled an endpoint that may probe: it took the probe slot and is
    // ready, waiting for the call. Its breaker counts every slot as taken, but the group
    // must not answer with the rejection while that endpoint can take the call.
    let group = EjectionGroup::new();
    let layer = || {
        CircuitBreakerLayer::builder()
            .minimum_calls(1)
            .open_for(OPEN)
            .half_open_probes(1)
            .build()
            .expect("valid")
    };
    let (first, second) = (layer(), layer());
    let second_fails = Arc::new(AtomicBool::new(true));
    let mut failing = local(&first, &group, Arc::new(AtomicBool::new(true)));
    let mut probing = local(&second, &group, Arc::clone(&second_fails));
    let _ = probing.ready().await.expect("ready").call(()).await;
    assert_eq!(second.handle().state(), State::Open);
    advance(OPEN).await;
    second_fails.store(false, Ordering::SeqCst);
    assert!(is_ready(&mut probing), "may probe: ready, holding the slot");
    assert_eq!(second.handle().state(), State::HalfOpen);

    let _ = failing.ready().await.expect("ready").call(()).await;
    assert_eq!(first.handle().state(), State::Open);
    assert!(
        !is_ready(&mut failing),
        "the other endpoint can take the call: the open one is not ready"
    );

    probing.call(()).await.expect("the probe succeeds");
    assert_eq!(second.handle().state(), State::Closed);
    assert!(!is_ready(&mut failing), "the other endpoint is closed");
}
