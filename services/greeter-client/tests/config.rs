//! A running client follows the `client` section of the service's configuration document
//! in a real etcd: the strategy, the endpoint breakers, the retries and the call timeout
//! change with no restart, and a refused document changes nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use greeter_client::{ClientBase, LiveTimeout, Mesh, follow};
use greeter_config::GreeterConfig;
use mesh_balancer::{BalancerConfig, EndpointSet, Strategy};
use mesh_config::{ConfigWatcher, Layers, LiveConfig};
use mesh_etcd::{Etcd, EtcdOptions};
use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;
use mesh_testkit::{NamedGreeter, TestServer};

const KEY: &str = "/mesh/config/greeter";

async fn until<T: Clone + PartialEq + std::fmt::Debug>(what: &str, want: T, mut read: impl FnMut() -> T) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while read() != want {
        assert!(tokio::time::Instant::now() < deadline, "{what}: still {:?}, want {want:?}", read());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Who served each of `n` calls, all with the hash key `key`.
async fn spread(mesh: &Mesh, n: usize, key: &str) -> BTreeMap<String, usize> {
    let mut client = GreeterClient::new(mesh.channel.clone());
    let mut served = BTreeMap::new();
    for _ in 0..n {
        let mut request = tonic::Request::new(HelloRequest { name: "c".into() });
        request.metadata_mut().insert("x-mesh-hash-key", key.parse().expect("ascii"));
        let reply = client.say_hello(request).await.expect("call");
        *served.entry(reply.into_inner().served_by).or_default() += 1;
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_client_follows_the_strategy_breaker_retry_and_timeout_put_in_etcd() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let mut servers: Vec<TestServer> = Vec::new();
    for name in ["a", "b", "c"] {
        servers.push(NamedGreeter::serve(name, Duration::ZERO).await.expect("serve"));
    }
    let set = EndpointSet::from_addresses(servers.iter().map(|s| s.addr().to_string()));
    let resilience = greeter_client::resilience();
    let mesh = Mesh::spawn(BalancerConfig::new("greeter"), &resilience, tokio_stream::once(set)).expect("valid");
    mesh.balanced.wait_ready(Duration::from_secs(5)).await.expect("ready");

    let client_etcd = Etcd::new(EtcdOptions::new(etcd.endpoints()).expect("endpoints"));
    let layers = Layers::defaults(&GreeterConfig::default()).expect("defaults");
    let live: LiveConfig<GreeterConfig> = ConfigWatcher::new(client_etcd, KEY, &layers).expect("valid layers").spawn();
    let timeout = LiveTimeout::new(Duration::from_secs(1));
    let base = ClientBase {
        strategy: Strategy::RoundRobin,
        endpoint_breaker: resilience.endpoint_breaker.clone(),
        retry: resilience.retry.clone(),
        timeout: Some(Duration::from_secs(1)),
    };
    let _following = tokio::spawn(follow(live.subscribe(), mesh.clone(), base, timeout.clone()));

    // Round robin, as the flags say: every server gets a third.
    let before = spread(&mesh, 30, "k1").await;
    assert_eq!(before.values().copied().collect::<Vec<_>>(), [10, 10, 10], "{before:?}");

    // Consistent hashing from etcd: one key, one server.
    etcd.put(KEY, r#"{"client": {"balancer": {"strategy": "consistent_hash"}}}"#).await.expect("put");
    until("the strategy", "consistent_hash".to_string(), || mesh.balanced.strategy().to_string()).await;
    let after = spread(&mesh, 30, "k1").await;
    assert_eq!(after.len(), 1, "one key, one server: {after:?}");

    // Breakers, retries and the timeout; the strategy left out goes back to the flags'.
    let doc = r#"{"client": {"breaker": {"failure_threshold": 2, "open_ms": 300},
                             "retry": {"max_attempts": 4, "codes": ["UNAVAILABLE", "INTERNAL"]},
                             "timeout_ms": 250}}"#;
    etcd.put(KEY, doc).await.expect("put");
    until("the breaker threshold", 2, || mesh.endpoint_breaker_config().failure_threshold).await;
    let id = servers[0].addr().to_string();
    let handle = mesh.endpoint_breaker(&id).expect("a breaker per endpoint");
    assert_eq!(
        (handle.config().failure_threshold, handle.config().open_time),
        (2, Duration::from_millis(300)),
        "the live circuits changed, not only the ones to come"
    );
    until("the retries", 4, || mesh.retry_policy().max_attempts).await;
    assert_eq!(mesh.retry_policy().retry_on, [tonic::Code::Unavailable, tonic::Code::Internal]);
    until("the timeout", Some(Duration::from_millis(250)), || timeout.get()).await;
    until("the strategy back to the flags'", "round_robin".to_string(), || mesh.balanced.strategy().to_string()).await;

    // A refused document changes nothing.
    let refused = etcd.put(KEY, r#"{"client": {"retry": {"max_attempts": 0}}}"#).await.expect("put");
    let mut status = live.status();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.last_rejection.as_ref().is_some_and(|r| r.revision == refused)),
    )
    .await
    .expect("refused in time")
    .expect("watching");
    assert!(live.status().borrow().last_rejection.as_ref().is_some_and(|r| r.reason.contains("client.retry")));
    assert_eq!(mesh.retry_policy().max_attempts, 4);
    assert_eq!(live.current().client.retry.max_attempts, Some(4), "the last good document stays");
}
