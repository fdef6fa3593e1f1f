//! Live reload of the concurrency limit: a new configuration applies atomically under
//! load (no refusal carries the limit of one configuration with the answer or the shadow
//! switch of another), the limit and an adaptive estimate carry over as documented,
//! shadow mode flips both ways for the next request, the queue follows the new options
//! for new waiters only, and an invalid or unreloadable configuration is refused at its
//! field with the old one still in force.
#![cfg(feature = "serde")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use palisade::concurrency_limit::{
    ConcurrencyLimitConfigError, ConcurrencyLimitHandle, Overloaded,
};
use palisade::config::{ConcurrencyLimitConfig, ConfigError, NotReloadable, Policies};
use tokio::sync::oneshot;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

fn config(text: &str) -> ConcurrencyLimitConfig {
    toml::from_str(text).unwrap_or_else(|error| panic!("{text}\n{error}"))
}

fn overloaded(error: &BoxError) -> &Overloaded {
    error.downcast_ref::<Overloaded>().expect("Overloaded")
}

/// A backend that answers each request once its sender fires (or is dropped).
fn gated()
-> impl Service<oneshot::Receiver<()>, Response = (), Error = BoxError, Future: Send> + Clone {
    service_fn(|done: oneshot::Receiver<()>| async move {
        let _ = done.await;
        Ok::<_, BoxError>(())
    })
}

/// A request held in flight until its sender fires.
struct Held {
    finish: oneshot::Sender<()>,
    response: tokio::task::JoinHandle<Result<(), BoxError>>,
}

impl Held {
    async fn finish(self) -> Result<(), BoxError> {
        let _ = self.finish.send(());
        self.response.await.expect("no panic")
    }
}

/// Sends a request that stays in flight (or in the queue) until released.
async fn hold<S>(service: &mut S) -> Held
where
    S: Service<oneshot::Receiver<()>, Response = (), Error = BoxError> + Send,
    S::Future: Send + 'static,
{
    let (finish, done) = oneshot::channel();
    let future = service.ready().await.expect("ready").call(done);
    let response = tokio::spawn(future);
    // Let the spawned future reach the backend (or the queue).
    tokio::task::yield_now().await;
    Held { finish, response }
}

/// Sends a request that the backend answers at once.
async fn send<S>(service: &mut S) -> Result<(), BoxError>
where
    S: Service<oneshot::Receiver<()>, Response = (), Error = BoxError>,
{
    let (finish, done) = oneshot::channel();
    drop(finish);
    service.ready().await?.call(done).await
}

/// A backend that takes a few polls, so that requests overlap.
async fn yielding(_: ()) -> Result<(), BoxError> {
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    Ok(())
}

