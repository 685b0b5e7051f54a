//! The registrar against a real etcd from mesh-testkit, with short TTLs.

use std::time::{Duration, Instant};

use mesh_etcd::{Etcd, EtcdOptions};
use mesh_registry::{Instance, Registrar, RegistrarConfig};
use mesh_testkit::eventually;

fn client(etcd: &mesh_testkit::Etcd) -> Etcd {
    Etcd::new(
        EtcdOptions::new(etcd.endpoints())
            .expect("endpoints")
            .with_request_timeout(Duration::from_millis(800))
            .with_connect_timeout(Duration::from_millis(300))
            .with_watch_progress_interval(Duration::from_millis(500)),
    )
}

fn registrar(etcd: &mesh_testkit::Etcd, ttl_secs: u64) -> Registrar {
    Registrar::new(client(etcd), RegistrarConfig { root: "/mesh".into(), ttl: Duration::from_secs(ttl_secs) })
}

fn instance(port: u16) -> Instance {
    Instance {
        service: "greeter".into(),
        id: format!("127.0.0.1:{port}"),
        addr: format!("127.0.0.1:{port}"),
        weight: 100,
        zone: Some("eu-1a".into()),
        version: Some("0.3.0".into()),
        tls: false,
    }
}

async fn present(etcd: &mesh_testkit::Etcd, key: &str) -> bool {
    etcd.get(key).await.ok().flatten().is_some()
}

#[tokio::test]
async fn register_puts_exactly_the_documented_json_under_a_lease() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let reg = registrar(&etcd, 2).spawn(&instance(50051));
    assert!(reg.wait_registered(Duration::from_secs(5)).await, "{:?}", reg.state().borrow());
    assert_eq!(reg.key(), "/mesh/services/greeter/127.0.0.1:50051");
    let kvs = etcd.get_prefix("/mesh/services/greeter/").await.expect("list");
    assert_eq!(kvs.len(), 1);
    assert_eq!(
        kvs[0].value,
        r#"{"Op":0,"Addr":"127.0.0.1:50051","Metadata":{"weight":100,"zone":"eu-1a","version":"0.3.0","instance":"127.0.0.1:50051"}}"#
    );
    assert_eq!(Some(kvs[0].lease), reg.state().borrow().lease, "attached to the registration's lease");
}

#[tokio::test]
async fn graceful_deregister_removes_the_key_at_once_not_after_the_ttl() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let reg = registrar(&etcd, 10).spawn(&instance(50052));
    assert!(reg.wait_registered(Duration::from_secs(5)).await);
    let key = reg.key().to_string();
    reg.deregister(Duration::from_secs(2)).await.expect("deregister");
    assert!(!present(&etcd, &key).await, "the key must be gone right after deregister, TTL is 10 s");
}

#[tokio::test]
async fn a_deleted_key_is_back_within_1s() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let reg = registrar(&etcd, 10).spawn(&instance(50053));
    assert!(reg.wait_registered(Duration::from_secs(5)).await);
    let lease = reg.state().borrow().lease;
    assert_eq!(etcd.delete(reg.key()).await.expect("delete"), 1);
    let deleted_at = Instant::now();
    eventually("key back", Duration::from_secs(1), || async { present(&etcd, reg.key()).await.then_some(()) })
        .await
        .expect("back within 1 s");
    println!("put back after {:?}", deleted_at.elapsed());
    assert_eq!(reg.state().borrow().lease, lease, "same lease");
}

