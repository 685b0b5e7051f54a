//! Circuit breakers and retries of the client stack against real in-process servers: an
//! endpoint that keeps failing is ejected and probed back, retries stay inside their
//! budget, an open service breaker sends nothing, and a rate-limited server is retried after
//! the pause it asks for without tripping a breaker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use greeter_client::{Mesh, Resilience};
use mesh_balancer::{BalancerConfig, EndpointSet};
use mesh_breaker::{BreakerConfig, State};
use mesh_proto::pb::greeter_client::GreeterClient;
use mesh_proto::pb::greeter_server::{Greeter, GreeterServer};
use mesh_proto::pb::{HelloReply, HelloRequest, HelloStreamRequest};
use mesh_retry::RetryPolicy;
use mesh_testkit::TestServer;
use tokio::time::Instant;
use tonic::{Code, Request, Response, Status};

/// A greeter that counts the calls it gets and fails them with UNAVAILABLE while told to.
#[derive(Clone)]
struct Flaky {
    name: &'static str,
    failing: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
}

impl Flaky {
    fn new(name: &'static str, failing: bool) -> Self {
        Flaky { name, failing: Arc::new(AtomicBool::new(failing)), calls: Arc::default() }
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl Greeter for Flaky {
    async fn say_hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(Status::unavailable(format!("{} is failing", self.name)));
        }
        let message = format!("Hello, {}!", request.get_ref().name);
        Ok(Response::new(HelloReply { message, served_by: self.name.to_string() }))
    }

    type SayHelloStreamStream = tokio_stream::Empty<Result<HelloReply, Status>>;

