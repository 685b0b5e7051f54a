//! Pick cost per strategy at 3, 100 and 1000 endpoints: the work a call does to choose its
//! endpoint (for consistent hashing, including hashing the key). Run by `cargo xtask bench`.

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mesh_balancer::pick::{PickEndpoint, PickInput, Picker, ring};
use mesh_balancer::{P2cLoad, Strategy};

fn strategies() -> Vec<Strategy> {
    vec![
        Strategy::RoundRobin,
        Strategy::Random,
        Strategy::consistent_hash(),
        Strategy::Weighted,
        Strategy::P2c(P2cLoad::InFlight),
    ]
}

fn pick(c: &mut Criterion) {
    let keys: Vec<String> = (0..1024).map(|i| format!("user-{i}")).collect();
    let mut group = c.benchmark_group("pick");
    for n in [3usize, 100, 1000] {
        let ids: Vec<String> = (0..n).map(|i| format!("10.0.{}.{}:50051", i / 256, i % 256)).collect();
        let endpoints: Vec<PickEndpoint<'_>> =
            ids.iter().enumerate().map(|(i, id)| PickEndpoint { id, weight: 1 + (i % 5) as u32 }).collect();
        let loads: Vec<u64> = (0..n as u64).map(|i| i % 7).collect();
        for strategy in strategies() {
            let picker = Picker::new(&strategy, &endpoints);
            let hashed = matches!(strategy, Strategy::ConsistentHash(_));
            // The inputs are made as the balanced channel makes them per call: a shared
            // atomic ticket, a thread-local random number when the strategy needs one.
            let ticket = AtomicUsize::new(0);
            let needs_random = matches!(strategy, Strategy::Random | Strategy::P2c(_));
            group.bench_function(BenchmarkId::new(strategy.name(), n), |b| {
                b.iter(|| {
                    let ticket = ticket.fetch_add(1, Ordering::Relaxed);
                    let random = if needs_random { rand::random() } else { 0 };
                    let key = hashed.then(|| ring::hash_key(keys[ticket % keys.len()].as_bytes()));
                    let input = PickInput { ticket, random, key };
                    black_box(picker.first(black_box(&input), |i| loads[i]))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, pick);
criterion_main!(benches);
