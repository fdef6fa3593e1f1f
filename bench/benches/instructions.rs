//! Instructions per call, counted by callgrind (through gungraun): every layer's success
//! path and its peers', each over the same bare service in the same build.
//!
//! Each benchmark makes [`CALLS`] calls after a warm-up (outside the count); what a
//! layer adds per call is `(its count - the bare count of its group) / CALLS`, which
//! `scripts/instructions` computes and prints as a table. Instruction counts do not move
//! with a noisy neighbour the way wall time does; criterion's wall times are the other
//! benches in this directory.
//!
//! Needs valgrind and the runner of the same version as the `gungraun` dependency:
//! `cargo install gungraun-runner --version <that version>`.
use std::hint::black_box;
use std::sync::Arc;

use axum::body::Body;
use governor::DefaultDirectRateLimiter;
use gungraun::{library_benchmark, library_benchmark_group, main};
use palisade::correlation::{CorrelationIdLayer, PropagateCorrelationIdLayer};
use palisade_bench::drive::Driver;
use palisade_bench::stacks::*;
use tower::Layer;

/// Calls per measurement.
const CALLS: u64 = 1_000;

fn run(mut driver: Driver) {
    driver.run(black_box(CALLS));
}

/// Requests `0, 1, 2, ...`; keyed stacks with one key get `one_key` instead.
fn counting(i: u64) -> u64 {
    i
}

fn one_key(_: u64) -> u64 {
    7
}

mod breakers {
    use super::*;

    pub fn bare() -> Driver {
        Driver::new(super::bare, counting)
    }
    pub fn palisade_count() -> Driver {
        Driver::new(|| breaker_count().layer(super::bare()), counting)
    }
    pub fn palisade_time_slow() -> Driver {
        Driver::new(|| breaker_time_slow().layer(super::bare()), counting)
    }
    pub fn failsafe() -> Driver {
        Driver::new(failsafe_breaker, counting)
    }
    pub fn tower_resilience() -> Driver {
        Driver::new(|| tower_resilience_breaker(super::bare()), counting)
    }
}

mod limiters {
    use super::*;

    pub fn bare() -> Driver {
        Driver::new(super::bare, counting)
    }
    pub fn palisade_global() -> Driver {
        Driver::new(|| rate_limit_global().layer(super::bare()), counting)
    }
    pub fn governor_direct() -> Driver {
        let limiter = Arc::new(DefaultDirectRateLimiter::direct(never_throttled()));
        Driver::new(|| super::governor_direct(super::bare(), limiter), counting)
    }
    pub fn governor_keyed_one_key() -> Driver {
        Driver::new(|| super::governor_keyed(super::bare()), one_key)
    }
    // tower_governor answers with axum's body type: so do the services of its group.
    pub fn bare_http() -> Driver {
        Driver::new(super::bare_http::<Body>, |_| keyed_request(7))
    }
    pub fn palisade_keyed_one_key() -> Driver {
        Driver::new(
            || rate_limit_keyed_http(super::bare_http::<Body>()),
            |_| keyed_request(7),
        )
    }
    pub fn tower_governor_keyed_one_key() -> Driver {
        Driver::new(
            || tower_governor_keyed(super::bare_http::<Body>()),
            |_| keyed_request(7),
        )
    }
}

mod shedding {
    use super::*;
    use palisade::concurrency_limit::ConcurrencyLimitLayer;
    use tower::ServiceBuilder;

    const LIMIT: u32 = 1024;

    pub fn bare() -> Driver {
        Driver::new(super::bare, counting)
    }
    pub fn palisade_static() -> Driver {
        let layer = ConcurrencyLimitLayer::builder()
            .max_in_flight(LIMIT)
            .build()
            .expect("valid");
        Driver::new(|| layer.layer(super::bare()), counting)
    }
    pub fn tower_shed() -> Driver {
        Driver::new(
            || {
                ServiceBuilder::new()
                    .load_shed()
                    .concurrency_limit(LIMIT as usize)
                    .service(super::bare())
            },
            counting,
        )
    }
    pub fn palisade_keyed_one_key() -> Driver {
        let layer = ConcurrencyLimitLayer::builder()
            .max_in_flight(LIMIT)
            .keyed(|request: &u64| Some(*request))
            .build()
            .expect("valid");
        Driver::new(|| layer.layer(super::bare()), one_key)
    }
}

mod retries {
    use super::*;

    pub fn bare() -> Driver {
        Driver::new(super::bare_http::<()>, |_| http::Request::new(()))
    }
    pub fn palisade() -> Driver {
        Driver::new(
            || super::retry().layer(super::bare_http::<()>()),
            |_| http::Request::new(()),
        )
    }
    pub fn tower_cloning() -> Driver {
        Driver::new(
            || tower_retry(super::bare_http::<()>()),
            |_| http::Request::new(()),
        )
    }
}

mod correlations {
    use super::*;

    fn present(_: u64) -> http::Request<()> {
        thread_local!(static ID: http::HeaderValue = request_id());
        ID.with(|id| request_with_id(Some(id)))
    }
    fn absent(_: u64) -> http::Request<()> {
        request_with_id(None)
    }

