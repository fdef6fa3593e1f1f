//! Per-request cost of the correlation server layer, against a bare service and against
//! tower-http's `SetRequestIdLayer` + `PropagateRequestIdLayer` with `MakeRequestUuid`,
//! on the same requests: one carrying a valid `x-request-id`, one without (minted).
//!
//! The `context` groups measure the request context's two ends: the server layer reading
//! an ID, a deadline, a `traceparent` and a `tracestate` (against the same layer without
//! deadlines and the bare service), and the client layer writing them onto a handler's
//! outgoing request (against the same scope around the bare service).
//!
//! Every service completes at once, so each iteration polls the response future once
//! with a no-op waker instead of paying for a runtime round trip.
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::{Request, Response};
use palisade::correlation::{CorrelationIdLayer, Generator, PropagateCorrelationIdLayer};
use palisade_bench::drive::runtime;
use palisade_bench::stacks::{
    bare_handler, bare_http, correlation_with_deadlines, handler_context, in_context, request_id,
    request_with_context, request_with_id, tower_http_request_id,
};
use std::hint::black_box;
use tower::BoxError;
use tower::{Layer, Service};

fn serve<S, E>(service: &mut S, request: Request<()>) -> Response<()>
where
    S: Service<Request<()>, Response = Response<()>, Error = E>,
{
    let ready = std::future::poll_fn(|cx| service.poll_ready(cx)).now_or_never();
    assert!(
        matches!(ready, Some(Ok(()))),
        "services here are always ready"
    );
    match service.call(request).now_or_never() {
        Some(Ok(response)) => response,
        _ => unreachable!("services here complete at once"),
    }
}

fn compare(c: &mut Criterion) {
    let shared_id = request_id();

    let mut bare_service = bare_handler();
    let mut palisade = CorrelationIdLayer::new().layer(bare_handler());
    let mut palisade_v7 = CorrelationIdLayer::new()
        .generator(Generator::uuid_v7())
        .layer(bare_handler());
    let mut tower_http = tower_http_request_id(bare_handler());

    for (case, id) in [("id present", Some(&shared_id)), ("id minted", None)] {
        let mut group = c.benchmark_group(format!("correlation/{case}"));
        let mut run = |name: &str, service: &mut dyn FnMut(Request<()>) -> Response<()>| {
            group.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter(|| black_box(service(black_box(request_with_id(id)))))
            });
        };
        run("bare", &mut |r| serve(&mut bare_service, r));
        run("palisade", &mut |r| serve(&mut palisade, r));
        if id.is_none() {
            run("palisade uuid v7", &mut |r| serve(&mut palisade_v7, r));
        }
        run("tower-http", &mut |r| serve(&mut tower_http, r));
        group.finish();
    }
}

fn context(c: &mut Criterion) {
    // The server layer arms a deadline timer, and the context's deadline reads the
    // clock: both need a runtime, which is never driven (every call completes at once).
    let runtime = runtime();
    let _entered = runtime.enter();
    let shared_id = request_id();

    let mut group = c.benchmark_group("context/server");
    let mut bare_service = bare_handler();
    let mut ids_only = CorrelationIdLayer::new().layer(bare_handler());
    let mut palisade = correlation_with_deadlines().layer(bare_handler());
    let mut run = |name: &str, service: &mut dyn FnMut(Request<()>) -> Response<()>| {
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| black_box(service(black_box(request_with_context(&shared_id)))))
        });
    };
    run("bare", &mut |r| serve(&mut bare_service, r));
    run("palisade, no deadlines", &mut |r| serve(&mut ids_only, r));
    run("palisade, deadlines", &mut |r| serve(&mut palisade, r));
    group.finish();

    let mut group = c.benchmark_group("context/client");
    let mut bare_client = in_context(handler_context(), bare_http::<()>());
    let mut palisade = in_context(
        handler_context(),
        PropagateCorrelationIdLayer::new().layer(bare_http::<()>()),
    );
    let mut run = |name: &str, service: &mut dyn FnMut(Request<()>) -> Response<()>| {
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| black_box(service(black_box(Request::new(())))))
        });
    };
    run("bare", &mut |r| serve::<_, BoxError>(&mut bare_client, r));
    run("palisade", &mut |r| serve::<_, BoxError>(&mut palisade, r));
    group.finish();
}

criterion_group!(benches, compare, context);
criterion_main!(benches);
