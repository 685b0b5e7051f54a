//! mesh-tls on loopback with certificates made at test time: handshakes, their errors in
//! words, and rotation on both sides.

use std::path::Path;
use std::time::Duration;

use mesh_testkit::pki::{CertFiles, Pki, Validity};
use mesh_tls::{ClientTls, Identity, IncomingOptions, ServerTls, incoming};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;

fn der(pem: &Path) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(pem).expect("a PEM certificate").to_vec()
}

fn copy(from: &CertFiles, to: &CertFiles) {
    mesh_etcd_local::pki::write(&to.key, &std::fs::read(&from.key).expect("read"), true).expect("write");
    mesh_etcd_local::pki::write(&to.cert, &std::fs::read(&from.cert).expect("read"), false).expect("write");
}

/// A TLS server on loopback that accepts connections and keeps them; returns its address
/// and a channel of the certificates its clients presented.
async fn serve(tls: ServerTls) -> (String, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut connections = incoming(listener, Some(tls), IncomingOptions::default());
    tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Some(Ok(mut io)) = connections.next().await {
            if let Some(session) = io.tls_session() {
                let cert = session.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
                let _ = tx.send(cert.unwrap_or_default());
            }
            // Say something, as an HTTP/2 server sends its settings first.
            use tokio::io::AsyncWriteExt;
            let _ = io.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
            let _ = io.flush().await;
            kept.push(io);
        }
    });
    (addr, rx)
}

async fn presented(addr: &str, client: &ClientTls) -> Result<Vec<u8>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let io = client.connect(tcp, "127.0.0.1").await.map_err(|e| e.to_string())?;
    Ok(io.session().peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default())
}

#[tokio::test]
async fn a_server_serves_a_renewed_certificate_once_its_files_change_and_keeps_it_when_a_bad_one_follows() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = Pki::create(dir.path(), "t").expect("CA");
    let first = pki.issue("first", "s", &["127.0.0.1"], Validity::Current).expect("cert");
    let second = pki.issue("second", "s", &["127.0.0.1"], Validity::Current).expect("cert");
    let live = CertFiles { cert: dir.path().join("live.pem"), key: dir.path().join("live.key") };
    copy(&first, &live);
    let server = ServerTls::load(Identity::new(&live.cert, &live.key), None).expect("server TLS");
    let _reloading = server.watch(Duration::from_millis(50));
    let (addr, _) = serve(server.clone()).await;
    let client = ClientTls::load(pki.ca_file(), None).expect("client TLS");
    assert_eq!(presented(&addr, &client).await, Ok(der(&first.cert)));

    copy(&second, &live);
    mesh_testkit::eventually("the renewed certificate", Duration::from_secs(5), || async {
        (presented(&addr, &client).await == Ok(der(&second.cert))).then_some(())
    })
    .await
    .expect("served");

    std::fs::write(&live.key, "not a key").expect("write");
    mesh_testkit::eventually("the bad key to be refused", Duration::from_secs(5), || async {
        (server.reloads().1 >= 1).then_some(())
    })
    .await
    .expect("refused");
    assert_eq!(presented(&addr, &client).await, Ok(der(&second.cert)), "the one in use stays");
    let err = server.reload().expect_err("a bad key");
    assert!(err.to_string().contains("live.key") && err.to_string().contains("no private key"), "{err}");
}

#[tokio::test]
async fn a_client_presents_its_renewed_certificate_on_new_connections() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = Pki::create(dir.path(), "t").expect("CA");
    let server_cert = pki.issue("server", "s", &["127.0.0.1"], Validity::Current).expect("cert");
    let first = pki.issue("c1", "client", &[], Validity::Current).expect("cert");
    let second = pki.issue("c2", "client", &[], Validity::Current).expect("cert");
    let live = CertFiles { cert: dir.path().join("client.pem"), key: dir.path().join("client.key") };
    copy(&first, &live);
    let server =
        ServerTls::load(Identity::new(&server_cert.cert, &server_cert.key), Some(pki.ca_file())).expect("mTLS");
    let (addr, mut seen) = serve(server).await;
    let client = ClientTls::load(pki.ca_file(), Some(Identity::new(&live.cert, &live.key))).expect("client TLS");
    presented(&addr, &client).await.expect("an mTLS handshake");
    assert_eq!(seen.recv().await, Some(der(&first.cert)));
    copy(&second, &live);
    client.reload().expect("the renewed certificate loads");
    presented(&addr, &client).await.expect("an mTLS handshake");
    assert_eq!(seen.recv().await, Some(der(&second.cert)));
    assert_eq!(client.reloads(), (1, 0));
}

