//! mesh-etcd against a real etcd from mesh-testkit.

use std::time::Duration;

use mesh_etcd::{Etcd, EtcdOptions, ListWatch, WatchEvent};
use mesh_testkit::eventually;

fn options(etcd: &mesh_testkit::Etcd) -> EtcdOptions {
    EtcdOptions::new(etcd.endpoints())
        .expect("valid endpoints")
        .with_request_timeout(Duration::from_secs(1))
        .with_connect_timeout(Duration::from_millis(500))
        .with_watch_progress_interval(Duration::from_millis(500))
}

/// Whether `event` shows `key` present: as a put, or inside a listing.
fn shows(event: &WatchEvent, key: &str) -> bool {
    match event {
        WatchEvent::Put(kv) => kv.key == key,
        WatchEvent::Reset { kvs, .. } => kvs.iter().any(|kv| kv.key == key),
        WatchEvent::Delete { .. } => false,
    }
}

/// The next event, or a panic naming what was awaited.
async fn next(watch: &mut ListWatch, what: &str) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(15), watch.next()).await.unwrap_or_else(|_| panic!("no {what}"))
}

#[test]
fn bad_endpoints_are_refused_with_the_endpoint_named() {
    for (bad, why) in [("", "no etcd endpoints"), ("ftp://x:1", "unknown scheme"), ("127.0.0.1", "no port")] {
        let err = EtcdOptions::parse_endpoints(bad).expect_err(bad);
        assert!(err.to_string().contains(why), "{bad}: {err}");
    }
    let ok = EtcdOptions::parse_endpoints("127.0.0.1:2379, http://127.0.0.1:22379/").expect("valid");
    assert_eq!(ok.endpoints, ["http://127.0.0.1:2379", "http://127.0.0.1:22379"]);
}

#[test]
fn debug_output_never_shows_the_password() {
    let o = EtcdOptions::parse_endpoints("127.0.0.1:2379").expect("valid").with_user("root", "s3cret");
    let shown = format!("{o:?}");
    assert!(shown.contains("root") && !shown.contains("s3cret"), "{shown}");
}

#[tokio::test]
async fn put_get_list_delete_round_trip() {
    let server = mesh_testkit::Etcd::start().await.expect("etcd");
    let etcd = Etcd::new(options(&server));
    let rev = etcd.put("/t/a", "1", None).await.expect("put");
    etcd.put("/t/b", "2", None).await.expect("put");
    etcd.put("/u/c", "3", None).await.expect("put");
    assert_eq!(etcd.get("/t/a").await.expect("get").map(|kv| (kv.value, kv.mod_revision)), Some((b"1".to_vec(), rev)));
    let listing = etcd.list("/t/").await.expect("list");
    assert_eq!(listing.kvs.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(), ["/t/a", "/t/b"]);
    assert!(listing.revision > rev && listing.cluster_id != 0);
    assert_eq!(etcd.delete("/t/a").await.expect("delete"), 1);
    assert_eq!(etcd.get("/t/a").await.expect("get"), None);
}

#[tokio::test]
async fn a_lease_keeps_its_key_until_revoked_and_is_then_not_found() {
    let server = mesh_testkit::Etcd::start().await.expect("etcd");
    let etcd = Etcd::new(options(&server));
    let lease = etcd.grant(Duration::from_secs(5)).await.expect("grant");
    assert_eq!(lease.ttl, 5);
    etcd.put("/t/leased", "v", Some(lease.id)).await.expect("put");
    let mut keepalive = etcd.keep_alive(lease.id).await.expect("keepalive stream");
    assert_eq!(keepalive.refresh().await.expect("refresh"), 5);
    etcd.revoke(lease.id).await.expect("revoke");
    assert_eq!(etcd.get("/t/leased").await.expect("get"), None, "revoking deletes the key");
    let err = keepalive.refresh().await.expect_err("revoked");
    assert!(err.is_lease_not_found(), "{err}");
    let err = etcd.put("/t/x", "v", Some(lease.id)).await.expect_err("put on a revoked lease");
    assert!(err.is_lease_not_found(), "{err}");
    assert!(err.to_string().starts_with("etcd put /t/x: lease not found"), "{err}");
}