#[tokio::test]
async fn an_overwrite_that_keeps_our_lease_is_replaced_by_our_own_value() {
    // `etcdctl put --ignore-lease`: the key stays under our lease, so the keepalive never
    // notices; the self-watch must, and put our value back.
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let reg = registrar(&etcd, 10).spawn(&instance(50061));
    assert!(reg.wait_registered(Duration::from_secs(5)).await);
    let ours = etcd.get(reg.key()).await.expect("get").expect("registered");
    let lease = reg.state().borrow().lease;
    etcd.put_ignore_lease(reg.key(), r#"{"Op":0,"Addr":"127.0.0.1:2"}"#).await.expect("overwrite");
    // Well within one TTL (10 s): the repair comes from the watch, not from a lease expiring.
    eventually("our value back", Duration::from_secs(5), || async {
        (etcd.get(reg.key()).await.ok().flatten().as_deref() == Some(ours.as_str())).then_some(())
    })
    .await
    .expect("repaired");
    let held = holder(&etcd, reg.key()).await.expect("held");
    assert_eq!(Some(held.lease), lease, "under the same lease");
    assert_eq!(reg.state().borrow().puts, 2, "one put, one repair: {:?}", reg.state().borrow());
}

#[tokio::test]
async fn dropped_without_deregistering_the_key_expires_within_ttl_plus_1s() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let reg = registrar(&etcd, 2).spawn(&instance(50054));
    assert!(reg.wait_registered(Duration::from_secs(5)).await);
    let key = reg.key().to_string();
    drop(reg); // as kill -9: no delete, no revoke
    assert!(present(&etcd, &key).await, "still there until the lease expires");
    eventually("key expired", Duration::from_secs(3), || async { (!present(&etcd, &key).await).then_some(()) })
        .await
        .expect("gone within TTL + 1 s");
}

#[tokio::test]
async fn etcd_down_at_start_then_registers_when_it_comes() {
    let mut etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    etcd.kill(0).expect("kill");
    let reg = registrar(&etcd, 2).spawn(&instance(50055));
    eventually("an error reported", Duration::from_secs(5), || async { reg.state().borrow().last_error.clone() })
        .await
        .expect("it tried and failed");
    assert!(!reg.state().borrow().registered);
    etcd.restart(0).await.expect("etcd comes");
    let back = Instant::now();
    assert!(reg.wait_registered(Duration::from_secs(5)).await, "{:?}", reg.state().borrow());
    assert!(present(&etcd, reg.key()).await);
    println!("registered {:?} after etcd came", back.elapsed());
}

#[tokio::test]
async fn a_short_etcd_restart_keeps_the_same_lease() {
    let mut etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let reg = registrar(&etcd, 3).spawn(&instance(50056));
    assert!(reg.wait_registered(Duration::from_secs(5)).await);
    let lease = reg.state().borrow().lease;
    etcd.restart(0).await.expect("restart on the same data dir");
    eventually("registered after restart", Duration::from_secs(5), || async {
        let s = reg.state().borrow().clone();
        (s.registered && s.last_error.is_none()).then_some(())
    })
    .await
    .expect("recovered");
    assert!(present(&etcd, reg.key()).await);
    assert_eq!(reg.state().borrow().lease, lease, "the lease survived: etcd renews leases on restart");
}

#[tokio::test]
async fn a_fresh_etcd_gets_a_new_lease_and_the_key_within_ttl_over_3_plus_backoff() {
    let mut etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let reg = registrar(&etcd, 3).spawn(&instance(50057));
    assert!(reg.wait_registered(Duration::from_secs(5)).await);
    let first = reg.state().borrow().lease;
    etcd.restart_fresh().await.expect("fresh data dir");
    let back = Instant::now();
    // TTL/3 = 1 s until the next keepalive notices, plus a backoff of at most TTL/3.
    eventually("re-registered on the fresh cluster", Duration::from_secs(3), || async {
        present(&etcd, reg.key()).await.then_some(())
    })
    .await
    .expect("re-registered");
    println!("re-registered {:?} after the fresh etcd came", back.elapsed());
    assert_ne!(reg.state().borrow().lease, first, "a new lease");
    let kv = etcd.get_prefix(reg.key()).await.expect("get");
    assert_eq!(Some(kv[0].lease), reg.state().borrow().lease);
}

