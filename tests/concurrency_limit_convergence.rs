//! Convergence of the adaptive limits, on paused time, against a simulated backend: `C`
//! workers, each request taking `SERVICE` of one worker's time, requests beyond `C`
//! queueing for a worker (so latency grows with concurrency). Open-loop load at five
//! times the backend's capacity. From a limit far above and far below `C`, each
//! algorithm settles within a stated band; the admitted requests keep their latency
//! (p99 within twice the unloaded latency) and the goodput stays near capacity.
//!
//! The figures are printed: `cargo test --all-features --test concurrency_limit_convergence -- --nocapture`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade::concurrency_limit::{Aimd, ConcurrencyLimitHandle, ConcurrencyLimitLayer, Gradient};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceExt};

/// The backend's workers.
const C: u32 = 10;
/// One request's time on a worker: the unloaded latency.
const SERVICE: Duration = Duration::from_millis(20);
/// How long the load runs, and the part of it at the end that is judged settled.
const RUN: Duration = Duration::from_secs(12);
const SETTLED: Duration = Duration::from_secs(6);

#[derive(Debug)]
struct Figures {
    name: String,
    /// The limit over the settled part: least, mean, most.
    limit: (u32, f64, u32),
    /// Admitted requests' latency over the settled part, in units of `SERVICE`.
    p50: f64,
    p99: f64,
    /// Requests completed per second over the settled part, as a share of capacity.
    goodput: f64,
    /// The share of requests refused over the settled part.
    shed: f64,
}

/// Runs `load` times the backend's capacity through `layer` for `RUN`.
async fn simulate(name: &str, layer: ConcurrencyLimitLayer, load: f64) -> Figures {
    let handle = layer.handle();
    let service = layer.layer(backend());
    let start = Instant::now();
    let settled_from = start + RUN - SETTLED;
    // (admitted, finished at, latency) per request.
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let limits = Arc::new(Mutex::new(Vec::new()));
    let sampler = tokio::spawn(sample_limit(
        handle.clone(),
        limits.clone(),
        settled_from,
        start + RUN,
    ));
    let capacity_per_sec = f64::from(C) / SERVICE.as_secs_f64();
    let gap = Duration::from_secs_f64(1.0 / (capacity_per_sec * load));
    let mut next = start;
    let mut tasks = Vec::new();
    while next < start + RUN {
        tokio::time::sleep_until(next).await;
        let service = service.clone();
        let outcomes = outcomes.clone();
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let result = service.oneshot(()).await;
            let finished = Instant::now();
            outcomes
                .lock()
                .unwrap()
                .push((result.is_ok(), finished, finished - sent));
        }));
        next += gap;
    }
    for task in tasks {
        task.await.unwrap();
    }
    sampler.await.unwrap();
    figures(
        name,
        &outcomes.lock().unwrap(),
        &limits.lock().unwrap(),
        settled_from,
        capacity_per_sec,
    )
}

type BackendFuture = std::pin::Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

/// `C` workers: a request waits for one (first come, first served), then takes
/// `SERVICE` of its time.
#[derive(Clone)]
struct Backend(Arc<Semaphore>);

impl Service<()> for Backend {
    type Response = ();
    type Error = BoxError;
    type Future = BackendFuture;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, (): ()) -> BackendFuture {
        let workers = self.0.clone();
        Box::pin(async move {
            let _worker = workers.acquire().await?;
            tokio::time::sleep(SERVICE).await;
            Ok(())
        })
    }
}

fn backend() -> Backend {
    Backend(Arc::new(Semaphore::new(C as usize)))
}

