//! The gateway demo: the system palisade exists for, in one process on 127.0.0.1.
//!
//! ```text
//!  client ──HTTP──▶ gateway ──HTTP──▶ users
//!                   (correlation IDs,  ├─HTTP──▶ orders ──gRPC──▶ payments ×2
//!                    JWT check,        └─HTTP──▶ legacy (gone)
//!                    per-client limits,           (retry, a balanced pool,
//!                    a breaker per upstream)      a breaker per replica,
//!                                                 compensating action)
//! ```
//!
//! The per-client limit comes from `policies.toml` next to this file, and an admin
//! endpoint on a loopback port (`POST /admin/reload`) reloads it live. (The scripted
//! scenario edits a copy of it in a temporary directory; `--serve` reads the file
//! itself, for you to edit.)
//!
//! `cargo run --example gateway --features full` drives a scripted scenario, prints a
//! report and exits non-zero if any step misbehaved. `-- --serve` keeps the system up
//! and prints curl commands to try by hand.

mod admin;
mod deadlines;
mod edge;
mod logs;
mod payments;
mod replicas;
mod services;
mod shedding;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::routing::any;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{HeaderMap, Method, Request, StatusCode, http};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use palisade::ServiceBuilderExt;
use palisade::circuit_breaker::{
    CircuitBreakerLayer, KeyedCircuitBreakerHandle, SlidingWindow, State,
};
use palisade::correlation::CorrelationIdLayer;
use palisade::key;
use palisade::rate_limit::{LocalStore, RateLimitHandle};
use palisade::retry::{Backoff, GrpcRetry, Jitter, RetryLayer};
use palisade::tonic::RejectionsAsStatusLayer;
use tokio::net::TcpListener;
use tower::{BoxError, ServiceBuilder};

use crate::edge::{Subject, TokenKeys, Upstreams};
use crate::logs::Logs;
use crate::payments::{Payments, PaymentsClient, Transport};
use crate::services::Orders;

/// How long the payments breaker stays open before it lets a probe through.
const OPEN_FOR: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> ExitCode {
    let serve = std::env::args().any(|arg| arg == "--serve");
    let logs = Logs::install(serve);
    let policies = match admin::PolicyFile::in_use(serve) {
        Ok(policies) => policies,
        Err(error) => {
            eprintln!("could not read the policy file: {error}");
            return ExitCode::FAILURE;
        }
    };
    let system = match System::start(policies).await {
        Ok(system) => system,
        Err(error) => {
            eprintln!("could not start the system: {error}");
            return ExitCode::FAILURE;
        }
    };
    if serve {
        system.print_curl_commands();
        let _ = tokio::signal::ctrl_c().await;
        return ExitCode::SUCCESS;
    }
    let mut report = Report::default();
    scenario(&system, &logs, &mut report).await;
    report.finish()
}

/// Every part of the system, started on OS-assigned ports.
struct System {
    gateway: SocketAddr,
    payments: Arc<Payments>,
    replicas: replicas::Replicas,
    tokens: TokenKeys,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    /// The gateway's breakers, one per upstream authority.
    upstream_breakers: KeyedCircuitBreakerHandle<http::uri::Authority>,
    users: SocketAddr,
    orders: SocketAddr,
    legacy: SocketAddr,
    /// The gateway's admin endpoint, on loopback.
    admin: SocketAddr,
    /// The policy file the gateway reads (and reloads on an empty `POST /admin/reload`).
    policies: Arc<admin::PolicyFile>,
    /// The per-client limit's handle, to read what it would have refused in shadow mode.
    per_client: RateLimitHandle<LocalStore<Subject>>,
}

/// The gateway's router and the handles of its layers.
struct Gateway {
    router: Router,
    upstream_breakers: KeyedCircuitBreakerHandle<http::uri::Authority>,
    per_client: RateLimitHandle<LocalStore<Subject>>,
}

