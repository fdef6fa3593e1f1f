//! Per-request cost of the correlation server layer, against a bare service and against
//! tower-http's `SetRequestIdLayer` + `PropagateRequestIdLayer` with `MakeRequestUuid`,
//! on the same requests: one carrying a valid `x-request-id`, one without (minted).
//!
//! Every service completes at once, so each iteration polls the response future once
//! with a no-op waker instead of paying for a runtime round trip.
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::{Request, Response};
use palisade::correlation::{CorrelationIdLayer, Generator};
use palisade_bench::stacks::{bare_handler, request_id, request_with_id, tower_http_request_id};
use std::convert::Infallible;
use std::hint::black_box;
use tower::{Layer, Service};

fn serve<S>(service: &mut S, request: Request<()>) -> Response<()>
where
    S: Service<Request<()>, Response = Response<()>, Error = Infallible>,
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

criterion_group!(benches, compare);
criterion_main!(benches);
