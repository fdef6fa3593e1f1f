//! The smallest useful axum server with palisade: correlation IDs, a per-client rate
//! limit and a circuit breaker, every rejection answered by one line.
//!
//! ```text
//! cargo run --example axum_server --features axum            # serves 127.0.0.1:3000
//! cargo run --example axum_server --features axum -- 8080    # another port
//! cargo run --example axum_server --features axum -- --once  # serve, call itself, exit
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::routing::get;
use palisade::ServiceBuilderExt;
use palisade::circuit_breaker::CircuitBreakerLayer;
use palisade::classify::ServerErrorsAsFailures;
use palisade::correlation::CorrelationId;
use palisade::rate_limit::RateLimitLayer;
use palisade::rate_limit::key::PeerIp;
use tower::{BoxError, ServiceBuilder};

/// Requests a client may burst; then one a second.
const BURST: u64 = 5;

fn app() -> Result<Router, BoxError> {
    let per_client = RateLimitLayer::builder()
        .capacity(BURST)
        .refill(1, Duration::from_secs(1))
        .keyed(PeerIp) // needs `into_make_service_with_connect_info`, below
        .build()?;
    let breaker = CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .minimum_calls(10)
        .open_for(Duration::from_secs(10))
        .classify(ServerErrorsAsFailures) // a 5xx answer is a failure, not only an `Err`
        .build()?;
    Ok(Router::new().route("/", get(hello)).layer(
        ServiceBuilder::new()
            .correlation_id() // outermost: rejections carry the ID too
            .layer(HandleErrorLayer::new(palisade::axum::handle_error))
            .rate_limiter(per_client)
            .circuit_breaker(breaker),
    ))
}

async fn hello(id: CorrelationId) -> String {
    format!("hello, request {id}\n")
}

#[tokio::main]
async fn main() -> ExitCode {
    let once = std::env::args().any(|arg| arg == "--once");
    let port = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse::<u16>().ok())
        .unwrap_or(if once { 0 } else { 3000 });
    match run(port, once).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("axum_server: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(port: u16, once: bool) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let address = listener.local_addr()?;
    let service = app()?.into_make_service_with_connect_info::<SocketAddr>();
    let server = tokio::spawn(async move { axum::serve(listener, service).await });
    println!("listening on http://{address}");
    println!("  curl -i http://{address}/");
    println!("  curl -i -H 'x-request-id: my-trace-1' http://{address}/");
    println!(
        "  for i in $(seq 1 {}); do curl -s -o /dev/null -w '%{{http_code}}\\n' http://{address}/; done",
        BURST + 2
    );
    if once {
        return call_itself(address).await;
    }
    server.await??;
    Ok(())
}

/// Sends a burst over the limit and checks the answers: `BURST` times 200 with an ID,
/// then 429 with `Retry-After`.
async fn call_itself(address: SocketAddr) -> Result<(), BoxError> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    for call in 1..=BURST + 1 {
        let request = http::Request::get(format!("http://{address}/"))
            .header("x-request-id", format!("once-{call}"))
            .body(Empty::new())?;
        let response = client.request(request).await?;
        let status = response.status();
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|value: &http::HeaderValue| value.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        let (id, retry_after) = (header("x-request-id"), header("retry-after"));
        let body = response.into_body().collect().await?.to_bytes();
        println!(
            "GET / -> {status} x-request-id={id} retry-after={retry_after} {}",
            String::from_utf8_lossy(&body).trim()
        );
        let expected = if call <= BURST { 200 } else { 429 };
        if status.as_u16() != expected || id != format!("once-{call}") {
            return Err(format!("call {call}: expected {expected} with its ID").into());
        }
    }
    Ok(())
}
