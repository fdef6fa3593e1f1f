//! The keyed (fair per client) concurrency limit: a flooding client leaves another its
//! share, no share is reserved while the layer is not contended, the table at its
//! `max_keys` and requests without a key share one overflow share, keyed permits come
//! back on every drop, the configuration errors, and a real axum server keyed on a
//! header. Time is paused, except in the server test, which depends on no timing.

use std::pin::Pin;
use std::time::Duration;

use futures_util::FutureExt;
use palisade::concurrency_limit::{
    ConcurrencyLimitConfigError, ConcurrencyLimitHandle, ConcurrencyLimitLayer,
    ConcurrencyLimitService, Overloaded,
};
use tokio::sync::oneshot;
use tokio::time::advance;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

/// A request: the client's key (if any) and the channel that ends it.
type Request = (Option<&'static str>, oneshot::Receiver<()>);

/// What each request needs to end: send on it (or drop it).
type Finish = oneshot::Sender<()>;

fn backend() -> impl Service<Request, Response = (), Error = BoxError, Future: Send> + Clone {
    service_fn(|(_, done): Request| async move {
        let _ = done.await;
        Ok::<_, BoxError>(())
    })
}

fn client_key(request: &Request) -> Option<&'static str> {
    request.0
}

type Keyed<S> = ConcurrencyLimitService<
    S,
    palisade::classify::ErrorsAsFailures,
    palisade::concurrency_limit::ReleaseOnResponse,
    fn(&Request) -> Option<&'static str>,
    &'static str,
>;