#[tokio::test]
async fn handshake_errors_name_an_expired_certificate_a_wrong_name_and_an_unknown_ca() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = Pki::create(dir.path(), "t").expect("CA");
    let other = Pki::create(&dir.path().join("other"), "o").expect("CA");
    let client = ClientTls::load(pki.ca_file(), None).expect("client TLS");
    for (cert, want) in [
        (pki.issue("expired", "s", &["127.0.0.1"], Validity::Expired).expect("cert"), "its certificate has expired"),
        (
            pki.issue("named", "s", &["elsewhere.example"], Validity::Current).expect("cert"),
            "is not valid for the name \"127.0.0.1\"",
        ),
        (
            other.issue("foreign", "s", &["127.0.0.1"], Validity::Current).expect("cert"),
            "not signed by a CA this client trusts",
        ),
    ] {
        let server = ServerTls::load(Identity::new(&cert.cert, &cert.key), None).expect("server TLS");
        let (addr, _) = serve(server).await;
        let err = presented(&addr, &client).await.expect_err(want);
        assert!(err.contains(want) && err.contains(&addr), "want {want:?}: {err}");
    }
    // The name the certificate carries, set by the client, is accepted.
    let named = pki.issue("greeter", "s", &["greeter"], Validity::Current).expect("cert");
    let (addr, _) = serve(ServerTls::load(Identity::new(&named.cert, &named.key), None).expect("TLS")).await;
    let by_name = client.clone().with_server_name("greeter").expect("a valid name");
    presented(&addr, &by_name).await.expect("the service name matches");
    let err = ServerTls::load(Identity::new(dir.path().join("missing.pem"), &named.key), None).expect_err("no file");
    assert!(err.to_string().contains("missing.pem") && err.to_string().contains("cannot be read"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_past_the_handshake_limit_shed_the_oldest_and_a_real_client_gets_in() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = Pki::create(dir.path(), "t").expect("CA");
    let cert = pki.issue("server", "s", &["127.0.0.1"], Validity::Current).expect("cert");
    let tls = ServerTls::load(Identity::new(&cert.cert, &cert.key), None).expect("load");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    // 600 sockets here and 512 in the server: more than a soft limit of 1024 holds.
    mesh_tls::raise_fd_limit().expect("the open-files limit");
    // Handshakes that never time out: only shedding can make room.
    let options = IncomingOptions { handshake_timeout: Duration::from_secs(3600), ..IncomingOptions::default() };
    let mut connections = incoming(listener, Some(tls), options);
    let accepted = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Some(Ok(mut io)) = connections.next().await {
            use tokio::io::AsyncWriteExt;
            let _ = io.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
            let _ = io.flush().await;
            kept.push(io);
        }
    });
    // More silent sockets than handshakes may be under way (512), each connected before
    // the next, so that the server has accepted them all.
    let mut silent = Vec::new();
    for _ in 0..600 {
        silent.push(TcpStream::connect(&addr).await.expect("connect"));
    }
    let client = ClientTls::load(pki.ca_file(), None).expect("client");
    // A hang guard: without shedding the server accepts no one for the hour the silent
    // handshakes may take.
    let got = tokio::time::timeout(Duration::from_secs(30), presented(&addr, &client)).await;
    assert!(matches!(got, Ok(Ok(_))), "a real client after 600 silent sockets: {got:?}");
    // The oldest silent sockets were closed by the server.
    let mut closed = 0;
    for s in &silent[..50] {
        let mut byte = [0u8; 1];
        // A hang guard again: a closed socket reads its end at once.
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_secs(5), s.peek(&mut byte)).await {
            closed += 1;
        }
    }
    assert!(closed >= 50, "{closed} of the 50 oldest silent sockets closed");
    accepted.abort();
}