#[tokio::test]
async fn etcd_down_gives_a_transient_error_naming_the_operation() {
    let port = mesh_etcd_local::free_port().expect("port");
    let etcd = Etcd::new(
        EtcdOptions::new([format!("127.0.0.1:{port}")])
            .expect("valid")
            .with_request_timeout(Duration::from_millis(500))
            .with_connect_timeout(Duration::from_millis(200)),
    );
    let err = etcd.put("/t/k", "v", None).await.expect_err("nothing listens");
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().starts_with("etcd put /t/k:"), "{err}");
}

#[tokio::test]
async fn list_then_watch_sees_the_set_then_each_change() {
    let server = mesh_testkit::Etcd::start().await.expect("etcd");
    let etcd = Etcd::new(options(&server));
    etcd.put("/w/a", "1", None).await.expect("put");
    let mut watch = ListWatch::new(etcd.clone(), "/w/");
    let WatchEvent::Reset { kvs, .. } = next(&mut watch, "reset").await else { panic!("first event must be a Reset") };
    assert_eq!(kvs.len(), 1);
    etcd.put("/w/b", "2", None).await.expect("put");
    etcd.put("/x/other", "ignored", None).await.expect("put");
    etcd.delete("/w/a").await.expect("delete");
    assert!(matches!(next(&mut watch, "put").await, WatchEvent::Put(kv) if kv.key == "/w/b" && kv.value == b"2"));
    assert!(matches!(next(&mut watch, "delete").await, WatchEvent::Delete { key, .. } if key == "/w/a"));
    assert!(watch.status().borrow().in_sync);
}

#[tokio::test]
async fn a_watch_resumed_from_a_compacted_revision_lists_again_once() {
    let server = mesh_testkit::Etcd::start().await.expect("etcd");
    let etcd = Etcd::new(options(&server));
    let old = etcd.put("/c/a", "1", None).await.expect("put");
    for i in 0..5 {
        etcd.put(&format!("/c/k{i}"), "v", None).await.expect("put");
    }
    let last = etcd.put("/c/a", "2", None).await.expect("put");
    etcd.compact(last).await.expect("compact");
    let mut watch = ListWatch::resume(etcd.clone(), "/c/", old + 1);
    let status = watch.status();
    let WatchEvent::Reset { kvs, revision, rebuilt, .. } = next(&mut watch, "reset after compaction").await else {
        panic!("a compacted resume must list again")
    };
    assert_eq!(kvs.len(), 6);
    assert!(revision >= last);
    assert!(!rebuilt, "a compaction is not a rebuild");
    assert_eq!(kvs.iter().find(|kv| kv.key == "/c/a").map(|kv| kv.value.clone()), Some(b"2".to_vec()));
    // It converged: one listing, then the watch carries on from there.
    etcd.put("/c/new", "n", None).await.expect("put");
    assert!(matches!(next(&mut watch, "put").await, WatchEvent::Put(kv) if kv.key == "/c/new"));
    assert_eq!(status.borrow().resets, 1, "listed once, no loop");
}

#[tokio::test]
async fn a_watch_survives_an_etcd_restart_and_catches_up() {
    let mut server = mesh_testkit::Etcd::start().await.expect("etcd");
    let etcd = Etcd::new(options(&server));
    etcd.put("/r/a", "1", None).await.expect("put");
    let mut watch = ListWatch::new(etcd.clone(), "/r/");
    let status = watch.status();
    assert!(matches!(next(&mut watch, "reset").await, WatchEvent::Reset { .. }));
    server.kill(0).expect("kill");
    // The view goes stale while etcd is gone; next() keeps retrying meanwhile.
    let waiting = tokio::spawn(async move {
        let mut events = Vec::new();
        loop {
            let event = watch.next().await;
            let done = shows(&event, "/r/b");
            events.push(event);
            if done {
                return events;
            }
        }
    });
    eventually("view out of sync", Duration::from_secs(10), || async { (!status.borrow().in_sync).then_some(()) })
        .await
        .expect("goes stale");
    server.restart(0).await.expect("restart");
    server.put("/r/b", "2").await.expect("put after restart");
    let events = tokio::time::timeout(Duration::from_secs(15), waiting).await.expect("catches up").expect("join");
    let WatchEvent::Reset { kvs, rebuilt, .. } = &events[0] else {
        panic!("after a stream end it lists again: {events:?}")
    };
    assert!(kvs.iter().any(|kv| kv.key == "/r/a"), "the listing after the restart holds /r/a: {kvs:?}");
    assert!(!rebuilt, "a restart on the same data dir is not a rebuild");
    assert!(status.borrow().resets >= 2);
}

