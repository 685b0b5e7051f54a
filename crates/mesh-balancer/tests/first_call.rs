//! A call made right after `Balancer::spawn`, as the crate's example makes it: no
//! `wait_ready`, no retry. It waits for the first endpoint set and a connection, bounded by
//! its deadline, and is never failed for having come early.

mod support;

use std::time::Duration;

use mesh_balancer::{Balancer, BalancerConfig, EndpointSet};
use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;
use support::{server, set};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;

async fn first_calls(trials: usize) {
    let (a, b) = (server("a").await, server("b").await);
    // One endpoint that will never answer, so a call must also wait for the right one.
    let dead = format!("127.0.0.1:{}", mesh_etcd_local::free_port().expect("port"));
    for trial in 0..trials {
        let mut endpoints = set(&[("a", &a), ("b", &b)]);
        endpoints.endpoints.insert(0, mesh_balancer::Endpoint::new(dead.clone()));
        let channel = Balancer::spawn(BalancerConfig::new("greeter"), tokio_stream::once(endpoints));
        let mut client = GreeterClient::new(channel);
        let reply = client.say_hello(HelloRequest { name: "now".into() }).await;
        assert!(reply.is_ok(), "trial {trial}: the first call failed: {reply:?}");
    }
}

#[tokio::test]
async fn a_call_right_after_spawn_succeeds_50_of_50_on_a_current_thread_runtime() {
    first_calls(50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_right_after_spawn_succeeds_200_of_200_on_a_multi_thread_runtime() {
    first_calls(200).await;
}

#[tokio::test]
async fn a_call_made_before_any_set_waits_for_the_first_one() {
    let a = server("a").await;
    let (tx, rx) = watch::channel(None::<EndpointSet>);
    let updates = tokio_stream::StreamExt::filter_map(WatchStream::new(rx), |s| s);
    let channel = Balancer::spawn(BalancerConfig::new("greeter"), updates);
    let first = set(&[("a", &a)]);
    let resolver = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        tx.send_replace(Some(first));
        tx
    });
    let mut request = tonic::Request::new(HelloRequest { name: "early".into() });
    request.set_timeout(Duration::from_secs(5));
    let reply = GreeterClient::new(channel).say_hello(request).await.expect("waited for the set");
    assert_eq!(reply.get_ref().served_by, "a");
    drop(resolver.await);
}

#[tokio::test]
async fn with_no_set_a_call_ends_at_its_deadline_or_the_first_resolution_timeout() {
    let mut cfg = BalancerConfig::new("greeter");
    cfg.first_resolution_timeout = Duration::from_millis(400);
    let channel = Balancer::spawn(cfg, tokio_stream::pending::<EndpointSet>());

    let mut request = tonic::Request::new(HelloRequest { name: "x".into() });
    request.set_timeout(Duration::from_millis(100));
    let err = GreeterClient::new(channel.clone()).say_hello(request).await.expect_err("nothing resolved");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");

    let started = std::time::Instant::now();
    let err = GreeterClient::new(channel.clone())
        .say_hello(HelloRequest { name: "x".into() })
        .await
        .expect_err("nothing resolved");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "no endpoints for service greeter: none were resolved within 400ms");
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(!channel.resolved(Duration::from_millis(10)).await);
}

#[tokio::test]
async fn resolved_and_applied_see_a_set_applied_before_they_were_asked() {
    let a = server("a").await;
    let channel = Balancer::spawn(BalancerConfig::new("greeter"), tokio_stream::once(set(&[("a", &a)])));
    GreeterClient::new(channel.clone()).say_hello(HelloRequest { name: "x".into() }).await.expect("call");
    // The set was applied long before these subscribe: neither misses it.
    assert!(channel.resolved(Duration::ZERO).await);
    let mut applied = channel.applied();
    tokio::time::timeout(Duration::from_millis(100), applied.wait_for(|&n| n >= 1))
        .await
        .expect("the count says one was applied")
        .expect("open");
}

#[tokio::test]
async fn wait_ready_takes_any_timeout_even_the_longest() {
    let a = server("a").await;
    let channel = Balancer::spawn(BalancerConfig::new("greeter"), tokio_stream::once(set(&[("a", &a)])));
    assert_eq!(channel.wait_ready(Duration::MAX).await, Ok(1));
}
