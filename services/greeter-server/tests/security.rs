//! TLS between services, end to end: real greeter-server processes with certificates made
//! at test time (none is checked in), a real etcd, and the client stack of greeter-client.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use greeter_client::{Mesh, Resilience};
use mesh_balancer::Strategy;
use mesh_etcd::{Etcd, EtcdOptions};
use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;
use mesh_testkit::eventually;
use mesh_testkit::pki::{CertFiles, Pki, Validity};
use mesh_tls::{ClientTls, Identity};

/// A CA, a server certificate for 127.0.0.1 and a client certificate signed by it, and a
/// rogue CA with a server certificate of its own.
struct Certs {
    _dir: tempfile::TempDir,
    pki: Pki,
    server: CertFiles,
    client: CertFiles,
    rogue_ca: PathBuf,
    rogue_server: CertFiles,
}

fn certs() -> Certs {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::create(dir.path(), "mesh").expect("CA");
    let server =
        pki.issue("server", "greeter", &["127.0.0.1", "localhost", "greeter"], Validity::Current).expect("cert");
    let client = pki.issue("client", "greeter-client", &[], Validity::Current).expect("cert");
    let rogue = Pki::create(&dir.path().join("rogue"), "rogue").expect("rogue CA");
    let rogue_server = rogue.issue("server", "greeter", &["127.0.0.1", "localhost"], Validity::Current).expect("cert");
    Certs { rogue_ca: rogue.ca_file(), _dir: dir, pki, server, client, rogue_server }
}

/// A greeter-server process.
struct Server {
    name: String,
    addr: String,
    child: Child,
    logs: tempfile::NamedTempFile,
}

impl Server {
    fn start(name: &str, etcd: Option<&mesh_testkit::Etcd>, extra: &[&str]) -> Server {
        let port = mesh_etcd_local::free_port().expect("port");
        let addr = format!("127.0.0.1:{port}");
        let logs = tempfile::NamedTempFile::new().expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_greeter-server"));
        cmd.args(["--listen", &addr, "--instance-id", name, "--ttl", "2s", "--shutdown-grace", "200ms"]);
        match etcd {
            Some(etcd) => cmd.args(["--etcd", &etcd.endpoints().join(","), "--no-config"]),
            None => cmd.arg("--no-register"),
        };
        let child = cmd
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logs.reopen().expect("log handle"))
            .spawn()
            .expect("start greeter-server");
        Server { name: name.into(), addr, child, logs }
    }

    fn tls(name: &str, etcd: Option<&mesh_testkit::Etcd>, files: &CertFiles, client_ca: Option<&Path>) -> Server {
        let mut args = vec!["--tls-cert", path(&files.cert), "--tls-key", path(&files.key)];
        if let Some(ca) = client_ca {
            args.extend(["--tls-client-ca", path(ca)]);
        }
        Server::start(name, etcd, &args)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.logs.path()).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

fn etcd_of(etcd: &mesh_testkit::Etcd) -> Etcd {
    Etcd::new(EtcdOptions::new(etcd.endpoints()).expect("endpoints"))
}

/// Waits until `n` servers are registered.
async fn registered(etcd: &mesh_testkit::Etcd, n: usize) {
    eventually("the servers to register", Duration::from_secs(10), || async {
        etcd.get_prefix("/mesh/services/greeter/").await.map(|kvs| kvs.len() == n).unwrap_or(false).then_some(())
    })
    .await
    .expect("registered");
}

async fn discover(etcd: &mesh_testkit::Etcd, tls: Option<ClientTls>) -> anyhow::Result<Mesh> {
    greeter_client::discovered_through(
        etcd_of(etcd),
        "/mesh",
        "greeter",
        Strategy::RoundRobin,
        &Resilience::default(),
        tls,
    )
    .await
}

async fn hello(mesh: &Mesh) -> Result<String, tonic::Status> {
    let mut client = GreeterClient::new(mesh.channel.clone());
    client.say_hello(HelloRequest { name: "tls".into() }).await.map(|r| r.into_inner().served_by)
}

/// The error's whole chain, for matching words in it.
fn chain(e: &anyhow::Error) -> String {
    format!("{e:#}")
}

