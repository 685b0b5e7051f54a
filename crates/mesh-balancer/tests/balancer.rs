//! The balanced channel over real tonic servers on 127.0.0.1:0.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use mesh_balancer::{Balancer, BalancerConfig, Endpoint, EndpointSet, HashConfig, MissingKey, P2cLoad, Strategy};
use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;
use mesh_testkit::eventually;
use support::{calls, endpoint, server, set, slow_server};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;

fn config() -> BalancerConfig {
    BalancerConfig::new("greeter")
}

fn watched(initial: EndpointSet) -> (watch::Sender<EndpointSet>, WatchStream<EndpointSet>) {
    let (tx, rx) = watch::channel(initial);
    (tx, WatchStream::new(rx))
}

#[tokio::test]
async fn round_robin_300_calls_over_3_servers_gives_100_each() {
    let (a, b, c) = (server("a").await, server("b").await, server("c").await);
    let channel = Balancer::spawn(config(), tokio_stream::once(set(&[("a", &a), ("b", &b), ("c", &c)])));
    // Once all three are connected, round robin is exact.
    channel.wait_ready(Duration::from_secs(5)).await.expect("ready");
    let (by, failures) = calls(&channel, 300).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(by, BTreeMap::from([("a".into(), 100), ("b".into(), 100), ("c".into(), 100)]));
    let stats = channel.endpoints();
    assert!(stats.iter().all(|e| e.requests == 100 && e.failures == 0 && e.connected), "{stats:?}");
}

#[tokio::test]
async fn no_endpoints_fails_fast_with_unavailable_naming_the_service() {
    let channel = Balancer::spawn(config(), tokio_stream::once(EndpointSet::default()));
    let err = GreeterClient::new(channel).say_hello(HelloRequest { name: "x".into() }).await.expect_err("no endpoints");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(err.message(), "no endpoints for service greeter");
}

#[tokio::test]
async fn a_malformed_address_is_skipped_and_the_others_serve() {
    let (a, b) = (server("a").await, server("b").await);
    let mut s = set(&[("a", &a), ("b", &b)]);
    s.endpoints.insert(1, Endpoint::new("not a valid address::/").with_id("bad"));
    s.endpoints.push(Endpoint::new("http://").with_id("empty-host"));
    let channel = Balancer::spawn(config(), tokio_stream::once(s));
    let (by, failures) = calls(&channel, 100).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(by.values().sum::<usize>(), 100);
    let ids: Vec<String> = channel.endpoints().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, ["a", "b"]);
}

#[tokio::test]
async fn a_server_added_at_runtime_gets_calls_with_no_call_in_between() {
    let (a, b, c, d) = (server("a").await, server("b").await, server("c").await, server("d").await);
    let (tx, updates) = watched(set(&[("a", &a), ("b", &b), ("c", &c)]));
    let channel = Balancer::spawn(config(), updates);
    tx.send_replace(set(&[("a", &a), ("b", &b), ("c", &c), ("d", &d)]));
    // No call flows: the background task alone must apply the update.
    eventually("the fourth endpoint applied", Duration::from_secs(5), || async {
        (channel.endpoints().len() == 4).then_some(())
    })
    .await
    .expect("applied without traffic");
    channel.wait_ready(Duration::from_secs(5)).await.expect("ready");
    let (by, failures) = calls(&channel, 400).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(by.get("d"), Some(&100), "{by:?}");
}

