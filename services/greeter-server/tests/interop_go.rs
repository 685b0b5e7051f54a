//! Interoperability with the real Go libraries: Go greeter-servers that register with etcd's
//! `endpoints.Manager`, and a Go client that finds servers through etcd's gRPC resolver
//! (`interop/go`, built here with the `go` command), beside greeter-servers and mesh's client,
//! against a real etcd.
//!
//! These tests need Go (the version interop/go/go.mod names, or newer). `cargo xtask test`
//! leaves them out, saying so in one line, on a machine without it; run here without Go they
//! fail saying how to get it, never pass.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use greeter_client::Mesh;
use mesh_balancer::Strategy;
use mesh_etcd_local::Signal;
use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds interop/go's two commands once per test process; their directory.
///
/// Test processes run side by side: each builds into a directory of its own (Go's build
/// cache makes all but the first build quick), then renames the binaries into place, which
/// is atomic and leaves a binary another test is running intact.
fn go_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let module = root().join("interop").join("go");
        let out = root().join("target").join("go-interop");
        let own = out.join(format!(".build-{}", std::process::id()));
        std::fs::create_dir_all(&own).unwrap_or_else(|e| panic!("creating {}: {e}", own.display()));
        let go = std::env::var_os("GO").unwrap_or_else(|| "go".into());
        let built = Command::new(&go)
            .current_dir(&module)
            .args(["build", "-mod=readonly", "-buildvcs=false", "-o"])
            .arg(&own)
            .arg("./cmd/...")
            .output();
        match built {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!("`go build` in interop/go failed: {}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => panic!(
                "these tests need Go (interop/go/go.mod names the version) and `go` could not be run: {e}; \
                 install it, or let `cargo xtask test` leave them out"
            ),
        }
        for name in ["go-greeter-server", "go-greeter-client"] {
            std::fs::rename(own.join(name), out.join(name)).unwrap_or_else(|e| panic!("placing {name}: {e}"));
        }
        let _ = std::fs::remove_dir_all(&own);
        out
    })
}