#[tokio::test]
async fn calls_go_over_tls_and_a_plaintext_client_a_wrong_ca_and_a_missing_client_certificate_are_refused_in_words() {
    let certs = certs();
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let a = Server::tls("a", Some(&etcd), &certs.server, Some(&certs.pki.ca_file()));
    let b = Server::tls("b", Some(&etcd), &certs.server, Some(&certs.pki.ca_file()));
    registered(&etcd, 2).await;
    let value = etcd.get(&format!("/mesh/services/greeter/{}", a.name)).await.expect("get").expect("registered");
    assert!(value.contains(r#""tls":true"#), "the registration says TLS: {value}");

    // The client as a user builds it: CA, its certificate, discovery, balancer.
    let tls = ClientTls::load(certs.pki.ca_file(), Some(Identity::new(&certs.client.cert, &certs.client.key)))
        .expect("client TLS");
    let mesh = discover(&etcd, Some(tls)).await.expect("a TLS client reaches the TLS servers");
    let mut served = std::collections::BTreeMap::new();
    for _ in 0..20 {
        *served.entry(hello(&mesh).await.expect("a call over mTLS")).or_insert(0) += 1;
    }
    assert_eq!(served.len(), 2, "both servers served: {served:?}");

    // A client without TLS settings does not dial servers registered as speaking TLS.
    let err = discover(&etcd, None).await.expect_err("a plaintext client");
    assert!(chain(&err).contains("it speaks TLS, and this client has no TLS settings"), "{err:#}");

    // A plaintext client dialling the port anyway is told why by the server.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", a.addr)).expect("uri").connect_lazy();
    let status = GreeterClient::new(channel).say_hello(HelloRequest { name: "x".into() }).await.expect_err("plaintext");
    assert!(format!("{status:?}").contains("this server speaks TLS only"), "{status:?}");
    eventually("the server to log the plaintext client", Duration::from_secs(5), || async {
        a.log().contains("spoke plaintext to this TLS port").then_some(())
    })
    .await
    .expect("logged");

    // A client that trusts another CA.
    let wrong = ClientTls::load(&certs.rogue_ca, Some(Identity::new(&certs.client.cert, &certs.client.key)))
        .expect("client TLS");
    let err = discover(&etcd, Some(wrong)).await.expect_err("a client that trusts another CA");
    assert!(chain(&err).contains("its certificate is not signed by a CA this client trusts"), "{err:#}");

    // A client with no certificate, to servers that require one.
    let anonymous = ClientTls::load(certs.pki.ca_file(), None).expect("client TLS");
    let failed = match discover(&etcd, Some(anonymous)).await {
        Err(e) => chain(&e),
        Ok(mesh) => format!("{:?}", hello(&mesh).await.expect_err("no client certificate")),
    };
    assert!(failed.contains("requires a client certificate"), "{failed}");
    eventually("the server to log the refused client", Duration::from_secs(5), || async {
        (a.log().contains("presented no certificate") || b.log().contains("presented no certificate")).then_some(())
    })
    .await
    .expect("logged");
}

/// Callers in a loop until stopped, counting replies by server and failures.
struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    served: Arc<Mutex<BTreeMap<String, u64>>>,
    errors: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(mesh: &Mesh, workers: usize) -> Load {
        let load = Load {
            stop: Arc::default(),
            failed: Arc::default(),
            served: Arc::default(),
            errors: Arc::default(),
            tasks: Vec::new(),
        };
        let tasks = (0..workers)
            .map(|_| {
                let (stop, failed, served, errors) =
                    (load.stop.clone(), load.failed.clone(), load.served.clone(), load.errors.clone());
                let mesh = mesh.clone();
                tokio::spawn(async move {
                    // Bounded: at most 20 000 calls a worker, and stopped by the test.
                    for _ in 0..20_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match hello(&mesh).await {
                            Ok(by) => *served.lock().expect("lock").entry(by).or_insert(0) += 1,
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors.lock().expect("lock").push(format!("{e:?}"));
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })
            })
            .collect();
        Load { tasks, ..load }
    }

    /// Stops the callers; what they saw: replies by server, and the failures.
    async fn finish(self) -> (BTreeMap<String, u64>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("caller");
        }
        let served = self.served.lock().expect("lock").clone();
        let errors = self.errors.lock().expect("lock").clone();
        assert_eq!(self.failed.load(Ordering::Relaxed) as usize, errors.len());
        (served, errors)
    }
}

#[tokio::test]
async fn a_registered_server_whose_certificate_another_ca_signed_never_gets_a_call_and_the_client_says_why() {
    let certs = certs();
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let _a = Server::tls("a", Some(&etcd), &certs.server, None);
    let _b = Server::tls("b", Some(&etcd), &certs.server, None);
    // Valid registrations, as any process that can write under the prefix makes them.
    let _rogue = Server::tls("rogue", Some(&etcd), &certs.rogue_server, None);
    let _plain = Server::start("plain", Some(&etcd), &[]);
    registered(&etcd, 4).await;

    let tls = ClientTls::load(certs.pki.ca_file(), None).expect("client TLS");
    let mesh = discover(&etcd, Some(tls)).await.expect("the good servers are reachable");
    let load = Load::start(&mesh, 4);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (served, errors) = load.finish().await;

    assert!(errors.is_empty(), "{} calls failed: {:?}", errors.len(), &errors[..errors.len().min(3)]);
    assert_eq!(served.keys().map(String::as_str).collect::<Vec<_>>(), ["a", "b"], "{served:?}");
    assert!(served.values().all(|&n| n > 50), "both good servers under load: {served:?}");
    let status = mesh.balanced.endpoints();
    let why = |id: &str| {
        let s = status.iter().find(|s| s.id == id).unwrap_or_else(|| panic!("{id} in {status:?}"));
        assert!(!s.usable && s.requests == 0, "{id} must be unusable and uncalled: {s:?}");
        s.last_error.clone().unwrap_or_default()
    };
    assert!(why("rogue").contains("its certificate is not signed by a CA this client trusts"), "{status:?}");
    assert!(why("plain").contains("it speaks plaintext"), "{status:?}");
}

/// The certificate a new TLS connection to `addr` is shown.
async fn presented(addr: &str, ca: &Path) -> Vec<u8> {
    let tls = ClientTls::load(ca, None).expect("client TLS");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let io = tls.connect(tcp, "127.0.0.1").await.expect("handshake");
    io.session().peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default()
}

fn der(pem: &Path) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(pem).expect("a PEM certificate").to_vec()
}

