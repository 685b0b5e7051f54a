//! TLS between services, end to end: real greeter-server processes with certificates made
//! at test time (none is checked in), a real etcd, and the client stack of greeter-client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
    dir: tempfile::TempDir,
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
    Certs { rogue_ca: rogue.ca_file(), dir, pki, server, client, rogue_server }
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