impl System {
    async fn start(policies: admin::PolicyFile) -> Result<Self, BoxError> {
        let policies = Arc::new(policies);
        let secret = b"palisade demo secret";
        let payments = Arc::new(Payments::default());

        let (pool, replicas) = replicas::start(&payments, OPEN_FOR).await?;
        let transport = Transport::new(
            ServiceBuilder::new()
                .map_response(|response: http::Response<_>| response.map(tonic::body::Body::new))
                .layer(RejectionsAsStatusLayer::new())
                .retries(
                    RetryLayer::builder()
                        .max_attempts(3)
                        .backoff(
                            Backoff::exponential(Duration::from_millis(20))
                                .max(Duration::from_millis(200))
                                .jitter(Jitter::Full),
                        )
                        .policy(GrpcRetry::new())
                        // Waiting out an open breaker is the caller's call, not ours: give up
                        // on any hint longer than this.
                        .max_server_delay(Duration::from_millis(200))
                        .replay_bodies()
                        .build()?,
                )
                .map_request(palisade::tonic::into_channel_request)
                .propagate_correlation_id()
                .service(pool),
        );

        let orders = Arc::new(Orders::new(PaymentsClient::new(transport)));
        let orders_addr = serve_http(services::orders(orders)).await?;
        let users_addr = serve_http(services::users()).await?;

        // A port nobody listens on: the retired service behind /legacy.
        let legacy = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;

        let tokens = TokenKeys::new(secret);
        let Gateway {
            router,
            upstream_breakers,
            per_client,
        } = gateway_router(
            users_addr,
            orders_addr,
            legacy,
            TokenKeys::new(secret),
            &policies,
        )?;
        let gateway = serve_http(router).await?;
        let admin = admin::serve(per_client.clone(), policies.clone()).await?;

        Ok(Self {
            gateway,
            payments,
            replicas,
            tokens,
            client: Client::builder(TokioExecutor::new()).build_http(),
            upstream_breakers,
            users: users_addr,
            orders: orders_addr,
            legacy,
            admin,
            policies,
            per_client,
        })
    }

    fn print_curl_commands(&self) {
        let token = self.tokens.issue("alice");
        let gateway = self.gateway;
        println!("The system is up. Try:");
        println!("  curl -i -H 'authorization: Bearer {token}' http://{gateway}/users/1");
        println!(
            "  curl -i -H 'authorization: Bearer {token}' -H 'content-type: application/json' \\\n       -d '{{\"item\":\"book\",\"amount_cents\":1200}}' http://{gateway}/orders"
        );
        println!(
            "  curl -i -H 'x-request-id: my-trace-1' -H 'authorization: Bearer {token}' http://{gateway}/users/2"
        );
        println!(
            "  curl -i -X POST --data-binary @examples/gateway/policies.toml http://{}/admin/reload",
            self.admin
        );
        println!(
            "  # or edit examples/gateway/policies.toml (shadow = true, say), then:\n  curl -i -X POST http://{}/admin/reload",
            self.admin
        );
        println!("Press Ctrl-C to stop.");
    }

    async fn send(&self, call: Call<'_>) -> Reply {
        let mut request = Request::builder()
            .method(call.method.clone())
            .uri(format!("http://{}{}", self.gateway, call.path))
            .header("content-type", "application/json");
        if let Some(subject) = call.subject {
            request = request.header(
                "authorization",
                format!("Bearer {}", self.tokens.issue(subject)),
            );
        }
        if let Some(id) = call.request_id {
            request = request.header("x-request-id", id);
        }
        let request = request
            .body(Full::new(Bytes::from(call.body.to_owned())))
            .expect("a well-formed request");
        let started = Instant::now();
        match self.client.request(request).await {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|body| body.to_bytes())
                    .unwrap_or_default();
                Reply {
                    status: parts.status,
                    headers: parts.headers,
                    body: String::from_utf8_lossy(&body).into_owned(),
                    took: started.elapsed(),
                }
            }
            Err(error) => Reply {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                headers: HeaderMap::new(),
                body: format!("request failed: {error}"),
                took: started.elapsed(),
            },
        }
    }
}

fn gateway_router(
    users: SocketAddr,
    orders: SocketAddr,
    legacy: SocketAddr,
    tokens: TokenKeys,
    policy_file: &admin::PolicyFile,
) -> Result<Gateway, BoxError> {
    // The per-client limit is data, in the policy file; the key (the token's subject) is
    // code.
    let policies = admin::parse(&policy_file.read()?)?;
    let per_client = policies
        .keyed_rate_limit(admin::PER_CLIENT, |request: &axum::extract::Request| {
            request.extensions().get::<Subject>().cloned()
        })?;
    let per_client_handle = per_client.handle();
    // One breaker per upstream authority: an upstream that cannot be reached (an `Err`
    // from the client; any HTTP answer counts as reached) stops being called, and the
    // others never notice.
    let upstream_breakers = CircuitBreakerLayer::builder()
        .minimum_calls(3)
        .sliding_window(SlidingWindow::count(10))
        .open_for(Duration::from_secs(30))
        .keyed(key::Authority)
        .max_keys(64)
        .on_transition(|upstream, transition| {
            tracing::warn!(?upstream, from = ?transition.from, to = ?transition.to, "gateway: an upstream's breaker moved");
        })
        .build()?;
    let breakers = upstream_breakers.handle();
    let client = ServiceBuilder::new()
        .layer(upstream_breakers)
        .propagate_correlation_id()
        .map_err(BoxError::from)
        .service(Client::builder(TokioExecutor::new()).build_http::<axum::body::Body>());
    let upstreams = Arc::new(Upstreams {
        users,
        orders,
        legacy,
        client,
    });
    let router = Router::new()
        .route("/users/{*rest}", any(edge::forward))
        .route("/orders", any(edge::forward))
        .route("/orders/{*rest}", any(edge::forward))
        .route("/legacy/{*rest}", any(edge::forward))
        .with_state(upstreams)
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(palisade::axum::handle_error))
                .layer(per_client),
        )
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(tokens),
            edge::authenticate,
        ));
    Ok(Gateway {
        router,
        upstream_breakers: breakers,
        per_client: per_client_handle,
    })
}