#[tokio::test]
async fn killing_the_leader_of_three_loses_no_lease() {
    let mut etcd = mesh_testkit::Etcd::start_cluster(3).await.expect("cluster");
    let reg = registrar(&etcd, 3).spawn(&instance(50058));
    assert!(reg.wait_registered(Duration::from_secs(5)).await);
    let before = reg.state().borrow().clone();
    let leader = etcd.leader().await.expect("leader");
    etcd.kill(leader).expect("kill leader");
    eventually("a new leader", Duration::from_secs(10), || async { etcd.leader().await.ok() }).await.expect("leader");
    // Several keepalive rounds answered by the new leader.
    eventually("keepalives after the election", Duration::from_secs(10), || async {
        (reg.state().borrow().keepalives >= before.keepalives + 4).then_some(())
    })
    .await
    .expect("keepalives go on");
    let after = reg.state().borrow().clone();
    assert_eq!(after.lease, before.lease, "same lease: {after:?}");
    assert_eq!(after.leases_granted, 1, "no new lease was needed: {after:?}");
    assert!(present(&etcd, reg.key()).await);
}

#[tokio::test]
async fn deregistering_what_never_registered_returns_at_once() {
    let port = mesh_etcd_local::free_port().expect("port");
    let etcd = Etcd::new(
        EtcdOptions::new([format!("127.0.0.1:{port}")])
            .expect("endpoints")
            .with_request_timeout(Duration::from_millis(300))
            .with_connect_timeout(Duration::from_millis(100)),
    );
    let reg = Registrar::new(etcd, RegistrarConfig::default()).spawn(&instance(50059));
    eventually("a failed attempt", Duration::from_secs(5), || async { reg.state().borrow().last_error.clone() })
        .await
        .expect("tried");
    // With a 30 s deregister timeout, only skipping etcd altogether returns within 5 s.
    tokio::time::timeout(Duration::from_secs(5), reg.deregister(Duration::from_secs(30)))
        .await
        .expect("no wait for an etcd that never answered")
        .expect("nothing to do is fine");
}

/// An instance with a fixed id at `port`, as two servers started with one `--instance-id`.
fn named(id: &str, port: u16) -> Instance {
    Instance { id: id.into(), ..instance(port) }
}

async fn holder(etcd: &mesh_testkit::Etcd, key: &str) -> Option<mesh_testkit::KeyValue> {
    etcd.get_prefix(key).await.ok()?.into_iter().find(|kv| kv.key == key)
}

#[tokio::test]
async fn a_waiting_instance_takes_a_freed_key_with_a_lease_that_has_its_whole_ttl() {
    // The second waits with the lease it granted for its first put, refreshed by no one.
    // When the key is freed (the holder's lease revoked, as `etcdctl lease revoke` or a
    // `del --prefix` does), taking it with that lease would put the key under a lease with
    // little left to live, lost again if it runs out before the next refresh; the two
    // would then trade the key. It takes it with a fresh lease.
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let first = registrar(&etcd, 10).spawn(&named("dup", 50063));
    assert!(first.wait_registered(Duration::from_secs(5)).await);
    let key = first.key().to_string();
    let second = registrar(&etcd, 10).spawn(&named("dup", 50064));
    eventually("the second sees the conflict", Duration::from_secs(5), || async {
        second.state().borrow().conflict.clone()
    })
    .await
    .expect("conflict reported");
    // Half the second's first lease goes by.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let lease = holder(&etcd, &key).await.expect("held").lease;
    etcd.revoke(lease).await.expect("revoke the holder's lease");
    let taken = eventually("the key held again", Duration::from_secs(5), || async { holder(&etcd, &key).await })
        .await
        .expect("taken");
    let left = etcd.time_to_live(taken.lease).await.expect("time to live");
    assert!(left.is_some_and(|s| s >= 8), "the key was taken under a lease with {left:?} s of 10 left: {taken:?}");
}

