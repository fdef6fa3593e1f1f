//! Success-path cost of the retry layer against a bare service, tower's `retry` with a
//! never-retry policy that clones the request, and tower-resilience's retry; then the
//! layer replaying a 1 KiB streaming HTTP body against the same bare service.
//!
//! The bare service gets `Request::default()` too, so building (and dropping) the
//! request is part of every line, as is a retry layer's clone of it.
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use palisade::retry::{HttpRetry, RetryLayer};
use palisade_bench::stacks::{bare_http, retry, tower_retry};
use std::future::ready;
use std::hint::black_box;
use tokio::runtime::Runtime;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

type Empty = Request<()>;

/// The bare service: an empty response, at once.
fn bare() -> impl Service<Empty, Response = Response<()>, Error = BoxError> + Clone {
    bare_http::<()>()
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

/// Calls `service` once per iteration, as a client would: ready, call, await.
fn bench_service<S, Req>(
    c: &mut Criterion,
    name: &str,
    runtime: &Runtime,
    mut service: S,
    request: impl Fn() -> Req,
) where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    // Every service here answers at once, so one poll completes each call: this
    // measures the middleware, not the executor.
    let _context = runtime.enter();
    c.bench_function(name, |b| {
        b.iter(|| {
            let call = async {
                let ready = service.ready().await.expect("ready");
                black_box(ready.call(black_box(request())).await.expect("call"))
            };
            call.now_or_never().expect("completes in one poll")
        })
    });
}

#[derive(Debug, Clone)]
struct Unreachable;

fn success_path(c: &mut Criterion) {
    let runtime = runtime();

    bench_service(c, "bare", &runtime, bare(), Request::default);

    bench_service(
        c,
        "palisade retry",
        &runtime,
        retry().layer(bare()),
        Request::default,
    );

    let http = RetryLayer::builder()
        .policy(HttpRetry::new())
        .build()
        .expect("config");
    bench_service(
        c,
        "palisade retry (HTTP preset)",
        &runtime,
        http.layer(bare()),
        Request::default,
    );

    // A request the policy may not retry is neither copied nor kept: the layer's own
    // cost without the clone.
    let post = || {
        let mut request = Request::default();
        *request.method_mut() = http::Method::POST;
        request
    };
    bench_service(
        c,
        "palisade retry (HTTP preset, POST: not kept)",
        &runtime,
        http.layer(bare()),
        post,
    );

    bench_service(
        c,
        "tower retry (cloning policy)",
        &runtime,
        tower_retry(bare()),
        Request::default,
    );

    let resilience_inner =
        service_fn(|_request: Empty| ready(Ok::<_, Unreachable>(Response::new(()))));
    let resilience =
        tower_resilience::retry::RetryLayer::<Empty, Response<()>, Unreachable>::builder()
            .max_attempts(3)
            .build();
    bench_service(
        c,
        "tower-resilience retry",
        &runtime,
        resilience.layer(resilience_inner),
        Request::default,
    );
}

/// Both services read the whole body, so that the layer's copy is actually made.
fn replayed_body(c: &mut Criterion) {
    let runtime = runtime();
    let kilobyte = Bytes::from(vec![7u8; 1024]);
    let body = || Request::new(Full::new(kilobyte.clone()));

    let bare_body = service_fn(|request: Request<Full<Bytes>>| async move {
        let bytes = request.into_body().collect().await?.to_bytes();
        Ok::<_, BoxError>(Response::new(bytes.len()))
    });
    bench_service(c, "bare, 1 KiB body", &runtime, bare_body, body);

    let replaying_inner = service_fn(
        |request: Request<palisade::retry::ReplayBody<Full<Bytes>>>| async move {
            let bytes = request.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>(Response::new(bytes.len()))
        },
    );
    let ours = RetryLayer::builder()
        .policy(HttpRetry::new())
        .replay_bodies()
        .build()
        .expect("config");
    bench_service(
        c,
        "palisade retry, replayable 1 KiB body",
        &runtime,
        ours.layer(replaying_inner),
        body,
    );
}

criterion_group!(benches, success_path, replayed_body);
criterion_main!(benches);