/// Serves `router` on an OS-assigned port, with correlation IDs at its edge.
async fn serve_http(router: Router) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = router.layer(CorrelationIdLayer::new());
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(addr)
}

struct Call<'a> {
    method: Method,
    path: &'a str,
    subject: Option<&'a str>,
    request_id: Option<&'a str>,
    body: &'a str,
}

impl<'a> Call<'a> {
    fn get(path: &'a str, subject: &'a str) -> Self {
        Self {
            method: Method::GET,
            path,
            subject: Some(subject),
            request_id: None,
            body: "",
        }
    }

    fn order(subject: &'a str) -> Self {
        Self {
            method: Method::POST,
            path: "/orders",
            subject: Some(subject),
            request_id: None,
            body: r#"{"item":"book","amount_cents":1200}"#,
        }
    }

    fn with_request_id(mut self, id: &'a str) -> Self {
        self.request_id = Some(id);
        self
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
    took: Duration,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("-")
    }
}

/// The scenario's verdicts, printed as it goes.
#[derive(Default)]
struct Report {
    failures: usize,
}

impl Report {
    fn section(&self, title: &str) {
        println!("\n== {title}");
    }

    fn check(&mut self, ok: bool, what: impl std::fmt::Display) {
        if ok {
            println!("  ok    {what}");
        } else {
            println!("  FAIL  {what}");
            self.failures += 1;
        }
    }

    fn finish(self) -> ExitCode {
        if self.failures == 0 {
            println!("\nEvery step behaved as expected.");
            ExitCode::SUCCESS
        } else {
            println!("\n{} step(s) did not behave as expected.", self.failures);
            ExitCode::FAILURE
        }
    }
}

