//! What a large fleet and a struggling cluster send: listings over gRPC's default 4 MiB,
//! listings in pages while others write, watch answers carrying several big values, and a
//! follower that lags behind the member that answered the listing.

use std::time::Duration;

use mesh_etcd::{Etcd, EtcdOptions, ListWatch, WatchEvent};
use mesh_testkit::TxnOp;

const PREFIX: &str = "/mesh/services/greeter/";

fn options(endpoints: Vec<String>) -> EtcdOptions {
    EtcdOptions::new(endpoints)
        .expect("valid endpoints")
        .with_request_timeout(Duration::from_secs(2))
        .with_connect_timeout(Duration::from_millis(500))
        .with_watch_progress_interval(Duration::from_millis(500))
}

async fn next(watch: &mut ListWatch) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(20), watch.next()).await.expect("an event")
}

/// Four values of 1.2 MB (each under etcd's 1.5 MiB request limit): 4.8 MB in one answer.
async fn put_big_values(etcd: &mesh_testkit::Etcd) -> i64 {
    let mut revision = 0;
    for i in 0..4 {
        let value = format!(r#"{{"Op":0,"Addr":"10.0.0.{i}:50051","Metadata":{{"pad":"{}"}}}}"#, "x".repeat(1_200_000));
        revision = etcd.put(&format!("{PREFIX}big-{i}"), value).await.expect("put 1.2 MB");
    }
    revision
}

#[tokio::test]
async fn a_listing_of_four_values_of_1_2_mb_is_read_whole_by_a_new_and_a_running_watch() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let client = Etcd::new(options(etcd.endpoints()));
    let mut running = ListWatch::new(client.clone(), PREFIX);
    assert!(matches!(next(&mut running).await, WatchEvent::Reset { ref kvs, .. } if kvs.is_empty()));
    let first = etcd.revision().await.expect("revision") + 1;
    put_big_values(&etcd).await;

    let listing = client.list(PREFIX).await.expect("a 4.8 MB listing");
    assert_eq!(listing.kvs.len(), 4);
    assert!(listing.kvs.iter().all(|kv| kv.value.len() > 1_200_000));
    let mut fresh = ListWatch::new(client.clone(), PREFIX);
    match next(&mut fresh).await {
        WatchEvent::Reset { kvs, .. } => assert_eq!(kvs.len(), 4),
        other => panic!("expected a listing, got {other:?}"),
    }
    // The running watch sees each put; a watch resumed from before them gets them from
    // etcd's history, several in one answer.
    for i in 0..4 {
        assert!(matches!(next(&mut running).await, WatchEvent::Put(kv) if kv.key.ends_with(&format!("big-{i}"))));
    }
    let mut resumed = ListWatch::resume(client.clone(), PREFIX, first);
    for i in 0..4 {
        assert!(matches!(next(&mut resumed).await, WatchEvent::Put(kv) if kv.key.ends_with(&format!("big-{i}"))));
    }
    // And after a restart of etcd, the running watch lists them all again.
    let mut etcd = etcd;
    etcd.restart_all().await.expect("restart");
    match next(&mut running).await {
        WatchEvent::Reset { kvs, rebuilt, .. } => assert_eq!((kvs.len(), rebuilt), (4, false)),
        other => panic!("expected a listing after the restart, got {other:?}"),
    }
}

