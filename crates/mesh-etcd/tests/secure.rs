//! mesh-etcd against a real etcd with TLS, auth and mesh's roles (mesh-testkit's
//! `start_secure`).

use std::time::Duration;

use mesh_etcd::{ErrorKind, Etcd, EtcdOptions};
use mesh_testkit::{Credentials, SecureOptions};

fn as_user(etcd: &mesh_testkit::Etcd, creds: &Credentials, user: &str) -> Etcd {
    let options = EtcdOptions::new(etcd.endpoints())
        .expect("valid endpoints")
        .with_request_timeout(Duration::from_secs(2))
        .with_tls(&creds.ca, Some((&creds.client.cert, &creds.client.key)))
        .expect("readable TLS files")
        .with_user(user, creds.password(user));
    Etcd::new(options)
}

#[tokio::test]
async fn each_user_of_a_locked_down_etcd_does_its_job_and_nothing_else() {
    let (etcd, creds) = mesh_testkit::Etcd::start_secure(SecureOptions {
        services: vec!["a".into(), "b".into()],
        ..SecureOptions::default()
    })
    .await
    .expect("a secure etcd");

    let server_a = as_user(&etcd, &creds, "server-a");
    server_a.put("/mesh/services/a/1", "x", None).await.expect("a server writes its own registrations");
    server_a.put("/mesh/status/a/1", "x", None).await.expect("and its own status");
    server_a.get("/mesh/config/a").await.expect("and reads its configuration");
    for key in ["/mesh/services/b/1", "/mesh/status/b/1", "/mesh/config/a", "/mesh/other"] {
        let err = server_a.put(key, "x", None).await.expect_err(key);
        assert!(matches!(err.kind(), ErrorKind::PermissionDenied(_)), "{key}: {err}");
        assert!(err.to_string().contains(key) && err.to_string().contains("permission denied"), "{err}");
    }
    let err = server_a.get("/mesh/config/b").await.expect_err("another service's config is not readable");
    assert!(matches!(err.kind(), ErrorKind::PermissionDenied(_)), "{err}");

    let client = as_user(&etcd, &creds, "client");
    let listing = client.list("/mesh/services/").await.expect("a client reads registrations");
    assert_eq!(listing.kvs.len(), 1);
    let err = client.put("/mesh/services/a/rogue", "x", None).await.expect_err("a client cannot register");
    assert!(matches!(err.kind(), ErrorKind::PermissionDenied(_)), "{err}");

    let admin = as_user(&etcd, &creds, "admin");
    admin.put("/mesh/config/a", "{}", None).await.expect("an admin writes configuration");
    let err = admin.put("/mesh/services/a/2", "x", None).await.expect_err("but registers nothing");
    assert!(matches!(err.kind(), ErrorKind::PermissionDenied(_)), "{err}");
}

#[tokio::test]
async fn a_wrong_password_or_missing_tls_settings_fail_saying_so_and_the_password_is_never_shown() {
    let (etcd, creds) = mesh_testkit::Etcd::start_secure(SecureOptions::default()).await.expect("a secure etcd");

    let secret = "not-the-password-8c1f";
    let wrong = EtcdOptions::new(etcd.endpoints())
        .expect("valid endpoints")
        .with_tls(&creds.ca, Some((&creds.client.cert, &creds.client.key)))
        .expect("readable TLS files")
        .with_user("client", secret);
    assert!(!format!("{wrong:?}").contains(secret), "options print the password: {wrong:?}");
    let err = Etcd::new(wrong).get("/mesh/x").await.expect_err("a wrong password");
    assert!(matches!(err.kind(), ErrorKind::AuthFailed(_)), "{err}");
    let text = format!("{err} {err:?}");
    assert!(!text.contains(secret), "the error shows the password: {text}");
    let right = creds.password("client");
    let err = Etcd::new(EtcdOptions::new(etcd.endpoints()).expect("valid").with_user("client", right))
        .get("/mesh/x")
        .await
        .expect_err("https without a CA");
    assert!(err.to_string().contains("--etcd-ca"), "{err}");
    assert!(!format!("{err} {err:?}").contains(right));

    let err = EtcdOptions::new(etcd.endpoints())
        .expect("valid")
        .with_tls(std::path::Path::new("/nonexistent/ca.pem"), None)
        .expect_err("a missing CA file");
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
}

#[test]
fn the_password_comes_from_a_file_or_the_environment_never_a_flag() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("pw");
    std::fs::write(&file, "s3cret\n").expect("write");
    assert_eq!(mesh_etcd::read_password(Some(&file)).expect("read").as_deref(), Some("s3cret"));
    std::fs::write(&file, "\n").expect("write");
    let err = mesh_etcd::read_password(Some(&file)).expect_err("empty");
    assert!(err.to_string().contains("empty"), "{err}");
    let err = mesh_etcd::read_password(Some(&dir.path().join("missing"))).expect_err("missing");
    assert!(err.to_string().contains("missing"), "{err}");
}

#[tokio::test]
async fn a_watch_opened_after_the_token_expired_or_etcd_restarted_still_sees_every_event() {
    let (mut etcd, creds) =
        mesh_testkit::Etcd::start_secure(SecureOptions { auth_token_ttl: Some(1), ..SecureOptions::default() })
            .await
            .expect("a secure etcd");
    let root = as_user(&etcd, &creds, "root");
    let client = as_user(&etcd, &creds, "client");
    let revision = client.list("/mesh/services/").await.expect("a first request logs in").revision;
    // The token expires unused; then a watch is the first request, with no list before it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut watch = mesh_etcd::ListWatch::resume(client.clone(), "/mesh/services/", revision);
    root.put("/mesh/services/greeter/a", "1", None).await.expect("put");
    let seen =
        tokio::time::timeout(Duration::from_secs(10), watch.next()).await.expect("an event after the token expired");
    assert!(matches!(&seen, mesh_etcd::WatchEvent::Put(kv) if kv.key == "/mesh/services/greeter/a"), "{seen:?}");

    // A restart loses every token; the watch comes back and misses nothing.
    etcd.restart(0).await.expect("restart");
    root.put("/mesh/services/greeter/b", "2", None).await.expect("put after the restart");
    let seen = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match watch.next().await {
                mesh_etcd::WatchEvent::Put(kv) if kv.key == "/mesh/services/greeter/b" => return true,
                mesh_etcd::WatchEvent::Reset { kvs, .. } if kvs.iter().any(|kv| kv.key.ends_with("/b")) => return true,
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(seen, Ok(true), "the watch did not come back after the restart");
}
