//! Live reload of the retry layer: under load, every request's attempts and backoff
//! delays belong to one configuration (a request in flight keeps the options it started
//! with); the budget keeps its balance across a reload; an invalid configuration is
//! refused at its field with the old one still in force.
#![cfg(feature = "serde")]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade::config::{Policies, RetryConfig};
use palisade::retry::{RetryConfigError, RetryEvent, RetryHandle, RetryLayer};
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

fn config(text: &str) -> RetryConfig {
    toml::from_str(text).unwrap_or_else(|error| panic!("{text}\n{error}"))
}

tokio::task_local! {
    /// The request the current task is sending, for the retry observer.
    static REQUEST: u64;
}

/// What each request went through: the attempts the backend saw, and the delays the
/// layer announced before each retry.
#[derive(Debug, Default)]
struct Journal {
    calls: Mutex<HashMap<u64, u32>>,
    delays: Mutex<HashMap<u64, Vec<Duration>>>,
}

impl Journal {
    fn observe(self: &Arc<Self>) -> impl Fn(&RetryEvent) + Send + Sync + use<> {
        let journal = Arc::clone(self);
        move |event: &RetryEvent| {
            let request = REQUEST.try_with(|request| *request).expect("in a request");
            let mut delays = journal.delays.lock().unwrap();
            delays.entry(request).or_default().push(event.delay);
        }
    }

    fn call(&self, request: u64) {
        *self.calls.lock().unwrap().entry(request).or_default() += 1;
    }

    /// The attempts and delays of `request`.
    fn of(&self, request: u64) -> (u32, Vec<Duration>) {
        let calls = self.calls.lock().unwrap().get(&request).copied();
        let delays = self.delays.lock().unwrap().get(&request).cloned();
        (calls.unwrap_or(0), delays.unwrap_or_default())
    }
}

/// A backend that always fails, noting each attempt.
fn failing(
    journal: &Arc<Journal>,
) -> impl Service<u64, Response = (), Error = BoxError, Future: Send> + Clone + Send + use<> {
    let journal = Arc::clone(journal);
    service_fn(move |request: u64| {
        journal.call(request);
        async { Err::<(), BoxError>("unavailable".into()) }
    })
}

