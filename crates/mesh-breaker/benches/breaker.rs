//! The breaker's cost on the path every call takes while all is well: admitting a call to a
//! closed circuit and recording its success, from one thread and from two at once (each its
//! own clone of one breaker, so they share the circuit). Run by `cargo xtask bench`.

use std::hint::black_box;
use std::sync::Barrier;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mesh_breaker::{Admission, BreakerConfig, BreakerLayer, Outcome};
use tower_layer::Layer as _;

fn closed(c: &mut Criterion) {
    let mut group = c.benchmark_group("breaker");
    let breaker = BreakerLayer::try_new("bench", BreakerConfig::default()).expect("valid config").layer(());
    let handle = breaker.handle();
    group.bench_function(BenchmarkId::new("admit_record_closed", 1), |b| {
        b.iter(|| {
            let admitted = handle.admit();
            debug_assert_eq!(admitted, Admission::Allowed);
            handle.record(black_box(admitted), Outcome::Success);
        })
    });
    group.bench_function(BenchmarkId::new("admit_record_closed", 2), |b| {
        b.iter_custom(|iters| {
            let barrier = Barrier::new(2);
            std::thread::scope(|s| {
                let other = s.spawn(|| {
                    let handle = breaker.handle();
                    barrier.wait();
                    for _ in 0..iters {
                        let admitted = handle.admit();
                        handle.record(black_box(admitted), Outcome::Success);
                    }
                });
                barrier.wait();
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    let admitted = handle.admit();
                    handle.record(black_box(admitted), Outcome::Success);
                }
                let elapsed = start.elapsed();
                let _ = other.join();
                elapsed
            })
        })
    });
    group.finish();
}

criterion_group!(benches, closed);
criterion_main!(benches);
