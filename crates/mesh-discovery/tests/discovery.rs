//! The etcd resolver against a real etcd, feeding a real balancer and real servers.

use std::time::Duration;

use mesh_balancer::{Balancer, BalancerConfig};
use mesh_discovery::{EtcdResolver, Resolution, StaticResolver};
use mesh_etcd::{Etcd, EtcdOptions};
use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;
use mesh_testkit::{NamedGreeter, eventually};
use tokio_stream::StreamExt as _;

fn resolve(etcd: &mesh_testkit::Etcd) -> Resolution {
    let client = Etcd::new(
        EtcdOptions::new(etcd.endpoints())
            .expect("endpoints")
            .with_request_timeout(Duration::from_millis(800))
            .with_connect_timeout(Duration::from_millis(300))
            .with_watch_progress_interval(Duration::from_millis(500)),
    );
    EtcdResolver::new(client, "/mesh", "greeter").spawn()
}

fn ids(r: &Resolution) -> Vec<String> {
    r.current().map(|s| s.endpoints.into_iter().map(|e| e.id).collect()).unwrap_or_default()
}

const PREFIX: &str = "/mesh/services/greeter/";

#[tokio::test]
async fn a_value_written_as_go_writes_it_is_discovered_and_called() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let server = NamedGreeter::serve("go-server", Duration::ZERO).await.expect("serve");
    // Exactly what go.etcd.io/etcd/client/v3/naming/endpoints writes for AddEndpoint with
    // endpoints.Endpoint{Addr: addr}: json.Marshal(Update{Op: Add, Addr: addr}).
    let go_value = format!(r#"{{"Op":0,"Addr":"{}","Metadata":null}}"#, server.addr());
    etcd.put(&format!("{PREFIX}go-1"), go_value).await.expect("put");
    let resolution = resolve(&etcd);
    let set = resolution.wait_listed(Duration::from_secs(5)).await.expect("listed");
    assert_eq!(set.endpoints.len(), 1);
    assert_eq!((set.endpoints[0].id.as_str(), set.endpoints[0].weight), ("go-1", 1));
    let channel = Balancer::spawn(BalancerConfig::new("greeter"), resolution.updates());
    channel.wait_ready(Duration::from_secs(5)).await.expect("ready");
    let reply = GreeterClient::new(channel).say_hello(HelloRequest { name: "go".into() }).await.expect("call");
    assert_eq!(reply.get_ref().served_by, "go-server");
}

#[tokio::test]
async fn malformed_values_are_skipped_and_the_others_apply() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let good = r#"{"Op":0,"Addr":"127.0.0.1:7001","Metadata":{"weight":3}}"#;
    etcd.put(&format!("{PREFIX}good"), good).await.expect("put");
    let bad: Vec<(String, Vec<u8>)> = vec![
        (format!("{PREFIX}garbage"), b"\x00\xffnot json".to_vec()),
        (format!("{PREFIX}wrong-type"), br#"{"Addr":["127.0.0.1:1"]}"#.to_vec()),
        (format!("{PREFIX}port-zero"), br#"{"Addr":"127.0.0.1:0"}"#.to_vec()),
        (format!("{PREFIX}huge"), format!(r#"{{"Addr":"127.0.0.1:1","x":"{}"}}"#, "y".repeat(1 << 20)).into_bytes()),
        (format!("{PREFIX}nested/key"), br#"{"Addr":"127.0.0.1:2"}"#.to_vec()),
    ];
    for (k, v) in &bad {
        etcd.put(k, v).await.expect("put");
    }
    let resolution = resolve(&etcd);
    let set = resolution.wait_listed(Duration::from_secs(5)).await.expect("listed");
    assert_eq!(set.endpoints.iter().map(|e| (e.id.as_str(), e.weight)).collect::<Vec<_>>(), [("good", 3)]);
    assert_eq!(resolution.status().borrow().malformed, bad.len() as u64);

    // A good value that turns bad keeps its last good state.
    etcd.put(&format!("{PREFIX}good"), "oops").await.expect("put");
    etcd.put(&format!("{PREFIX}second"), r#"{"Addr":"127.0.0.1:7002"}"#).await.expect("put");
    eventually("second applied", Duration::from_secs(5), || async { (ids(&resolution).len() == 2).then_some(()) })
        .await
        .expect("applied");
    assert_eq!(ids(&resolution), ["good", "second"]);
    assert_eq!(resolution.status().borrow().malformed, bad.len() as u64 + 1);
}

#[tokio::test]
async fn the_last_known_set_is_kept_through_an_outage_and_an_empty_set_only_when_etcd_says_so() {
    let mut etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    for i in 1..=2 {
        etcd.put(&format!("{PREFIX}s{i}"), format!(r#"{{"Addr":"127.0.0.1:700{i}"}}"#)).await.expect("put");
    }
    let resolution = resolve(&etcd);
    assert_eq!(resolution.wait_listed(Duration::from_secs(5)).await.map(|s| s.len()), Some(2));
    let status = resolution.status();
    etcd.kill(0).expect("kill");
    eventually("stale", Duration::from_secs(10), || async {
        status.borrow().view.as_ref().is_some_and(|v| !v.in_sync).then_some(())
    })
    .await
    .expect("noticed the outage");
    assert_eq!(ids(&resolution), ["s1", "s2"], "kept through the outage");
    etcd.restart(0).await.expect("back");
    eventually("in sync", Duration::from_secs(10), || async {
        status.borrow().view.as_ref().is_some_and(|v| v.in_sync).then_some(())
    })
    .await
    .expect("recovered");
    for i in 1..=2 {
        etcd.delete(&format!("{PREFIX}s{i}")).await.expect("delete");
    }
    eventually("empty", Duration::from_secs(5), || async { ids(&resolution).is_empty().then_some(()) })
        .await
        .expect("empty when etcd says so");
    assert_eq!(resolution.current().map(|s| s.len()), Some(0));
}

#[tokio::test]
async fn the_stream_starts_with_the_listed_set_and_follows_changes() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    etcd.put(&format!("{PREFIX}a"), r#"{"Addr":"127.0.0.1:7001"}"#).await.expect("put");
    let resolution = resolve(&etcd);
    let mut updates = Box::pin(resolution.updates());
    drop(resolution); // the stream alone keeps the resolver running
    let first = tokio::time::timeout(Duration::from_secs(5), updates.next()).await.expect("first").expect("set");
    assert_eq!(first.len(), 1, "never an empty set before the first listing");
    etcd.put(&format!("{PREFIX}b"), r#"{"Addr":"127.0.0.1:7002"}"#).await.expect("put");
    let second = tokio::time::timeout(Duration::from_secs(5), updates.next()).await.expect("second").expect("set");
    assert_eq!(second.len(), 2);
}

#[tokio::test]
async fn the_static_resolver_yields_its_set_and_stays_open() {
    let set = mesh_balancer::EndpointSet::from_addresses(["127.0.0.1:1", "127.0.0.1:2"]);
    let mut updates = Box::pin(StaticResolver::new(set.clone()).updates());
    assert_eq!(updates.next().await, Some(set));
    assert!(tokio::time::timeout(Duration::from_millis(50), updates.next()).await.is_err(), "stays open");
}
