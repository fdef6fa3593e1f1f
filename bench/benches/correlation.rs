//! Per-request cost of the correlation server layer, against a bare service and against
//! tower-http's `SetRequestIdLayer` + `PropagateRequestIdLayer` with `MakeRequestUuid`,
//! on the same requests: one carrying a valid `x-request-id`, one without (minted).
//!
//! Every service completes at once, so each iteration polls the response future once
//! with a no-op waker instead of paying for a runtime round trip.
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::header::{ACCEPT, CONTENT_TYPE, HOST, USER_AGENT};
use http::{HeaderValue, Request, Response};
use palisade::correlation::{CorrelationIdLayer, Generator};
use std::convert::Infallible;
use std::hint::black_box;
use tower::{Layer, Service, ServiceBuilder, service_fn};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

/// A handler's minimal work: a response with a content type.
fn bare() -> impl Service<Request<()>, Response = Response<()>, Error = Infallible> + Clone {
    service_fn(|_request: Request<()>| async {
        let mut response = Response::new(());
        let content_type = HeaderValue::from_static("text/plain");
        response.headers_mut().insert(CONTENT_TYPE, content_type);
        Ok(response)
    })
}

/// A request like one hyper hands over; `id`, when given, shares its bytes the way a
/// parsed header shares the read buffer.
fn request(id: Option<&HeaderValue>) -> Request<()> {
    let mut request = Request::new(());
    let headers = request.headers_mut();
    headers.insert(HOST, HeaderValue::from_static("orders.internal"));
    headers.insert(USER_AGENT, HeaderValue::from_static("bench/1.0"));
    headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
    if let Some(id) = id {
        headers.insert("x-request-id", id.clone());
    }
    request
}

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
    let shared_id = HeaderValue::from_maybe_shared(bytes::Bytes::from(
        "0b6b8e5c-3f41-4c0a-9a55-2f0e1a7c9d13".as_bytes().to_vec(),
    ))
    .expect("a UUID is a valid header value");

    let mut bare_service = bare();
    let mut palisade = CorrelationIdLayer::new().layer(bare());
    let mut palisade_v7 = CorrelationIdLayer::new()
        .generator(Generator::uuid_v7())
        .layer(bare());
    let mut tower_http = ServiceBuilder::new()
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(PropagateRequestIdLayer::x_request_id())
        .service(bare());

    for (case, id) in [("id present", Some(&shared_id)), ("id minted", None)] {
        let mut group = c.benchmark_group(format!("correlation/{case}"));
        let mut run = |name: &str, service: &mut dyn FnMut(Request<()>) -> Response<()>| {
            group.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter(|| black_box(service(black_box(request(id)))))
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
