//! A load and fault soak: a real axum server on 127.0.0.1 behind all four layers, a
//! backend that fails and slows down on a schedule, and a real HTTP client (hyper-util)
//! driving bounded load. Prints what it checked and exits non-zero on any breach.
//!
//! ```text
//! cargo run --release --features axum --example soak -- --requests 100000 --concurrency 32
//! ```
//!
//! Checks: every request got exactly one answer before its deadline; the limiter
//! admitted what a reference token bucket replayed over the same arrivals admits (within
//! 1%); the breaker passed exactly what it admitted, and the backend saw exactly those
//! calls plus the retries; retries stayed within the budget; resident memory grew by
//! less than a few MiB; no task outlived the run.
// A command-line check: its exit status is its verdict.
#![allow(clippy::exit)]

use axum::Router;
use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use palisade::circuit_breaker::{CircuitBreakerLayer, SlidingWindow};
use palisade::correlation::CorrelationIdLayer;
use palisade::rate_limit::{RateLimitLayer, RateLimited};
use palisade::retry::{Backoff, Jitter, RetryBudget, RetryLayer};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::{BoxError, Layer, ServiceBuilder, ServiceExt, service_fn};

const CAPACITY: u64 = 200;
const RATE_PER_SEC: u64 = 20_000;
const BUDGET_TTL: Duration = Duration::from_secs(10);
const BUDGET_MIN_PER_SEC: u32 = 10;
const BUDGET_RATIO: f64 = 0.2;
const DEADLINE: Duration = Duration::from_secs(5);
const MAX_RSS_GROWTH: u64 = 8 << 20;

#[derive(Default)]
struct Counters {
    breaker_passed: AtomicU64,
    backend_attempts: AtomicU64,
}

fn args() -> (usize, usize) {
    let mut requests = 100_000;
    let mut concurrency = 32;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().and_then(|value| value.parse().ok());
        match (flag.as_str(), value) {
            ("--requests", Some(n)) => requests = n,
            ("--concurrency", Some(n)) => concurrency = n,
            _ => {
                eprintln!("usage: soak [--requests N] [--concurrency C]");
                std::process::exit(2);
            }
        }
    }
    (requests, concurrency.max(1))
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|pages| pages.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// The backend's schedule, in 400 ms cycles: healthy for 200 ms, then failing half its
/// calls for 100 ms, then slow (5 ms a call) for 100 ms.
async fn backend(
    started: Instant,
    counters: Arc<Counters>,
    n: u64,
) -> Result<Response<Body>, BoxError> {
    counters.backend_attempts.fetch_add(1, Ordering::Relaxed);
    match started.elapsed().as_millis() % 400 {
        0..200 => Ok(Response::new(Body::from("ok"))),
        200..300 if n.is_multiple_of(2) => Err("backend failed".into()),
        200..300 => Ok(Response::new(Body::from("ok"))),
        _ => {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(Response::new(Body::from("slow")))
        }
    }
}