// Two enforcing configurations and a shadow one; mixed, they would show: a refusal with
// a limit of 4 and 1 s, or of 2 and 2 s, or one under the shadow configuration's limit.
const TIGHT: &str = "max_in_flight = 2\nretry_after = \"1s\"";
const SHADOW: &str = "max_in_flight = 6\nretry_after = \"3s\"\nshadow = true";
const MIDDLE: &str = "max_in_flight = 4\nretry_after = \"2s\"";
const RELOADS: usize = 600;
const REFUSALS: [(u32, Duration); 2] = [(2, Duration::from_secs(1)), (4, Duration::from_secs(2))];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_concurrent_load_never_tears_the_policy() {
    let limit = config(TIGHT).build().unwrap();
    let handle = limit.handle();
    let service = limit.layer(service_fn(yielding));
    let configs = [config(SHADOW), config(MIDDLE), config(TIGHT)];
    let done = Arc::new(AtomicBool::new(false));
    // Requests decided so far: each configuration stays in force for a few dozen, so
    // that every one of them, the shadow one included, decides some.
    let decided = Arc::new(AtomicU64::new(0));
    // A thread of its own, so that the runtime's scheduling cannot starve it.
    let reloader = {
        let (done, handle, decided) = (done.clone(), handle.clone(), decided.clone());
        std::thread::spawn(move || {
            for reload in 0..RELOADS {
                let mark = decided.load(Ordering::Relaxed);
                handle
                    .reload(&configs[reload % configs.len()])
                    .expect("a valid configuration");
                while decided.load(Ordering::Relaxed) < mark + 8 {
                    std::thread::yield_now();
                }
            }
            // The clients stop once every reload has had its requests.
            done.store(true, Ordering::Relaxed);
        })
    };
    let refused = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (service, refused, decided) = (service.clone(), refused.clone(), decided.clone());
            let done = done.clone();
            tokio::spawn(async move {
                let mut admitted = 0u64;
                while !done.load(Ordering::Relaxed) {
                    let response = service.clone().oneshot(()).await;
                    decided.fetch_add(1, Ordering::Relaxed);
                    match response {
                        Ok(()) => admitted += 1,
                        Err(error) => {
                            let overloaded = overloaded(&error);
                            let policy = (overloaded.limit(), overloaded.retry_after());
                            assert!(REFUSALS.contains(&policy), "torn policy: {policy:?}");
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                admitted
            })
        })
        .collect();
    let mut admitted = 0;
    for client in clients {
        admitted += client.await.expect("no client panicked");
    }
    reloader.join().unwrap();
    let refused = refused.load(Ordering::Relaxed);
    // Every refusal seen was counted as one, and the shadow configuration let some
    // through that it counted instead.
    assert_eq!(handle.rejected(), refused);
    assert!(
        admitted > 0 && refused > 0 && handle.shadow_rejected() > 0,
        "{admitted} admitted, {refused} refused, {} let through",
        handle.shadow_rejected()
    );
}

#[tokio::test(start_paused = true)]
async fn a_lower_limit_keeps_the_permits_held_and_refuses_until_below_it() {
    let limit = config("max_in_flight = 3").build().unwrap();
    let handle = limit.handle();
    let mut service = limit.layer(gated());
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(hold(&mut service).await);
    }
    handle.reload(&config("max_in_flight = 1")).unwrap();
    assert_eq!((handle.limit(), handle.in_flight()), (1, 3));
    let error = send(&mut service).await.unwrap_err();
    assert_eq!(overloaded(&error).limit(), 1);
    // Two finish: still one in flight, at the new limit.
    for request in held.drain(..2) {
        request.finish().await.unwrap();
    }
    assert!(send(&mut service).await.is_err());
    held.pop().unwrap().finish().await.unwrap();
    send(&mut service).await.unwrap();
    assert_eq!(handle.rejected(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_higher_limit_lets_queued_requests_in() {
    let limit = config("max_in_flight = 1\nqueue = { waiters = 5, max_wait = \"10s\" }")
        .build()
        .unwrap();
    let handle = limit.handle();
    let mut service = limit.layer(gated());
    let first = hold(&mut service).await;
    let waiting = [hold(&mut service).await, hold(&mut service).await];
    assert_eq!((handle.in_flight(), handle.queued()), (1, 2));
    handle
        .reload(&config(
            "max_in_flight = 3\nqueue = { waiters = 5, max_wait = \"10s\" }",
        ))
        .unwrap();
    assert_eq!((handle.in_flight(), handle.queued()), (3, 0));
    for request in waiting {
        request.finish().await.unwrap();
    }
    first.finish().await.unwrap();
    assert_eq!(handle.rejected(), 0);
}

#[tokio::test(start_paused = true)]
async fn shadow_mode_flips_both_ways_for_the_next_request() {
    let limit = config("max_in_flight = 1").build().unwrap();
    let handle = limit.handle();
    let mut service = limit.layer(gated());
    let held = hold(&mut service).await;
    assert!(send(&mut service).await.is_err());

    handle
        .reload(&config("max_in_flight = 1\nshadow = true"))
        .unwrap();
    assert!(handle.is_shadow());
    send(&mut service).await.expect("let through");
    assert_eq!((handle.rejected(), handle.shadow_rejected()), (1, 1));
    // What it let through held no place under the limit.
    assert_eq!(handle.in_flight(), 1);

    handle.reload(&config("max_in_flight = 1")).unwrap();
    assert!(!handle.is_shadow());
    assert!(send(&mut service).await.is_err());
    assert_eq!((handle.rejected(), handle.shadow_rejected()), (2, 1));
    held.finish().await.unwrap();
    send(&mut service).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_adaptive_estimate_is_clamped_and_another_kind_starts_afresh() {
    let limit = config("aimd = { initial_limit = 50, max_limit = 100 }")
        .build()
        .unwrap();
    let handle = limit.handle();
    // The same algorithm: the estimate carries, clamped into the new bounds; a new
    // initial limit only counts at a start.
    handle
        .reload(&config("aimd = { initial_limit = 5, max_limit = 30 }"))
        .unwrap();
    assert_eq!(handle.limit(), 30);
    handle
        .reload(&config(
            "aimd = { initial_limit = 60, min_limit = 40, max_limit = 200 }",
        ))
        .unwrap();
    assert_eq!(handle.limit(), 40);
    // Another kind of algorithm starts from its starting limit (a gradient measures its
    // minimum RTT first, at its minimum).
    handle
        .reload(&config("gradient = { min_limit = 7, initial_limit = 20 }"))
        .unwrap();
    assert_eq!(handle.limit(), 7);
    handle.reload(&config("max_in_flight = 12")).unwrap();
    assert_eq!(handle.limit(), 12);
    // No limit in the configuration: the limit stays as it is.
    handle.reload(&config("retry_after = \"2s\"")).unwrap();
    assert_eq!(handle.limit(), 12);
    handle
        .reload(&config("aimd = { initial_limit = 9 }"))
        .unwrap();
    assert_eq!(handle.limit(), 9);
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_keeps_the_wait_and_answer_it_was_queued_under() {
    let limit = config(
        "max_in_flight = 1\nretry_after = \"1s\"\nqueue = { waiters = 1, max_wait = \"100ms\" }",
    )
    .build()
    .unwrap();
    let handle = limit.handle();
    let mut service = limit.layer(gated());
    let first = hold(&mut service).await;
    let old = hold(&mut service).await;
    handle
        .reload(&config(
            "max_in_flight = 1\nretry_after = \"5s\"\nqueue = { waiters = 2, max_wait = \"10s\" }",
        ))
        .unwrap();
    // The new queue has a second place, with the new wait.
    let new = hold(&mut service).await;
    assert_eq!(handle.queued(), 2);
    tokio::time::advance(Duration::from_millis(150)).await;
    let error = old.response.await.unwrap().unwrap_err();
    assert_eq!(overloaded(&error).retry_after(), Duration::from_secs(1));
    assert_eq!(handle.queued(), 1);
    // Without a queue, a newcomer is refused at once; the waiter left keeps its place.
    handle
        .reload(&config("max_in_flight = 1\nretry_after = \"5s\""))
        .unwrap();
    let error = send(&mut service).await.unwrap_err();
    assert_eq!(overloaded(&error).retry_after(), Duration::from_secs(5));
    first.finish().await.unwrap();
    new.finish().await.unwrap();
    assert_eq!((handle.in_flight(), handle.queued()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn an_invalid_reload_is_refused_at_its_field_and_the_old_one_holds() {
    let limit = config("max_in_flight = 1\nretry_after = \"1s\"")
        .build()
        .unwrap();
    let handle = limit.handle();
    let mut service = limit.layer(gated());
    let refusals: [(&str, &str); 9] = [
        ("max_in_flight = 0", "max_in_flight"),
        ("max_in_flight = 4294967295", "max_in_flight"),
        ("max_in_flight = 2\naimd = {}", "aimd"),
        ("aimd = { backoff_ratio = 2.0 }", "aimd.backoff_ratio"),
        ("aimd = { min_limit = 5, initial_limit = 2 }", "aimd"),
        ("gradient = { percentile = 0.0 }", "gradient.percentile"),
        ("max_in_flight = 2\nretry_after = \"0s\"", "retry_after"),
        (
            "max_in_flight = 2\nqueue = { waiters = 0, max_wait = \"1s\" }",
            "queue.waiters",
        ),
        (
            "max_in_flight = 2\nqueue = { waiters = 1, max_wait = \"0s\" }",
            "queue.max_wait",
        ),
    ];
    for (text, path) in refusals {
        let refused = handle.reload(&config(text)).unwrap_err();
        // Exactly what building it would say.
        let built = config(text).build().unwrap_err();
        assert_eq!(refused.path(), path, "{text}");
        assert_eq!(refused.to_string(), built.to_string(), "{text}");
    }
    assert_eq!((handle.limit(), handle.is_shadow()), (1, false));
    let held = hold(&mut service).await;
    let error = send(&mut service).await.unwrap_err();
    assert_eq!(overloaded(&error).retry_after(), Duration::from_secs(1));
    held.finish().await.unwrap();
}

fn not_reloadable(error: &ConfigError) -> &NotReloadable {
    error
        .error()
        .downcast_ref::<NotReloadable>()
        .unwrap_or_else(|| panic!("not a NotReloadable: {error}"))
}

fn keyed(text: &str) -> ConcurrencyLimitHandle {
    config(text)
        .build_keyed::<_, u32>(|request: &u32| Some(*request))
        .unwrap()
        .handle()
}

#[tokio::test(start_paused = true)]
async fn what_shapes_a_keyed_limit_is_refused_at_its_field() {
    let global = config("max_in_flight = 4").build().unwrap().handle();
    let keyed = keyed("max_in_flight = 4\nretry_after = \"1s\"\nkeyed = { max_keys = 10 }");
    let refusals = [
        (&global, "max_in_flight = 4\nkeyed = {}", "keyed", None),
        (
            &keyed,
            "max_in_flight = 4\nretry_after = \"1s\"",
            "keyed",
            None,
        ),
        (
            &keyed,
            "max_in_flight = 4\nretry_after = \"1s\"\nkeyed = {}",
            "keyed.max_keys",
            Some("10"),
        ),
        (
            &keyed,
            "max_in_flight = 4\nretry_after = \"2s\"\nkeyed = { max_keys = 10 }",
            "retry_after",
            Some("1s"),
        ),
    ];
    for (handle, text, path, was) in refusals {
        let refused = handle.reload(&config(text)).unwrap_err();
        assert_eq!(refused.path(), path, "{text}");
        let fixed = not_reloadable(&refused);
        if let Some(was) = was {
            assert_eq!(fixed.was, was, "{text}");
        }
    }
    // A queue on a keyed limit is the builder's own refusal.
    let refused = keyed
        .reload(&config(
            "max_in_flight = 4\nretry_after = \"1s\"\nkeyed = { max_keys = 10 }\nqueue = { waiters = 1, max_wait = \"1s\" }",
        ))
        .unwrap_err();
    assert_eq!(refused.path(), "queue");
    assert!(matches!(
        refused.error().downcast_ref(),
        Some(ConcurrencyLimitConfigError::KeyedQueue)
    ));
    assert_eq!(keyed.limit(), 4);
    // What may change does: the limit and shadow mode of the keyed one, the answer of the
    // global one.
    keyed
        .reload(&config(
            "max_in_flight = 8\nretry_after = \"1s\"\nshadow = true\nkeyed = { max_keys = 10 }",
        ))
        .unwrap();
    assert_eq!((keyed.limit(), keyed.is_shadow()), (8, true));
    global
        .reload(&config("max_in_flight = 4\nretry_after = \"3s\""))
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_document_reload_names_its_place() {
    let policies: Policies = toml::from_str(
        "[concurrency.api]\nmax_in_flight = 8\n[concurrency.bad]\nmax_in_flight = 0",
    )
    .unwrap();
    let handle = policies.concurrency_limit("api").unwrap().handle();
    let refused = policies
        .reload_concurrency_limit("bad", &handle)
        .unwrap_err();
    assert_eq!(refused.path(), "concurrency.bad.max_in_flight");
    let missing = policies
        .reload_concurrency_limit("checkout", &handle)
        .unwrap_err();
    assert_eq!(missing.to_string(), "concurrency.checkout: no such policy");
    let tighter: Policies = toml::from_str("[concurrency.api]\nmax_in_flight = 2").unwrap();
    tighter.reload_concurrency_limit("api", &handle).unwrap();
    assert_eq!(handle.limit(), 2);
}