#[tokio::test]
async fn two_live_instances_with_one_id_do_not_fight_and_the_second_takes_over_when_the_first_leaves() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let first = registrar(&etcd, 2).spawn(&named("dup", 50060));
    assert!(first.wait_registered(Duration::from_secs(5)).await);
    let key = first.key().to_string();
    let start = etcd.revision().await.expect("revision");
    let second = registrar(&etcd, 2).spawn(&named("dup", 50061));
    eventually("the second sees the conflict", Duration::from_secs(5), || async {
        second.state().borrow().conflict.clone()
    })
    .await
    .expect("conflict reported");
    // Several TTLs of both running: the key stays with the first, and etcd's history grows
    // by keepalives only (which write no revision), not by puts.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let grown = etcd.revision().await.expect("revision") - start;
    assert!(grown < 50, "etcd's revision grew by {grown} in 5 s: the two are fighting");
    let kv = holder(&etcd, &key).await.expect("the key is held");
    assert_eq!(Some(kv.lease), first.state().borrow().lease, "the first keeps it");
    assert!(kv.value.contains("127.0.0.1:50060"), "{}", kv.value);
    let second_state = second.state().borrow().clone();
    assert!(!second_state.registered, "{second_state:?}");
    assert_eq!(second_state.conflict.as_deref(), Some("127.0.0.1:50060"), "names the other address");
    assert_eq!(first.state().borrow().puts, 1, "the first never had to put its key back");

    // A graceful exit frees the key at once, and the second takes it within a second.
    first.deregister(Duration::from_secs(2)).await.expect("deregister");
    let freed = Instant::now();
    assert!(second.wait_registered(Duration::from_secs(2)).await, "{:?}", second.state().borrow());
    println!("the second took the key {:?} after the first deregistered", freed.elapsed());
    let kv = holder(&etcd, &key).await.expect("held");
    assert!(kv.value.contains("127.0.0.1:50061") && Some(kv.lease) == second.state().borrow().lease, "{kv:?}");
    assert_eq!(second.state().borrow().conflict, None);

    // A crash leaves the key until its lease expires; a third instance waiting on it
    // takes it within the TTL (2 s) plus a backoff.
    let third = registrar(&etcd, 2).spawn(&named("dup", 50062));
    eventually("the third sees the conflict", Duration::from_secs(5), || async {
        third.state().borrow().conflict.clone()
    })
    .await
    .expect("conflict");
    drop(second);
    let crashed = Instant::now();
    assert!(third.wait_registered(Duration::from_secs(4)).await, "{:?}", third.state().borrow());
    println!("the third took the key {:?} after the second crashed", crashed.elapsed());
}

#[tokio::test]
async fn a_restart_at_the_same_address_replaces_the_previous_runs_key_at_once() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let before = registrar(&etcd, 10).spawn(&instance(50063));
    assert!(before.wait_registered(Duration::from_secs(5)).await);
    let old_lease = before.state().borrow().lease;
    drop(before); // kill -9: the key stays until its 10 s lease expires
    let again = registrar(&etcd, 10).spawn(&instance(50063));
    assert!(again.wait_registered(Duration::from_secs(2)).await, "{:?}", again.state().borrow());
    let kv = holder(&etcd, again.key()).await.expect("held");
    assert_ne!(Some(kv.lease), old_lease);
    assert_eq!(Some(kv.lease), again.state().borrow().lease);
}

#[tokio::test]
async fn after_an_outage_that_grew_every_backoff_a_deleted_key_is_back_within_1s() {
    let mut etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let reg = registrar(&etcd, 3).spawn(&instance(50064));
    assert!(reg.wait_registered(Duration::from_secs(5)).await);
    // Longer than the TTL: the lease expires, and the key's watch backs off to its cap.
    etcd.kill(0).expect("kill");
    tokio::time::sleep(Duration::from_secs(4)).await;
    etcd.restart(0).await.expect("restart");
    eventually("registered again", Duration::from_secs(5), || async {
        let s = reg.state().borrow().clone();
        (s.registered && present(&etcd, reg.key()).await).then_some(())
    })
    .await
    .expect("re-registered");
    assert_eq!(etcd.delete(reg.key()).await.expect("delete"), 1);
    let deleted_at = Instant::now();
    eventually("key back", Duration::from_secs(1), || async { present(&etcd, reg.key()).await.then_some(()) })
        .await
        .expect("back within 1 s");
    println!("put back after {:?}", deleted_at.elapsed());
}
