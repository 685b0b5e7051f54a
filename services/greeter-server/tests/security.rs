//! TLS between services, end to end: real greeter-server processes with certificates made
//! at test time (none is checked in), a real etcd, and the client stack of greeter-client.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use greeter_client::Mesh;
use mesh_balancer::Strategy;
use mesh_etcd::{Etcd, EtcdOptions};
use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;
use mesh_testkit::pki::{CertFiles, Pki, Validity};
use mesh_testkit::{Credentials, SecureOptions, eventually};
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
        let mut args: Vec<String> = match etcd {
            Some(etcd) => vec!["--etcd".into(), etcd.endpoints().join(","), "--no-config".into()],
            None => vec!["--no-register".into()],
        };
        args.extend(extra.iter().map(|a| a.to_string()));
        Server::spawn(name, &args, None)
    }

    /// A greeter-server with `args` after the common ones, and MESH_ETCD_PASSWORD set to
    /// `password` when given (removed otherwise).
    fn spawn(name: &str, args: &[String], password: Option<&str>) -> Server {
        let port = mesh_etcd_local::free_port().expect("port");
        let addr = format!("127.0.0.1:{port}");
        let logs = tempfile::NamedTempFile::new().expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_greeter-server"));
        cmd.args(["--listen", &addr, "--instance-id", name, "--ttl", "3s", "--shutdown-grace", "200ms"]);
        match password {
            Some(p) => cmd.env("MESH_ETCD_PASSWORD", p),
            None => cmd.env_remove("MESH_ETCD_PASSWORD"),
        };
        let child = cmd
            .args(args)
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

/// Waits until `servers` are all registered; on a timeout, says which were not and shows
/// their logs (a loaded machine can take a while; a server that exited says why).
async fn registered(etcd: &mesh_testkit::Etcd, servers: &mut [&mut Server]) {
    let n = servers.len();
    let done = eventually("the servers to register", Duration::from_secs(30), || async {
        etcd.get_prefix("/mesh/services/greeter/").await.map(|kvs| kvs.len() == n).unwrap_or(false).then_some(())
    })
    .await;
    if done.is_err() {
        let keys = etcd.get_prefix("/mesh/services/greeter/").await.unwrap_or_default();
        let known: Vec<String> = keys.iter().map(|kv| kv.key.clone()).collect();
        let logs: Vec<String> = servers
            .iter_mut()
            .map(|s| format!("{} (exited: {:?}): {}", s.name, s.child.try_wait().ok().flatten(), s.log()))
            .collect();
        panic!("not every server registered within 30 s; registered: {known:?}; logs: {logs:#?}");
    }
}

async fn discover(etcd: &mesh_testkit::Etcd, tls: Option<ClientTls>) -> anyhow::Result<Mesh> {
    greeter_client::discovered_through(
        etcd_of(etcd),
        "/mesh",
        "greeter",
        Strategy::RoundRobin,
        &greeter_client::resilience(),
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
    let mut a = Server::tls("a", Some(&etcd), &certs.server, Some(&certs.pki.ca_file()));
    let mut b = Server::tls("b", Some(&etcd), &certs.server, Some(&certs.pki.ca_file()));
    registered(&etcd, &mut [&mut a, &mut b]).await;
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
    let mut a = Server::tls("a", Some(&etcd), &certs.server, None);
    let mut b = Server::tls("b", Some(&etcd), &certs.server, None);
    // Valid registrations, as any process that can write under the prefix makes them.
    let mut rogue = Server::tls("rogue", Some(&etcd), &certs.rogue_server, None);
    let mut plain = Server::start("plain", Some(&etcd), &[]);
    registered(&etcd, &mut [&mut a, &mut b, &mut rogue, &mut plain]).await;

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
        "greeter",
        std::slice::from_ref(&server.addr),
        &[],
        Strategy::RoundRobin,
        &greeter_client::resilience(),
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

/// A greeter-server of `service` in a locked-down etcd, as etcd user `user` (password from
/// a file when `by_file`, else from MESH_ETCD_PASSWORD).
fn secure_server(
    name: &str,
    etcd: &mesh_testkit::Etcd,
    creds: &Credentials,
    user: &str,
    service: &str,
    by_file: bool,
) -> Server {
    let mut args: Vec<String> = ["--service", service, "--etcd", &etcd.endpoints().join(",")]
        .iter()
        .chain(&["--etcd-ca", path(&creds.ca), "--etcd-cert", path(&creds.client.cert)])
        .chain(&["--etcd-key", path(&creds.client.key), "--etcd-user", user])
        .map(|a| a.to_string())
        .collect();
    let password_file = creds.password_file(user);
    if by_file {
        args.extend(["--etcd-password-file".to_string(), path(&password_file).to_string()]);
    }
    Server::spawn(name, &args, (!by_file).then(|| creds.password(user)))
}

fn secure_etcd(etcd: &mesh_testkit::Etcd, creds: &Credentials, user: &str) -> Etcd {
    let options = EtcdOptions::new(etcd.endpoints())
        .expect("endpoints")
        .with_tls(&creds.ca, Some((&creds.client.cert, &creds.client.key)))
        .expect("TLS files")
        .with_user(user, creds.password(user));
    Etcd::new(options)
}

#[tokio::test]
async fn in_a_locked_down_etcd_a_client_user_cannot_register_nor_a_server_under_another_service() {
    let (etcd, creds) = mesh_testkit::Etcd::start_secure(SecureOptions {
        services: vec!["greeter".into(), "billing".into()],
        ..SecureOptions::default()
    })
    .await
    .expect("a secure etcd");
    let as_client = secure_server("c", &etcd, &creds, "client", "greeter", true);
    let as_billing = secure_server("b", &etcd, &creds, "server-billing", "greeter", false);
    let legit = secure_server("g", &etcd, &creds, "server-greeter", "greeter", true);
    let root = secure_etcd(&etcd, &creds, "root");
    eventually("the legitimate server to register", Duration::from_secs(10), || async {
        root.get("/mesh/services/greeter/g").await.ok().flatten()
    })
    .await
    .expect("registered");
    for s in [&as_client, &as_billing] {
        // A bound against a hang only: a loaded machine may take seconds to start a server.
        // The registration's refusal, not the first "permission denied": a server under
        // another service's user is refused its configuration and status reads too, and
        // those may be logged first.
        eventually("the registration's refusal in the log", Duration::from_secs(60), || async {
            s.log().contains("needs readwrite on /mesh/services/greeter/").then_some(())
        })
        .await
        .unwrap_or_else(|_| panic!("no clear refusal of the registration in {}: {}", s.name, s.log()));
        assert!(s.log().contains("permission denied"), "{}", s.log());
        let key = format!("/mesh/services/greeter/{}", s.name);
        assert!(root.get(&key).await.expect("read as root").is_none(), "{key} was written");
    }
    for s in [&as_client, &as_billing, &legit] {
        // Logs written to a file carry no colour codes.
        assert!(!s.log().contains('\x1b'), "ANSI escapes in {}'s log file: {:?}", s.name, s.log());
        for user in creds.users() {
            assert!(!s.log().contains(creds.password(user)), "{}'s log shows {user}'s password", s.name);
        }
    }
}

#[tokio::test]
async fn a_refusal_after_a_timeout_is_logged_too() {
    // A busy machine made a refused server's first grant time out; the refusal that followed
    // went to debug, since a warning had been logged, and the log never said why.
    let (mut etcd, creds) = mesh_testkit::Etcd::start_secure(SecureOptions::default()).await.expect("a secure etcd");
    etcd.pause(0).expect("SIGSTOP etcd");
    let s = secure_server("c", &etcd, &creds, "client", "greeter", true);
    let unanswered = eventually("the first grant to go unanswered", Duration::from_secs(60), || async {
        s.log().contains("registering when etcd comes").then_some(())
    })
    .await;
    etcd.resume(0).expect("SIGCONT etcd");
    unanswered.unwrap_or_else(|_| panic!("no unanswered grant in {}", s.log()));
    // A bound against a hang only.
    eventually("the refusal in the log", Duration::from_secs(60), || async {
        s.log().contains("needs readwrite on /mesh/services/greeter/").then_some(())
    })
    .await
    .unwrap_or_else(|_| panic!("the refusal after the timeout was not logged: {}", s.log()));
}

#[tokio::test]
async fn registrations_and_watches_survive_tokens_expiring_every_two_seconds_for_30s_and_an_etcd_restart() {
    let (mut etcd, creds) =
        mesh_testkit::Etcd::start_secure(SecureOptions { auth_token_ttl: Some(2), ..SecureOptions::default() })
            .await
            .expect("a secure etcd");
    let a = secure_server("a", &etcd, &creds, "server-greeter", "greeter", true);
    let root = secure_etcd(&etcd, &creds, "root");
    let lease_of = |name: &'static str| {
        let root = root.clone();
        async move { root.get(&format!("/mesh/services/greeter/{name}")).await.ok().flatten().map(|kv| kv.lease) }
    };
    let lease = eventually("a to register", Duration::from_secs(10), || lease_of("a")).await.expect("registered");
    let admin = secure_etcd(&etcd, &creds, "admin");
    let mesh = greeter_client::discovered_through(
        secure_etcd(&etcd, &creds, "client"),
        "/mesh",
        "greeter",
        Strategy::RoundRobin,
        &greeter_client::resilience(),
        None,
    )
    .await
    .expect("a client discovers through the locked-down etcd");
    let load = Load::start(&mesh, 2);

    // 30 s in which every token expires many times over: each round a configuration
    // change (the servers' watch), and servers joining and leaving (the client's watch).
    let mut extra: Option<Server> = None;
    for round in 0..10 {
        let greeting = format!("Round {round}, {{name}}!");
        let document = format!(r#"{{"server": {{"greeting": "{greeting}"}}}}"#);
        admin.put("/mesh/config/greeter", document, None).await.expect("the admin writes configuration");
        let want = greeting.replace("{name}", "tls");
        eventually("the servers to apply the new greeting", Duration::from_secs(5), || async {
            let mut client = GreeterClient::new(mesh.channel.clone());
            let mut all = true;
            for _ in 0..4 {
                let reply = client.say_hello(HelloRequest { name: "tls".into() }).await.ok()?;
                all &= reply.get_ref().message == want;
            }
            all.then_some(())
        })
        .await
        .unwrap_or_else(|_| panic!("round {round}: the greeting was not applied; {}", a.log()));
        match extra.take() {
            None if round % 2 == 0 => {
                let name = if round % 4 == 0 { "b" } else { "c" };
                extra = Some(secure_server(name, &etcd, &creds, "server-greeter", "greeter", false));
                eventually("the client to see a server join", Duration::from_secs(5), || async {
                    (mesh.balanced.endpoints().len() == 2).then_some(())
                })
                .await
                .unwrap_or_else(|_| panic!("round {round}: no join seen"));
            }
            Some(server) => {
                mesh_etcd_local::signal(server.child.id(), mesh_etcd_local::Signal::Term).expect("SIGTERM");
                eventually("the client to see a server leave", Duration::from_secs(5), || async {
                    (mesh.balanced.endpoints().len() == 1).then_some(())
                })
                .await
                .unwrap_or_else(|_| panic!("round {round}: no leave seen"));
                drop(server);
            }
            None => {}
        }
        // Longer than a token lives unused.
        tokio::time::sleep(Duration::from_millis(2600)).await;
    }
    assert_eq!(lease_of("a").await, Some(lease), "the lease changed: {}", a.log());
    assert!(!a.log().contains("lease lost"), "{}", a.log());

    // An etcd restart loses every token (simple tokens live in memory).
    etcd.restart(0).await.expect("restart");
    eventually("a to be registered after the restart", Duration::from_secs(10), || async {
        lease_of("a").await.map(|_| ())
    })
    .await
    .expect("registered again");
    admin.put("/mesh/config/greeter", r#"{"server": {"greeting": "After, {name}!"}}"#, None).await.expect("put");
    eventually("the greeting after the restart", Duration::from_secs(10), || async {
        let mut client = GreeterClient::new(mesh.channel.clone());
        let reply = client.say_hello(HelloRequest { name: "tls".into() }).await.ok()?;
        (reply.get_ref().message == "After, tls!").then_some(())
    })
    .await
    .unwrap_or_else(|_| panic!("the server's config watch did not come back: {}", a.log()));
    let (_, errors) = load.finish().await;
    assert!(errors.is_empty(), "{} calls failed: {:?}", errors.len(), &errors[..errors.len().min(3)]);
    for user in creds.users() {
        assert!(!a.log().contains(creds.password(user)), "the log shows {user}'s password");
    }
}