/// A process of ours, killed on drop.
struct Proc {
    name: String,
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// SIGTERM, and its exit status within 15 s.
    fn terminate(mut self) -> std::process::ExitStatus {
        mesh_etcd_local::signal(self.child.id(), Signal::Term).expect("SIGTERM");
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < until, "{} did not stop on SIGTERM:\n{}", self.name, self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(name: &str, mut cmd: Command) -> Proc {
    let log = tempfile::NamedTempFile::new().expect("log file");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.reopen().expect("log handle"))
        .stderr(log.reopen().expect("log handle"))
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    Proc { name: name.into(), child, log }
}

/// A Go greeter-server registered by endpoints.Manager as `instance` at `addr`.
fn go_server(etcd: &mesh_testkit::Etcd, instance: &str, addr: &str, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(go_bin().join("go-greeter-server"));
    cmd.args(["-listen", addr, "-instance", instance, "-etcd", &etcd.endpoints().join(","), "-ttl", "3"]);
    cmd.args(["-grace", "300ms"]).args(extra);
    spawn(instance, cmd)
}

/// A greeter-server registered by mesh-registry as `instance` at `addr`.
fn rust_server(etcd: &mesh_testkit::Etcd, instance: &str, addr: &str, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_greeter-server"));
    cmd.args(["--listen", addr, "--instance-id", instance, "--etcd", &etcd.endpoints().join(",")]);
    cmd.args(["--ttl", "3s", "--shutdown-grace", "300ms", "--no-config"]).args(extra).env("RUST_LOG", "info");
    spawn(instance, cmd)
}

/// The Go client, finding greeter through etcd's resolver, with `args`.
///
/// etcd's resolver drops the first "/" of the target's path, so keys under "/mesh/…" are
/// reached with four slashes; and grpc-go would send that path as :authority, which hyper
/// refuses (PROTOCOL_ERROR), so the client names the service as its authority.
fn go_client(etcd: &mesh_testkit::Etcd, args: &[&str]) -> Proc {
    let mut cmd = Command::new(go_bin().join("go-greeter-client"));
    cmd.args(["-etcd", &etcd.endpoints().join(","), "-target", "etcd:////mesh/services/greeter"]);
    cmd.args(["-authority", "greeter"]).args(args);
    spawn("go-greeter-client", cmd)
}

/// Waits for the Go client to end, and checks it exited 0: its JSON report, and its whole
/// output for messages.
async fn go_report(mut client: Proc) -> (serde_json::Value, String) {
    let (status, out) =
        tokio::task::spawn_blocking(move || (client.child.wait().expect("wait"), client.log())).await.expect("join");
    assert!(status.success(), "the Go client failed calls: {out}");
    let report = serde_json::from_str(out.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {out}"));
    (report, out)
}

fn free_addr() -> String {
    format!("127.0.0.1:{}", mesh_etcd_local::free_port().expect("port"))
}

/// Waits until `names` are all registered under /mesh/services/greeter/.
async fn registered(etcd: &mesh_testkit::Etcd, names: &[&str], procs: &[&Proc]) {
    let found = mesh_testkit::eventually("the servers to register", Duration::from_secs(20), || async {
        for name in names {
            etcd.get(&format!("/mesh/services/greeter/{name}")).await.ok()??;
        }
        Some(())
    })
    .await;
    if found.is_err() {
        let logs: Vec<String> = procs.iter().map(|p| format!("--- {}:\n{}", p.name, p.log())).collect();
        panic!("{names:?} did not all register within 20 s\n{}", logs.join("\n"));
    }
}

/// `count` calls through mesh's client stack with `strategy`, discovering greeter in etcd;
/// replies per served_by, and the failures.
async fn rust_calls(etcd: &mesh_testkit::Etcd, strategy: Strategy, count: usize) -> (BTreeMap<String, u64>, u64) {
    calls_through(&discover(etcd, strategy, None).await, count).await
}

async fn discover(etcd: &mesh_testkit::Etcd, strategy: Strategy, tls: Option<mesh_tls::ClientTls>) -> Mesh {
    let etcd = etcd.endpoints().join(",");
    greeter_client::discovered(&etcd, "/mesh", "greeter", strategy, &greeter_client::resilience(), tls)
        .await
        .expect("discovered")
}

/// `count` calls through `mesh`: replies per served_by, and the failures.
async fn calls_through(mesh: &Mesh, count: usize) -> (BTreeMap<String, u64>, u64) {
    let mut client = GreeterClient::new(mesh.channel.clone());
    let (mut by, mut failed) = (BTreeMap::new(), 0);
    for _ in 0..count {
        match client.say_hello(HelloRequest { name: "interop".into() }).await {
            Ok(reply) => *by.entry(reply.into_inner().served_by).or_default() += 1,
            Err(_) => failed += 1,
        }
    }
    (by, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_interop_servers_registered_by_endpoints_manager_are_balanced_by_mesh_with_each_strategy_and_their_weight_honoured()
 {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let a = go_server(&etcd, "go-a", &free_addr(), &[]);
    let b = go_server(&etcd, "go-b", &free_addr(), &["-weight", "3"]);
    registered(&etcd, &["go-a", "go-b"], &[&a, &b]).await;
    // What Go wrote, as Go wrote it: the shape mesh-registry writes too.
    let value = etcd.get("/mesh/services/greeter/go-b").await.expect("get").expect("present");
    assert!(value.contains(r#""Metadata":{"instance":"go-b","version":"go","weight":3}"#), "{value}");

    for name in ["round_robin", "random", "weighted", "consistent_hash", "p2c", "p2c_ewma"] {
        let strategy: Strategy = name.parse().expect("a strategy");
        let (by, failed) = rust_calls(&etcd, strategy, 40).await;
        assert_eq!(failed, 0, "{name}: {by:?}");
        assert_eq!(by.values().sum::<u64>(), 40, "{name}: {by:?}");
        match name {
            "round_robin" => assert_eq!((by.get("go-a"), by.get("go-b")), (Some(&20), Some(&20)), "{by:?}"),
            // Go's weight 3 beside no weight (1): exactly 10 and 30 of 40.
            "weighted" => assert_eq!((by.get("go-a"), by.get("go-b")), (Some(&10), Some(&30)), "{by:?}"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_interop_client_finds_greeter_servers_through_etcds_resolver_and_a_sigtermed_one_leaves_without_a_lost_call()
{
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let r1 = rust_server(&etcd, "rs-1", &free_addr(), &[]);
    let r2 = rust_server(&etcd, "rs-2", &free_addr(), &[]);
    registered(&etcd, &["rs-1", "rs-2"], &[&r1, &r2]).await;

    let client = go_client(&etcd, &["-duration", "4s", "-interval", "5ms", "-timeout", "2s"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = r2.terminate();
    assert!(status.success(), "rs-2 exited with {status}");
    let (report, out) = go_report(client).await;
    assert_eq!(report["failed"], 0, "{out}");
    assert!(report["served_by"]["rs-1"].as_u64().is_some_and(|n| n > 0), "{out}");
    assert!(report["served_by"]["rs-2"].as_u64().is_some_and(|n| n > 0), "rs-2 served before it left: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_interop_a_mixed_fleet_restarted_one_by_one_under_mesh_loses_no_call() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let names = ["go-1", "rs-1", "go-2", "rs-2"];
    let addrs: Vec<String> = names.iter().map(|_| free_addr()).collect();
    let start = |i: usize| {
        if names[i].starts_with("go") {
            go_server(&etcd, names[i], &addrs[i], &[])
        } else {
            rust_server(&etcd, names[i], &addrs[i], &[])
        }
    };
    let mut fleet: Vec<Option<Proc>> = (0..names.len()).map(|i| Some(start(i))).collect();
    let procs: Vec<&Proc> = fleet.iter().flatten().collect();
    registered(&etcd, &names, &procs).await;

    let mesh = discover(&etcd, Strategy::RoundRobin, None).await;
    let calling = tokio::sync::watch::channel(true);
    let caller = {
        let (mesh, running) = (mesh.clone(), calling.1.clone());
        tokio::spawn(async move {
            let mut client = GreeterClient::new(mesh.channel.clone());
            let (mut served, mut failures) = (Vec::new(), Vec::new());
            while *running.borrow() {
                match client.say_hello(HelloRequest { name: "fleet".into() }).await {
                    Ok(reply) => served.push(reply.into_inner().served_by),
                    Err(status) => failures.push(status),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (served, failures)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..names.len() {
        let old = fleet[i].take().expect("running");
        let status = tokio::task::spawn_blocking(move || old.terminate()).await.expect("join");
        assert!(status.success(), "{} exited with {status} on SIGTERM", names[i]);
        fleet[i] = Some(start(i));
        let procs: Vec<&Proc> = fleet.iter().flatten().collect();
        registered(&etcd, &[names[i]], &procs).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = calling.0.send(false);
    let (served, failures) = caller.await.expect("caller");
    assert!(
        failures.is_empty(),
        "{} of {} calls failed: {:?}",
        failures.len(),
        served.len() + failures.len(),
        failures
    );
    let tail = &served[served.len() * 3 / 4..];
    for name in names {
        assert!(
            tail.iter().any(|s| s == name),
            "{name} served nothing after the restarts: {:?}",
            &tail[..10.min(tail.len())]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_interop_with_tls_the_go_client_calls_greeter_servers_and_mesh_calls_go_servers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = mesh_testkit::pki::Pki::create(dir.path(), "interop").expect("CA");
    let cert = pki
        .issue("server", "greeter", &["127.0.0.1", "greeter"], mesh_testkit::pki::Validity::Current)
        .expect("certificate");
    let (cert_path, key_path) = (cert.cert.to_str().expect("utf-8"), cert.key.to_str().expect("utf-8"));
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let go = go_server(&etcd, "go-tls", &free_addr(), &["-tls-cert", cert_path, "-tls-key", key_path]);
    let rs = rust_server(&etcd, "rs-tls", &free_addr(), &["--tls-cert", cert_path, "--tls-key", key_path]);
    registered(&etcd, &["go-tls", "rs-tls"], &[&go, &rs]).await;
    let value = etcd.get("/mesh/services/greeter/go-tls").await.expect("get").expect("present");
    assert!(value.contains(r#""tls":true"#), "the Go server says it speaks TLS: {value}");

    // mesh's client, trusting the CA, calls both over TLS.
    let tls = mesh_tls::ClientTls::load(pki.ca_file(), None).expect("client TLS");
    let (by, failed) = calls_through(&discover(&etcd, Strategy::RoundRobin, Some(tls)).await, 20).await;
    assert_eq!((failed, by.get("go-tls"), by.get("rs-tls")), (0, Some(&10), Some(&10)), "{by:?}");

    // The Go client, trusting the same CA, calls both over TLS.
    let ca = pki.ca_file();
    let client = go_client(&etcd, &["-tls-ca", ca.to_str().expect("utf-8"), "-count", "20", "-timeout", "3s"]);
    let (report, out) = go_report(client).await;
    assert_eq!(report["failed"], 0, "{out}");
    assert!(report["served_by"]["go-tls"].as_u64().is_some_and(|n| n > 0), "{out}");
    assert!(report["served_by"]["rs-tls"].as_u64().is_some_and(|n| n > 0), "{out}");
}
