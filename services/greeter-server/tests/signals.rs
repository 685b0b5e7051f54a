//! greeter-server processes as an init system signals them: SIGHUP (a `systemctl reload`)
//! reloads what there is and ends nothing.

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

fn server(addr: &str, extra: &[&str]) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_greeter-server"));
    command.args(["--listen", addr, "--no-register", "--drain-timeout", "5s"]).args(extra);
    Process::spawn(command)
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
