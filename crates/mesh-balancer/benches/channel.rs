//! The cost of one call through the balanced channel over a dummy endpoint service (3
//! endpoints, all connected), per strategy, on one thread and on two threads at once (each
//! its own clone, as each task of a client has); and, as the baselines, the dummy service
//! called directly with the same request (`direct`, and `direct_keyed` with the hash-key
//! header consistent hashing reads). Run by `cargo xtask bench`, which tabulates the
//! medians and the balancer's own share (channel minus its baseline).

mod common;

use std::hint::black_box;
use std::task::Context;
use std::time::{Duration, Instant};

use common::{Dummy, DummyLayer};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mesh_balancer::{Balancer, BalancerConfig, Endpoint, EndpointSet, P2cLoad, Strategy};

fn strategies() -> Vec<Strategy> {
    vec![
        Strategy::RoundRobin,
        Strategy::Random,
        Strategy::consistent_hash(),
        Strategy::Weighted,
        Strategy::P2c(P2cLoad::InFlight),
        Strategy::P2c(P2cLoad::PeakEwma { decay: Duration::from_secs(10) }),
    ]
}

/// Runs `calls` calls on each of `threads` threads, each through its own clone made by
/// `make`; returns the slowest thread's time, so that time / calls is the cost per call
/// with `threads` callers at once.
fn timed<S, F>(threads: usize, calls: u64, keyed: bool, make: F) -> Duration
where
    F: Fn() -> S + Sync,
    S: tower_service::Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>,
{
    let barrier = std::sync::Barrier::new(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut service = make();
                    let mut cx = Context::from_waker(std::task::Waker::noop());
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..calls {
                        black_box(common::call(&mut service, &mut cx, keyed));
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("bench thread")).max().unwrap_or_default()
    })
}

fn channel(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let addr = common::listener();
    let set = EndpointSet::new(
        (0..3).map(|i| Endpoint::new(addr.clone()).with_id(format!("e{i}")).with_weight(1 + i)).collect(),
    );
    let mut group = c.benchmark_group("channel");
    for (name, keyed) in [("direct", false), ("direct_keyed", true)] {
        for threads in [1usize, 2] {
            group.bench_function(BenchmarkId::new(name, threads), |b| {
                b.iter_custom(|calls| timed(threads, calls, keyed, || Dummy));
            });
        }
    }
    for strategy in strategies() {
        let config = BalancerConfig::new("bench").with_strategy(strategy.clone());
        let channel = runtime.block_on(async {
            let channel = Balancer::spawn_with_layer(config, DummyLayer, tokio_stream::once(set.clone()));
            channel.wait_ready(Duration::from_secs(5)).await.expect("endpoints connected");
            channel
        });
        let keyed = matches!(strategy, Strategy::ConsistentHash(_));
        for threads in [1usize, 2] {
            group.bench_function(BenchmarkId::new(strategy.name(), threads), |b| {
                b.iter_custom(|calls| timed(threads, calls, keyed, || channel.clone()));
            });
        }
    }
    group.finish();
}

criterion_group!(benches, channel);
criterion_main!(benches);
