//! Step 7: the gateway sheds load when orders slows down.
//!
//! The gateway's route to a second orders replica (one whose speed the step controls)
//! sits behind an adaptive concurrency limit (AIMD). While the replica answers in a few
//! milliseconds the limit stays put. When it slows to 200 ms and a burst arrives, the
//! requests over the limit get 503 with `Retry-After` at once instead of queueing in
//! front of the slow replica, and every slow round halves the limit. When the replica
//! is fast again, the limit grows back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::routing::get;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade::ServiceBuilderExt;
use palisade::classify::ServerErrorsAsFailures;
use palisade::concurrency_limit::{Aimd, ConcurrencyLimitHandle, ConcurrencyLimitLayer};
use tokio::net::TcpListener;
use tower::{BoxError, ServiceBuilder};

use crate::Report;

const FAST: Duration = Duration::from_millis(5);
const SLOW: Duration = Duration::from_millis(200);
const START_LIMIT: u32 = 16;

/// An orders replica whose answers take `FAST` or, when `slow` is set, `SLOW`.
#[derive(Clone, Default)]
struct Replica {
    slow: Arc<AtomicBool>,
}

async fn list_orders(State(replica): State<Replica>) -> &'static str {
    let delay = if replica.slow.load(Ordering::SeqCst) {
        SLOW
    } else {
        FAST
    };
    tokio::time::sleep(delay).await;
    "[]"
}

struct Shedding {
    gateway: SocketAddr,
    replica: Replica,
    limit: ConcurrencyLimitHandle,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Shedding {
    async fn start() -> Result<Self, BoxError> {
        let replica = Replica::default();
        let backend = serve(
            Router::new()
                .route("/orders", get(list_orders))
                .with_state(replica.clone()),
        )
        .await?;
        let shed = ConcurrencyLimitLayer::builder()
            .aimd(
                Aimd::new()
                    .initial_limit(START_LIMIT)
                    .min_limit(2)
                    .max_limit(64)
                    .backoff_ratio(0.5)
                    // Well above the replica's normal latency, well below its slow one.
                    .latency_threshold(Duration::from_millis(50)),
            )
            .classify(ServerErrorsAsFailures)
            .release_on_body_end()
            .build()?;
        let limit = shed.handle();
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let upstream = client.clone();
        let gateway = serve(
            Router::new()
                .route(
                    "/orders",
                    get(move || {
                        let upstream = upstream.clone();
                        async move { forward(&upstream, backend).await }
                    }),
                )
                .layer(
                    ServiceBuilder::new()
                        .layer(HandleErrorLayer::new(palisade::axum::handle_error))
                        .concurrency_limiter(shed),
                ),
        )
        .await?;
        Ok(Self {
            gateway,
            replica,
            limit,
            client,
        })
    }

    /// `n` concurrent requests through the gateway: each one's status and time.
    async fn burst(&self, n: usize) -> Vec<(StatusCode, Option<String>, Duration)> {
        let calls: Vec<_> = (0..n)
            .map(|_| {
                let client = self.client.clone();
                let uri = format!("http://{}/orders", self.gateway);
                tokio::spawn(async move {
                    let started = Instant::now();
                    let request = Request::get(uri).body(Empty::new()).expect("a request");
                    match client.request(request).await {
                        Ok(response) => {
                            let status = response.status();
                            let retry_after = response
                                .headers()
                                .get("retry-after")
                                .and_then(|value| value.to_str().ok())
                                .map(str::to_owned);
                            let _ = response.into_body().collect().await;
                            (status, retry_after, started.elapsed())
                        }
                        Err(_) => (StatusCode::BAD_GATEWAY, None, started.elapsed()),
                    }
                })
            })
            .collect();
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.expect("a call task"));
        }
        answers
    }
}

async fn forward(client: &Client<HttpConnector, Empty<Bytes>>, backend: SocketAddr) -> StatusCode {
    let request = Request::get(format!("http://{backend}/orders"))
        .body(Empty::new())
        .expect("a request");
    match client.request(request).await {
        Ok(response) => {
            let status = response.status();
            let _ = response.into_body().collect().await;
            status
        }
        Err(_) => StatusCode::BAD_GATEWAY,
    }
}

async fn serve(router: Router) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(address)
}

pub(crate) async fn step(report: &mut Report) {
    report.section("8. orders slows down: the gateway sheds the excess, then recovers");
    let shedding = match Shedding::start().await {
        Ok(shedding) => shedding,
        Err(error) => return report.check(false, format!("could not start: {error}")),
    };

    let calm = shedding.burst(8).await;
    report.check(
        calm.iter().all(|(status, _, _)| *status == StatusCode::OK)
            && shedding.limit.limit() == START_LIMIT,
        format!(
            "8 requests while orders is fast: all 200, the limit stays at {}",
            shedding.limit.limit()
        ),
    );

    shedding.replica.slow.store(true, Ordering::SeqCst);
    let mut limits = vec![shedding.limit.limit()];
    let mut shed = Vec::new();
    let mut served = Vec::new();
    for _ in 0..3 {
        for (status, retry_after, took) in shedding.burst(40).await {
            match status {
                StatusCode::OK => served.push(took),
                StatusCode::SERVICE_UNAVAILABLE => shed.push((retry_after, took)),
                _ => {}
            }
        }
        limits.push(shedding.limit.limit());
    }
    let slowest_shed = shed.iter().map(|(_, took)| *took).max().unwrap_or_default();
    let fastest_served = served.iter().min().copied().unwrap_or_default();
    report.check(
        limits.windows(2).all(|pair| pair[1] < pair[0]),
        format!("three bursts of 40 while orders takes {SLOW:?}: the limit falls {limits:?}"),
    );
    report.check(
        !shed.is_empty()
            && shed
                .iter()
                .all(|(retry_after, _)| retry_after.as_deref() == Some("1"))
            && slowest_shed < SLOW / 2,
        format!(
            "{} requests get 503 + Retry-After: 1 at once (the slowest in {slowest_shed:?}), \
             {} are served (the fastest in {fastest_served:?}): nothing piles up",
            shed.len(),
            served.len()
        ),
    );
    report.check(
        shedding.limit.rejected() == shed.len() as u64,
        format!(
            "the handle counted {} rejections",
            shedding.limit.rejected()
        ),
    );

    shedding.replica.slow.store(false, Ordering::SeqCst);
    let low = shedding.limit.limit();
    let started = Instant::now();
    while shedding.limit.limit() < START_LIMIT && started.elapsed() < Duration::from_secs(10) {
        // Enough at once to use the limit: AIMD grows only a limit in use.
        let _ = shedding.burst(shedding.limit.limit() as usize + 2).await;
    }
    report.check(
        shedding.limit.limit() >= START_LIMIT,
        format!(
            "orders is fast again: the limit grows back from {low} to {} in {:?}",
            shedding.limit.limit(),
            started.elapsed()
        ),
    );
}
