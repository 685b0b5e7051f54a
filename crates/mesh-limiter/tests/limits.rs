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
    let (server, handle, _, _) = serve_recorded(config, greeter).await;
    (server, handle)
}

/// Like [`serve`], with every call recorded as it arrives; and when the limiter's buckets
/// were made.
async fn serve_recorded(config: LimiterConfig, greeter: Counting) -> (TestServer, LimiterHandle, Arrivals, Instant) {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<GreeterServer<Counting>>().await;
    let routes = tonic::service::Routes::new(GreeterServer::new(greeter)).add_service(health_service);
    let made = Instant::now();
    let layer = RateLimitLayer::try_new(config).expect("valid limits");
    let handle = layer.handle();
    let arrivals = Arrivals::default();
    let server = TestServer::serve(arrivals.layer(layer.layer(routes))).await.expect("serve");
    (server, handle, arrivals, made)
}

async fn channel(server: &TestServer) -> Channel {
    Channel::from_shared(server.uri()).expect("uri").connect().await.expect("connect")
}

/// Every SayHello as the server saw it arrive, in order: when, the x-tenant it carried, and
/// whether the limiter let it through. A flood's count in a wall-clock window measures the
/// machine (a busy one sends fewer calls, and tokens no call came for spill); the limiter's
/// decisions on the arrivals it really saw do not.
#[derive(Clone, Default)]
struct Arrivals(Arc<std::sync::Mutex<Vec<Arrival>>>);

/// When a call arrived, the x-tenant it carried, and how it ended (set when it did).
type Arrival = (Instant, Option<String>, Arc<std::sync::atomic::AtomicU8>);

const PENDING: u8 = 0;
const ADMITTED: u8 = 1;
const REJECTED: u8 = 2;

impl Arrivals {
    /// (tenant, admitted) of every call, in arrival order, with its arrival.
    fn seen(&self) -> Vec<(Instant, Option<String>, bool)> {
        let calls = self.0.lock().expect("lock");
        calls
            .iter()
            .map(|(at, tenant, outcome)| {
                let outcome = outcome.load(Ordering::SeqCst);
                assert_ne!(outcome, PENDING, "a call that never ended");
                (*at, tenant.clone(), outcome == ADMITTED)
            })
            .collect()
    }
}

impl<S> tower_layer::Layer<S> for Arrivals {
    type Service = Recording<S>;
    fn layer(&self, inner: S) -> Recording<S> {
        Recording { inner, arrivals: self.clone() }
    }
}

#[derive(Clone)]
struct Recording<S> {
    inner: S,
    arrivals: Arrivals,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for Recording<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let outcome = Arc::new(std::sync::atomic::AtomicU8::new(PENDING));
        if request.uri().path() == "/greeter.v1.Greeter/SayHello" {
            let tenant = request.headers().get("x-tenant").and_then(|v| v.to_str().ok()).map(str::to_string);
            self.arrivals.0.lock().expect("lock").push((Instant::now(), tenant, outcome.clone()));
        }
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await;
            if let Ok(r) = &response {
                // A rejection is a trailers-only answer: its status is in the head.
                let rejected = r.headers().get("grpc-status").is_some_and(|v| v.as_bytes() == b"8");
                outcome.store(if rejected { REJECTED } else { ADMITTED }, Ordering::SeqCst);
            }
            response
        })
    }
}

/// A token bucket as the limiter documents it: full at `made`, `tokens` more every
/// `interval` after it, never more than `burst`.
#[derive(Debug, Clone)]
struct Model {
    balance: u64,
    burst: u64,
    tokens: u64,
    interval: Duration,
    next: Instant,
}

impl Model {
    fn full(burst: u64, tokens: u64, interval: Duration, made: Instant) -> Self {
        Model { balance: burst, burst, tokens, interval, next: made + interval }
    }

    fn refill_to(&mut self, now: Instant) {
        while self.next <= now {
            self.balance = (self.balance + self.tokens).min(self.burst);
            self.next += self.interval;
        }
    }