fn keyed(
    limit: u32,
    max_keys: usize,
) -> (
    Keyed<impl Service<Request, Response = (), Error = BoxError, Future: Send> + Clone>,
    ConcurrencyLimitHandle,
) {
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(limit)
        .retry_after(Duration::from_secs(1))
        .keyed(client_key as fn(&Request) -> Option<&'static str>)
        .max_keys(max_keys)
        .build()
        .expect("a valid keyed limit");
    let handle = layer.handle();
    (layer.layer(backend()), handle)
}

/// An admitted request of `client`: what ends it, and its response future (polled once
/// so that it runs); `None` when refused with `Overloaded`.
async fn call<S>(
    service: &mut S,
    client: Option<&'static str>,
) -> Option<(Finish, Pin<Box<S::Future>>)>
where
    S: Service<Request, Response = (), Error = BoxError>,
{
    let (finish, done) = oneshot::channel();
    let mut future = Box::pin(service.ready().await.ok()?.call((client, done)));
    match future.as_mut().now_or_never() {
        None => Some((finish, future)),
        Some(Err(error)) => {
            assert!(error.is::<Overloaded>(), "refused with Overloaded: {error}");
            None
        }
        Some(Ok(())) => panic!("a request ends only when the test says"),
    }
}

/// Ends the oldest of `held` and waits for its response.
async fn finish_oldest<F: Future<Output = Result<(), BoxError>>>(held: &mut Vec<(Finish, F)>) {
    let (finish, response) = held.remove(0);
    finish.send(()).expect("the request is running");
    response.await.expect("served");
}

#[tokio::test(start_paused = true)]
async fn a_client_sending_ten_times_its_share_leaves_the_other_its_share() {
    const LIMIT: usize = 10;
    const SHARE: usize = LIMIT / 2;
    let (mut service, handle) = keyed(LIMIT as u32, 100);
    let mut flood = Vec::new();
    let mut calm = Vec::new();
    let mut flood_sent = 0;

    // Alone, the flooding client takes every slot: nothing is reserved for others.
    while flood.len() < LIMIT {
        flood.extend(call(&mut service, Some("flood")).await);
        flood_sent += 1;
    }
    assert_eq!(
        flood_sent, LIMIT,
        "no share was reserved while not contended"
    );

    // From now on it keeps ten times its share outstanding: every time one of its
    // requests ends it sends ten more, while the calm client asks for one permit at a
    // time until it holds its share.
    let mut calm_refused = 0;
    for _ in 0..40 {
        for _ in 0..10 * SHARE {
            flood_sent += 1;
            flood.extend(call(&mut service, Some("flood")).await);
        }
        if calm.len() < SHARE {
            match call(&mut service, Some("calm")).await {
                Some(admitted) => calm.push(admitted),
                None => calm_refused += 1,
            }
        }
        assert!(handle.in_flight() as usize <= LIMIT);
        if flood.len() > SHARE {
            finish_oldest(&mut flood).await;
        }
        advance(Duration::from_millis(10)).await;
    }
    assert!(
        calm_refused >= 1,
        "the calm client found the layer full at first"
    );
    assert_eq!(calm.len(), SHARE, "the calm client holds its share");
    assert_eq!(flood.len(), SHARE, "the flood holds its share, no more");
    assert_eq!(handle.in_flight() as usize, LIMIT);
    assert_eq!(handle.active_keys(), 2);
    assert_eq!(handle.tracked_keys(), 2);
    assert!(
        flood_sent > 100 * SHARE,
        "the flood sent far more than its share"
    );

    // The flood asks again while a slot is free: refused, the slot is the calm client's.
    finish_oldest(&mut calm).await;
    assert!(call(&mut service, Some("flood")).await.is_none());
    calm.extend(call(&mut service, Some("calm")).await);
    assert_eq!(calm.len(), SHARE);
}

#[tokio::test(start_paused = true)]
async fn once_contention_lapses_any_key_may_take_the_free_slots() {
    let (mut service, handle) = keyed(4, 100);
    let mut a = Vec::new();
    for _ in 0..4 {
        a.extend(call(&mut service, Some("a")).await);
    }
    // b finds no slot: the layer is contended, and a's share is 2.
    assert!(call(&mut service, Some("b")).await.is_none());
    finish_oldest(&mut a).await;
    finish_oldest(&mut a).await;
    assert!(
        call(&mut service, Some("a")).await.is_none(),
        "a holds its share"
    );
    assert_eq!(handle.in_flight(), 2);

    // Two windows of retry_after (1 s) after the last refusal for want of a slot, the
    // layer is no longer contended: a may take the free slots again.
    advance(Duration::from_millis(2001)).await;
    a.extend(call(&mut service, Some("a")).await);
    a.extend(call(&mut service, Some("a")).await);
    assert_eq!(a.len(), 4, "a took both free slots");
    assert_eq!(handle.active_keys(), 1);
}

#[tokio::test(start_paused = true)]
async fn keys_beyond_max_keys_and_requests_without_a_key_share_one_share() {
    let (mut service, handle) = keyed(6, 2);
    let mut held = Vec::new();
    for client in [Some("a"), Some("b")] {
        held.extend(call(&mut service, client).await);
    }
    assert_eq!(handle.tracked_keys(), 2);
    // The table is full of live keys: c and d, and a request without a key, are the
    // overflow, one more client; still nothing is reserved while not contended.
    for client in [Some("c"), Some("d"), None, Some("a")] {
        held.extend(call(&mut service, client).await);
    }
    assert_eq!(held.len(), 6);
    assert_eq!(handle.tracked_keys(), 2, "never more than max_keys");
    assert_eq!(handle.active_keys(), 3, "a, b and the overflow");

    // Contention: the overflow (through e), a and b are refused for want of a slot, so
    // three keys compete and a share is 2 of 6.
    for client in [Some("e"), Some("a"), Some("b")] {
        assert!(call(&mut service, client).await.is_none());
    }
    // a's two requests end; the overflow holds 3, over its share: refused, whoever
    // asks for it, while b below its share gets a free slot.
    let mut held_a: Vec<_> = vec![held.remove(5), held.remove(0)];
    finish_oldest(&mut held_a).await;
    finish_oldest(&mut held_a).await;
    assert_eq!(handle.in_flight(), 4);
    for client in [Some("f"), None, Some("c")] {
        assert!(call(&mut service, client).await.is_none(), "{client:?}");
    }
    held.extend(call(&mut service, Some("b")).await);
    assert_eq!(handle.in_flight(), 5);
    assert_eq!(handle.tracked_keys(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_idle_key_leaves_the_table_and_makes_room_for_a_new_one() {
    let (mut service, handle) = keyed(4, 1);
    let (finish, response) = call(&mut service, Some("a")).await.expect("admitted");
    assert_eq!(handle.tracked_keys(), 1);
    finish.send(()).unwrap();
    response.await.unwrap();
    // a holds nothing and never asked during contention: b takes its place.
    let _b = call(&mut service, Some("b")).await.expect("admitted");
    assert_eq!(handle.tracked_keys(), 1);
    assert_eq!(handle.active_keys(), 1);
}

#[tokio::test(start_paused = true)]
async fn keyed_permits_come_back_when_responses_are_dropped() {
    let (mut service, handle) = keyed(2, 10);
    let a = call(&mut service, Some("a")).await.expect("admitted");
    let b = call(&mut service, Some("a")).await.expect("admitted");
    assert!(
        call(&mut service, Some("b")).await.is_none(),
        "full: contended"
    );
    assert_eq!((handle.in_flight(), handle.active_keys()), (2, 1));

    // Dropped mid-flight (the client went away): the permit and a's count come back.
    drop(a);
    drop(b.1);
    assert_eq!((handle.in_flight(), handle.active_keys()), (0, 0));
    // a's count is zero again: both keys get their share (1 of 2) at once.
    let _a = call(&mut service, Some("a"))
        .await
        .expect("a below its share");
    let _b = call(&mut service, Some("b"))
        .await
        .expect("b below its share");
    assert_eq!((handle.in_flight(), handle.active_keys()), (2, 2));
    // A refused request holds nothing.
    assert!(call(&mut service, Some("c")).await.is_none());
    assert_eq!(handle.active_keys(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_shares_follow_every_clone_of_the_service() {
    let (service, handle) = keyed(2, 10);
    let mut one = service.clone();
    let mut two = service;
    let _a = call(&mut one, Some("a")).await.expect("admitted");
    let _a2 = call(&mut two, Some("a")).await.expect("admitted");
    assert!(call(&mut one, Some("b")).await.is_none());
    assert_eq!(handle.in_flight(), 2);
    assert_eq!(handle.active_keys(), 1);
}

#[test]
fn invalid_keyed_configurations_are_errors() {
    let zero_keys = ConcurrencyLimitLayer::builder()
        .max_in_flight(4)
        .keyed::<_, &'static str>(client_key)
        .max_keys(0)
        .build();
    assert_eq!(
        zero_keys.unwrap_err(),
        ConcurrencyLimitConfigError::ZeroMaxKeys
    );
    let queued = ConcurrencyLimitLayer::builder()
        .max_in_flight(4)
        .queue(8, Duration::from_secs(1))
        .keyed::<_, &'static str>(client_key)
        .build();
    assert_eq!(queued.unwrap_err(), ConcurrencyLimitConfigError::KeyedQueue);
    // max_keys means nothing to an unkeyed limit.
    let unkeyed = ConcurrencyLimitLayer::builder()
        .max_in_flight(4)
        .max_keys(0)
        .build()
        .unwrap();
    assert_eq!(unkeyed.handle().tracked_keys(), 0);
}

#[cfg(feature = "axum")]
mod server {
    use super::*;
    use axum::Router;
    use axum::error_handling::HandleErrorLayer;
    use axum::routing::get;
    use bytes::Bytes;
    use http::{HeaderName, HeaderValue, StatusCode};
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use palisade::ServiceBuilderExt;
    use palisade::key::Header;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Semaphore;
    use tower::ServiceBuilder;

    /// Holds every request until the test lets it through, counting those inside.
    #[derive(Clone)]
    struct Gate {
        open: Arc<Semaphore>,
        inside: Arc<AtomicUsize>,
    }

    impl Gate {
        fn new() -> Self {
            Self {
                open: Arc::new(Semaphore::new(0)),
                inside: Arc::default(),
            }
        }

        async fn pass(&self) {
            self.inside.fetch_add(1, Ordering::SeqCst);
            self.open.acquire().await.expect("open").forget();
            self.inside.fetch_sub(1, Ordering::SeqCst);
        }

        async fn until_inside(&self, n: usize) {
            while self.inside.load(Ordering::SeqCst) != n {
                tokio::task::yield_now().await;
            }
        }
    }

    type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

    async fn get_as(client: &HttpClient, address: std::net::SocketAddr, key: &str) -> StatusCode {
        let request = http::Request::get(format!("http://{address}/"))
            .header("x-client", key)
            .body(Empty::new())
            .unwrap();
        let response = client.request(request).await.expect("answered");
        let status = response.status();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(response.headers().contains_key(http::header::RETRY_AFTER));
        }
        response.into_body().collect().await.expect("body");
        status
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_axum_server_keyed_on_a_header_keeps_a_share_for_the_quiet_client() {
        const LIMIT: usize = 4;
        let gate = Gate::new();
        let limit = ConcurrencyLimitLayer::builder()
            .max_in_flight(LIMIT as u32)
            // Long windows: contention cannot lapse during the test, whatever the load.
            .retry_after(Duration::from_secs(600))
            .keyed::<_, HeaderValue>(Header::new(HeaderName::from_static("x-client")))
            .build()
            .unwrap();
        let handle = limit.handle();
        let inner = gate.clone();
        let app = Router::new()
            .route(
                "/",
                get(move || {
                    let gate = inner.clone();
                    async move {
                        gate.pass().await;
                        "served"
                    }
                }),
            )
            .layer(
                ServiceBuilder::new()
                    .layer(HandleErrorLayer::new(palisade::axum::handle_error))
                    .concurrency_limiter(limit),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

        // The flooding client fills the server (nothing reserved while not contended)...
        let mut flood = Vec::new();
        for _ in 0..LIMIT {
            let client = client.clone();
            flood.push(tokio::spawn(async move {
                get_as(&client, address, "flood").await
            }));
        }
        gate.until_inside(LIMIT).await;
        // ...so the quiet client is refused at first, and the flood too.
        assert_eq!(
            get_as(&client, address, "quiet").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            get_as(&client, address, "flood").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        // Two of the flood's requests end: it holds 2, its share of 4 between two.
        gate.open.add_permits(2);
        gate.until_inside(LIMIT - 2).await;
        while handle.in_flight() as usize > LIMIT - 2 {
            tokio::task::yield_now().await;
        }
        for _ in 0..20 {
            // Sent aside: were it admitted, it would wait at the gate, and the test
            // would see it inside rather than hang.
            let rejected = handle.rejected();
            let client = client.clone();
            let answer = tokio::spawn(async move { get_as(&client, address, "flood").await });
            while handle.rejected() == rejected && gate.inside.load(Ordering::SeqCst) == LIMIT - 2 {
                tokio::task::yield_now().await;
            }
            assert_eq!(
                gate.inside.load(Ordering::SeqCst),
                LIMIT - 2,
                "the free slots are not the flood's"
            );
            assert_eq!(answer.await.unwrap(), StatusCode::SERVICE_UNAVAILABLE);
        }
        // The quiet client gets its two.
        let mut quiet = Vec::new();
        for _ in 0..2 {
            let client = client.clone();
            quiet.push(tokio::spawn(async move {
                get_as(&client, address, "quiet").await
            }));
        }
        gate.until_inside(LIMIT).await;
        assert_eq!(handle.active_keys(), 2);
        assert_eq!(handle.in_flight() as usize, LIMIT);
        gate.open.add_permits(LIMIT);
        for answer in flood.into_iter().chain(quiet) {
            assert_eq!(answer.await.unwrap(), StatusCode::OK);
        }
        assert_eq!(handle.in_flight(), 0);
        assert_eq!(handle.tracked_keys(), 2);
    }
}