#[tokio::test]
async fn connections_of_endpoints_that_stay_are_kept_across_updates() {
    let (a, b) = (server("a").await, server("b").await);
    let (tx, updates) = watched(set(&[("a", &a)]));
    let channel = Balancer::spawn(config(), updates);
    calls(&channel, 10).await;
    tx.send_replace(set(&[("a", &a), ("b", &b)]));
    eventually("two endpoints", Duration::from_secs(5), || async { (channel.endpoints().len() == 2).then_some(()) })
        .await
        .expect("applied");
    let a_stats = channel.endpoints().into_iter().find(|e| e.id == "a").expect("a stays");
    assert_eq!(a_stats.requests, 10, "a's counters (and connection) survive the update");
    assert!(a_stats.connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_three_fails_at_most_the_calls_in_flight() {
    const WORKERS: usize = 8;
    let (a, b, c) = (server("a").await, server("b").await, server("c").await);
    let channel = Balancer::spawn(config(), tokio_stream::once(set(&[("a", &a), ("b", &b), ("c", &c)])));
    let killed = Arc::new(AtomicBool::new(false));
    let after_kill = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (channel, killed, after_kill) = (channel.clone(), killed.clone(), after_kill.clone());
        workers.push(tokio::spawn(async move {
            let mut client = GreeterClient::new(channel);
            let (mut failures, mut late) = (Vec::new(), BTreeMap::<String, usize>::new());
            while after_kill.load(Ordering::Relaxed) < 600 {
                let was_killed = killed.load(Ordering::Relaxed);
                match client.say_hello(HelloRequest { name: "k".into() }).await {
                    Ok(r) if was_killed => {
                        after_kill.fetch_add(1, Ordering::Relaxed);
                        *late.entry(r.into_inner().served_by).or_default() += 1;
                    }
                    Ok(_) => {}
                    Err(s) => failures.push(s),
                }
            }
            (failures, late)
        }));
    }
    eventually("load flowing", Duration::from_secs(5), || async {
        (channel.endpoints().iter().all(|e| e.requests > 20)).then_some(())
    })
    .await
    .expect("load");
    killed.store(true, Ordering::Relaxed);
    b.kill().await;
    let mut failures = Vec::new();
    let mut late = BTreeMap::new();
    for w in workers {
        let (f, l) = w.await.expect("worker");
        failures.extend(f);
        for (k, v) in l {
            *late.entry(k).or_insert(0) += v;
        }
    }
    assert!(failures.len() <= WORKERS, "{} failures > {WORKERS} calls in flight: {failures:?}", failures.len());
    assert!(!late.contains_key("b"), "{late:?}");
    assert!(late.get("a").is_some_and(|&n| n > 100) && late.get("c").is_some_and(|&n| n > 100), "{late:?}");
    let b_state = channel.endpoints().into_iter().find(|e| e.id == "b").expect("b still listed");
    assert!(!b_state.usable, "a dead endpoint is skipped: {b_state:?}");
}

#[tokio::test]
async fn a_killed_server_back_on_its_address_gets_calls_again() {
    let (a, b) = (server("a").await, server("b").await);
    let b_addr = b.addr();
    let mut cfg = config();
    cfg.probe_backoff_min = Duration::from_millis(20);
    cfg.probe_backoff_max = Duration::from_millis(100);
    let channel = Balancer::spawn(cfg, tokio_stream::once(set(&[("a", &a), ("b", &b)])));
    calls(&channel, 10).await;
    b.kill().await;
    eventually("b marked down", Duration::from_secs(5), || async {
        channel.endpoints().iter().any(|e| e.id == "b" && !e.usable).then_some(())
    })
    .await
    .expect("down");
    let (by, failures) = calls(&channel, 20).await;
    assert!(failures.is_empty() && by.get("a") == Some(&20), "{by:?} {failures:?}");
    let _b = mesh_testkit::TestServer::serve_at(
        b_addr,
        mesh_proto::pb::greeter_server::GreeterServer::new(mesh_testkit::NamedGreeter {
            name: "b".into(),
            delay: Duration::ZERO,
        }),
    )
    .await
    .expect("b again");
    eventually("b probed back", Duration::from_secs(5), || async {
        channel.endpoints().iter().any(|e| e.id == "b" && e.usable).then_some(())
    })
    .await
    .expect("back");
    let (by, failures) = calls(&channel, 20).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(by.get("b"), Some(&10), "{by:?}");
}

#[tokio::test]
async fn a_dead_endpoint_is_skipped_and_all_dead_says_how_many_were_tried() {
    let a = server("a").await;
    let dead1 = format!("127.0.0.1:{}", mesh_etcd_local::free_port().expect("port"));
    let dead2 = format!("127.0.0.1:{}", mesh_etcd_local::free_port().expect("port"));
    let (tx, updates) = watched(EndpointSet::new(vec![endpoint("a", &a), Endpoint::new(dead1.clone())]));
    let channel = Balancer::spawn(config(), updates);
    let (by, failures) = calls(&channel, 50).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(by.get("a"), Some(&50));

    tx.send_replace(EndpointSet::from_addresses([dead1, dead2]));
    eventually("both dead known", Duration::from_secs(5), || async {
        let e = channel.endpoints();
        (e.len() == 2 && e.iter().all(|e| !e.usable)).then_some(())
    })
    .await
    .expect("probed");
    let err =
        GreeterClient::new(channel.clone()).say_hello(HelloRequest { name: "x".into() }).await.expect_err("all dead");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(err.message(), "all 2 endpoints of service greeter are unreachable");
}

#[tokio::test]
async fn a_removed_endpoint_lets_its_in_flight_call_finish() {
    let slow = slow_server("slow", Duration::from_millis(400)).await;
    let fast = server("fast").await;
    let (tx, updates) = watched(set(&[("slow", &slow)]));
    let channel = Balancer::spawn(config(), updates);
    let mut client = GreeterClient::new(channel.clone());
    let in_flight = tokio::spawn(async move { client.say_hello(HelloRequest { name: "x".into() }).await });
    eventually("call in flight", Duration::from_secs(5), || async {
        channel.endpoints().first().is_some_and(|e| e.in_flight == 1).then_some(())
    })
    .await
    .expect("in flight");
    tx.send_replace(set(&[("fast", &fast)]));
    eventually("slow removed", Duration::from_secs(5), || async {
        (channel.endpoints().iter().all(|e| e.id == "fast")).then_some(())
    })
    .await
    .expect("removed");
    let reply = in_flight.await.expect("join").expect("the in-flight call finishes");
    assert_eq!(reply.get_ref().served_by, "slow");
    let (by, _) = calls(&channel, 5).await;
    assert_eq!(by.get("fast"), Some(&5));
}

async fn hashed_call(
    channel: &mesh_balancer::BalancedChannel<tonic::transport::Channel>,
    key: Option<&str>,
) -> Result<String, tonic::Status> {
    let mut request = tonic::Request::new(HelloRequest { name: "h".into() });
    if let Some(key) = key {
        request.metadata_mut().insert("x-mesh-hash-key", key.parse().expect("ascii key"));
    }
    GreeterClient::new(channel.clone()).say_hello(request).await.map(|r| r.into_inner().served_by)
}

#[tokio::test]
async fn switching_to_consistent_hash_at_runtime_pins_each_key_to_one_server() {
    let (a, b, c) = (server("a").await, server("b").await, server("c").await);
    let channel = Balancer::spawn(config(), tokio_stream::once(set(&[("a", &a), ("b", &b), ("c", &c)])));
    assert_eq!(channel.strategy(), Strategy::RoundRobin);
    channel.set_strategy(Strategy::consistent_hash()).await;
    assert_eq!(channel.strategy().name(), "consistent_hash");
    let mut owners = BTreeMap::new();
    for i in 0..60 {
        let key = format!("user-{}", i % 20);
        let owner = hashed_call(&channel, Some(&key)).await.expect("call");
        assert_eq!(owners.entry(key.clone()).or_insert_with(|| owner.clone()), &owner, "key {key} moved");
    }
    let distinct: std::collections::BTreeSet<_> = owners.values().collect();
    assert!(distinct.len() >= 2, "20 keys all on one server: {owners:?}");
    // No key: random by default.
    hashed_call(&channel, None).await.expect("a keyless call still goes somewhere");
}

#[tokio::test]
async fn a_missing_hash_key_is_invalid_argument_when_configured() {
    let a = server("a").await;
    let cfg = HashConfig::try_new("x-user", 160, MissingKey::Reject).expect("valid");
    let channel =
        Balancer::spawn(config().with_strategy(Strategy::ConsistentHash(cfg)), tokio_stream::once(set(&[("a", &a)])));
    let err = hashed_call(&channel, None).await.expect_err("no key");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("x-user"), "{}", err.message());
}

