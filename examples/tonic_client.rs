//! A resilient gRPC client: a generated tonic client over a `Channel` wrapped in retry,
//! a circuit breaker and correlation-ID propagation.
//!
//! Self-contained: it starts a tonic-health server on 127.0.0.1 (rate-limited, so that
//! a burst gets `RESOURCE_EXHAUSTED` with a pushback), calls it, stops it, watches the
//! breaker open, and exits 0 if every step behaved.
//!
//! ```text
//! cargo run --example tonic_client --features tonic
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use palisade::ServiceBuilderExt;
use palisade::circuit_breaker::{CircuitBreakerHandle, CircuitBreakerLayer, SlidingWindow, State};
use palisade::classify::{GrpcCode, GrpcErrorsAsFailures};
use palisade::correlation::{CorrelationId, CorrelationIdLayer};
use palisade::rate_limit::RateLimitLayer;
use palisade::retry::{Backoff, GrpcRetry, Jitter, RetryHandle, RetryLayer};
use palisade::tonic::RejectionsAsStatusLayer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceBuilder};

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => {
            println!("every step behaved as expected");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("tonic_client: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let (address, server) = start_server().await?;
    let (mut client, breaker, retry) = resilient_client(address)?;

    println!("1. a burst of 5 calls; the server admits 2 at once, then one per second");
    let id = CorrelationId::parse("demo-checkout-1")?;
    id.scope(async {
        for call in 1..=5 {
            let response = client.check(check()).await?;
            let echoed = response.metadata().get("x-request-id").cloned();
            let status = ServingStatus::try_from(response.into_inner().status)?;
            println!("   call {call}: {status:?}, x-request-id seen by the server: {echoed:?}");
            if status != ServingStatus::Serving
                || echoed.as_ref().is_none_or(|id| id != "demo-checkout-1")
            {
                return Err::<(), BoxError>("expected SERVING with the caller's ID".into());
            }
        }
        Ok(())
    })
    .await?;
    let metrics = retry.metrics();
    println!(
        "   retries after the server's pushback: {} (calls that needed one: {})",
        metrics.retries, metrics.success_with_retry
    );
    if metrics.retries == 0 {
        return Err("the burst should have been pushed back at least once".into());
    }

    println!("2. the server goes away; the breaker opens and answers at once");
    server.stop().await?;
    let failed = client.check(check()).await.expect_err("no server");
    println!("   call: {:?} ({})", failed.code(), failed.message());
    let started = Instant::now();
    let shed = client.check(check()).await.expect_err("breaker open");
    let pushback = shed.metadata().get("grpc-retry-pushback-ms").cloned();
    println!(
        "   call: {:?} in {:?}, breaker {:?}, grpc-retry-pushback-ms {pushback:?}",
        shed.code(),
        started.elapsed(),
        breaker.state()
    );
    if shed.code() != Code::Unavailable || pushback.is_none() || breaker.state() != State::Open {
        return Err("expected UNAVAILABLE with a pushback from the open breaker".into());
    }
    Ok(())
}

fn check() -> HealthCheckRequest {
    HealthCheckRequest {
        service: "orders".to_owned(),
    }
}

/// What the generated client calls through: boxed, so that it has a name to keep in a
/// struct (and the response body is boxed back into tonic's, which the breaker's gRPC
/// classifier wraps).
type Transport = BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    tonic::Status,
>;

/// The client: `RejectionsAsStatusLayer` outermost, so local rejections come out of
/// the generated client as `Status`es too.
fn resilient_client(
    address: SocketAddr,
) -> Result<(HealthClient<Transport>, CircuitBreakerHandle, RetryHandle), BoxError> {
    let retry = RetryLayer::builder()
        .max_attempts(4)
        .backoff(
            Backoff::exponential(Duration::from_millis(20))
                .max(Duration::from_millis(200))
                .jitter(Jitter::Full),
        )
        // RESOURCE_EXHAUSTED with a pushback is "come back in N ms": worth waiting for.
        .policy(GrpcRetry::new().with_code(GrpcCode::ResourceExhausted))
        // The server's pushback is at most its one-second refill. Longer waits (an open
        // breaker's five seconds) are the caller's business: give up instead.
        .max_server_delay(Duration::from_secs(2))
        .replay_bodies()
        .build()?;
    let breaker = CircuitBreakerLayer::builder()
        .sliding_window(SlidingWindow::count(4))
        .minimum_calls(4)
        .failure_rate_threshold(0.5)
        .open_for(Duration::from_secs(5))
        // Being told to slow down is not the server being unwell.
        .classify(GrpcErrorsAsFailures::new().without_failure(GrpcCode::ResourceExhausted))
        .build()?;
    let (breaker_handle, retry_handle) = (breaker.handle(), retry.handle());
    let channel = Endpoint::from_shared(format!("http://{address}"))?.connect_lazy();
    let transport = ServiceBuilder::new()
        .map_response(|response: http::Response<_>| response.map(tonic::body::Body::new))
        .layer(RejectionsAsStatusLayer::new())
        .retries(retry)
        .map_request(palisade::tonic::into_channel_request)
        .circuit_breaker(breaker)
        .propagate_correlation_id()
        .service(channel);
    Ok((
        HealthClient::new(Transport::new(transport)),
        breaker_handle,
        retry_handle,
    ))
}

/// A running server: stopping it waits until it has closed its connections, so that the
/// next call cannot still reach it.
struct RunningServer {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningServer {
    async fn stop(self) -> Result<(), BoxError> {
        self.stop.send(()).map_err(|()| "server already gone")?;
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .map_err(|_| "the server did not shut down within 5 s")???;
        Ok(())
    }
}

/// A tonic-health server reporting "orders" as serving, behind a rate limit; it echoes
/// each call's `x-request-id`.
async fn start_server() -> Result<(SocketAddr, RunningServer), BoxError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("orders", tonic_health::ServingStatus::Serving)
        .await;
    // A refill far longer than five loopback calls take, even in a debug build on a busy
    // machine: the burst is certain to be pushed back.
    let limit = RateLimitLayer::builder()
        .capacity(2)
        .refill(1, Duration::from_secs(1))
        .build()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(
        Server::builder()
            .layer(
                ServiceBuilder::new()
                    .layer(CorrelationIdLayer::new())
                    .layer(RejectionsAsStatusLayer::new())
                    .rate_limiter(limit),
            )
            .add_service(health)
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stopped.await;
            }),
    );
    Ok((address, RunningServer { stop, task }))
}