#[tokio::test]
async fn renewed_certificates_are_served_after_sighup_without_a_failed_call_and_a_corrupt_one_is_refused() {
    let certs = certs();
    let live = CertFiles {
        cert: certs.server.cert.with_file_name("live.pem"),
        key: certs.server.key.with_file_name("live.key"),
    };
    std::fs::copy(&certs.server.cert, &live.cert).expect("copy");
    std::fs::copy(&certs.server.key, &live.key).expect("copy");
    let server = Server::tls("s", None, &live, None);
    let ca = certs.pki.ca_file();
    let tls = ClientTls::load(&ca, None).expect("client TLS");
    let mesh = greeter_client::balanced(
        std::slice::from_ref(&server.addr),
        &[],
        Strategy::RoundRobin,
        &Resilience::default(),
        Some(tls),
    )
    .await
    .expect("the server is reachable over TLS");
    assert_eq!(presented(&server.addr, &ca).await, der(&certs.server.cert));
    let load = Load::start(&mesh, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Renewal: a new certificate and key from the same CA, then SIGHUP.
    let renewed = certs.pki.issue("renewed", "greeter", &["127.0.0.1"], Validity::Current).expect("cert");
    mesh_etcd_local::pki::write(&live.key, &std::fs::read(&renewed.key).expect("read"), true).expect("write");
    mesh_etcd_local::pki::write(&live.cert, &std::fs::read(&renewed.cert).expect("read"), false).expect("write");
    mesh_etcd_local::signal(server.child.id(), mesh_etcd_local::Signal::Hup).expect("SIGHUP");
    let want = der(&renewed.cert);
    eventually("new connections to present the renewed certificate", Duration::from_secs(5), || async {
        (presented(&server.addr, &ca).await == want).then_some(())
    })
    .await
    .expect("renewed");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A corrupt replacement is refused; the renewed certificate stays in use.
    mesh_etcd_local::pki::write(&live.cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n", false).expect("write");
    mesh_etcd_local::signal(server.child.id(), mesh_etcd_local::Signal::Hup).expect("SIGHUP");
    eventually("the server to refuse the corrupt file", Duration::from_secs(5), || async {
        server.log().contains("refused the new files").then_some(())
    })
    .await
    .expect("refused");
    assert_eq!(presented(&server.addr, &ca).await, want, "the renewed certificate stays in use");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (served, errors) = load.finish().await;
    assert!(errors.is_empty(), "{} calls failed: {:?}", errors.len(), &errors[..errors.len().min(3)]);
    assert!(served.get("s").copied().unwrap_or(0) > 100, "{served:?}");
    assert!(server.log().contains("reloaded"), "{}", server.log());
}
