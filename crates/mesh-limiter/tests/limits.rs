//! The limiter in a real tonic server on loopback, under floods from many connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mesh_limiter::{CallerKey, Limit, LimiterConfig, LimiterHandle, PUSHBACK_KEY, PerCaller, RateLimitLayer};
use mesh_proto::pb::greeter_client::GreeterClient;
use mesh_proto::pb::greeter_server::{Greeter, GreeterServer};
use mesh_proto::pb::{HelloReply, HelloRequest, HelloStreamRequest};
use mesh_testkit::TestServer;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use tower_layer::Layer as _;

/// A greeter that counts its calls and takes `delay` to answer each.
#[derive(Clone, Default)]
struct Counting {
    calls: Arc<AtomicU64>,
    delay: Duration,
}

#[tonic::async_trait]
impl Greeter for Counting {
    async fn say_hello(&self, _: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        Ok(Response::new(HelloReply { message: "hi".into(), served_by: "s".into() }))
    }

    type SayHelloStreamStream = tokio_stream::Empty<Result<HelloReply, Status>>;

    async fn say_hello_stream(
        &self,
        _: Request<HelloStreamRequest>,
    ) -> Result<Response<Self::SayHelloStreamStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// A limited greeter and health service; the limiter's handle, and the greeter's count.
async fn serve(config: LimiterConfig, greeter: Counting) -> (TestServer, LimiterHandle) {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<GreeterServer<Counting>>().await;
    let routes = tonic::service::Routes::new(GreeterServer::new(greeter)).add_service(health_service);
    let layer = RateLimitLayer::try_new(config).expect("valid limits");
    let handle = layer.handle();
    let server = TestServer::serve(layer.layer(routes)).await.expect("serve");
    (server, handle)
}

async fn channel(server: &TestServer) -> Channel {
    Channel::from_shared(server.uri()).expect("uri").connect().await.expect("connect")
}

/// `connections` clients, connected first, then each calling every `every` for `lasting`,
/// with `tenant` as the x-tenant metadata when given; (admitted, rejected) and every
/// rejection's status.
async fn flood(
    server: &TestServer,
    connections: usize,
    every: Duration,
    lasting: Duration,
    tenant: Option<&'static str>,
) -> (u64, u64, Vec<Status>) {
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(GreeterClient::new(channel(server).await));
    }
    let until = Instant::now() + lasting;
    let mut tasks = Vec::new();
    for mut client in clients {
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut rejected) = (0u64, Vec::new());
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while Instant::now() < until {
                tick.tick().await;
                let mut request = Request::new(HelloRequest { name: "f".into() });
                if let Some(t) = tenant {
                    request.metadata_mut().insert("x-tenant", t.parse().expect("ascii"));
                }
                match client.say_hello(request).await {
                    Ok(_) => ok += 1,
                    Err(status) => rejected.push(status),
                }
            }
            (ok, rejected)
        }));
    }
    let (mut ok, mut rejected) = (0, Vec::new());
    for t in tasks {
        let (o, r) = t.await.expect("flooder");
        ok += o;
        rejected.extend(r);
    }
    (ok, rejected.len() as u64, rejected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_connections_flooding_at_5x_get_the_servers_rate_not_20x_and_health_answers_throughout() {
    let rate = 200.0;
    let burst = 20;
    let greeter = Counting::default();
    let (server, handle) =
        serve(LimiterConfig::try_new(Limit::try_new(rate, burst).expect("valid")).expect("valid"), greeter.clone())
            .await;
    let secs = 3;
    let until = Instant::now() + Duration::from_secs(secs);
    let lasting = Duration::from_secs(secs);
    // Health checked every 20 ms during the flood, on a connection of its own.
    let mut health = HealthClient::new(channel(&server).await);
    let checker = tokio::spawn(async move {
        let mut answers = Vec::new();
        while Instant::now() < until {
            let reply = health.check(HealthCheckRequest { service: String::new() }).await;
            answers.push(reply.map(|r| r.into_inner().status).map_err(|s| s.code()));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        answers
    });
    // 20 connections, 50 calls per second each: 1000 per second, 5× the rate.
    let (ok, rejected, statuses) = flood(&server, 20, Duration::from_millis(20), lasting, None).await;
    let expected = rate * secs as f64 + f64::from(burst);
    let got = ok as f64;
    assert!((got - expected).abs() <= expected * 0.05, "{ok} admitted; rate × 3 s + burst is {expected}");
    assert_eq!(greeter.calls.load(Ordering::SeqCst), ok, "only admitted calls reach the greeter");
    assert!(rejected > 1000, "{rejected} rejected");
    assert_eq!((handle.admitted(), handle.rejected()), (ok, rejected));
    for status in &statuses {
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), "rate limit exceeded for /greeter.v1.Greeter/SayHello: 200/s, burst 20");
        assert_eq!(status.metadata().get(PUSHBACK_KEY).and_then(|v| v.to_str().ok()), Some("20"));
    }
    let answers = checker.await.expect("checker");
    assert!(answers.len() > 50, "{} health checks", answers.len());
    assert!(answers.iter().all(|a| *a == Ok(ServingStatus::Serving as i32)), "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_calls_complete_within_max_wait_and_the_rest_are_rejected_then() {
    let limit = Limit::try_new(10.0, 1).expect("valid").waiting(Duration::from_millis(300));
    let (server, _) = serve(LimiterConfig::try_new(limit).expect("valid"), Counting::default()).await;
    let ch = channel(&server).await;
    let started = Instant::now();
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut client = GreeterClient::new(ch.clone());
        calls.push(tokio::spawn(async move {
            let result = client.say_hello(HelloRequest { name: "w".into() }).await;
            (result.map(drop).map_err(|s| s.code()), started.elapsed())
        }));
    }
    let mut admitted = Vec::new();
    let mut rejected = Vec::new();
    for c in calls {
        let (result, took) = c.await.expect("call");
        match result {
            Ok(()) => admitted.push(took),
            Err(code) => rejected.push((code, took)),
        }
    }
    // One at once, then one per 100 ms: 4 within 300 ms.
    assert!((3..=4).contains(&admitted.len()), "{admitted:?}");
    assert!(admitted.iter().all(|t| *t <= Duration::from_millis(400)), "{admitted:?}");
    for (code, took) in &rejected {
        assert_eq!(*code, Code::ResourceExhausted);
        assert!(*took >= Duration::from_millis(300) && *took <= Duration::from_millis(450), "{took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_callers_flood_leaves_another_callers_rate_intact_and_a_method_override_applies() {
    let limit = Limit::try_new(50.0, 5).expect("valid");
    let config = LimiterConfig::try_new(limit)
        .expect("valid")
        .with_per_caller(PerCaller::new(CallerKey::Metadata("x-tenant".into())));
    let (server, handle) = serve(config, Counting::default()).await;
    let lasting = Duration::from_secs(2);
    let (a, b) = tokio::join!(
        // Tenant a: 10 connections at 100/s each, 20× its rate.
        flood(&server, 10, Duration::from_millis(10), lasting, Some("a")),
        // Tenant b: 25 calls per second, half its rate.
        flood(&server, 1, Duration::from_millis(40), lasting, Some("b")),
    );
    assert!(a.1 > 1000, "tenant a is limited: {a:?}");
    assert!(a.0 <= 50 * 2 + 5 + 5, "tenant a got at most its own rate: {}", a.0);
    assert_eq!(b.1, 0, "tenant b lost nothing to a's flood");
    assert!(b.0 >= 45, "{}", b.0);
    assert_eq!(handle.callers(), 2);
    // A method override: SayHello down to 1 per second, burst 1, for everyone.
    let slow = Limit::try_new(1.0, 1).expect("valid");
    let config = handle.config().expect("limits in force");
    handle.update(config.with_method("/greeter.v1.Greeter/SayHello", slow)).expect("valid");
    let mut client = GreeterClient::new(channel(&server).await);
    let mut request = Request::new(HelloRequest { name: "x".into() });
    request.metadata_mut().insert("x-tenant", "c".parse().expect("ascii"));
    client.say_hello(request).await.expect("the first in its bucket");
    let mut request = Request::new(HelloRequest { name: "x".into() });
    request.metadata_mut().insert("x-tenant", "c".parse().expect("ascii"));
    let status = client.say_hello(request).await.expect_err("over 1/s");
    assert_eq!(status.message(), "rate limit exceeded for /greeter.v1.Greeter/SayHello from c: 1/s, burst 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_told_apart_by_peer_ip_get_a_budget_each_and_a_rejection_names_the_address() {
    // One token a second and a burst of 2: the third quick call from one address is over.
    let limit = Limit::try_new(1.0, 2).expect("valid");
    let config = LimiterConfig::try_new(limit).expect("valid").with_per_caller(PerCaller::new(CallerKey::PeerIp));
    let (server, handle) = serve(config, Counting::default()).await;
    // Two callers on loopback addresses of their own (all of 127.0.0.0/8 is local on Linux).
    let from = |ip: [u8; 4]| {
        let endpoint = Channel::from_shared(server.uri()).expect("uri").local_address(Some(ip.into()));
        async move { GreeterClient::new(endpoint.connect().await.expect("connect")) }
    };
    let (mut a, mut b) = (from([127, 0, 0, 2]).await, from([127, 0, 0, 3]).await);
    let hello = || HelloRequest { name: "ip".into() };
    a.say_hello(hello()).await.expect("a's first");
    a.say_hello(hello()).await.expect("a's second");
    let status = a.say_hello(hello()).await.expect_err("a's third is over its burst");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(status.message(), "rate limit exceeded for /greeter.v1.Greeter/SayHello from 127.0.0.2: 1/s, burst 2");
    assert_eq!(status.metadata().get(PUSHBACK_KEY).and_then(|v| v.to_str().ok()), Some("1000"));
    b.say_hello(hello()).await.expect("b's first: a's calls took nothing from b");
    b.say_hello(hello()).await.expect("b's second");
    assert_eq!(handle.callers(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_update_during_a_flood_sets_the_admitted_rate_and_calls_in_flight_complete() {
    let greeter = Counting { delay: Duration::from_millis(50), ..Counting::default() };
    let (server, handle) =
        serve(LimiterConfig::try_new(Limit::try_new(100.0, 10).expect("valid")).expect("valid"), greeter).await;
    let (ok_slow, _, _) = flood(&server, 20, Duration::from_millis(10), Duration::from_secs(1), None).await;
    handle.update(LimiterConfig::try_new(Limit::try_new(400.0, 10).expect("valid")).expect("valid")).expect("valid");
    let (ok_fast, _, statuses) = flood(&server, 20, Duration::from_millis(10), Duration::from_secs(1), None).await;
    assert!((95..=125).contains(&ok_slow), "{ok_slow} admitted in 1 s at 100/s with burst 10");
    assert!((360..=440).contains(&ok_fast), "{ok_fast} admitted in 1 s at 400/s");
    assert!(statuses.iter().all(|s| s.code() == Code::ResourceExhausted), "in-flight calls completed");
    assert!(statuses.iter().all(|s| s.message().contains("400/s")), "the new limit is named");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limiter_that_starts_off_limits_once_given_limits_and_stops_when_turned_off() {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<GreeterServer<Counting>>().await;
    let routes = tonic::service::Routes::new(GreeterServer::new(Counting::default())).add_service(health_service);
    let layer = RateLimitLayer::off();
    let handle = layer.handle();
    let server = TestServer::serve(layer.layer(routes)).await.expect("serve");
    let mut client = GreeterClient::new(channel(&server).await);
    let hello = || HelloRequest { name: "off".into() };
    for _ in 0..5 {
        client.say_hello(hello()).await.expect("no limits yet");
    }
    assert_eq!((handle.config(), handle.admitted()), (None, 0));
    handle.update(LimiterConfig::try_new(Limit::try_new(1.0, 1).expect("valid")).expect("valid")).expect("valid");
    client.say_hello(hello()).await.expect("the burst of 1");
    let status = client.say_hello(hello()).await.expect_err("over 1/s");
    assert_eq!(status.code(), Code::ResourceExhausted);
    handle.turn_off();
    for _ in 0..5 {
        client.say_hello(hello()).await.expect("off again");
    }
    assert_eq!((handle.admitted(), handle.rejected()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_counted_by_the_scope_whose_budget_decided_them() {
    use mesh_limiter::Scope;
    let slow = Limit::try_new(0.1, 2).expect("valid");
    let config = LimiterConfig::try_new(Limit::try_new(1000.0, 1000).expect("valid"))
        .expect("valid")
        .with_method("/greeter.v1.Greeter/SayHello", slow);
    let (server, handle) = serve(config, Counting::default()).await;
    let mut client = GreeterClient::new(channel(&server).await);
    for _ in 0..5 {
        let _ = client.say_hello(HelloRequest { name: "m".into() }).await;
    }
    // The stream has no limit of its own: the server's budget decides it.
    for _ in 0..3 {
        let status = client.say_hello_stream(HelloStreamRequest::default()).await.expect_err("not in this test");
        assert_eq!(status.code(), Code::Unimplemented, "admitted, then answered by the greeter");
    }
    let counts = |s: Scope| (handle.admitted_in(s), handle.rejected_in(s));
    assert_eq!(counts(Scope::Method), (2, 3));
    assert_eq!(counts(Scope::Server), (3, 0));
    assert_eq!(counts(Scope::Caller), (0, 0));
    assert_eq!((handle.admitted(), handle.rejected()), (5, 3));

    // With budgets per caller, each caller's bucket decides, whatever limit it follows.
    handle
        .update(
            LimiterConfig::try_new(slow)
                .expect("valid")
                .with_per_caller(PerCaller::new(CallerKey::Metadata("x-tenant".into()))),
        )
        .expect("valid");
    for _ in 0..3 {
        let mut request = Request::new(HelloRequest { name: "c".into() });
        request.metadata_mut().insert("x-tenant", "t1".parse().expect("ascii"));
        let _ = client.say_hello(request).await;
    }
    assert_eq!(counts(Scope::Caller), (2, 1));
    assert_eq!(Scope::ALL.map(Scope::as_str), ["server", "method", "caller"]);
}
