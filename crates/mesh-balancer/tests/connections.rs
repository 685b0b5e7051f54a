//! Connections under the balancer: servers that close them, endpoints that never answer,
//! and an endpoint that moves to another address.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use mesh_balancer::{BalancedChannel, Balancer, BalancerConfig, Endpoint, EndpointSet, EndpointState};
use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;
use mesh_proto::pb::greeter_server::GreeterServer;
use mesh_testkit::{NamedGreeter, eventually};
use support::{calls, endpoint, logs, server, set};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::transport::Channel;

/// Runs `workers` callers for `run` over `channel`; returns replies per server and failures.
async fn load(
    channel: &BalancedChannel<Channel>,
    workers: usize,
    run: Duration,
) -> (BTreeMap<String, u64>, Vec<String>) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (channel, stop) = (channel.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = GreeterClient::new(channel);
            let (mut by, mut failed) = (BTreeMap::<String, u64>::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let mut request = tonic::Request::new(HelloRequest { name: "l".into() });
                request.set_timeout(Duration::from_secs(2));
                match client.say_hello(request).await {
                    Ok(r) => *by.entry(r.into_inner().served_by).or_default() += 1,
                    Err(s) => failed.push(format!("{:?}: {}", s.code(), s.message())),
                }
            }
            (by, failed)
        }));
    }
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    let (mut by, mut failed) = (BTreeMap::new(), Vec::new());
    for t in tasks {
        let (b, f) = t.await.expect("worker");
        for (k, v) in b {
            *by.entry(k).or_insert(0) += v;
        }
        failed.extend(f);
    }
    (by, failed)
}

