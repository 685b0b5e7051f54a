//! greeter-server processes as an init system and an operator signal them: SIGHUP (a
//! `systemctl reload`) reloads what there is and ends nothing; a second SIGTERM or SIGINT
//! cuts the shutdown short; a shutdown with etcd hung says what it could not do; a TLS
//! server answers plaintext health probes (the kubelet's) on its health port.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_etcd_local::Signal;
use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;

/// A process whose log goes to a file the test reads.
struct Process {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Process {
    fn spawn(mut command: Command) -> Process {
        let log = tempfile::NamedTempFile::new().expect("log file");
        let child = command
            .env("RUST_LOG", "debug,h2=info,tower=info,hyper=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.reopen().expect("log handle"))
            .spawn()
            .expect("start the process");
        Process { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Waits for `line` in the log; a hang guard, not a timing assertion.
    fn wait_for(&mut self, line: &str) {
        let start = Instant::now();
        while !self.log().contains(line) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("exited ({status}) before logging {line:?}:\n{}", self.log());
            }
            assert!(start.elapsed() < Duration::from_secs(60), "no {line:?} in 60 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, signal: Signal) {
        mesh_etcd_local::signal(self.child.id(), signal).expect("signal");
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A greeter-server with `args`.
fn greeter_server(args: &[&str]) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_greeter-server"));
    command.args(args);
    Process::spawn(command)
}

/// A greeter-server without etcd, on `addr`.
fn server(addr: &str, extra: &[&str]) -> Process {
    greeter_server(&[&["--listen", addr, "--no-register"], extra].concat())
}

fn free_addr() -> String {
    format!("127.0.0.1:{}", mesh_etcd_local::free_port().expect("port"))
}

async fn greet(addr: &str) -> String {
    let mut client = GreeterClient::connect(format!("http://{addr}")).await.expect("connect");
    client.say_hello(HelloRequest { name: "hup".into() }).await.expect("a call").into_inner().message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_leaves_a_plaintext_server_serving_and_says_there_is_nothing_to_reload() {
    let addr = free_addr();
    let mut s = server(&addr, &[]);
    // The handler is installed before the server binds.
    s.wait_for("serving greeter.v1");
    for _ in 0..3 {
        s.signal(Signal::Hup);
    }
    s.wait_for("SIGHUP received: nothing to reload");
    assert!(s.alive(), "SIGHUP ended the server:\n{}", s.log());
    assert_eq!(greet(&addr).await, "Hello, hup!");
    assert!(s.log().contains("SIGHUP handled: it reloads nothing"), "{}", s.log());
    s.signal(Signal::Term);
    let status = s.child.wait().expect("wait");
    assert!(status.success(), "{status}:\n{}", s.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_tls_servers_certificate_and_leaves_it_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = mesh_etcd_local::pki::Pki::create(dir.path(), "hup").expect("ca");
    let cert = pki.issue("server", "greeter", &["127.0.0.1"], mesh_etcd_local::pki::Validity::Current).expect("cert");
    let addr = free_addr();
    let (c, k) = (path(&cert.cert), path(&cert.key));
    let mut s = server(&addr, &["--tls-cert", c, "--tls-key", k]);
    s.wait_for("serving greeter.v1");
    s.signal(Signal::Hup);
    s.wait_for("SIGHUP received: reloading the TLS certificate files");
    s.wait_for("reloaded");
    assert!(s.alive(), "SIGHUP ended the server:\n{}", s.log());
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_cuts_the_drain_short_and_says_so() {
    let addr = free_addr();
    let mut s = server(&addr, &["--drain-timeout", "1h"]);
    s.wait_for("serving greeter.v1");
    // A stream the client does not read: a window of 64 bytes holds the server's messages
    // back, so the call stays in flight until it is cut.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .initial_stream_window_size(Some(64))
        .connect()
        .await
        .expect("connect");
    let request = mesh_proto::pb::HelloStreamRequest { name: "slow reader".into(), count: 10_000 };
    let held = GreeterClient::new(channel).say_hello_stream(request).await.expect("the stream starts");
    s.signal(Signal::Term);
    s.wait_for("draining in-flight calls");
    s.signal(Signal::Int);
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = s.child.try_wait() {
            break status;
        }
        // A hang guard: the drain alone would last an hour.
        assert!(start.elapsed() < Duration::from_secs(60), "a second signal did not end the drain:\n{}", s.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = s.log();
    assert!(status.success(), "{status}:\n{log}");
    assert!(log.contains("SIGINT received during the shutdown: cutting it short"), "{log}");
    assert!(log.contains("shutdown cut short: calls still in flight were cut"), "{log}");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_hung_the_shutdown_logs_why_it_did_not_deregister_and_never_claims_it_did() {
    let mut etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let addr = free_addr();
    let endpoints = etcd.endpoints().join(",");
    let mut s = greeter_server(&["--listen", &addr, "--etcd", &endpoints, "--instance-id", "hung", "--ttl", "3s"]);
    s.wait_for("registered");
    let key = "/mesh/services/greeter/hung";
    assert!(etcd.get(key).await.expect("read etcd").is_some(), "{key} not registered:\n{}", s.log());
    etcd.pause(0).expect("SIGSTOP etcd");
    s.signal(Signal::Term);
    let status = s.child.wait().expect("wait");
    etcd.resume(0).expect("SIGCONT etcd");
    let log = s.log();
    assert!(status.success(), "{status}:\n{log}");
    let line = log.lines().find(|l| l.contains("WARN") && l.contains(&format!("deregistering {key}"))).unwrap_or("");
    println!("{line}");
    assert!(line.contains("the key expires with its lease"), "no reason why it did not deregister:\n{log}");
    assert!(!log.contains("deregistered; serving out the grace period"), "it claimed to have deregistered:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_server_answers_plaintext_health_probes_on_its_health_port_until_it_stops() {
    // The kubelet's gRPC probe cannot speak TLS: against the TLS port it always fails.
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = mesh_etcd_local::pki::Pki::create(dir.path(), "health").expect("ca");
    let cert = pki.issue("server", "greeter", &["127.0.0.1"], mesh_etcd_local::pki::Validity::Current).expect("cert");
    let (addr, health) = (free_addr(), free_addr());
    let (c, k) = (path(&cert.cert), path(&cert.key));
    let mut s = server(&addr, &["--tls-cert", c, "--tls-key", k, "--health-listen", &health]);
    s.wait_for("serving greeter.v1");
    let connect = |a: &str| {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{a}")).expect("uri");
        async move { endpoint.connect().await }
    };
    let mut probe = HealthClient::new(connect(&health).await.expect("plaintext connect"));
    let status = probe.check(HealthCheckRequest { service: String::new() }).await.expect("a check").into_inner().status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let mut watch = probe.watch(HealthCheckRequest { service: String::new() }).await.expect("a watch").into_inner();
    assert_eq!(watch.message().await.expect("a status").map(|r| r.status), Some(ServingStatus::Serving as i32));
    // The same probe against the TLS port fails, as the kubelet's did.
    let failed = match connect(&addr).await {
        Ok(channel) => HealthClient::new(channel).check(HealthCheckRequest::default()).await.is_err(),
        Err(_) => true,
    };
    assert!(failed, "a plaintext probe of the TLS port passed");
    s.signal(Signal::Term);
    assert_eq!(watch.message().await.expect("a status").map(|r| r.status), Some(ServingStatus::NotServing as i32));
    let status = s.child.wait().expect("wait");
    assert!(status.success(), "{status}:\n{}", s.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_registered_says_so_on_shutdown_and_serves_no_grace() {
    // etcd never answered: the log said "deregistered; serving out the grace period".
    let addr = free_addr();
    let nowhere = format!("http://{}", free_addr());
    let mut s = greeter_server(&["--listen", &addr, "--etcd", &nowhere, "--shutdown-grace", "1h"]);
    s.wait_for("serving greeter.v1");
    s.wait_for("registering when etcd comes");
    s.signal(Signal::Term);
    // A hang guard: an hour of grace would hold it.
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = s.child.try_wait() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "it served the grace period:\n{}", s.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = s.log();
    assert!(status.success(), "{status}:\n{log}");
    assert!(log.contains("never registered"), "{log}");
    assert!(!log.contains("deregistered;"), "it claimed to have deregistered:\n{log}");
}