#[tokio::test]
async fn eleven_hundred_registrations_of_4_3_kb_are_listed_in_pages_at_one_revision() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let metadata = "m".repeat(4_300);
    let mut written = 0;
    while written < 1_100 {
        let ops: Vec<TxnOp> = (written..(written + 100).min(1_100))
            .map(|i| {
                TxnOp::Put(
                    format!("{PREFIX}go-{i:04}"),
                    format!(
                        r#"{{"Op":0,"Addr":"10.0.{}.{}:50051","Metadata":{{"note":"{metadata}"}}}}"#,
                        i / 250,
                        i % 250
                    ),
                )
            })
            .collect();
        etcd.txn(&ops).await.expect("txn");
        written += ops.len();
    }
    let client = Etcd::new(options(etcd.endpoints()));
    let listing = client.list(PREFIX).await.expect("a 4.8 MB listing, in pages");
    assert_eq!(listing.kvs.len(), 1_100);
    let keys: Vec<&str> = listing.kvs.iter().map(|kv| kv.key.as_str()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(keys, sorted, "in key order, none twice");
    assert_eq!(listing.revision, etcd.revision().await.expect("revision"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_listed_while_a_writer_adds_and_deletes_keys_are_one_view_at_one_revision() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let ops: Vec<TxnOp> = (0..60).map(|i| TxnOp::Put(format!("{PREFIX}k{i:03}"), format!("v{i}"))).collect();
    etcd.txn(&ops).await.expect("seed");
    let client = Etcd::new(options(etcd.endpoints()).with_list_page_size(7));
    let writer = {
        let endpoint = etcd.endpoint(0);
        let writer = Etcd::new(options(vec![endpoint]));
        tokio::spawn(async move {
            for i in 0..300 {
                // Keys before, inside and after the pages already read, and deletions.
                let key = format!("{PREFIX}k{:03}", (i * 37) % 120);
                if i % 3 == 0 {
                    let _ = writer.delete(&key).await;
                } else {
                    let _ = writer.put(&key, format!("w{i}"), None).await;
                }
            }
        })
    };
    let mut checked = 0;
    while !writer.is_finished() {
        let listing = client.list(PREFIX).await.expect("listing");
        let truth = etcd.get_prefix_at(PREFIX, listing.revision).await.expect("etcd at that revision");
        let seen: Vec<(String, String)> =
            listing.kvs.iter().map(|kv| (kv.key.clone(), String::from_utf8_lossy(&kv.value).into_owned())).collect();
        let held: Vec<(String, String)> = truth.into_iter().map(|kv| (kv.key, kv.value)).collect();
        assert_eq!(seen, held, "the listing at revision {} is not what etcd held then", listing.revision);
        checked += 1;
    }
    writer.await.expect("writer");
    assert!(checked > 0);
    println!("{checked} listings in pages of 7 matched etcd at their revision");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_watches_beside_a_follower_that_lags_under_writes_never_take_it_for_a_rebuild() {
    let etcd = mesh_testkit::Etcd::start_cluster(3).await.expect("etcd cluster");
    let leader = etcd.leader().await.expect("leader");
    let follower = etcd.follower().await.expect("follower");
    etcd.put(&format!("{PREFIX}a"), r#"{"Op":0,"Addr":"10.0.0.1:50051"}"#).await.expect("put");
    let slow = etcd.slow(follower, Duration::from_millis(60), Duration::from_millis(40)).expect("slow the follower");
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let (endpoint, writing) = (etcd.endpoint(leader), writing.clone());
        tokio::spawn(async move {
            let client = Etcd::new(options(vec![endpoint]));
            let mut i = 0u64;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = client.put(&format!("{PREFIX}load"), i.to_string(), None).await;
                i += 1;
            }
            i
        })
    };
    // Each watch lists through one member and watches through either: the listing is
    // linearizable, the watch's first answer comes from whichever member serves it.
    let mut rebuilt = Vec::new();
    for i in 0..12 {
        let mut endpoints = vec![etcd.endpoint(leader), etcd.endpoint(follower)];
        endpoints.rotate_left(i % 2);
        let mut watch = ListWatch::new(Etcd::new(options(endpoints)), PREFIX);
        let status = watch.status();
        assert!(matches!(next(&mut watch).await, WatchEvent::Reset { .. }));
        for _ in 0..20 {
            if let WatchEvent::Reset { rebuilt: true, .. } = next(&mut watch).await {
                rebuilt.push(i);
            }
        }
        if status.borrow().rebuilds > 0 {
            rebuilt.push(i);
        }
    }
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    let puts = writer.await.expect("writer");
    drop(slow);
    assert!(rebuilt.is_empty(), "watches {rebuilt:?} took a lagging follower for a rebuilt etcd ({puts} puts)");
}
