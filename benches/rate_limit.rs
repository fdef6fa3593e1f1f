//! Placeholder until the layer lands: measures the bare service every layer is compared to.
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tower::{Service, ServiceExt, service_fn};

fn bare(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut service = service_fn(|request: u64| async move { Ok::<_, tower::BoxError>(request) });
    c.bench_function("bare", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let ready = service.ready().await.expect("ready");
                black_box(ready.call(black_box(1)).await.expect("call"))
            })
        })
    });
}

criterion_group!(benches, bare);
criterion_main!(benches);
