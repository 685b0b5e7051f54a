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

/// A registration value for `server` as mesh-registry writes it.
fn value(server: &mesh_testkit::TestServer) -> String {
    mesh_registry::Instance::new("greeter", server.addr().to_string()).encode()
}

/// Waits until the client's view (the resolver's set, and the endpoints its balancer
/// routes to) holds exactly what etcd holds under the prefix; then a round of calls must
/// reach exactly `names`.
async fn converged(
    etcd: &mesh_testkit::Etcd,
    resolution: &Resolution,
    balanced: &mesh_balancer::BalancedChannel<tonic::transport::Channel>,
    names: &[&str],
) {
    let mut client = GreeterClient::new(balanced.clone());
    let held = || async {
        let mut keys: Vec<String> =
            etcd.get_prefix(PREFIX).await.ok()?.into_iter().map(|kv| kv.key[PREFIX.len()..].to_string()).collect();
        keys.sort();
        Some(keys)
    };
    eventually("the view equals get --prefix", Duration::from_secs(5), || async {
        let mut seen = ids(resolution);
        seen.sort();
        let mut routed: Vec<String> = balanced.endpoints().into_iter().map(|e| e.id).collect();
        routed.sort();
        (resolution.current().is_some() && routed == seen && Some(seen) == held().await).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: the client sees {:?}", ids(resolution)));
    let mut reached = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    for _ in 0..(3 * names.len()).max(1) {
        match client.say_hello(HelloRequest { name: "t".into() }).await {
            Ok(r) => {
                reached.insert(r.into_inner().served_by);
            }
            Err(s) => failures.push(s.message().to_string()),
        }
    }
    let want: std::collections::BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
    assert_eq!(reached, want, "calls reach exactly the registered servers; failures: {failures:?}");
    if names.is_empty() {
        assert!(failures.iter().all(|f| f == "no endpoints for service greeter"), "{failures:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_a_prefix_delete_and_a_lease_revoke_reach_the_client_whole() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let mut servers = Vec::new();
    for name in ["s1", "s2", "s3"] {
        servers.push(NamedGreeter::serve(name, Duration::ZERO).await.expect("serve"));
    }
    let resolution = resolve(&etcd);
    let channel = Balancer::spawn(BalancerConfig::new("greeter"), resolution.updates());
    converged(&etcd, &resolution, &channel, &[]).await;

    // Three registrations in one transaction: one watch response, one revision.
    let keys: Vec<String> = ["s1", "s2", "s3"].iter().map(|n| format!("{PREFIX}{n}")).collect();
    let values: Vec<String> = servers.iter().map(value).collect();
    let pairs: Vec<(&str, &str)> = keys.iter().map(String::as_str).zip(values.iter().map(String::as_str)).collect();
    etcd.put_all(&pairs).await.expect("txn");
    converged(&etcd, &resolution, &channel, &["s1", "s2", "s3"]).await;

    // `etcdctl del --prefix` over the three: three deletes at one revision.
    assert_eq!(etcd.delete_prefix(PREFIX).await.expect("del --prefix"), 3);
    converged(&etcd, &resolution, &channel, &[]).await;

    // Three registrations on one lease, then the lease revoked: three deletes again.
    let lease = etcd.grant(60).await.expect("grant");
    for (key, value) in &pairs {
        etcd.put_leased(key, value, lease).await.expect("put");
    }
    converged(&etcd, &resolution, &channel, &["s1", "s2", "s3"]).await;
    etcd.revoke(lease).await.expect("revoke");
    converged(&etcd, &resolution, &channel, &[]).await;
}

async fn first_call_over_etcd() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let server = NamedGreeter::serve("s1", Duration::ZERO).await.expect("serve");
    etcd.put(&format!("{PREFIX}s1"), value(&server)).await.expect("register");
    for trial in 0..20 {
        // As a user writes it: resolve, balance, call. No waiting in between.
        let resolution = resolve(&etcd);
        let channel = Balancer::spawn(BalancerConfig::new("greeter"), resolution.updates());
        let reply = GreeterClient::new(channel).say_hello(HelloRequest { name: "now".into() }).await;
        assert_eq!(reply.map(|r| r.into_inner().served_by).ok().as_deref(), Some("s1"), "trial {trial}");
    }
}

#[tokio::test]
async fn a_call_right_after_spawning_over_etcd_discovery_succeeds_on_a_current_thread_runtime() {
    first_call_over_etcd().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_right_after_spawning_over_etcd_discovery_succeeds_on_a_multi_thread_runtime() {
    first_call_over_etcd().await;
}

#[tokio::test]
async fn during_the_settle_period_a_server_that_re_registered_and_left_is_dropped_at_once() {
    let mut etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    for id in ["a", "b", "c"] {
        etcd.put(
            &format!("{PREFIX}{id}"),
            format!(r#"{{"Op":0,"Addr":"127.0.0.1:70{}"}}"#, id.as_bytes()[0] - b'a' + 1),
        )
        .await
        .expect("put");
    }
    let client = Etcd::new(
        EtcdOptions::new(etcd.endpoints())
            .expect("endpoints")
            .with_request_timeout(Duration::from_millis(800))
            .with_connect_timeout(Duration::from_millis(300)),
    );
    // A settle period far longer than the test waits: what happens in it is the point.
    let resolution = EtcdResolver::new(client, "/mesh", "greeter").with_settle(Duration::from_secs(120)).spawn();
    resolution.wait_listed(Duration::from_secs(5)).await.expect("listed");
    etcd.restart_fresh().await.expect("fresh etcd");
    // a and b re-register in the new etcd; c never comes back and is kept while settling.
    for id in ["a", "b"] {
        etcd.put(
            &format!("{PREFIX}{id}"),
            format!(r#"{{"Op":0,"Addr":"127.0.0.1:70{}"}}"#, id.as_bytes()[0] - b'a' + 1),
        )
        .await
        .expect("put");
    }
    let mut status = resolution.status();
    let settling = tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| s.settling)).await.is_ok();
    assert!(settling, "never settling: {:?}", resolution.status().borrow());
    // b deregisters: its key is deleted from the new etcd, which settles it.
    etcd.delete(&format!("{PREFIX}b")).await.expect("delete");
    let sorted = || {
        let mut seen = ids(&resolution);
        seen.sort();
        seen
    };
    eventually("b dropped while settling", Duration::from_secs(5), || async { (sorted() == ["a", "c"]).then_some(()) })
        .await
        .unwrap_or_else(|e| panic!("{e}: the client publishes {:?}", sorted()));
    assert!(resolution.status().borrow().settling, "still settling: c is kept");
}