    pub fn bare_present() -> Driver {
        Driver::new(bare_handler, present)
    }
    pub fn palisade_present() -> Driver {
        Driver::new(|| CorrelationIdLayer::new().layer(bare_handler()), present)
    }
    pub fn tower_http_present() -> Driver {
        Driver::new(|| tower_http_request_id(bare_handler()), present)
    }
    pub fn bare_minted() -> Driver {
        Driver::new(bare_handler, absent)
    }
    pub fn palisade_minted() -> Driver {
        Driver::new(|| CorrelationIdLayer::new().layer(bare_handler()), absent)
    }
    pub fn tower_http_minted() -> Driver {
        Driver::new(|| tower_http_request_id(bare_handler()), absent)
    }
}

/// The request context's two ends: a server reading a request that carries an ID, a
/// deadline, a `traceparent` and a `tracestate`; a client writing them onto a handler's
/// outgoing request.
mod contexts {
    use super::*;

    fn incoming(_: u64) -> http::Request<()> {
        thread_local!(static ID: http::HeaderValue = request_id());
        ID.with(request_with_context)
    }

    pub fn bare_server() -> Driver {
        Driver::new(bare_handler, incoming)
    }
    pub fn palisade_server() -> Driver {
        Driver::new(
            || correlation_with_deadlines().layer(bare_handler()),
            incoming,
        )
    }
    pub fn bare_client() -> Driver {
        Driver::new(
            || in_context(handler_context(), super::bare_http::<()>()),
            |_| http::Request::new(()),
        )
    }
    pub fn palisade_client() -> Driver {
        Driver::new(
            || {
                let client = PropagateCorrelationIdLayer::new().layer(super::bare_http::<()>());
                in_context(handler_context(), client)
            },
            |_| http::Request::new(()),
        )
    }
    fn grpc(_: u64) -> http::Request<()> {
        let mut request = http::Request::new(());
        let grpc = http::HeaderValue::from_static("application/grpc");
        request
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, grpc);
        request
    }
    pub fn bare_client_grpc() -> Driver {
        Driver::new(
            || in_context(handler_context(), super::bare_http::<()>()),
            grpc,
        )
    }
    pub fn palisade_client_grpc() -> Driver {
        Driver::new(
            || {
                let client = PropagateCorrelationIdLayer::new().layer(super::bare_http::<()>());
                in_context(handler_context(), client)
            },
            grpc,
        )
    }
}

#[library_benchmark]
#[bench::bare(setup = breakers::bare)]
#[bench::palisade_count(setup = breakers::palisade_count)]
#[bench::palisade_time_slow(setup = breakers::palisade_time_slow)]
#[bench::failsafe(setup = breakers::failsafe)]
#[bench::tower_resilience(setup = breakers::tower_resilience)]
fn circuit_breaker(driver: Driver) {
    run(driver);
}

#[library_benchmark]
#[bench::bare(setup = limiters::bare)]
#[bench::palisade_global(setup = limiters::palisade_global)]
#[bench::governor_direct(setup = limiters::governor_direct)]
#[bench::governor_keyed_one_key(setup = limiters::governor_keyed_one_key)]
#[bench::bare_http(setup = limiters::bare_http)]
#[bench::palisade_keyed_one_key(setup = limiters::palisade_keyed_one_key)]
#[bench::tower_governor_keyed_one_key(setup = limiters::tower_governor_keyed_one_key)]
fn rate_limit(driver: Driver) {
    run(driver);
}

#[library_benchmark]
#[bench::bare(setup = shedding::bare)]
#[bench::palisade_static(setup = shedding::palisade_static)]
#[bench::tower_shed(setup = shedding::tower_shed)]
#[bench::palisade_keyed_one_key(setup = shedding::palisade_keyed_one_key)]
fn concurrency_limit(driver: Driver) {
    run(driver);
}

#[library_benchmark]
#[bench::bare(setup = retries::bare)]
#[bench::palisade(setup = retries::palisade)]
#[bench::tower_cloning(setup = retries::tower_cloning)]
fn retry(driver: Driver) {
    run(driver);
}

#[library_benchmark]
#[bench::bare_present(setup = correlations::bare_present)]
#[bench::palisade_present(setup = correlations::palisade_present)]
#[bench::tower_http_present(setup = correlations::tower_http_present)]
#[bench::bare_minted(setup = correlations::bare_minted)]
#[bench::palisade_minted(setup = correlations::palisade_minted)]
#[bench::tower_http_minted(setup = correlations::tower_http_minted)]
fn correlation(driver: Driver) {
    run(driver);
}

#[library_benchmark]
#[bench::bare_server(setup = contexts::bare_server)]
#[bench::palisade_server(setup = contexts::palisade_server)]
#[bench::bare_client(setup = contexts::bare_client)]
#[bench::palisade_client(setup = contexts::palisade_client)]
#[bench::bare_client_grpc(setup = contexts::bare_client_grpc)]
#[bench::palisade_client_grpc(setup = contexts::palisade_client_grpc)]
fn context(driver: Driver) {
    run(driver);
}

library_benchmark_group!(
    name = layers;
    benchmarks = circuit_breaker, rate_limit, concurrency_limit, retry, correlation, context
);

main!(library_benchmark_groups = layers);