    /// Whether a call arriving at `now` is admitted.
    fn admit(&mut self, now: Instant) -> bool {
        self.refill_to(now);
        let admitted = self.balance > 0;
        self.balance -= u64::from(admitted);
        admitted
    }
}

/// The calls `model` admits of `arrivals`, beside those the limiter admitted.
fn replay(arrivals: &[(Instant, Option<String>, bool)], model: &mut Model) -> (u64, u64) {
    let (mut want, mut got) = (0, 0);
    for (at, _, admitted) in arrivals {
        want += u64::from(model.admit(*at));
        got += u64::from(*admitted);
    }
    (want, got)
}

/// Whether the limiter admitting `got` where the bucket admits `want` over `span` is the
/// bucket the limiter documents: never more than one refill above (a call that arrived on
/// a refill's edge), and below by at most what whole-millisecond refills lose (up to a
/// millisecond of each interval: the module docs of the limiter's bucket) and one refill.
fn within_the_bucket(model: &Model, want: u64, got: u64, span: Duration) -> bool {
    let interval_ms = model.interval.as_millis() as f64;
    let refills = span.as_secs_f64() * 1000.0 / interval_ms;
    let lost = (refills * model.tokens as f64 / interval_ms).ceil() as u64;
    got <= want + model.tokens && got + lost + model.tokens >= want
}