async fn scenario(system: &System, logs: &Logs, report: &mut Report) {
    report.section("1. normal traffic");
    let user = system.send(Call::get("/users/1", "alice")).await;
    report.check(
        user.status == StatusCode::OK,
        format!("alice reads /users/1: {} {}", user.status, user.body),
    );
    let order = system.send(Call::order("bob")).await;
    report.check(
        order.status == StatusCode::CREATED && order.body.contains("\"paid\""),
        format!("bob places an order: {} {}", order.status, order.body),
    );
    let anonymous = system
        .send(Call {
            subject: None,
            ..Call::get("/users/1", "")
        })
        .await;
    report.check(
        anonymous.status == StatusCode::UNAUTHORIZED,
        format!(
            "a request without a token is refused at the edge: {}",
            anonymous.status
        ),
    );

    report.section("2. one correlation ID across every hop");
    let traced = system
        .send(Call::order("carol").with_request_id("demo-order-42"))
        .await;
    report.check(
        traced.header("x-request-id") == "demo-order-42",
        format!(
            "the gateway echoes the caller's ID: x-request-id: {}",
            traced.header("x-request-id")
        ),
    );
    let trail = logs.lines_with("demo-order-42");
    for hop in ["gateway:", "orders:", "payments:"] {
        report.check(
            trail.iter().any(|line| line.contains(hop)),
            format!("the ID is in the {} log lines", hop.trim_end_matches(':')),
        );
    }
    for line in &trail {
        println!("        {line}");
    }
    let minted = system.send(Call::get("/users/2", "carol")).await;
    let minted_id = minted.header("x-request-id").to_owned();
    report.check(
        minted_id != "-"
            && logs
                .lines_with(&minted_id)
                .iter()
                .any(|line| line.contains("users:")),
        format!(
            "without an ID the gateway mints one ({minted_id}) and it reaches the users service"
        ),
    );

    report.section("3. a noisy client is limited; the others are not");
    let started = Instant::now();
    let burst = (0..30).map(|_| system.send(Call::get("/users/1", "mallory")));
    let replies = futures_util::future::join_all(burst).await;
    let elapsed = started.elapsed();
    let limited: Vec<_> = replies
        .iter()
        .filter(|reply| reply.status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    let admitted = replies.len() - limited.len();
    // A burst of 10, then 5 a second: all the bucket can have let through meanwhile.
    let allowed = 10 + (5.0 * elapsed.as_secs_f64()).ceil() as usize;
    let example = limited.first().map_or_else(String::new, |reply| {
        format!(
            "Retry-After: {}, RateLimit: {}",
            reply.header("retry-after"),
            reply.header("ratelimit")
        )
    });
    report.check(
        !limited.is_empty() && admitted <= allowed,
        format!(
            "mallory sent 30 requests at once: {} got 429 ({example}), {admitted} went through",
            limited.len()
        ),
    );
    let alice = system.send(Call::get("/users/1", "alice")).await;
    report.check(
        alice.status == StatusCode::OK,
        format!("alice is unaffected: {}", alice.status),
    );

    report.section("4. retries absorb a flaky hop");
    let before = system.payments.calls();
    system.payments.fail_next(1);
    let order = system.send(Call::order("alice")).await;
    let calls = system.payments.calls() - before;
    report.check(
        order.status == StatusCode::CREATED && calls == 2,
        format!(
            "payments failed once; the order still went through: {} after {calls} payment calls",
            order.status
        ),
    );

    report.section("5. payments goes down: the breakers open and shed load");
    system.payments.set_down(true);
    let mut cancelled = 0;
    for _ in 0..3 {
        let reply = system.send(Call::order("bob")).await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE && reply.body.contains("\"cancelled\"") {
            cancelled += 1;
        }
    }
    report.check(
        cancelled == 3,
        format!("orders whose payment failed for good were cancelled again: {cancelled}/3"),
    );
    report.check(
        system.replicas.all(State::Open),
        format!(
            "both replicas' breakers are open: {:?}",
            system.replicas.states()
        ),
    );
    let before = system.payments.calls();
    let shed = system.send(Call::order("bob")).await;
    report.check(
        shed.status == StatusCode::SERVICE_UNAVAILABLE && system.payments.calls() == before,
        format!(
            "while open, an order is answered at once without calling payments: {} in {:?}, Retry-After: {}",
            shed.status,
            shed.took,
            shed.header("retry-after")
        ),
    );

    report.section("6. payments recovers: half-open probe, then closed");
    system.payments.set_down(false);
    tokio::time::sleep(OPEN_FOR + Duration::from_millis(100)).await;
    let order = system.send(Call::order("bob")).await;
    report.check(
        order.status == StatusCode::CREATED,
        format!("the probe order succeeds: {}", order.status),
    );
    report.check(
        system.replicas.states().contains(&State::Closed),
        format!(
            "the probe closed a replica's breaker: {:?}",
            system.replicas.states()
        ),
    );

    replicas::one_replica_down(system, report, OPEN_FOR).await;
    shedding::step(report).await;
    deadlines::step(report, logs).await;
    one_upstream_unreachable(system, report).await;
    admin::step(system, report).await;
    admin::shadow_step(system, report).await;
}

/// The gateway keeps a breaker per upstream: the retired `/legacy` service opens its own
/// and no other.
async fn one_upstream_unreachable(system: &System, report: &mut Report) {
    report.section("10. an upstream of the gateway is unreachable: only its breaker opens");
    let authority = |address: SocketAddr| {
        http::uri::Authority::try_from(address.to_string()).expect("an address is an authority")
    };
    let breakers = &system.upstream_breakers;
    let mut bad_gateway = 0;
    for _ in 0..3 {
        if system
            .send(Call::get("/legacy/report", "dave"))
            .await
            .status
            == StatusCode::BAD_GATEWAY
        {
            bad_gateway += 1;
        }
    }
    report.check(
        bad_gateway == 3 && breakers.state_for(&authority(system.legacy)) == State::Open,
        format!(
            "three calls to /legacy found nobody listening ({bad_gateway}x 502): its breaker is {:?}",
            breakers.state_for(&authority(system.legacy))
        ),
    );
    let shed = system.send(Call::get("/legacy/report", "dave")).await;
    report.check(
        shed.status == StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "the next one is answered at once without a connection attempt: {} in {:?}, Retry-After: {}",
            shed.status,
            shed.took,
            shed.header("retry-after")
        ),
    );
    let users = system.send(Call::get("/users/1", "dave")).await;
    report.check(
        users.status == StatusCode::OK
            && breakers.state_for(&authority(system.users)) == State::Closed
            && breakers.state_for(&authority(system.orders)) == State::Closed,
        format!(
            "users and orders keep their closed breakers and keep serving: /users/1 {}",
            users.status
        ),
    );
    report.check(
        breakers.not_closed() == vec![(authority(system.legacy), State::Open)],
        format!("the breakers not closed: {:?}", breakers.not_closed()),
    );
}
