//! Failover through the whole client stack (greeter-client's `Mesh`: service breaker,
//! retries, balancer, endpoint breakers) against real greeter-server processes: one killed
//! with SIGKILL under load, one frozen with SIGSTOP. No etcd: a static list of three.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use greeter_client::{Mesh, MeshChannel, Resilience};
use mesh_balancer::{BalancerConfig, EndpointSet};
use mesh_breaker::BreakerConfig;
use mesh_etcd_local::Signal;
use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;
use mesh_retry::RetryPolicy;
use tokio::time::Instant;
use tonic::Code;

/// A greeter-server process, serving without etcd.
struct Server {
    addr: String,
    child: Child,
}

impl Server {
    fn start() -> Server {
        let port = mesh_etcd_local::free_port().expect("port");
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_greeter-server"))
            .args(["--listen", &addr, "--no-register"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start greeter-server");
        let up = mesh_etcd_local::wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(&addr).is_ok());
        assert!(up, "greeter-server did not listen on {addr}");
        Server { addr, child }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = mesh_etcd_local::signal(self.child.id(), Signal::Cont);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn mesh(servers: &[Server], endpoint_breaker: BreakerConfig, max_attempts: u32) -> Mesh {
    let retry = RetryPolicy::default().with_max_attempts(max_attempts).with_methods(greeter_client::GREETER_IDEMPOTENT);
    let set = EndpointSet::from_addresses(servers.iter().map(|s| s.addr.clone()));
    let resilience = Resilience { endpoint_breaker, service_breaker: greeter_client::default_service_breaker(), retry };
    let mesh =
        Mesh::spawn(BalancerConfig::new("greeter"), &resilience, tokio_stream::once(set)).expect("valid settings");
    // As greeter-client does before its first call.
    mesh.balanced.wait_ready(Duration::from_secs(5)).await.expect("three servers up");
    mesh
}

/// One call's end: when it started and ended (since the run began) and its code.
#[derive(Debug, Clone, Copy)]
struct Call {
    start: Duration,
    end: Duration,
    code: Code,
}

/// The first failures, with their messages, to say what went wrong.
static FIRST_ERRORS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn note(status: &tonic::Status) {
    let mut first = FIRST_ERRORS.lock().expect("lock");
    if first.len() < 5 {
        first.push(format!("{:?}: {}", status.code(), status.message()));
    }
}

/// `workers` callers sharing `total` calls (or running until `until`), each call with
/// deadline `timeout`; `at` runs once `trigger_after` calls have completed.
async fn load(
    channel: MeshChannel,
    workers: usize,
    total: u64,
    timeout: Duration,
    trigger_after: u64,
    at: impl FnOnce() + Send + 'static,
) -> Vec<Call> {
    let begun = Instant::now();
    let started = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let trigger = Arc::new(Mutex::new(Some(at)));
    let fired = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let mut client = GreeterClient::new(channel.clone());
        let (started, done, calls, trigger, fired) =
            (started.clone(), done.clone(), calls.clone(), trigger.clone(), fired.clone());
        tasks.push(tokio::spawn(async move {
            while started.fetch_add(1, Ordering::SeqCst) < total {
                let start = begun.elapsed();
                let mut request = tonic::Request::new(HelloRequest { name: "load".into() });
                request.set_timeout(timeout);
                let code = match client.say_hello(request).await {
                    Ok(_) => Code::Ok,
                    Err(status) => {
                        note(&status);
                        status.code()
                    }
                };
                calls.lock().expect("lock").push(Call { start, end: begun.elapsed(), code });
                if done.fetch_add(1, Ordering::SeqCst) + 1 >= trigger_after && !fired.swap(true, Ordering::SeqCst) {
                    let at = trigger.lock().expect("lock").take();
                    if let Some(at) = at {
                        at();
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }
    calls.lock().expect("lock").clone()
}

fn failed(calls: &[Call]) -> Vec<Call> {
    calls.iter().filter(|c| c.code != Code::Ok).copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_one_of_three_under_load_with_retries_fails_no_call() {
    let servers = [Server::start(), Server::start(), Server::start()];
    let mesh = mesh(&servers, BreakerConfig::default(), 3).await;
    let victim = servers[1].child.id();
    let calls = load(mesh.channel.clone(), 16, 2000, Duration::from_secs(2), 500, move || {
        let _ = mesh_etcd_local::signal(victim, Signal::Kill);
    })
    .await;
    assert_eq!(calls.len(), 2000);
    let failed = failed(&calls);
    assert!(
        failed.is_empty(),
        "{} failed, the first: {:?} {:?}",
        failed.len(),
        &failed[..failed.len().min(5)],
        FIRST_ERRORS.lock()
    );
    // The kill came mid-load: the victim had served its share, and is out of the set.
    let victim = mesh.balanced.endpoints().into_iter().find(|e| e.address == servers[1].addr).expect("listed");
    assert!(victim.requests >= 100, "{victim:?}");
    assert_ne!(victim.state, mesh_balancer::EndpointState::Ready, "{victim:?}");
    // Retries carried the calls in flight at the kill, if any were.
    eprintln!("kill -9 under load, retries on: 0 of 2000 failed, {} retries", mesh.retries.retries());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_one_of_three_under_load_without_retries_fails_at_most_the_calls_in_flight() {
    let servers = [Server::start(), Server::start(), Server::start()];
    let mesh = mesh(&servers, BreakerConfig::default(), 1).await;
    let victim = servers[1].child.id();
    let calls = load(mesh.channel.clone(), 16, 2000, Duration::from_secs(2), 500, move || {
        let _ = mesh_etcd_local::signal(victim, Signal::Kill);
    })
    .await;
    let failed = failed(&calls);
    let first = &failed[..failed.len().min(5)];
    assert!(
        failed.len() <= 16,
        "{} failed; at most the 16 in flight at the kill may; the first: {first:?} {:?}",
        failed.len(),
        FIRST_ERRORS.lock()
    );
    assert!(failed.iter().all(|c| c.code == Code::Unavailable), "the first: {first:?}");
}

/// 8 workers calling round robin while one of three servers is frozen (SIGSTOP) from 1 s
/// in for `hung_for`; every call's end, and when the freeze began.
async fn under_a_hang(mesh: &Mesh, timeout: Duration, hung_for: Duration, server: &Server) -> (Vec<Call>, Duration) {
    let channel = mesh.channel.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let frozen_at = Arc::new(Mutex::new(None::<Duration>));
    let begun = Instant::now();
    let pid = server.child.id();
    let (stop2, frozen2) = (stop.clone(), frozen_at.clone());
    let freezer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        *frozen2.lock().expect("lock") = Some(begun.elapsed());
        mesh_etcd_local::signal(pid, Signal::Stop).expect("SIGSTOP");
        tokio::time::sleep(hung_for).await;
        mesh_etcd_local::signal(pid, Signal::Cont).expect("SIGCONT");
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop2.store(true, Ordering::SeqCst);
    });
    let calls = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = GreeterClient::new(channel.clone());
        let (stop, calls) = (stop.clone(), calls.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let start = begun.elapsed();
                let mut request = tonic::Request::new(HelloRequest { name: "load".into() });
                request.set_timeout(timeout);
                let code = client.say_hello(request).await.map_or_else(|s| s.code(), |_| Code::Ok);
                calls.lock().expect("lock").push(Call { start, end: begun.elapsed(), code });
            }
        }));
    }
    freezer.await.expect("freezer");
    for t in tasks {
        t.await.expect("worker");
    }
    let calls = calls.lock().expect("lock").clone();
    let frozen = frozen_at.lock().expect("lock").expect("frozen");
    (calls, frozen)
}

/// Asserts that successful calls ended in every second of `hang`.
fn served_every_second(calls: &[Call], hang: std::ops::Range<Duration>) {
    let mut second = hang.start;
    while second + Duration::from_secs(1) <= hang.end {
        let window = second..second + Duration::from_secs(1);
        let ok = calls.iter().filter(|c| c.code == Code::Ok && window.contains(&c.end)).count();
        assert!(ok > 0, "no successful call in {window:?} of the hang");
        second += Duration::from_secs(1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_hung_for_8s_is_ejected_after_a_few_timeouts_and_the_others_serve_every_second() {
    let servers = [Server::start(), Server::start(), Server::start()];
    let threshold = 5;
    let mesh = mesh(&servers, BreakerConfig::default().with_failure_threshold(threshold as u32), 1).await;
    let timeout = Duration::from_millis(200);
    let hung_for = Duration::from_secs(8);
    let (calls, frozen) = under_a_hang(&mesh, timeout, hung_for, &servers[2]).await;
    let failed = failed(&calls);
    // Every failure is a deadline, and ends within the deadline plus slack.
    let slack = Duration::from_millis(150);
    for c in &failed {
        assert_eq!(c.code, Code::DeadlineExceeded, "{c:?}");
        assert!(c.end - c.start <= timeout + slack, "a call took {:?}: {c:?}", c.end - c.start);
    }
    // Ejected after a few timeouts. The breaker opens at the 5th; the calls that time out
    // before that are the ones already sent when the first deadlines passed (every worker's
    // next round-robin turn lands on the hung server within a millisecond of the freeze,
    // long before its 200 ms deadline, so one per worker), plus at most one more from each
    // worker whose call timed out before the 5th did. After it, one call per half-open
    // probe (open about 1 s, 2 s, 4 s: at most three probes in 8 s).
    let mut ends: Vec<Duration> = failed.iter().map(|c| c.end).collect();
    ends.sort();
    let opened = ends.get(threshold - 1).copied().expect("at least 5 calls timed out");
    let before = failed.iter().filter(|c| c.start < opened).count();
    let probes = failed.len() - before;
    assert!(before <= 8 + (threshold - 1), "{before} calls timed out before the breaker opened: {failed:?}");
    assert!(probes <= 3, "{probes} calls timed out after the breaker opened: {failed:?}");
    served_every_second(&calls, frozen..frozen + hung_for);
    eprintln!(
        "hung 8 s, retries off: {} calls, {} timed out ({:?} after the freeze)",
        calls.len(),
        failed.len(),
        failed.iter().map(|c| c.start.saturating_sub(frozen)).collect::<Vec<_>>(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_hung_for_4s_fails_no_call_when_attempts_have_a_per_try_timeout() {
    let servers = [Server::start(), Server::start(), Server::start()];
    let retry = RetryPolicy::default()
        .with_methods(greeter_client::GREETER_IDEMPOTENT)
        .with_per_try_timeout(Duration::from_millis(200));
    let set = EndpointSet::from_addresses(servers.iter().map(|s| s.addr.clone()));
    let resilience = Resilience {
        endpoint_breaker: BreakerConfig::default(),
        service_breaker: greeter_client::default_service_breaker(),
        retry,
    };
    let mesh = Mesh::spawn(BalancerConfig::new("greeter"), &resilience, tokio_stream::once(set)).expect("valid");
    mesh.balanced.wait_ready(Duration::from_secs(5)).await.expect("three servers up");
    let hung_for = Duration::from_secs(4);
    let (calls, frozen) = under_a_hang(&mesh, Duration::from_secs(1), hung_for, &servers[2]).await;
    let failed = failed(&calls);
    assert!(
        failed.is_empty(),
        "{} of {} calls failed: {:?}",
        failed.len(),
        calls.len(),
        &failed[..failed.len().min(5)]
    );
    served_every_second(&calls, frozen..frozen + hung_for);
    let slowest = calls.iter().map(|c| c.end - c.start).max().unwrap_or_default();
    assert!(slowest < Duration::from_secs(1), "the slowest call took {slowest:?}");
    eprintln!(
        "hung 4 s, per-try timeout 200 ms: {} calls, none failed, slowest {slowest:?}, {} retries",
        calls.len(),
        mesh.retries.retries()
    );
}