    async fn say_hello_stream(
        &self,
        _: Request<HelloStreamRequest>,
    ) -> Result<Response<Self::SayHelloStreamStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

async fn serve(greeters: &[Flaky]) -> Vec<TestServer> {
    let mut servers = Vec::new();
    for g in greeters {
        servers.push(TestServer::serve(GreeterServer::new(g.clone())).await.expect("serve"));
    }
    servers
}

fn mesh(servers: &[TestServer], resilience: &Resilience) -> Mesh {
    let set = EndpointSet::from_addresses(servers.iter().map(|s| s.addr().to_string()));
    Mesh::spawn(BalancerConfig::new("greeter"), resilience, tokio_stream::once(set)).expect("valid settings")
}

/// Endpoint breakers as given, the default service breaker, `max_attempts` per call.
fn resilience(endpoint_breaker: BreakerConfig, max_attempts: u32) -> Resilience {
    let retry = RetryPolicy::default()
        .with_max_attempts(max_attempts)
        .with_methods(greeter_client::GREETER_IDEMPOTENT)
        .with_retry_on(&greeter_client::GREETER_RETRY_ON);
    Resilience { endpoint_breaker, service_breaker: greeter_client::default_service_breaker(), retry }
}

/// One SayHello; who served it, or the status.
async fn hello(client: &mut GreeterClient<greeter_client::MeshChannel>) -> Result<String, Status> {
    let mut request = Request::new(HelloRequest { name: "t".into() });
    request.set_timeout(Duration::from_secs(2));
    client.say_hello(request).await.map(|r| r.into_inner().served_by)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_keeps_failing_gets_no_calls_while_open_then_exactly_one_probe_and_rejoins_when_healed() {
    let (a, b, bad) = (Flaky::new("a", false), Flaky::new("b", false), Flaky::new("bad", true));
    let servers = serve(&[a.clone(), b.clone(), bad.clone()]).await;
    let breaker = BreakerConfig::default()
        .with_failure_threshold(3)
        .with_open_time(Duration::from_millis(500), Duration::from_secs(4))
        .with_jitter(0.0);
    let mesh = mesh(&servers, &resilience(breaker, 1));
    // As greeter-client does: connected to all three before the first call, so that round
    // robin's turns are the ones counted below.
    mesh.balanced.wait_ready(Duration::from_secs(5)).await.expect("three servers up");
    let mut client = GreeterClient::new(mesh.channel.clone());

    // Round robin over three: every third call fails, until the third failure opens it.
    let mut failed = 0;
    for _ in 0..9 {
        if hello(&mut client).await.is_err() {
            failed += 1;
        }
    }
    let opened = Instant::now();
    let handle = mesh.endpoint_breaker(&servers[2].addr().to_string()).expect("a breaker per endpoint");
    assert_eq!((failed, bad.calls(), handle.state()), (3, 3, State::Open), "9 calls over 3 endpoints");

    // Then over two: no call reaches it while open.
    let mut served = Vec::new();
    while opened.elapsed() < Duration::from_millis(400) {
        served.push(hello(&mut client).await.expect("the other two serve"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(bad.calls(), 3, "no call while open");
    assert!(served.iter().all(|s| s == "a" || s == "b") && served.len() > 20, "{served:?}");

    // The open time passes, and it still fails: exactly one probe, and it opens again for
    // twice as long.
    while opened.elapsed() < Duration::from_millis(500) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut failed = 0;
    while opened.elapsed() < Duration::from_millis(1400) {
        if hello(&mut client).await.is_err() {
            failed += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!((bad.calls(), failed), (4, 1), "exactly one probe in the half-open spell");
    assert_eq!(handle.state(), State::Open);

    // Healed: after the second open time the probe succeeds, and round robin goes over
    // three again.
    bad.failing.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(3);
    while handle.state() != State::Closed && Instant::now() < deadline {
        hello(&mut client).await.expect("no call fails once healed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(handle.state(), State::Closed);
    let mut last = Vec::new();
    for _ in 0..9 {
        last.push(hello(&mut client).await.expect("served"));
    }
    last.sort();
    assert_eq!(last, ["a", "a", "a", "b", "b", "b", "bad", "bad", "bad"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_endpoint_failing_attempts_stay_within_the_retry_budget() {
    let greeters = [Flaky::new("a", true), Flaky::new("b", true), Flaky::new("c", true)];
    let servers = serve(&greeters).await;
    // Breakers out of the way (thresholds never reached), to see the budget alone.
    let mut r = resilience(BreakerConfig::default().with_failure_threshold(100_000), 3);
    r.service_breaker = BreakerConfig::default().with_failure_threshold(100_000);
    let mesh = mesh(&servers, &r);
    let calls = 300u64;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut client = GreeterClient::new(mesh.channel.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..calls / 4 {
                assert_eq!(hello(&mut client).await.map_err(|s| s.code()), Err(Code::Unavailable));
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }
    let attempts: u64 = greeters.iter().map(Flaky::calls).sum();
    // The default budget: 20% of calls, plus a minimum of 10 retries per second over a 10 s
    // window (100).
    let bound = calls + calls / 5 + 100;
    assert!(attempts <= bound, "{attempts} attempts for {calls} calls; the budget allows {bound}");
    assert!(mesh.retries.budget_exhausted() > 0, "the budget ran out");
    assert_eq!(mesh.retries.retries(), attempts - calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_service_breaker_fails_fast_and_the_servers_see_nothing() {
    let greeters = [Flaky::new("a", true), Flaky::new("b", true)];
    let servers = serve(&greeters).await;
    // The service breaker opens after 3 failed calls in a row; each endpoint has seen at
    // most two of them then, below its own threshold of 5.
    let mut r = resilience(BreakerConfig::default(), 1);
    r.service_breaker = BreakerConfig::default().with_failure_threshold(3);
    let mesh = mesh(&servers, &r);
    let mut client = GreeterClient::new(mesh.channel.clone());
    for _ in 0..3 {
        let status = hello(&mut client).await.expect_err("failing");
        assert!(status.message().contains("is failing"), "{status:?}");
    }
    assert_eq!(mesh.service_breaker.state(), State::Open);
    let before: u64 = greeters.iter().map(Flaky::calls).sum();
    for _ in 0..100 {
        let status = hello(&mut client).await.expect_err("open");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().starts_with("circuit open for greeter"), "{}", status.message());
    }
    let after: u64 = greeters.iter().map(Flaky::calls).sum();
    assert_eq!(after, before, "the servers saw no call while the service breaker was open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_endpoint_is_ejected_the_call_says_so() {
    let greeters = [Flaky::new("a", true), Flaky::new("b", true), Flaky::new("c", true)];
    let servers = serve(&greeters).await;
    let mesh = mesh(&servers, &resilience(BreakerConfig::default().with_failure_threshold(2), 1));
    // Through the balancer, under the service breaker (which would open first and answer
    // for it): two failures per endpoint open all three.
    let mut client = GreeterClient::new(mesh.balanced.clone());
    for _ in 0..6 {
        assert!(client.say_hello(HelloRequest { name: "t".into() }).await.is_err());
    }
    let inner = client.say_hello(HelloRequest { name: "t".into() }).await;
    let status = inner.expect_err("every endpoint ejected");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().starts_with("all 3 endpoints of service greeter are ejected"), "{}", status.message());
    assert!(status.message().contains("circuit open for 127.0.0.1:"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_closing_connections_gracefully_is_never_counted_against_by_its_breaker() {
    // GOAWAY(NO_ERROR) as a maximum connection age sends it: calls it refused (above its
    // last stream) and calls hyper had queued on the closing connection never reached the
    // greeter. On a busy machine five of them in a row opened the endpoint's breaker and
    // ejected a healthy server; here one counted failure would.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let greeter = Flaky::new("aged", false);
    tokio::spawn(
        tonic::transport::Server::builder()
            .max_connection_age(Duration::from_millis(100))
            .add_service(GreeterServer::new(greeter.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let set = EndpointSet::from_addresses([addr.clone()]);
    let resilience = resilience(BreakerConfig::default().with_failure_threshold(1), 3);
    let mesh = Mesh::spawn(BalancerConfig::new("greeter"), &resilience, tokio_stream::once(set)).expect("valid");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = GreeterClient::new(mesh.channel.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..300 {
                let _ = hello(&mut client).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("caller");
    }
    let breaker = mesh.endpoint_breaker(&addr).expect("the endpoint's breaker");
    assert_eq!(breaker.transitions(), 0, "graceful closes opened the breaker ({:?})", breaker.state());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_by_the_server_fail_no_call_through_the_whole_stack() {
    // A server that closes every connection after 300 ms, as servers with a maximum
    // connection age do: a call hyper had queued on a closing connection is cancelled
    // before it is sent, and retried.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let greeter = Flaky::new("aged", false);
    tokio::spawn(
        tonic::transport::Server::builder()
            .max_connection_age(Duration::from_millis(300))
            .add_service(GreeterServer::new(greeter.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let set = EndpointSet::from_addresses([addr]);
    let mesh = Mesh::spawn(BalancerConfig::new("greeter"), &greeter_client::resilience(), tokio_stream::once(set))
        .expect("valid settings");
    for callers in [1, 4] {
        let until = Instant::now() + Duration::from_secs(2);
        let mut tasks = Vec::new();
        for _ in 0..callers {
            let mut client = GreeterClient::new(mesh.channel.clone());
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, Vec::new());
                while Instant::now() < until {
                    match hello(&mut client).await {
                        Ok(_) => ok += 1,
                        Err(s) => failed.push(format!("{:?}: {}", s.code(), s.message())),
                    }
                }
                (ok, failed)
            }));
        }
        let mut ok = 0;
        for t in tasks {
            let (n, failed) = t.await.expect("caller");
            assert!(
                failed.is_empty(),
                "{callers} callers: {} failed: {:?}",
                failed.len(),
                &failed[..failed.len().min(3)]
            );
            ok += n;
        }
        assert!(ok > 200, "{callers} callers: {ok} calls");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_server_is_retried_after_its_pushback_and_trips_no_breaker() {
    use mesh_limiter::{Limit, LimiterConfig, RateLimitLayer};
    use tower_layer::Layer as _;

    let greeter = Flaky::new("a", false);
    // One token every 200 ms, a burst of 1: back-to-back calls are over the limit, and a
    // rejection asks for a 200 ms pause.
    let limit = Limit::try_new(5.0, 1).expect("valid");
    let limiter = RateLimitLayer::try_new(LimiterConfig::try_new(limit).expect("valid")).expect("valid");
    let limits = limiter.handle();
    let server = TestServer::serve(limiter.layer(GreeterServer::new(greeter.clone()))).await.expect("serve");
    // Breakers that would open after 2 failures in a row, if a limit counted as a failure.
    let mut r = resilience(BreakerConfig::default().with_failure_threshold(2), 3);
    r.service_breaker = BreakerConfig::default().with_failure_threshold(2);
    let mesh = mesh(std::slice::from_ref(&server), &r);
    let mut client = GreeterClient::new(mesh.channel.clone());
    let started = Instant::now();
    for i in 0..6 {
        assert_eq!(hello(&mut client).await.map_err(|s| s.message().to_string()), Ok("a".into()), "call {i}");
    }
    // Six calls admitted at 5/s from a burst of 1 cannot end sooner than 1 s in.
    assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!((limits.admitted(), greeter.calls()), (6, 6));
    // Each retry waited for the pushback, when the next token was due, and got it: no call
    // was rejected twice (a retry after the usual 20 ms backoff would have been).
    let rejected = limits.rejected();
    assert!((1..=5).contains(&rejected), "{rejected} rejections for 6 calls");
    assert_eq!(mesh.retries.retries(), rejected);
    assert_eq!(mesh.service_breaker.state(), State::Closed);
    let endpoint = mesh.endpoint_breaker(&server.addr().to_string()).expect("the endpoint's breaker");
    assert_eq!(endpoint.state(), State::Closed);

    // Deadlines shorter than the pushback: not retried; the limit's answer is the call's.
    // Three in a row would open both breakers (2 failures in a row) if a limit counted.
    for _ in 0..3 {
        let mut request = Request::new(HelloRequest { name: "t".into() });
        request.set_timeout(Duration::from_millis(50));
        let status = client.say_hello(request).await.expect_err("over the limit, no time to wait");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), "rate limit exceeded for /greeter.v1.Greeter/SayHello: 5/s, burst 1");
    }
    assert_eq!(mesh.retries.retries(), rejected, "no retry for them");
    assert_eq!(mesh.service_breaker.state(), State::Closed);
    assert_eq!(endpoint.state(), State::Closed);
    assert_eq!(hello(&mut client).await.map_err(|s| s.message().to_string()), Ok("a".into()));
}

/// Answers every call with a response head and then nothing, as a server frozen
/// mid-response: HTTP 200, `content-type: application/grpc`, no message, no trailers.
#[derive(Clone)]
struct StallsAfterHead;

impl tower_service::Service<http::Request<tonic::body::Body>> for StallsAfterHead {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
        let never = futures_util::stream::pending::<Result<http_body::Frame<bytes::Bytes>, Status>>();
        let mut response = http::Response::new(tonic::body::Body::new(http_body_util::StreamBody::new(never)));
        response.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
        std::future::ready(Ok(response))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_sends_its_head_and_then_nothing_is_counted_and_ejected() {
    // It was neither: 12 of 12 calls ended DEADLINE_EXCEEDED while its row said
    // `failures 0` and its breaker stayed closed (the deadline fired above both).
    let server = TestServer::serve(StallsAfterHead).await.expect("serve");
    let mesh = mesh(std::slice::from_ref(&server), &resilience(BreakerConfig::default(), 1));
    let mut client = GreeterClient::new(mesh.channel.clone());
    for i in 0..5 {
        let mut request = Request::new(HelloRequest { name: "t".into() });
        request.set_timeout(Duration::from_millis(100));
        let status = client.say_hello(request).await.expect_err("it never answers");
        assert_eq!(status.code(), Code::DeadlineExceeded, "call {i}: {status:?}");
    }
    let row = mesh.balanced.endpoints().into_iter().next().expect("one endpoint");
    assert_eq!((row.requests, row.failures, row.in_flight), (5, 5, 0), "{row:?}");
    let breaker = mesh.endpoint_breaker(&server.addr().to_string()).expect("its breaker");
    assert_eq!(breaker.state(), State::Open, "5 failures in a row eject it");
    let status = hello(&mut client).await.expect_err("ejected");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("ejected"), "{status:?}");
}

/// A greeter whose unary calls fail while told to, and whose stream sends one reply at
/// once and ends after `stream_for`.
#[derive(Clone)]
struct LongStream {
    failing: Arc<AtomicBool>,
    stream_for: Duration,
}

#[tonic::async_trait]
impl Greeter for LongStream {
    async fn say_hello(&self, _: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(Status::unavailable("failing"));
        }
        Ok(Response::new(HelloReply { message: "hi".into(), served_by: "long".into() }))
    }

    type SayHelloStreamStream =
        std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<HelloReply, Status>> + Send + 'static>>;

    async fn say_hello_stream(
        &self,
        _: Request<HelloStreamRequest>,
    ) -> Result<Response<Self::SayHelloStreamStream>, Status> {
        let first = HelloReply { message: "first".into(), served_by: "long".into() };
        let wait = self.stream_for;
        use futures_util::StreamExt as _;
        let stream = futures_util::stream::iter([Ok(first)]).chain(futures_util::stream::once(async move {
            tokio::time::sleep(wait).await;
            Ok(HelloReply { message: "last".into(), served_by: "long".into() })
        }));
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_probe_gives_its_verdict_at_its_first_message_and_frees_the_circuit() {
    use futures_util::StreamExt as _;
    let greeter = LongStream { failing: Arc::new(AtomicBool::new(true)), stream_for: Duration::from_secs(2) };
    let server = TestServer::serve(GreeterServer::new(greeter.clone())).await.expect("serve");
    let open = Duration::from_millis(100);
    let breaker = BreakerConfig::default().with_failure_threshold(1).with_open_time(open, open).with_jitter(0.0);
    let mesh = mesh(std::slice::from_ref(&server), &resilience(breaker, 1));
    let mut client = GreeterClient::new(mesh.channel.clone());
    hello(&mut client).await.expect_err("failing");
    let handle = mesh.endpoint_breaker(&server.addr().to_string()).expect("its breaker");
    assert_eq!(handle.state(), State::Open);
    greeter.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(open + Duration::from_millis(50)).await;
    // The probe: a stream that answers at once and lasts 2 s.
    let mut stream = client
        .say_hello_stream(HelloStreamRequest { name: "probe".into(), count: 2 })
        .await
        .expect("the probe goes through")
        .into_inner();
    let first = stream.next().await.expect("a first reply").expect("ok");
    assert_eq!(first.message, "first");
    // It answered: the circuit closed, and unary calls go through while it streams on (10
    // of 10 were refused "ejected" while the probe was out).
    assert_eq!(handle.state(), State::Closed);
    for i in 0..10 {
        assert_eq!(hello(&mut client).await.map_err(|s| s.to_string()), Ok("long".into()), "call {i}");
    }
    let last = stream.next().await.expect("the last reply").expect("ok");
    assert_eq!(last.message, "last");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_per_endpoint_lives_as_long_as_the_endpoint_through_a_churn_of_400_ids() {
    // Every id ever seen kept its breaker handle (about 1 KB each, 8,420 ids churned
    // through etcd grew the client by 8.7 MB for good).
    let server = TestServer::serve(GreeterServer::new(Flaky::new("a", false))).await.expect("serve");
    let addr = server.addr().to_string();
    let (updates, rx) = tokio::sync::mpsc::unbounded_channel();
    let set = |i: usize| {
        EndpointSet::new(vec![
            mesh_balancer::Endpoint::new(addr.clone()).with_id(format!("id-{i}")),
            mesh_balancer::Endpoint::new(addr.clone()).with_id(format!("id-{}", i + 1)),
        ])
    };
    updates.send(set(0)).expect("send");
    let mesh = Mesh::spawn(
        BalancerConfig::new("greeter"),
        &resilience(BreakerConfig::default(), 1),
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
    )
    .expect("valid settings");
    let mut client = GreeterClient::new(mesh.channel.clone());
    let mut applied = mesh.balanced.applied();
    for i in 1..=400 {
        updates.send(set(2 * i)).expect("send");
        applied.wait_for(|&n| n > i as u64).await.expect("applied");
        hello(&mut client).await.expect("a call");
    }
    let (breakers, calls) = mesh.endpoint_state_held();
    assert!(breakers <= 6, "{breakers} breakers held for 2 endpoints");
    assert!(calls <= 6, "{calls} call counts held for 2 endpoints");
}