#[tokio::test]
async fn consistent_hash_moves_only_the_keys_of_a_removed_server() {
    let (a, b, c) = (server("a").await, server("b").await, server("c").await);
    let (tx, updates) = watched(set(&[("a", &a), ("b", &b), ("c", &c)]));
    let channel = Balancer::spawn(config().with_strategy(Strategy::consistent_hash()), updates);
    // Once all three are connected, each key has its owner.
    channel.wait_ready(Duration::from_secs(5)).await.expect("ready");
    let keys: Vec<String> = (0..90).map(|i| format!("k{i}")).collect();
    let mut before = Vec::new();
    for k in &keys {
        before.push(hashed_call(&channel, Some(k)).await.expect("call"));
    }
    tx.send_replace(set(&[("a", &a), ("c", &c)]));
    eventually("b removed", Duration::from_secs(5), || async { (channel.endpoints().len() == 2).then_some(()) })
        .await
        .expect("removed");
    for (k, was) in keys.iter().zip(&before) {
        let now = hashed_call(&channel, Some(k)).await.expect("call");
        if was != "b" {
            assert_eq!(&now, was, "key {k} moved off a server that stayed");
        }
    }
}

#[tokio::test]
async fn weighted_1_2_3_over_600_calls_gives_100_200_300() {
    let (a, b, c) = (server("a").await, server("b").await, server("c").await);
    let s = EndpointSet::new(vec![
        endpoint("a", &a).with_weight(1),
        endpoint("b", &b).with_weight(2),
        endpoint("c", &c).with_weight(3),
    ]);
    let channel = Balancer::spawn(config().with_strategy(Strategy::Weighted), tokio_stream::once(s));
    // Once all three are connected, the schedule is exact.
    channel.wait_ready(Duration::from_secs(5)).await.expect("ready");
    let (by, failures) = calls(&channel, 600).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(by, BTreeMap::from([("a".into(), 100), ("b".into(), 200), ("c".into(), 300)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_sends_most_calls_to_the_faster_server() {
    for load in [P2cLoad::InFlight, P2cLoad::PeakEwma { decay: Duration::from_secs(1) }] {
        let slow = slow_server("slow", Duration::from_millis(30)).await;
        let fast = server("fast").await;
        let channel = Balancer::spawn(
            config().with_strategy(Strategy::P2c(load)),
            tokio_stream::once(set(&[("slow", &slow), ("fast", &fast)])),
        );
        let mut workers = Vec::new();
        for _ in 0..4 {
            let channel = channel.clone();
            workers.push(tokio::spawn(async move { calls(&channel, 50).await }));
        }
        let mut by: BTreeMap<String, usize> = BTreeMap::new();
        for w in workers {
            let (b, f) = w.await.expect("worker");
            assert!(f.is_empty(), "{f:?}");
            for (k, v) in b {
                *by.entry(k).or_default() += v;
            }
        }
        let (s, f) = (by.get("slow").copied().unwrap_or(0), by.get("fast").copied().unwrap_or(0));
        assert!(f > 3 * s, "{load:?}: fast {f} vs slow {s}");
    }
}

/// A per-endpoint layer whose first service is never ready, as an open breaker would be.
#[derive(Clone, Default)]
struct FirstNeverReady(Arc<AtomicUsize>);

#[derive(Clone)]
struct MaybeReady<S> {
    inner: S,
    ready: bool,
}

impl<S> tower::Layer<S> for FirstNeverReady {
    type Service = MaybeReady<S>;
    fn layer(&self, inner: S) -> MaybeReady<S> {
        MaybeReady { inner, ready: self.0.fetch_add(1, Ordering::Relaxed) > 0 }
    }
}

impl<S, R> tower::Service<R> for MaybeReady<S>
where
    S: tower::Service<R>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = S::Response;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = futures_util::future::MapErr<S::Future, fn(S::Error) -> Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if !self.ready {
            return Poll::Ready(Err("circuit open".into()));
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, r: R) -> Self::Future {
        use futures_util::TryFutureExt as _;
        self.inner.call(r).map_err(Into::into)
    }
}

#[tokio::test]
async fn an_endpoint_whose_layer_is_not_ready_is_skipped() {
    let (a, b) = (server("a").await, server("b").await);
    let channel = Balancer::spawn_with_layer(
        config(),
        FirstNeverReady::default(),
        tokio_stream::once(set(&[("a", &a), ("b", &b)])),
    );
    let mut client = GreeterClient::new(channel.clone());
    for _ in 0..20 {
        let r = client.say_hello(HelloRequest { name: "x".into() }).await.expect("b serves");
        assert_eq!(r.get_ref().served_by, "b");
    }
}

#[tokio::test]
async fn a_hash_key_extension_wins_over_the_header() {
    let (a, b, c) = (server("a").await, server("b").await, server("c").await);
    let channel = Balancer::spawn(
        config().with_strategy(Strategy::consistent_hash()),
        tokio_stream::once(set(&[("a", &a), ("b", &b), ("c", &c)])),
    );
    let mut client = GreeterClient::new(channel.clone());
    let mut owners = std::collections::BTreeSet::new();
    for i in 0..12 {
        let mut request = tonic::Request::new(HelloRequest { name: "x".into() });
        request.extensions_mut().insert(mesh_balancer::HashKey("tenant-9".into()));
        // A different header on every call: the extension decides.
        request.metadata_mut().insert("x-mesh-hash-key", format!("header-{i}").parse().expect("ascii"));
        owners.insert(client.say_hello(request).await.expect("call").into_inner().served_by);
    }
    assert_eq!(owners.len(), 1, "one extension key, one server: {owners:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_ewma_spreads_sequential_calls_over_equal_servers() {
    // 3 / 93 / 204 of 300 in the demo: one slow answer kept an endpoint out for seconds.
    let (a, b, c) = (server("a").await, server("b").await, server("c").await);
    let channel = Balancer::spawn(
        config().with_strategy(Strategy::P2c(P2cLoad::PeakEwma { decay: Duration::from_secs(10) })),
        tokio_stream::once(set(&[("a", &a), ("b", &b), ("c", &c)])),
    );
    channel.wait_ready(Duration::from_secs(5)).await.expect("ready");
    let (by, failures) = calls(&channel, 300).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(by.len(), 3, "{by:?}");
    assert!(by.values().all(|&n| n >= 15), "every server gets a share: {by:?}");
}