async fn sample_limit(
    handle: ConcurrencyLimitHandle,
    limits: Arc<Mutex<Vec<u32>>>,
    from: Instant,
    until: Instant,
) {
    tokio::time::sleep_until(from).await;
    while Instant::now() < until {
        limits.lock().unwrap().push(handle.limit());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn figures(
    name: &str,
    outcomes: &[(bool, Instant, Duration)],
    limits: &[u32],
    settled_from: Instant,
    capacity_per_sec: f64,
) -> Figures {
    let until = settled_from + SETTLED;
    let settled: Vec<_> = outcomes
        .iter()
        .filter(|(_, at, _)| *at >= settled_from && *at < until)
        .collect();
    let mut latencies: Vec<Duration> = settled.iter().filter(|o| o.0).map(|o| o.2).collect();
    latencies.sort();
    let percentile = |p: f64| {
        let rank = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
        latencies[rank - 1].as_secs_f64() / SERVICE.as_secs_f64()
    };
    let goodput = latencies.len() as f64 / SETTLED.as_secs_f64() / capacity_per_sec;
    let shed = settled.iter().filter(|o| !o.0).count() as f64 / settled.len() as f64;
    let figures = Figures {
        name: name.to_owned(),
        limit: (
            *limits.iter().min().unwrap(),
            limits.iter().map(|&l| f64::from(l)).sum::<f64>() / limits.len() as f64,
            *limits.iter().max().unwrap(),
        ),
        p50: percentile(0.5),
        p99: percentile(0.99),
        goodput,
        shed,
    };
    println!(
        "{:<34} limit {:>3}..{:>3} (mean {:>5.1}) for c = {C}; admitted p50 {:.2}x p99 {:.2}x unloaded; goodput {:>5.1}% of capacity; shed {:>4.1}%",
        figures.name,
        figures.limit.0,
        figures.limit.2,
        figures.limit.1,
        figures.p50,
        figures.p99,
        figures.goodput * 100.0,
        figures.shed * 100.0,
    );
    figures
}

fn aimd(initial: u32) -> ConcurrencyLimitLayer {
    ConcurrencyLimitLayer::builder()
        .aimd(
            Aimd::new()
                .initial_limit(initial)
                .max_limit(1000)
                .latency_threshold(SERVICE * 3 / 2),
        )
        .build()
        .unwrap()
}

fn gradient(initial: u32) -> ConcurrencyLimitLayer {
    ConcurrencyLimitLayer::builder()
        .gradient(
            Gradient::new()
                .initial_limit(initial)
                .min_limit(1)
                .max_limit(1000),
        )
        .build()
        .unwrap()
}

/// The band every algorithm must settle in, and what the admitted requests must see.
fn assert_settled(figures: &Figures, band: (u32, u32)) {
    let (least, _, most) = figures.limit;
    assert!(
        least >= band.0 && most <= band.1,
        "{}: the limit ranged {least}..{most}, outside {band:?}",
        figures.name
    );
    assert!(
        figures.p99 <= 2.0,
        "{}: admitted p99 {:.2}x unloaded",
        figures.name,
        figures.p99
    );
    assert!(
        figures.goodput >= 0.9,
        "{}: goodput {:.2} of capacity",
        figures.name,
        figures.goodput
    );
}

#[tokio::test(start_paused = true)]
async fn aimd_settles_from_far_above_and_far_below() {
    let band = (C * 8 / 10, C * 3 / 2);
    assert_settled(
        &simulate("AIMD from 20c, 5x overload", aimd(20 * C), 5.0).await,
        band,
    );
    assert_settled(
        &simulate("AIMD from 1, 5x overload", aimd(1), 5.0).await,
        band,
    );
}

#[tokio::test(start_paused = true)]
async fn gradient_settles_from_far_above_and_far_below() {
    let band = (C, 2 * C);
    assert_settled(
        &simulate("Gradient from 20c, 5x overload", gradient(20 * C), 5.0).await,
        band,
    );
    assert_settled(
        &simulate("Gradient from 1, 5x overload", gradient(1), 5.0).await,
        band,
    );
}

#[tokio::test(start_paused = true)]
async fn without_a_limit_the_queue_grows_without_bound() {
    // The baseline the figures above are measured against: the same load with a static
    // limit far above capacity lets the backend's queue, and every request's latency,
    // grow for as long as the overload lasts.
    let layer = ConcurrencyLimitLayer::builder()
        .max_in_flight(100_000)
        .build()
        .unwrap();
    let figures = simulate("no effective limit, 5x overload", layer, 5.0).await;
    assert!(figures.p99 > 10.0, "p99 {:.2}x", figures.p99);
}