const BUDGET: &str = "budget = { ttl = \"10s\", min_per_sec = 1000000, ratio = 0.0 }";
fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_concurrent_load_never_tears_the_policy() {
    // Mixed, they would show: 3 attempts with delays of 2 ms, or 5 with 1 ms.
    let few = config(&format!(
        "max_attempts = 3\nbackoff = {{ kind = \"constant\", base = \"1ms\" }}\n{BUDGET}"
    ));
    let many = config(&format!(
        "max_attempts = 5\nbackoff = {{ kind = \"linear\", base = \"2ms\" }}\n{BUDGET}"
    ));
    let policies = [
        (3, vec![ms(1), ms(1)]),
        (5, vec![ms(2), ms(4), ms(6), ms(8)]),
    ];
    let journal = Arc::new(Journal::default());
    let retry = few
        .build_from(RetryLayer::builder().on_retry(journal.observe()))
        .unwrap();
    let handle = retry.handle();
    let service = retry.layer(failing(&journal));
    let done = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicU64::new(0));
    // A thread of its own; each configuration stays in force until a few requests
    // finish, so that both are exercised and requests start under one and end under the
    // other.
    let reloader = {
        let (done, finished, handle) = (done.clone(), finished.clone(), handle.clone());
        std::thread::spawn(move || {
            for reload in 0..200 {
                let mark = finished.load(Ordering::Relaxed);
                handle
                    .reload(if reload % 2 == 0 { &many } else { &few })
                    .expect("a valid configuration");
                while finished.load(Ordering::Relaxed) < mark + 4 {
                    std::thread::yield_now();
                }
            }
            done.store(true, Ordering::Relaxed);
        })
    };
    let next = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (service, journal) = (service.clone(), journal.clone());
            let (done, finished, next) = (done.clone(), finished.clone(), next.clone());
            let policies = policies.clone();
            tokio::spawn(async move {
                let mut seen = [0u32; 2];
                while !done.load(Ordering::Relaxed) {
                    let request = next.fetch_add(1, Ordering::Relaxed);
                    let result = REQUEST
                        .scope(request, service.clone().oneshot(request))
                        .await;
                    assert!(result.is_err());
                    let observed = journal.of(request);
                    let policy = policies
                        .iter()
                        .position(|policy| *policy == observed)
                        .unwrap_or_else(|| panic!("torn policy: {observed:?}"));
                    seen[policy] += 1;
                    finished.fetch_add(1, Ordering::Relaxed);
                }
                seen
            })
        })
        .collect();
    let mut seen = [0u32; 2];
    for client in clients {
        let [few, many] = client.await.expect("no client panicked");
        seen[0] += few;
        seen[1] += many;
    }
    reloader.join().unwrap();
    assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
    assert_eq!(handle.metrics().budget_exhausted, 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_in_flight_keeps_the_options_it_started_with() {
    let journal = Arc::new(Journal::default());
    let retry = config("max_attempts = 2\nbackoff = { kind = \"constant\", base = \"100ms\" }")
        .build_from(RetryLayer::builder().on_retry(journal.observe()))
        .unwrap();
    let handle = retry.handle();
    // Request 1's first attempt waits for the gate, so that it is in flight during the
    // reload.
    let gate = Arc::new(tokio::sync::Notify::new());
    let backend = {
        let (journal, gate) = (journal.clone(), gate.clone());
        service_fn(move |request: u64| {
            journal.call(request);
            let first = request == 1 && journal.of(1).0 == 1;
            let gate = gate.clone();
            async move {
                if first {
                    gate.notified().await;
                }
                Err::<(), BoxError>("unavailable".into())
            }
        })
    };
    let service = retry.layer(backend);
    let in_flight = tokio::spawn(REQUEST.scope(1, service.clone().oneshot(1)));
    tokio::task::yield_now().await;
    assert_eq!(journal.of(1).0, 1);
    handle
        .reload(&config(
            "max_attempts = 4\nbackoff = { kind = \"constant\", base = \"1s\" }",
        ))
        .unwrap();
    assert_eq!(handle.max_attempts(), 4);
    gate.notify_one();
    assert!(in_flight.await.unwrap().is_err());
    assert_eq!(journal.of(1), (2, vec![ms(100)]));
    // The next request follows the new configuration.
    assert!(REQUEST.scope(2, service.oneshot(2)).await.is_err());
    assert_eq!(journal.of(2), (4, vec![ms(1000); 3]));
}

/// Sends `count` requests that fail once each (one retry apiece, a withdrawal) and one
/// that succeeds (a deposit), for a layer of two attempts.
async fn traffic<S>(service: &S, failures: usize, successes: usize)
where
    S: Service<bool, Response = (), Error = BoxError> + Clone,
{
    for _ in 0..failures {
        let _ = service.clone().oneshot(true).await;
    }
    for _ in 0..successes {
        service.clone().oneshot(false).await.unwrap();
    }
}

fn two_attempts(
    budget: &str,
) -> (
    RetryHandle,
    impl Service<bool, Response = (), Error = BoxError> + Clone,
) {
    let retry = config(&format!(
        "max_attempts = 2\nbackoff = {{ kind = \"constant\", base = \"1ms\" }}\n{budget}"
    ))
    .build()
    .unwrap();
    let handle = retry.handle();
    // `true` fails every attempt; `false` succeeds.
    let backend = service_fn(|fails: bool| async move {
        if fails {
            Err::<(), BoxError>("unavailable".into())
        } else {
            Ok(())
        }
    });
    (handle, retry.layer(backend))
}

#[tokio::test(start_paused = true)]
async fn the_budget_keeps_its_balance_across_a_reload() {
    let (handle, service) =
        two_attempts("budget = { ttl = \"10s\", min_per_sec = 1, ratio = 0.0 }");
    assert_eq!(handle.budget_available(), 10);
    traffic(&service, 4, 0).await;
    assert_eq!(handle.budget_available(), 6);
    let reload = |budget: &str| {
        handle
            .reload(&config(&format!(
                "max_attempts = 2\nbackoff = {{ kind = \"constant\", base = \"1ms\" }}\n{budget}"
            )))
            .unwrap();
    };
    // A larger reserve; the four retries spent stay spent.
    reload("budget = { ttl = \"10s\", min_per_sec = 2, ratio = 0.0 }");
    assert_eq!(handle.budget_available(), 16);
    // A ratio: nothing earned before it, one retry per request from now on.
    reload("budget = { ttl = \"10s\", min_per_sec = 2, ratio = 1.0 }");
    assert_eq!(handle.budget_available(), 16);
    traffic(&service, 0, 3).await;
    assert_eq!(handle.budget_available(), 19);
    // No reserve: what the old one lent is owed, and nothing is retried meanwhile.
    reload("budget = { ttl = \"10s\", min_per_sec = 0, ratio = 0.0 }");
    assert_eq!(handle.budget_available(), 0);
    traffic(&service, 2, 0).await;
    assert_eq!(handle.metrics().budget_exhausted, 2);
    // A ttl later every amount has expired: the reserve alone (none) is left. A
    // configuration without a budget gets the default one (10 a second for 10 s).
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(handle.budget_available(), 0);
    reload("");
    assert_eq!(handle.budget_available(), 100);
}

#[tokio::test(start_paused = true)]
async fn a_shorter_ttl_expires_what_the_budget_holds_sooner() {
    let (handle, service) =
        two_attempts("budget = { ttl = \"60s\", min_per_sec = 0, ratio = 1.0 }");
    traffic(&service, 0, 10).await;
    assert_eq!(handle.budget_available(), 10);
    handle
        .reload(&config(
            "max_attempts = 2\nbudget = { ttl = \"1s\", min_per_sec = 0, ratio = 1.0 }",
        ))
        .unwrap();
    // The deposits keep their place in the window, which now spans a second.
    assert_eq!(handle.budget_available(), 10);
    tokio::time::advance(Duration::from_millis(1_100)).await;
    assert_eq!(handle.budget_available(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_invalid_reload_is_refused_at_its_field_and_the_old_one_holds() {
    let original = "max_attempts = 4\nbudget = { ttl = \"10s\", min_per_sec = 1, ratio = 0.5 }";
    let retry = config(original).build().unwrap();
    let handle = retry.handle();
    let refusals: [(&str, &str); 10] = [
        ("max_attempts = 0", "max_attempts"),
        (
            "backoff = { base = \"1s\", multiplier = 0.5 }",
            "backoff.multiplier",
        ),
        ("backoff = { base = \"1s\", max = \"10ms\" }", "backoff.max"),
        (
            "backoff = { base = \"1s\", jitter = { proportional = 2.0 } }",
            "backoff.jitter",
        ),
        (
            "budget = { ttl = \"0s\", min_per_sec = 1, ratio = 0.1 }",
            "budget.ttl",
        ),
        (
            "budget = { ttl = \"10s\", min_per_sec = 2000000, ratio = 0.1 }",
            "budget.min_per_sec",
        ),
        (
            "budget = { ttl = \"10s\", min_per_sec = 1, ratio = -1.0 }",
            "budget.ratio",
        ),
        (
            "budget = { ttl = \"10s\", min_per_sec = 1, ratio = nan }",
            "budget.ratio",
        ),
        ("per_attempt_timeout = \"0s\"", "per_attempt_timeout"),
        ("deadline = \"0s\"", "deadline"),
    ];
    for (text, path) in refusals {
        let refused = handle.reload(&config(text)).unwrap_err();
        // Exactly what building it would say.
        let built = config(text).build().unwrap_err();
        assert_eq!(refused.path(), path, "{text}");
        assert_eq!(refused.to_string(), built.to_string(), "{text}");
        assert!(refused.error().is::<RetryConfigError>(), "{text}");
    }
    assert_eq!(handle.max_attempts(), 4);
    assert_eq!(handle.budget_available(), 10);
}

#[tokio::test(start_paused = true)]
async fn a_document_reload_names_its_place() {
    let policies: Policies =
        toml::from_str("[retries.idempotent]\nmax_attempts = 3\n[retries.bad]\nmax_attempts = 0")
            .unwrap();
    let handle = policies.retry("idempotent").unwrap().handle();
    let refused = policies.reload_retry("bad", &handle).unwrap_err();
    assert_eq!(refused.path(), "retries.bad.max_attempts");
    let missing = policies.reload_retry("polling", &handle).unwrap_err();
    assert_eq!(missing.to_string(), "retries.polling: no such policy");
    let more: Policies = toml::from_str("[retries.idempotent]\nmax_attempts = 6").unwrap();
    more.reload_retry("idempotent", &handle).unwrap();
    assert_eq!(handle.max_attempts(), 6);
}
