//! Applying endpoint-set updates of 1000 endpoints under consistent hashing (a ring of
//! 160 000 points rebuilt each time) while calls run: how long calls and the runtime's
//! timers are held up, against the same run with no updates. Calls go through the
//! balanced channel to a dummy endpoint service on a 2-worker runtime; a 1 ms interval
//! measures how late each tick fires, which shows a runtime worker that something blocks.
//! Prints one JSON line for `cargo xtask bench`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::DummyLayer;
use mesh_balancer::{Balancer, BalancerConfig, Endpoint, EndpointSet, Strategy};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tower_service::Service as _;

const ENDPOINTS: usize = 1000;
const RUN: Duration = Duration::from_secs(3);
const EVERY: Duration = Duration::from_millis(50);

fn set(addr: &str, skip: Option<usize>) -> EndpointSet {
    EndpointSet::new(
        (0..ENDPOINTS).filter(|&i| Some(i) != skip).map(|i| Endpoint::new(addr).with_id(format!("e{i}"))).collect(),
    )
}

#[derive(Debug, Default)]
struct Run {
    calls: u64,
    call_p999_ns: u64,
    call_max_ns: u64,
    tick_late_max_us: u64,
    updates_applied: u64,
    /// From sending a set to calls using it, median and slowest.
    apply_p50_ms: f64,
    apply_max_ms: f64,
}

async fn run(addr: &str, with_updates: bool) -> Run {
    let (tx, rx) = watch::channel(set(addr, None));
    let config = BalancerConfig::new("bench").with_strategy(Strategy::consistent_hash());
    let channel = Balancer::spawn_with_layer(config, DummyLayer, WatchStream::new(rx));
    channel.wait_ready(Duration::from_secs(30)).await.expect("endpoints connected");
    let mut applied = channel.applied();
    let first = *applied.borrow();
    let mut apply_times = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));

    let caller = tokio::spawn({
        let (mut channel, stop) = (channel.clone(), stop.clone());
        async move {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                std::future::poll_fn(|cx| channel.poll_ready(cx)).await.expect("infallible");
                let _ = channel.call(common::request(true)).await;
                latencies.push(started.elapsed());
                // Let the other tasks of this worker run, as a real client would.
                tokio::task::yield_now().await;
            }
            latencies
        }
    });
    let ticker = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut late = Duration::ZERO;
            let mut next = tokio::time::Instant::now() + Duration::from_millis(1);
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep_until(next).await;
                late = late.max(tokio::time::Instant::now().saturating_duration_since(next));
                next += Duration::from_millis(1);
            }
            late
        }
    });
    let until = Instant::now() + RUN;
    let mut flip = 0;
    while Instant::now() < until {
        tokio::time::sleep(EVERY).await;
        if with_updates {
            flip += 1;
            // One endpoint leaves and comes back, as discovery reports registrations.
            let seen = *applied.borrow_and_update();
            let sent = Instant::now();
            tx.send_replace(set(addr, (flip % 2 == 1).then_some(flip % ENDPOINTS)));
            let _ = applied.wait_for(|&n| n > seen).await;
            apply_times.push(sent.elapsed());
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut latencies = caller.await.expect("caller");
    let tick_late = ticker.await.expect("ticker");
    latencies.sort();
    apply_times.sort();
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let at = |v: &[Duration], q: f64| v.get(((v.len() as f64 - 1.0) * q) as usize).copied().unwrap_or_default();
    Run {
        calls: latencies.len() as u64,
        call_p999_ns: ns(at(&latencies, 0.999)),
        call_max_ns: ns(latencies.last().copied().unwrap_or_default()),
        tick_late_max_us: ns(tick_late) / 1000,
        updates_applied: *applied.borrow() - first,
        apply_p50_ms: at(&apply_times, 0.5).as_secs_f64() * 1e3,
        apply_max_ms: apply_times.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    }
}

fn main() {
    // `cargo bench` passes --bench; any filter given is not ours to interpret.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let addr = common::listener();
    let quiet = runtime.block_on(run(&addr, false));
    let busy = runtime.block_on(run(&addr, true));
    eprintln!("without updates: {quiet:?}\nwith updates:    {busy:?}");
    let side = |r: &Run| {
        format!(
            "{{\"calls\":{},\"call_p999_ns\":{},\"call_max_ns\":{},\"tick_late_max_us\":{},\"updates_applied\":{},\"apply_p50_ms\":{:.2},\"apply_max_ms\":{:.2}}}",
            r.calls,
            r.call_p999_ns,
            r.call_max_ns,
            r.tick_late_max_us,
            r.updates_applied,
            r.apply_p50_ms,
            r.apply_max_ms
        )
    };
    println!("{{\"endpoints\":{ENDPOINTS},\"quiet\":{},\"updating\":{}}}", side(&quiet), side(&busy));
}