#[tokio::test]
async fn a_fresh_cluster_resets_the_view_to_what_it_holds() {
    let mut server = mesh_testkit::Etcd::start().await.expect("etcd");
    let etcd = Etcd::new(options(&server));
    for i in 0..3 {
        etcd.put(&format!("/f/{i}"), "v", None).await.expect("put");
    }
    let mut watch = ListWatch::new(etcd.clone(), "/f/");
    assert!(matches!(next(&mut watch, "reset").await, WatchEvent::Reset { kvs, .. } if kvs.len() == 3));
    server.restart_fresh().await.expect("fresh");
    let WatchEvent::Reset { kvs, rebuilt, .. } = next(&mut watch, "reset on the fresh cluster").await else {
        panic!("the next event after a rebuild must be a Reset")
    };
    assert!(kvs.is_empty(), "the fresh cluster holds nothing: {kvs:?}");
    assert!(rebuilt, "a fresh cluster is reported as rebuilt");
}

#[tokio::test]
async fn a_hung_etcd_makes_the_view_stale_and_it_recovers() {
    let mut server = mesh_testkit::Etcd::start().await.expect("etcd");
    let etcd = Etcd::new(options(&server));
    let mut watch = ListWatch::new(etcd.clone(), "/h/");
    let status = watch.status();
    assert!(matches!(next(&mut watch, "reset").await, WatchEvent::Reset { .. }));
    let driver = tokio::spawn(async move {
        loop {
            if shows(&watch.next().await, "/h/after") {
                return;
            }
        }
    });
    eventually("in sync", Duration::from_secs(5), || async { status.borrow().in_sync.then_some(()) })
        .await
        .expect("sync");
    server.pause(0).expect("SIGSTOP");
    eventually("stale while etcd hangs", Duration::from_secs(10), || async {
        (!status.borrow().in_sync).then_some(())
    })
    .await
    .expect("noticed");
    assert!(status.borrow().staleness().is_some());
    server.resume(0).expect("SIGCONT");
    server.put("/h/after", "v").await.expect("put");
    tokio::time::timeout(Duration::from_secs(15), driver).await.expect("recovers and sees /h/after").expect("join");
}

