//! The registry lifecycle end to end: real greeter-server processes registering in a real
//! etcd (mesh-testkit), and a client that discovers them (mesh-discovery + mesh-balancer)
//! under load, through graceful stops, kill -9, etcd outages, a rebuilt etcd and a leader
//! election. Short TTLs (2 s) keep it fast.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_balancer::{BalancedChannel, Balancer, BalancerConfig};
use mesh_discovery::{EtcdResolver, Resolution};
use mesh_etcd::{Etcd, EtcdOptions};
use mesh_etcd_local::Signal;
use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;
use mesh_testkit::eventually;
use tonic::transport::Channel;

const PREFIX: &str = "/mesh/services/greeter/";

/// A greeter-server process.
struct Server {
    name: String,
    addr: String,
    child: Child,
    _logs: tempfile::NamedTempFile,
}

impl Server {
    fn start(name: &str, etcd: &mesh_testkit::Etcd) -> Server {
        let port = mesh_etcd_local::free_port().expect("port");
        let addr = format!("127.0.0.1:{port}");
        let logs = tempfile::NamedTempFile::new().expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_greeter-server"))
            .args(["--listen", &addr, "--instance-id", name, "--ttl", "2s", "--shutdown-grace", "500ms"])
            .args(["--etcd", &etcd.endpoints().join(",")])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logs.reopen().expect("log handle"))
            .spawn()
            .expect("start greeter-server");
        Server { name: name.into(), addr, child, _logs: logs }
    }

    fn key(&self) -> String {
        format!("{PREFIX}{}", self.name)
    }

    /// What it logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self._logs.path()).unwrap_or_default()
    }

    /// SIGTERM, then the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        mesh_etcd_local::signal(self.child.id(), Signal::Term).expect("SIGTERM");
        self.child.wait().expect("wait")
    }

    fn kill(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("wait");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A discovering client under load: `workers` callers in a loop until stopped.
struct Load {
    resolution: Resolution,
    channel: BalancedChannel<Channel>,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    served: Arc<Mutex<BTreeMap<String, u64>>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(etcd: &mesh_testkit::Etcd, workers: usize) -> Load {
        let client = Etcd::new(
            EtcdOptions::new(etcd.endpoints())
                .expect("endpoints")
                .with_request_timeout(Duration::from_millis(800))
                .with_connect_timeout(Duration::from_millis(300))
                .with_watch_progress_interval(Duration::from_millis(500)),
        );
        let resolution = EtcdResolver::new(client, "/mesh", "greeter").with_settle(Duration::from_secs(4)).spawn();
        let channel = Balancer::spawn(BalancerConfig::new("greeter"), resolution.updates());
        // As greeter-client does: calls start once etcd was listed and a server is reachable.
        resolution.wait_listed(Duration::from_secs(5)).await.expect("listed");
        channel.wait_ready(Duration::from_secs(5)).await.expect("a server reachable");
        let load = Load {
            resolution,
            channel,
            stop: Arc::new(AtomicBool::new(false)),
            ok: Arc::default(),
            failures: Arc::default(),
            served: Arc::default(),
            workers: Vec::new(),
        };
        let mut load = load;
        for _ in 0..workers {
            let (channel, stop, ok, failures, served) =
                (load.channel.clone(), load.stop.clone(), load.ok.clone(), load.failures.clone(), load.served.clone());
            load.workers.push(tokio::spawn(async move {
                let mut client = GreeterClient::new(channel);
                while !stop.load(Ordering::Relaxed) {
                    let mut request = tonic::Request::new(HelloRequest { name: "load".into() });
                    request.set_timeout(Duration::from_secs(2));
                    match client.say_hello(request).await {
                        Ok(r) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            *served.lock().expect("lock").entry(r.into_inner().served_by).or_default() += 1;
                        }
                        Err(s) => failures.lock().expect("lock").push(format!("{:?}: {}", s.code(), s.message())),
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
        load
    }

    /// Waits until the client routes to exactly `names`.
    async fn routes_to(&self, names: &[&str], within: Duration) {
        let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        want.sort();
        eventually(&format!("client routing to {want:?}"), within, || async {
            let mut ids: Vec<String> = self.channel.endpoints().into_iter().map(|e| e.id).collect();
            ids.sort();
            (ids == want).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; it routes to {:?}", self.channel.endpoints()));
    }

    /// Calls that succeeded so far; waits until at least `n` more have.
    async fn progress(&self, n: u64) {
        let start = self.ok.load(Ordering::Relaxed);
        eventually("calls flowing", Duration::from_secs(10), || async {
            (self.ok.load(Ordering::Relaxed) >= start + n).then_some(())
        })
        .await
        .expect("calls flow");
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().expect("lock").clone()
    }

    fn served_by(&self, name: &str) -> u64 {
        self.served.lock().expect("lock").get(name).copied().unwrap_or(0)
    }

    /// Stops the load and asserts that not one call failed.
    async fn finish_with_no_failed_call(self) {
        let (ok, failures) = self.finish().await;
        assert!(failures.is_empty(), "{} failed of {}: {failures:?}", failures.len(), ok + failures.len() as u64);
    }

    async fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            let _ = w.await;
        }
        (self.ok.load(Ordering::Relaxed), self.failures())
    }
}

/// The client's view (ids) equals what etcd holds under the prefix.
async fn view_matches_etcd(load: &Load, etcd: &mesh_testkit::Etcd, within: Duration) {
    eventually("client view equals get --prefix", within, || async {
        let held: Vec<String> = etcd
            .get_prefix(PREFIX)
            .await
            .ok()?
            .into_iter()
            .map(|kv| kv.key.trim_start_matches(PREFIX).to_string())
            .collect();
        let mut seen: Vec<String> = load.resolution.current()?.endpoints.into_iter().map(|e| e.id).collect();
        seen.sort();
        (seen == held).then_some(())
    })
    .await
    .expect("converged");
}

/// How long a server process just started may take to register: its start, not what a test
/// claims (a busy machine running this file's ten tests at once once took over 10 s).
const STARTING: Duration = Duration::from_secs(30);

async fn registered(etcd: &mesh_testkit::Etcd, servers: &[&Server], within: Duration) {
    for s in servers {
        let found = eventually(&format!("{} registered", s.name), within, || async {
            etcd.get(&s.key()).await.ok().flatten().map(drop)
        })
        .await;
        // What the server said, when it did not register: why is in its log.
        if let Err(e) = found {
            panic!("{e:?}; {} logged:\n{}", s.name, s.log());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_registers_the_documented_json_once_serving() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let s1 = Server::start("s1", &etcd);
    registered(&etcd, &[&s1], STARTING).await;
    let value = etcd.get(&s1.key()).await.expect("get").expect("present");
    assert_eq!(
        value,
        format!(
            r#"{{"Op":0,"Addr":"{}","Metadata":{{"weight":1,"version":"{}","instance":"s1"}}}}"#,
            s1.addr,
            env!("CARGO_PKG_VERSION")
        )
    );
    // Someone deletes the key: it is back within a second.
    etcd.delete(&s1.key()).await.expect("delete");
    eventually("key back", Duration::from_secs(1), || async { etcd.get(&s1.key()).await.ok().flatten().map(drop) })
        .await
        .expect("back within 1 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_every_interface_without_advertise_registers_this_hosts_address() {
    // The Docker image's default command: --listen 0.0.0.0:50051 and nothing else. It exited
    // 1 ("pass --advertise"); go-zero and Kratos register the host's address instead.
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let port = mesh_etcd_local::free_port().expect("port");
    let host = mesh_registry::pick_host_ip(&mesh_registry::interface_addrs(), false);
    let logs = tempfile::NamedTempFile::new().expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_greeter-server"))
        .args(["--listen", &format!("0.0.0.0:{port}"), "--instance-id", "any", "--ttl", "2s"])
        .args(["--etcd", &etcd.endpoints().join(",")])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logs.reopen().expect("log handle"))
        .spawn()
        .expect("start greeter-server");
    let log = || std::fs::read_to_string(logs.path()).unwrap_or_default();
    let Some(host) = host else {
        // A host with loopback only: the server must say what to do, not register 0.0.0.0.
        let status = child.wait().expect("wait");
        assert!(!status.success() && log().contains("pass --advertise"), "{status}: {}", log());
        return;
    };
    let addr = std::net::SocketAddr::new(host, port).to_string();
    let value = eventually("the registration", Duration::from_secs(30), || async {
        etcd.get(&format!("{PREFIX}any")).await.ok().flatten()
    })
    .await
    .unwrap_or_else(|_| panic!("not registered:\n{}", log()));
    let _ = child.kill();
    let _ = child.wait();
    assert!(value.contains(&format!(r#""Addr":"{addr}""#)), "{value}");
    assert!(log().contains(&format!("advertising {addr}")), "{}", log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_three_servers_loses_no_call() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let mut servers: Vec<Server> = (1..=3).map(|i| Server::start(&format!("s{i}"), &etcd)).collect();
    registered(&etcd, &servers.iter().collect::<Vec<_>>(), STARTING).await;
    let load = Load::start(&etcd, 4).await;
    load.routes_to(&["s1", "s2", "s3"], Duration::from_secs(5)).await;
    load.progress(100).await;
    for generation in 1..=3 {
        let old = servers.remove(0);
        let key = old.key();
        let status = old.stop();
        assert!(status.success(), "graceful stop exits 0, got {status}");
        assert_eq!(etcd.get(&key).await.expect("get"), None, "the key is gone at once, not after the TTL");
        let new = Server::start(&format!("r{generation}"), &etcd);
        registered(&etcd, &[&new], STARTING).await;
        servers.push(new);
        let mut names: Vec<String> = servers.iter().map(|s| s.name.clone()).collect();
        names.sort();
        load.routes_to(&names.iter().map(String::as_str).collect::<Vec<_>>(), Duration::from_secs(5)).await;
        load.progress(50).await;
    }
    load.finish_with_no_failed_call().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_removes_the_key_within_ttl_plus_1s_and_the_client_stops_using_it() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let servers: Vec<Server> = (1..=3).map(|i| Server::start(&format!("s{i}"), &etcd)).collect();
    registered(&etcd, &servers.iter().collect::<Vec<_>>(), STARTING).await;
    let load = Load::start(&etcd, 2).await;
    load.routes_to(&["s1", "s2", "s3"], Duration::from_secs(5)).await;
    load.progress(50).await;
    let mut servers = servers.into_iter();
    let victim = servers.next().expect("s1");
    let key = victim.key();
    victim.kill();
    let killed_at = Instant::now();
    eventually("key expired", Duration::from_secs(3), || async {
        etcd.get(&key).await.ok().flatten().is_none().then_some(())
    })
    .await
    .expect("gone within TTL + 1 s");
    println!("key gone {:?} after kill -9", killed_at.elapsed());
    load.routes_to(&["s2", "s3"], Duration::from_secs(2)).await;
    let before = load.served_by("s1");
    let failed_before = load.failures().len();
    load.progress(100).await;
    assert_eq!(load.served_by("s1"), before, "no call reaches the killed server");
    let (_, failures) = load.finish().await;
    assert_eq!(failures.len(), failed_before, "calls failed after the client stopped routing to s1: {failures:?}");
    // Without retries, a call may fail only at the killed server, for want of it: one caught
    // in flight by the kill, or one sent before the balancer saw its connection end (on a
    // busy machine its worker may see that a call later), at most one of each per caller.
    assert!(failures.len() <= 2 * 2, "{failures:?}");
    for f in &failures {
        assert!(f.starts_with("Unavailable: endpoint s1 "), "a failure not at the killed server: {f}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outages_shorter_and_longer_than_the_ttl_fail_no_call_and_recover() {
    let mut etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let servers: Vec<Server> = (1..=3).map(|i| Server::start(&format!("s{i}"), &etcd)).collect();
    registered(&etcd, &servers.iter().collect::<Vec<_>>(), STARTING).await;
    let load = Load::start(&etcd, 4).await;
    load.routes_to(&["s1", "s2", "s3"], Duration::from_secs(5)).await;
    for outage in [Duration::from_secs(1), Duration::from_secs(4)] {
        etcd.kill(0).expect("kill etcd");
        let down_at = Instant::now();
        // Calls keep flowing on the last known set while etcd is away.
        load.progress(100).await;
        tokio::time::sleep(outage.saturating_sub(down_at.elapsed())).await;
        etcd.restart(0).await.expect("etcd back");
        let back = Instant::now();
        registered(&etcd, &servers.iter().collect::<Vec<_>>(), Duration::from_secs(5)).await;
        let status = load.resolution.status();
        eventually(
            "the client's watch in sync again",
            Duration::from_secs(5).saturating_sub(back.elapsed()),
            || async { status.borrow().view.as_ref().is_some_and(|v| v.in_sync).then_some(()) },
        )
        .await
        .expect("watch recovered within 5 s of etcd's return");
        view_matches_etcd(&load, &etcd, Duration::from_secs(2)).await;
        println!("outage {outage:?}: registrations, watch and view back {:?} after etcd", back.elapsed());
        load.routes_to(&["s1", "s2", "s3"], Duration::from_secs(2)).await;
        // Keepalives resumed: a TTL later every key is still there, under the same lease.
        let held = |kvs: Vec<mesh_testkit::KeyValue>| kvs.into_iter().map(|kv| (kv.key, kv.lease)).collect::<Vec<_>>();
        let leases = held(etcd.get_prefix(PREFIX).await.expect("list"));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let later = held(etcd.get_prefix(PREFIX).await.expect("list"));
        assert_eq!(later, leases, "registrations kept alive after the outage");
        load.progress(100).await;
    }
    load.finish_with_no_failed_call().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_etcd_gets_every_server_back_and_clients_converge_with_no_failed_call() {
    let mut etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let servers: Vec<Server> = (1..=3).map(|i| Server::start(&format!("s{i}"), &etcd)).collect();
    registered(&etcd, &servers.iter().collect::<Vec<_>>(), STARTING).await;
    let load = Load::start(&etcd, 4).await;
    load.routes_to(&["s1", "s2", "s3"], Duration::from_secs(5)).await;
    etcd.restart_fresh().await.expect("fresh etcd");
    let back = Instant::now();
    // TTL/3 (0.67 s) until a keepalive finds the lease gone, plus a backoff of at most TTL/3.
    registered(&etcd, &servers.iter().collect::<Vec<_>>(), Duration::from_secs(3)).await;
    println!("every server re-registered {:?} after the fresh etcd", back.elapsed());
    view_matches_etcd(&load, &etcd, Duration::from_secs(5)).await;
    load.routes_to(&["s1", "s2", "s3"], Duration::from_secs(6)).await;
    load.progress(100).await;
    load.finish_with_no_failed_call().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_of_three_under_load_fails_no_call_and_loses_no_lease() {
    let mut etcd = mesh_testkit::Etcd::start_cluster(3).await.expect("cluster");
    let servers: Vec<Server> = (1..=3).map(|i| Server::start(&format!("s{i}"), &etcd)).collect();
    registered(&etcd, &servers.iter().collect::<Vec<_>>(), STARTING).await;
    let leases = |kvs: Vec<mesh_testkit::KeyValue>| kvs.into_iter().map(|kv| (kv.key, kv.lease)).collect::<Vec<_>>();
    let before = leases(etcd.get_prefix(PREFIX).await.expect("list"));
    let load = Load::start(&etcd, 4).await;
    load.routes_to(&["s1", "s2", "s3"], Duration::from_secs(5)).await;
    let leader = etcd.leader().await.expect("leader");
    etcd.kill(leader).expect("kill leader");
    eventually("a new leader", Duration::from_secs(10), || async { etcd.leader().await.ok() }).await.expect("elected");
    // Past two TTLs: a lost keepalive would have let a lease expire by now.
    let elected = Instant::now();
    while elected.elapsed() < Duration::from_secs(5) {
        load.progress(50).await;
    }
    let after = leases(etcd.get_prefix(PREFIX).await.expect("list"));
    assert_eq!(after, before, "the same keys under the same leases");
    // The client's watch now runs on a surviving member: a change still reaches it.
    let s4 = Server::start("s4", &etcd);
    registered(&etcd, &[&s4], STARTING).await;
    load.routes_to(&["s1", "s2", "s3", "s4"], Duration::from_secs(5)).await;
    load.finish_with_no_failed_call().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_with_one_instance_id_do_not_fight_and_the_second_takes_over_when_the_first_exits() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let first = Server::start("dup", &etcd);
    registered(&etcd, &[&first], STARTING).await;
    let status_key = "/mesh/status/greeter/dup";
    let status_of = || async { etcd.get_prefix(status_key).await.ok()?.into_iter().find(|kv| kv.key == status_key) };
    let reported =
        eventually("the first reports its status", Duration::from_secs(10), status_of).await.expect("status reported");
    let start = etcd.revision().await.expect("revision");
    let second = Server::start("dup", &etcd);
    let started = Instant::now();
    eventually("the second logs the conflict", Duration::from_secs(10), || async {
        second.log().contains("not registering").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; its log: {}", second.log()));
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(started.elapsed())).await;
    let grown = etcd.revision().await.expect("revision") - start;
    assert!(grown < 50, "etcd's revision grew by {grown} in 10 s: the two servers are fighting over the key");
    let held = etcd.get(&first.key()).await.expect("get").expect("held");
    assert!(held.contains(&first.addr), "the first keeps the key: {held}");
    let log = second.log();
    let conflicts: Vec<&str> = log.lines().filter(|l| l.contains("not registering")).collect();
    assert_eq!(conflicts.len(), 1, "the conflict is logged once: {conflicts:?}");
    assert!(conflicts[0].contains(&first.key()) && conflicts[0].contains(&first.addr), "{}", conflicts[0]);
    assert!(conflicts[0].contains("ERROR"), "{}", conflicts[0]);
    let status = status_of().await.expect("the holder's status");
    assert_eq!(
        (status.lease, status.mod_revision),
        (reported.lease, reported.mod_revision),
        "the waiting second wrote the status key of the first: {status:?}"
    );
    assert!(!log.contains("lease lost"), "the second never held the key, so lost no lease: {log}");

    let status = first.stop();
    assert!(status.success(), "{status}");
    let exited = Instant::now();
    // The first deregisters on the way out, so the second takes the key well within a TTL.
    eventually("the second holds the key", Duration::from_secs(3), || async {
        etcd.get(&second.key()).await.ok().flatten().filter(|v| v.contains(&second.addr)).map(drop)
    })
    .await
    .expect("taken over");
    println!("the second server took the key {:?} after the first exited", exited.elapsed());
    eventually("the second reports its status", Duration::from_secs(10), || async {
        status_of().await.filter(|kv| kv.lease != reported.lease).map(drop)
    })
    .await
    .expect("the new holder reports");
}

/// Runs `greeter-server config …` against `etcd`; (exit success, stdout, stderr).
fn config_command(etcd: &mesh_testkit::Etcd, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_greeter-server"))
        .args(["--etcd", &etcd.endpoints().join(","), "config"])
        .args(args)
        .output()
        .expect("run greeter-server config");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_server_applies_a_new_greeting_limit_and_log_level_and_refuses_a_bad_document_saying_why() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let s1 = Server::start("s1", &etcd);
    registered(&etcd, &[&s1], STARTING).await;
    let mut client = GreeterClient::new(
        Channel::from_shared(format!("http://{}", s1.addr)).expect("uri").connect().await.expect("connect"),
    );
    let greet = |mut c: GreeterClient<Channel>| async move {
        c.say_hello(HelloRequest { name: "Ada".into() }).await.map(|r| r.into_inner().message)
    };
    assert_eq!(greet(client.clone()).await.expect("call"), "Hello, Ada!");

    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.json");
    std::fs::write(&good, r#"{"server": {"greeting": "Hi, {name}.", "limiter": {"rate_per_sec": 1, "burst": 1}}}"#)
        .expect("write");
    let (ok, out, err) = config_command(&etcd, &["apply", good.to_str().expect("utf-8 path")]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("applied as /mesh/config/greeter at revision"), "{out}");
    let applied = eventually("the new greeting", Duration::from_secs(5), || {
        let c = client.clone();
        async move { greet(c).await.ok().filter(|m| m == "Hi, {name}.".replace("{name}", "Ada").as_str()) }
    })
    .await;
    assert!(applied.is_ok(), "{}", s1.log());
    // The limit applies too: 1 per second with a burst of 1, so of ten calls in a row at most
    // a couple pass (on a loaded machine a second may pass between two of them).
    let mut rejected = Vec::new();
    for _ in 0..10 {
        if let Err(status) = greet(client.clone()).await {
            rejected.push(status.code());
        }
    }
    assert!(rejected.len() >= 5, "the 1/s limit rejected only {} of 10 calls", rejected.len());
    assert!(rejected.iter().all(|&c| c == tonic::Code::ResourceExhausted), "{rejected:?}");

    // A bad document: `validate` and `apply` refuse it and write nothing.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"server": {"limiter": {"rate_per_sec": -1}}}"#).expect("write");
    let before = etcd.revision().await.expect("revision");
    for command in ["validate", "apply"] {
        let (ok, _, err) = config_command(&etcd, &[command, bad.to_str().expect("utf-8 path")]);
        assert!(!ok && err.contains("server.limiter: invalid rate limit rate_per_sec: is -1"), "{command}: {err}");
    }
    assert_eq!(etcd.revision().await.expect("revision"), before, "nothing written");

    // Put past the command (as an operator with etcdctl would): refused by the server,
    // which keeps serving as before and reports why.
    let refused = etcd.put("/mesh/config/greeter", r#"{"server": {"greeting": ""}}"#).await.expect("put");
    let shown = eventually("the refusal in the status", Duration::from_secs(5), || async {
        let (_, out, _) = config_command(&etcd, &["show"]);
        out.contains(&format!("revision {refused}: server.greeting is 0 bytes")).then_some(out)
    })
    .await
    .expect("reported");
    assert!(shown.contains("s1 "), "{shown}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    client = GreeterClient::new(
        Channel::from_shared(format!("http://{}", s1.addr)).expect("uri").connect().await.expect("connect"),
    );
    assert_eq!(greet(client.clone()).await.expect("call"), "Hi, Ada.", "the last good greeting stays");
    assert!(s1.log().contains("configuration refused"), "{}", s1.log());

    // The document deleted: back to the flags (no limit, the default greeting).
    etcd.delete("/mesh/config/greeter").await.expect("delete");
    eventually("back to the defaults", Duration::from_secs(5), || {
        let c = client.clone();
        async move { greet(c).await.ok().filter(|m| m == "Hello, Ada!") }
    })
    .await
    .expect("default greeting");
    assert!(s1.log().contains("configuration deleted; back to the file and flag settings"), "{}", s1.log());
    for _ in 0..5 {
        greet(client.clone()).await.expect("no limit any more");
    }

    // The log level, live: debug lines appear once it is applied.
    assert!(!s1.log().contains("DEBUG"), "started at info");
    etcd.put("/mesh/config/greeter", r#"{"server": {"log_level": "debug"}}"#).await.expect("put");
    eventually("debug logging", Duration::from_secs(5), || {
        let c = client.clone();
        let log = s1.log();
        async move {
            let _ = greet(c).await;
            (log.contains("log level now") && log.contains("DEBUG")).then_some(())
        }
    })
    .await
    .expect("debug lines in the log");
    assert_eq!(s1.stop().code(), Some(0));
    assert_eq!(etcd.get("/mesh/status/greeter/s1").await.expect("get"), None, "the status leaves with the server");
}

#[test]
fn config_validate_says_when_a_document_depends_on_a_clients_flags_and_refuses_a_partial_limiter() {
    let dir = tempfile::tempdir().expect("temp dir");
    let validate = |doc: &str| {
        let file = dir.path().join("doc.json");
        std::fs::write(&file, doc).expect("write");
        let out = Command::new(env!("CARGO_BIN_EXE_greeter-server"))
            .args(["config", "validate"])
            .arg(&file)
            .output()
            .expect("run greeter-server config validate");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, _) = validate(r#"{"client": {"breaker": {"open_ms": 20000}}}"#);
    assert!(ok, "{stdout}");
    assert!(
        stdout.contains("valid over the defaults")
            && stdout.contains("note: ")
            && stdout.contains("--breaker-max-open below 20000ms"),
        "{stdout}"
    );
    let (ok, stdout, _) = validate(r#"{"client": {"breaker": {"open_ms": 20000, "max_open_ms": 60000}}}"#);
    assert!(ok && !stdout.contains("note:"), "{stdout}");
    // Refused here as by every server, --rate or not: a document's limiter stands alone.
    let (ok, _, stderr) = validate(r#"{"server": {"limiter": {"burst": 5}}}"#);
    assert!(!ok && stderr.contains("rate_per_sec"), "{stderr}");
}