/// What a token bucket of the same quota admits over `arrivals` (sorted).
fn reference_admissions(arrivals: &[Instant], start: Instant) -> u64 {
    let mut tokens = CAPACITY as f64;
    let mut last = start;
    let mut admitted = 0;
    for &at in arrivals {
        let at = at.max(last);
        tokens = (tokens + at.duration_since(last).as_secs_f64() * RATE_PER_SEC as f64)
            .min(CAPACITY as f64);
        last = at;
        if tokens >= 1.0 {
            tokens -= 1.0;
            admitted += 1;
        }
    }
    admitted
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (requests, concurrency) = args();
    let started = Instant::now();
    let counters = Arc::new(Counters::default());
    // Sized and touched up front: growing it during the run would count against the
    // memory check, which is about the layers, not this log.
    let mut log = Vec::with_capacity(requests);
    log.resize(requests, (started, false));
    log.clear();
    let arrivals: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::new(Mutex::new(log));

    let limiter = RateLimitLayer::builder()
        .capacity(CAPACITY)
        .refill(RATE_PER_SEC, Duration::from_secs(1))
        .build()
        .expect("limiter");
    let breaker = CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count(50))
        .minimum_calls(20)
        .failure_rate_threshold(0.3)
        .open_for(Duration::from_millis(50))
        .half_open_probes(5)
        .build()
        .expect("breaker");
    let retry = RetryLayer::builder()
        .max_attempts(3)
        .backoff(
            Backoff::exponential(Duration::from_millis(1))
                .max(Duration::from_millis(10))
                .jitter(Jitter::Full),
        )
        .budget(RetryBudget::new(
            BUDGET_TTL,
            BUDGET_MIN_PER_SEC,
            BUDGET_RATIO,
        ))
        .replay_bodies()
        .build()
        .expect("retry");
    let (limit_handle, breaker_handle, retry_handle) =
        (limiter.handle(), breaker.handle(), retry.handle());

    let backend_counters = counters.clone();
    let calls = Arc::new(AtomicU64::new(0));
    let backend = retry.layer(service_fn(move |_request: Request<_>| {
        let counters = backend_counters.clone();
        let n = calls.fetch_add(1, Ordering::Relaxed);
        backend(started, counters, n)
    }));
    let passed = counters.clone();
    let counted = service_fn(move |request| {
        passed.breaker_passed.fetch_add(1, Ordering::Relaxed);
        backend.clone().oneshot(request)
    });
    let limited = limiter.layer(breaker.layer(counted));
    let log = arrivals.clone();
    let recorded = service_fn(move |request: Request<Body>| {
        let (limited, log) = (limited.clone(), log.clone());
        async move {
            let at = Instant::now();
            let result = limited.oneshot(request).await;
            let refused = matches!(&result, Err(error) if error.is::<RateLimited>());
            log.lock().unwrap().push((at, !refused));
            result
        }
    });
    let app = Router::new().route_service(
        "/",
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(palisade::axum::handle_error))
            .layer(CorrelationIdLayer::new())
            .service(recorded),
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline_tasks = metrics.num_alive_tasks();

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri: http::Uri = format!("http://{address}/").parse().expect("uri");
    let warmup = requests / 10;
    let rss_before = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let statuses: Arc<Mutex<[u64; 6]>> = Arc::default();
    let (lost, late) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, uri, next) = (client.clone(), uri.clone(), next.clone());
            let (statuses, lost, late) = (statuses.clone(), lost.clone(), late.clone());
            let rss_before = rss_before.clone();
            tokio::spawn(async move {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= requests {
                        return;
                    }
                    if index == warmup {
                        rss_before.store(rss_bytes(), Ordering::Relaxed);
                    }
                    let sent = Instant::now();
                    match tokio::time::timeout(DEADLINE, client.get(uri.clone())).await {
                        Err(_) => {
                            late.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(_)) => {
                            lost.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Ok(response)) => {
                            let slot = match response.status() {
                                StatusCode::OK => 0,
                                StatusCode::TOO_MANY_REQUESTS => 1,
                                StatusCode::SERVICE_UNAVAILABLE => 2,
                                StatusCode::INTERNAL_SERVER_ERROR => 3,
                                _ => 4,
                            };
                            let body = http_body_util::BodyExt::collect(response.into_body()).await;
                            let slot = if body.is_err() { 5 } else { slot };
                            if sent.elapsed() > DEADLINE {
                                late.fetch_add(1, Ordering::Relaxed);
                            }
                            statuses.lock().unwrap()[slot] += 1;
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("worker");
    }
    let elapsed = started.elapsed();
    drop(client);

    // Let the connections close, then count what is still alive.
    let mut tasks = metrics.num_alive_tasks();
    for _ in 0..60 {
        if tasks <= baseline_tasks {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        tasks = metrics.num_alive_tasks();
    }
    let rss_after = rss_bytes();
    let rss_before = rss_before.load(Ordering::Relaxed);

    let statuses = *statuses.lock().unwrap();
    let answered: u64 = statuses.iter().sum();
    let (lost, late) = (lost.load(Ordering::Relaxed), late.load(Ordering::Relaxed));
    let mut arrivals = std::mem::take(&mut *arrivals.lock().unwrap());
    arrivals.sort_by_key(|(at, _)| *at);
    let admitted = arrivals.iter().filter(|(_, admitted)| *admitted).count() as u64;
    let times: Vec<_> = arrivals.iter().map(|(at, _)| *at).collect();
    let expected = reference_admissions(&times, started);
    let breaker_passed = counters.breaker_passed.load(Ordering::Relaxed);
    let backend_attempts = counters.backend_attempts.load(Ordering::Relaxed);
    let retry_metrics = retry_handle.metrics();
    let retries = retry_metrics.retries;
    // Within any one ttl the budget allows the reserve plus the ratio of the requests;
    // over a longer run the reserve comes back once per ttl (one more for the slice
    // boundaries), and the refund race may add one retry.
    let windows = 1.0 + (elapsed.as_secs_f64() / BUDGET_TTL.as_secs_f64()).ceil();
    let budget_cap = (BUDGET_MIN_PER_SEC as f64 * BUDGET_TTL.as_secs_f64() * windows
        + BUDGET_RATIO * breaker_passed as f64) as u64
        + 1;

    println!("soak: {requests} requests, concurrency {concurrency}, {elapsed:.2?}");
    println!(
        "  answers: {answered} (200: {}, 429: {}, 503: {}, 500: {}, other: {}, broken body: {}), lost {lost}, past deadline {late}",
        statuses[0], statuses[1], statuses[2], statuses[3], statuses[4], statuses[5]
    );
    println!(
        "  limiter: admitted {admitted}, reference bucket {expected}, tokens left {}",
        limit_handle.available()
    );
    println!(
        "  breaker: passed {breaker_passed} of {admitted} admitted ({} open answers), state {:?}, trips in a row {}",
        statuses[2],
        breaker_handle.state(),
        breaker_handle.metrics().consecutive_trips
    );
    println!(
        "  backend: {backend_attempts} attempts = {breaker_passed} calls + {retries} retries; budget cap {budget_cap}, exhausted {}",
        retry_metrics.budget_exhausted
    );
    println!(
        "  memory: {:.1} MiB after warm-up, {:.1} MiB at the end",
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0
    );
    println!("  tasks: {baseline_tasks} before the load, {tasks} after");

    let mut breaches = Vec::new();
    let mut check = |ok: bool, what: &str| {
        if !ok {
            breaches.push(what.to_owned());
        }
    };
    check(
        answered == requests as u64 && lost == 0 && late == 0,
        "every request got one answer in time",
    );
    check(
        statuses[4] == 0 && statuses[5] == 0,
        "only the expected answers",
    );
    check(
        statuses[1] == requests as u64 - admitted,
        "every refusal by the limiter was a 429",
    );
    check(
        admitted.abs_diff(expected) as f64 <= (expected as f64 * 0.01).max(2.0),
        "limiter within 1% of the bucket",
    );
    check(
        breaker_passed + statuses[2] == admitted,
        "breaker passed or refused every admitted call",
    );
    check(
        backend_attempts == breaker_passed + retries,
        "backend saw the breaker's calls plus the retries",
    );
    check(retries <= budget_cap, "retries within the budget");
    check(
        rss_after.saturating_sub(rss_before) <= MAX_RSS_GROWTH,
        "memory stable",
    );
    check(tasks <= baseline_tasks, "no task leaked");
    server.abort();
    if breaches.is_empty() {
        println!("soak: all checks passed");
    } else {
        for breach in &breaches {
            eprintln!("soak: BREACH: {breach}");
        }
        std::process::exit(1);
    }
}