/// From the first arrival of `calls` to the last.
fn span_of(calls: &[(Instant, Option<String>, bool)]) -> Duration {
    match (calls.first(), calls.last()) {
        (Some(first), Some(last)) => last.0.duration_since(first.0),
        _ => Duration::ZERO,
    }
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
    let config = LimiterConfig::try_new(Limit::try_new(rate, burst).expect("valid")).expect("valid");
    let (server, handle, arrivals, made) = serve_recorded(config, greeter.clone()).await;
    let secs = 3;
    let until = Instant::now() + Duration::from_secs(secs);
    let lasting = Duration::from_secs(secs);
    // Health checked every 20 ms during the flood, on a connection of its own.
    let mut health = HealthClient::new(channel(&server).await);
    let checker = tokio::spawn(async move {
        let mut answers = Vec::new();
        while Instant::now() < until {
            let reply = health.check(HealthCheckRequest { service: String::new() }).await;
            answers.push((Instant::now(), reply.map(|r| r.into_inner().status).map_err(|s| s.code())));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        answers
    });
    // 20 connections, 50 calls per second each: 1000 per second, 5× the rate.
    let started = Instant::now();
    let (ok, rejected, statuses) = flood(&server, 20, Duration::from_millis(20), lasting, None).await;
    // 200/s is 4 tokens every 20 ms (the pushback each rejection names). The limiter's
    // decisions on the calls as they arrived are a token bucket's: one refill apart at
    // most, for calls that arrived on a refill's edge.
    let seen = arrivals.seen();
    let mut model = Model::full(20, 4, Duration::from_millis(20), made);
    let (want, got) = replay(&seen, &mut model);
    assert_eq!(got, ok, "the calls admitted are those the clients saw succeed");
    let span = span_of(&seen);
    assert!(
        within_the_bucket(&model, want, got, span),
        "{got} admitted of {} arrivals in {span:?}; a token bucket admits {want}",
        seen.len()
    );
    // And never more than the rate allows since the bucket was made, whatever came.
    let span = seen.last().map_or(Duration::ZERO, |(at, _, _)| at.duration_since(made));
    assert!(ok as f64 <= rate * span.as_secs_f64() + f64::from(burst) + 4.0, "{ok} admitted in {span:?}");
    assert_eq!(greeter.calls.load(Ordering::SeqCst), ok, "only admitted calls reach the greeter");
    assert!(rejected > 0, "a flood at 5x the rate was never limited");
    assert_eq!((handle.admitted(), handle.rejected()), (ok, rejected));
    for status in &statuses {
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), "rate limit exceeded for /greeter.v1.Greeter/SayHello: 200/s, burst 20");
        assert_eq!(status.metadata().get(PUSHBACK_KEY).and_then(|v| v.to_str().ok()), Some("20"));
    }
    // Health answered Serving throughout: every answer, from the first third of the flood
    // to the last (how many answers came is the machine's business).
    let answers = checker.await.expect("checker");
    assert!(answers.iter().all(|(_, a)| *a == Ok(ServingStatus::Serving as i32)), "{answers:?}");
    let third = lasting / 3;
    assert!(answers.iter().any(|(at, _)| *at <= started + third), "no health answer early in the flood");
    assert!(answers.iter().any(|(at, _)| *at >= started + 2 * third), "no health answer late in the flood");
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
    // Each tenant 50/s; the server as a whole 2000/s, more than the flood sends.
    let tenant = Limit::try_new(50.0, 5).expect("valid");
    let config = LimiterConfig::try_new(Limit::try_new(2000.0, 200).expect("valid"))
        .expect("valid")
        .with_per_caller(PerCaller::new(CallerKey::Metadata("x-tenant".into())).with_limit(tenant));
    let (server, handle, arrivals, _) = serve_recorded(config, Counting::default()).await;
    let lasting = Duration::from_secs(2);
    let (a, b) = tokio::join!(
        // Tenant a: 10 connections at 100/s each, 20× its rate.
        flood(&server, 10, Duration::from_millis(10), lasting, Some("a")),
        // Tenant b: 25 calls per second, half its rate.
        flood(&server, 1, Duration::from_millis(40), lasting, Some("b")),
    );
    // Each tenant's calls, as they arrived, against a bucket of its own made full at its
    // first call (50/s is 1 token every 20 ms).
    let seen = arrivals.seen();
    for tenant in ["a", "b"] {
        let calls: Vec<_> = seen.iter().filter(|(_, t, _)| t.as_deref() == Some(tenant)).cloned().collect();
        let first = calls.first().map(|(at, _, _)| *at).expect("calls");
        let mut model = Model::full(5, 1, Duration::from_millis(20), first);
        let (want, got) = replay(&calls, &mut model);
        let span = span_of(&calls);
        assert!(
            within_the_bucket(&model, want, got, span),
            "tenant {tenant}: {got} admitted of {} in {span:?}; its own bucket admits {want}",
            calls.len()
        );
    }
    assert!(a.1 > 0, "tenant a's flood at 20x its rate was never limited: {a:?}");
    assert_eq!(a.0 + b.0, handle.admitted());
    assert_eq!(handle.callers(), 2);
    // A method override: SayHello down to 1 per second, burst 1, for all callers together.
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
    assert_eq!(status.message(), "rate limit exceeded for /greeter.v1.Greeter/SayHello: 1/s, burst 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_caller_keys_never_get_past_the_servers_limit_nor_into_a_rejection_or_the_table() {
    // --rate 10 --burst 1 --limit-per-caller metadata:x-tenant: 500 calls, each with a key of
    // its own, were all admitted when only the callers' buckets counted.
    let limit = Limit::try_new(10.0, 1).expect("valid");
    let config = LimiterConfig::try_new(limit)
        .expect("valid")
        .with_per_caller(PerCaller::new(CallerKey::Metadata("x-tenant".into())));
    let (server, handle, arrivals, _) = serve_recorded(config, Counting::default()).await;
    let mut client = GreeterClient::new(channel(&server).await);
    let secret = "sk-live-0123456789";
    for i in 0..500 {
        let mut request = Request::new(HelloRequest { name: "spoof".into() });
        request.metadata_mut().insert("x-tenant", format!("{secret}-{i}").parse().expect("ascii"));
        if let Err(status) = client.say_hello(request).await {
            assert_eq!(status.code(), Code::ResourceExhausted);
            assert!(!status.message().contains(secret), "the key in a rejection: {}", status.message());
        }
    }
    // Every arrival against the server's one bucket (10/s is a token every 100 ms).
    let seen = arrivals.seen();
    let first = seen.first().map(|(at, _, _)| *at).expect("calls");
    let mut model = Model::full(1, 1, Duration::from_millis(100), first);
    let (want, got) = replay(&seen, &mut model);
    let span = span_of(&seen);
    assert!(
        within_the_bucket(&model, want, got, span),
        "{got} of 500 admitted in {span:?}; the server's bucket admits {want}"
    );
    // A caller over its own budget is rejected naming how callers are told apart, not who.
    let mut request = Request::new(HelloRequest { name: "k".into() });
    request.metadata_mut().insert("x-tenant", secret.parse().expect("ascii"));
    let _ = client.say_hello(request).await;
    let mut request = Request::new(HelloRequest { name: "k".into() });
    request.metadata_mut().insert("x-tenant", secret.parse().expect("ascii"));
    let status = client.say_hello(request).await.expect_err("over the burst of 1");
    assert!(!status.message().contains(secret), "{}", status.message());
    // Keys longer than 128 bytes share one budget and take no place in the table.
    let callers = handle.callers();
    for i in 0..50 {
        let mut request = Request::new(HelloRequest { name: "long".into() });
        request.metadata_mut().insert("x-tenant", format!("{i}{}", "x".repeat(15_000)).parse().expect("ascii"));
        let _ = client.say_hello(request).await;
    }
    assert_eq!(handle.callers(), callers, "long keys got buckets of their own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_told_apart_by_peer_ip_get_a_budget_each_and_a_rejection_says_so() {
    // One token a second and a burst of 2: the third quick call from one address is over.
    let limit = Limit::try_new(1.0, 2).expect("valid");
    let config = LimiterConfig::try_new(Limit::try_new(100.0, 10).expect("valid"))
        .expect("valid")
        .with_per_caller(PerCaller::new(CallerKey::PeerIp).with_limit(limit));
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
    assert_eq!(
        status.message(),
        "rate limit exceeded for /greeter.v1.Greeter/SayHello for this caller (by its address): 1/s, burst 2"
    );
    assert_eq!(status.metadata().get(PUSHBACK_KEY).and_then(|v| v.to_str().ok()), Some("1000"));
    b.say_hello(hello()).await.expect("b's first: a's calls took nothing from b");
    b.say_hello(hello()).await.expect("b's second");
    assert_eq!(handle.callers(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_update_during_a_flood_sets_the_admitted_rate_and_calls_in_flight_complete() {
    let greeter = Counting { delay: Duration::from_millis(50), ..Counting::default() };
    let config = LimiterConfig::try_new(Limit::try_new(100.0, 10).expect("valid")).expect("valid");
    let (server, handle, arrivals, made) = serve_recorded(config, greeter).await;
    let (ok_slow, _, _) = flood(&server, 20, Duration::from_millis(10), Duration::from_secs(1), None).await;
    let updated = Instant::now();
    handle.update(LimiterConfig::try_new(Limit::try_new(400.0, 10).expect("valid")).expect("valid")).expect("valid");
    let (ok_fast, _, statuses) = flood(&server, 20, Duration::from_millis(10), Duration::from_secs(1), None).await;
    // Before the update a bucket of 100/s (2 tokens every 20 ms); from it on, one of 400/s
    // (8 every 20 ms) holding what the old one held, as the calls arrived.
    let seen = arrivals.seen();
    let (before, after): (Vec<_>, Vec<_>) = seen.into_iter().partition(|(at, _, _)| *at < updated);
    let mut slow = Model::full(10, 2, Duration::from_millis(20), made);
    let (want_slow, got_slow) = replay(&before, &mut slow);
    slow.refill_to(updated);
    let mut fast = Model { balance: slow.balance, ..Model::full(10, 8, Duration::from_millis(20), updated) };
    let (want_fast, got_fast) = replay(&after, &mut fast);
    assert_eq!((got_slow, got_fast), (ok_slow, ok_fast));
    let (span_slow, span_fast) = (span_of(&before), span_of(&after));
    assert!(
        within_the_bucket(&slow, want_slow, got_slow, span_slow),
        "{got_slow} admitted at 100/s in {span_slow:?}; a bucket admits {want_slow}"
    );
    assert!(
        within_the_bucket(&fast, want_fast, got_fast, span_fast),
        "{got_fast} admitted at 400/s in {span_fast:?}; a bucket admits {want_fast}"
    );
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