/// Reads events until `done` holds for the view they build; fails after 10 s.
async fn view_until(
    watch: &mut ListWatch,
    view: &mut std::collections::BTreeMap<String, Vec<u8>>,
    what: &str,
    done: impl Fn(&std::collections::BTreeMap<String, Vec<u8>>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done(view) {
        let event = tokio::time::timeout_at(deadline, watch.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: the view stopped at {view:?}"));
        match event {
            WatchEvent::Reset { kvs, .. } => *view = kvs.into_iter().map(|kv| (kv.key, kv.value)).collect(),
            WatchEvent::Put(kv) => {
                view.insert(kv.key, kv.value);
            }
            WatchEvent::Delete { key, .. } => {
                view.remove(&key);
            }
        }
    }
}

#[tokio::test]
async fn every_event_of_a_transaction_a_prefix_delete_and_a_lease_revoke_is_delivered() {
    let server = mesh_testkit::Etcd::start().await.expect("etcd");
    let etcd = Etcd::new(options(&server));
    let mut watch = ListWatch::new(etcd.clone(), "/tx/");
    let mut view = std::collections::BTreeMap::new();
    assert!(matches!(next(&mut watch, "reset").await, WatchEvent::Reset { kvs, .. } if kvs.is_empty()));

    // Three puts in one transaction: one response, one revision, three events.
    let rev = server.put_all(&[("/tx/a", "1"), ("/tx/b", "2"), ("/tx/c", "3")]).await.expect("txn");
    let mut events = Vec::new();
    for _ in 0..3 {
        events.push(next(&mut watch, "a put of the transaction").await);
    }
    let keys: Vec<&str> = events
        .iter()
        .map(|e| match e {
            WatchEvent::Put(kv) if kv.mod_revision == rev => kv.key.as_str(),
            other => panic!("expected three puts at revision {rev}, got {other:?}"),
        })
        .collect();
    assert_eq!(keys, ["/tx/a", "/tx/b", "/tx/c"]);
    assert_eq!(watch.status().borrow().revision, rev);

    // `etcdctl del --prefix` over the three: three deletes at one revision.
    assert_eq!(server.delete_prefix("/tx/").await.expect("del --prefix"), 3);
    for key in ["/tx/a", "/tx/b", "/tx/c"] {
        assert!(
            matches!(next(&mut watch, "a delete").await, WatchEvent::Delete { key: k, .. } if k == key),
            "the delete of {key}"
        );
    }

    // A revoked lease takes its three keys in one revision.
    let lease = server.grant(30).await.expect("grant");
    for key in ["/tx/x", "/tx/y", "/tx/z"] {
        server.put_leased(key, "v", lease).await.expect("put with lease");
    }
    view_until(&mut watch, &mut view, "three leased keys", |v| v.len() == 3).await;
    server.revoke(lease).await.expect("revoke");
    view_until(&mut watch, &mut view, "every leased key gone", |v| v.is_empty()).await;
    let left = server.get_prefix("/tx/").await.expect("get --prefix");
    assert!(left.is_empty() && view.is_empty(), "etcd holds {left:?}, the view {view:?}");
}

#[tokio::test]
async fn a_next_cancelled_every_200ms_still_lists_when_its_backoff_deadline_passes() {
    let mut server = mesh_testkit::Etcd::start().await.expect("etcd");
    let etcd = Etcd::new(options(&server));
    let mut watch = ListWatch::new(etcd.clone(), "/b/").with_backoff_max(Duration::from_secs(3));
    assert!(matches!(next(&mut watch, "reset").await, WatchEvent::Reset { .. }));
    server.kill(0).expect("kill");
    // The watch fails, and each failed listing doubles the backoff towards 3 s; a consumer
    // that races `next` against a 200 ms timer (as the registrar does with its keepalive)
    // cancels it over and over meanwhile.
    let down = tokio::time::Instant::now();
    while down.elapsed() < Duration::from_secs(6) {
        let _ = tokio::time::timeout(Duration::from_millis(200), watch.next()).await;
    }
    server.restart(0).await.expect("restart");
    server.put("/b/after", "v").await.expect("put");
    let back = tokio::time::Instant::now();
    loop {
        // At most the longest backoff (3 s), plus a listing, after etcd's return.
        assert!(back.elapsed() < Duration::from_secs(5), "no listing within 5 s of etcd's return");
        if let Ok(event) = tokio::time::timeout(Duration::from_millis(200), watch.next()).await
            && shows(&event, "/b/after")
        {
            break;
        }
    }
    println!("listed {:?} after etcd came back", back.elapsed());
}

#[tokio::test]
async fn put_if_lets_exactly_one_of_two_writers_of_a_key_win() {
    let server = mesh_testkit::Etcd::start().await.expect("etcd");
    let etcd = Etcd::new(options(&server));
    let (a, b) = tokio::join!(etcd.put_if("/cas/k", "a", None, 0), etcd.put_if("/cas/k", "b", None, 0));
    let (a, b) = (a.expect("a"), b.expect("b"));
    assert!(a.is_some() != b.is_some(), "exactly one creates the key: {a:?} {b:?}");
    let held = etcd.get("/cas/k").await.expect("get").expect("present");
    assert_eq!(held.value, if a.is_some() { b"a".to_vec() } else { b"b".to_vec() });
    assert_eq!(etcd.put_if("/cas/k", "c", None, held.mod_revision - 1).await.expect("stale"), None);
    let rev = etcd.put_if("/cas/k", "c", None, held.mod_revision).await.expect("current");
    assert!(rev.is_some_and(|r| r > held.mod_revision));
}