/// A greeter that closes each connection 500 ms after it opened, as servers with a maximum
/// connection age (grpc-go's MaxConnectionAge) do; counts the connections it accepted.
async fn aging_server(name: &str) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), move |c| {
        counter.fetch_add(1, Ordering::Relaxed);
        c
    });
    let greeter = GreeterServer::new(NamedGreeter { name: name.into(), delay: Duration::ZERO });
    tokio::spawn(
        tonic::transport::Server::builder()
            .max_connection_age(Duration::from_millis(500))
            .add_service(greeter)
            .serve_with_incoming(incoming),
    );
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_closes_connections_every_500ms_is_never_marked_down_and_lost_calls_are_retryable() {
    let (addr, accepted) = aging_server("aged").await;
    let channel =
        Balancer::spawn(BalancerConfig::new("greeter"), tokio_stream::once(EndpointSet::from_addresses([addr])));
    // One caller: a call rarely meets a closing connection. When it does, hyper cancels it
    // before sending, and the balancer says UNAVAILABLE, which mesh-retry retries (the
    // greeter-client test `connections_closed_by_the_server_fail_no_call_through_the_whole_stack`
    // shows no call lost then).
    let (by, failures) = load(&channel, 1, Duration::from_secs(4)).await;
    assert!(failures.len() <= 2, "{} failed calls: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    assert!(failures.iter().all(|f| f.starts_with("Unavailable")), "{failures:?}");
    let reconnects = accepted.load(Ordering::Relaxed);
    println!("one caller: {by:?} over {reconnects} connections");
    assert!(reconnects >= 6, "the server closed its connections, so the client reconnected: {reconnects}");
    assert!(by.get("aged").is_some_and(|&n| n > 500), "{by:?}");

    // Four callers: a call hyper had queued on a connection just as the server closed it is
    // cancelled before it was sent, or reset by the server's final GOAWAY before the server
    // took it, under a plain tonic Channel as under the balancer. The balancer reports those
    // as UNAVAILABLE, the code that tells a retry layer (mesh-retry) to send them again.
    // What the balancer adds must never fail a call: nothing of its own (no "unreachable",
    // no "endpoints of service"), and the endpoint never marked unreachable.
    let watcher = tokio::spawn({
        let channel = channel.clone();
        async move {
            let mut states = std::collections::BTreeSet::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(4);
            while tokio::time::Instant::now() < until {
                states.extend(channel.endpoints().into_iter().map(|e| format!("{:?}", e.state)));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            states
        }
    });
    let (by, failures) = load(&channel, 4, Duration::from_secs(4)).await;
    let states = watcher.await.expect("watcher");
    println!("four callers: {by:?}, {} lost to a closing connection, states seen {states:?}", failures.len());
    let own = |f: &String| f.contains("unreachable") || f.contains("endpoints of service");
    assert!(!failures.iter().any(own), "{failures:?}");
    assert!(failures.iter().all(|f| f.starts_with("Unavailable")), "lost calls are retryable: {failures:?}");
    assert!(failures.len() * 50 < by.values().sum::<u64>() as usize, "{} of {by:?}", failures.len());
    assert!(!states.contains("Unreachable"), "a server that closes connections is not down: {states:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_that_never_answer_added_under_load_fail_no_call_and_are_logged_once() {
    let logs = logs();
    let (a, b) = (server("a").await, server("b").await);
    let (tx, rx) = watch::channel(set(&[("a", &a), ("b", &b)]));
    let mut cfg = BalancerConfig::new("greeter");
    cfg.probe_backoff_min = Duration::from_millis(20);
    cfg.probe_backoff_max = Duration::from_millis(100);
    let channel = Balancer::spawn(cfg, WatchStream::new(rx));
    let background = tokio::spawn({
        let channel = channel.clone();
        async move { load(&channel, 8, Duration::from_secs(3)).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Port 1 refuses at once; a name that does not resolve fails (or times out) slowly.
    let refused = "127.0.0.1:1";
    let nameless = "mesh-no-such-host.invalid:50051";
    let mut grown = set(&[("a", &a), ("b", &b)]);
    grown.endpoints.push(Endpoint::new(refused).with_id("refused"));
    grown.endpoints.push(Endpoint::new(nameless).with_id("nameless"));
    tx.send_replace(grown);
    let (by, failures) = background.await.expect("load");
    assert!(failures.is_empty(), "{} failed calls: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    assert!(by.get("a").is_some_and(|&n| n > 100) && by.get("b").is_some_and(|&n| n > 100), "{by:?}");
    let states: BTreeMap<String, EndpointState> = channel.endpoints().into_iter().map(|e| (e.id, e.state)).collect();
    assert_eq!(states.get("refused"), Some(&EndpointState::Unreachable), "{states:?}");
    assert_eq!(states.get("nameless"), Some(&EndpointState::Unreachable), "{states:?}");
    for address in [refused, nameless] {
        let said = logs.lines_with(&[&format!("({address})"), "unreachable"]);
        assert_eq!(said.len(), 1, "one line naming {address}, after several failed probes: {said:?}");
    }
}

#[tokio::test]
async fn an_endpoint_that_moves_to_another_address_is_connected_there() {
    let (a, c) = (server("a").await, server("c").await);
    let dead = format!("127.0.0.1:{}", mesh_etcd_local::free_port().expect("port"));
    let (tx, rx) = watch::channel(EndpointSet::new(vec![Endpoint::new(a.addr().to_string()).with_id("x")]));
    let channel = Balancer::spawn(BalancerConfig::new("greeter"), WatchStream::new(rx));
    let (by, failures) = calls(&channel, 5).await;
    assert!(failures.is_empty() && by.get("a") == Some(&5), "{by:?} {failures:?}");

    // Same id, an address nothing listens on: it is probed anew, found unreachable, and
    // calls say so instead of going to the old address.
    tx.send_replace(EndpointSet::new(vec![Endpoint::new(dead.clone()).with_id("x")]));
    eventually("x unreachable at its new address", Duration::from_secs(5), || async {
        channel.endpoints().iter().any(|e| e.address == dead && e.state == EndpointState::Unreachable).then_some(())
    })
    .await
    .expect("probed");
    let (_, failures) = calls(&channel, 1).await;
    assert_eq!(failures.first().map(|s| s.message()), Some("all 1 endpoints of service greeter are unreachable"));

    tx.send_replace(EndpointSet::new(vec![endpoint("x", &c)]));
    eventually("calls reach x at its third address", Duration::from_secs(5), || async {
        let (by, _) = calls(&channel, 1).await;
        (by.get("c") == Some(&1)).then_some(())
    })
    .await
    .expect("moved");
}

/// Established TCP connections from this process to `port` on loopback, from
/// /proc/net/tcp (the client's side of each connection: its remote port is `port`).
fn established_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port =
                fields.get(2).and_then(|r| r.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok());
            remote_port == Some(port) && fields.get(3) == Some(&"01")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clones_keep_no_connection_to_an_endpoint_that_left_and_its_calls_in_flight_end_well() {
    let slow = support::slow_server("s1", Duration::from_millis(800)).await;
    let s2 = server("s2").await;
    let (tx, rx) = watch::channel(set(&[("s1", &slow)]));
    let channel = Balancer::spawn(BalancerConfig::new("greeter"), WatchStream::new(rx));
    // A clone that never calls (a handle kept for tables), and one that called and went idle.
    let _never = channel.clone();
    let mut called = GreeterClient::new(channel.clone());
    called.say_hello(HelloRequest { name: "once".into() }).await.expect("a first call");
    // A call in flight when s1 leaves the set.
    let mut client = GreeterClient::new(channel.clone());
    let in_flight = tokio::spawn(async move { client.say_hello(HelloRequest { name: "in flight".into() }).await });
    support::wait_in_flight(&channel, 1).await;
    let port = slow.addr().port();
    assert!(established_to(port) > 0);
    tx.send(set(&[("s2", &s2)])).expect("send");
    let reply = in_flight.await.expect("join").expect("a call in flight ends well");
    assert_eq!(reply.into_inner().served_by, "s1");
    // Nobody calls: the clones still hold s1's channel, but its connection is closed (one
    // stayed ESTABLISHED 8 s later).
    eventually("no connection to the endpoint that left", Duration::from_secs(10), || async {
        (established_to(port) == 0).then_some(())
    })
    .await
    .expect("closed");
    // The idle clone's next call goes to s2.
    let reply = called.say_hello(HelloRequest { name: "next".into() }).await.expect("a call after");
    assert_eq!(reply.into_inner().served_by, "s2");
}
