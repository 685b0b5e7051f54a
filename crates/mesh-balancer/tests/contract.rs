//! What tower's contract and tonic's statuses demand of the balancer: per-endpoint layers
//! polled with the caller's waker on the instance that takes the call, backpressure that
//! makes callers wait (bounded by their deadline), and errors that keep their meaning.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use mesh_balancer::{Balancer, BalancerConfig};
use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;
use support::{server, set, slow_server};
use tower::limit::ConcurrencyLimitLayer;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_limit_of_1_per_endpoint_makes_4_concurrent_calls_wait_and_all_succeed() {
    let slow = slow_server("slow", Duration::from_millis(100)).await;
    let channel = Balancer::spawn_with_layer(
        BalancerConfig::new("greeter"),
        ConcurrencyLimitLayer::new(1),
        tokio_stream::once(set(&[("slow", &slow)])),
    );
    let started = Instant::now();
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let mut client = GreeterClient::new(channel.clone());
            tokio::spawn(async move {
                let mut request = tonic::Request::new(HelloRequest { name: "c".into() });
                request.set_timeout(Duration::from_secs(5));
                client.say_hello(request).await
            })
        })
        .collect();
    for call in calls {
        let reply = call.await.expect("join").expect("every call waits for the permit and succeeds");
        assert_eq!(reply.get_ref().served_by, "slow");
    }
    // One at a time: four calls of 100 ms take at least 400 ms.
    assert!(started.elapsed() >= Duration::from_millis(400), "{:?}", started.elapsed());
}

#[tokio::test]
async fn backpressure_that_outlasts_the_deadline_ends_deadline_exceeded_not_unavailable() {
    let slow = slow_server("slow", Duration::from_secs(2)).await;
    let channel = Balancer::spawn_with_layer(
        BalancerConfig::new("greeter"),
        ConcurrencyLimitLayer::new(1),
        tokio_stream::once(set(&[("slow", &slow)])),
    );
    let mut holder = GreeterClient::new(channel.clone());
    let held = tokio::spawn(async move { holder.say_hello(HelloRequest { name: "hold".into() }).await });
    support::wait_in_flight(&channel, 1).await;
    let mut request = tonic::Request::new(HelloRequest { name: "late".into() });
    request.set_timeout(Duration::from_millis(200));
    let started = Instant::now();
    let err = GreeterClient::new(channel.clone()).say_hello(request).await.expect_err("the permit is held for 2 s");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    held.abort();
}

/// A layer whose services count their calls in a plain field (no `Arc`), and report which
/// instance took each call, as a layer keeping per-instance state would.
#[derive(Clone, Default)]
struct Counting {
    next_id: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<(usize, usize)>>>,
}

struct Counted<S> {
    inner: S,
    id: usize,
    calls: usize,
    next_id: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<(usize, usize)>>>,
}

impl<S: Clone> Clone for Counted<S> {
    /// A clone is another instance, with its own count.
    fn clone(&self) -> Self {
        Counted {
            inner: self.inner.clone(),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            calls: 0,
            next_id: self.next_id.clone(),
            seen: self.seen.clone(),
        }
    }
}

impl<S> tower::Layer<S> for Counting {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            calls: 0,
            next_id: self.next_id.clone(),
            seen: self.seen.clone(),
        }
    }
}

impl<S, R> tower::Service<R> for Counted<S>
where
    S: tower::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, r: R) -> Self::Future {
        self.calls += 1;
        self.seen.lock().expect("lock").push((self.id, self.calls));
        self.inner.call(r)
    }
}

#[tokio::test]
async fn a_stateful_layer_sees_every_call_of_a_client_on_one_instance() {
    let a = server("a").await;
    let layer = Counting::default();
    let seen = layer.seen.clone();
    let channel =
        Balancer::spawn_with_layer(BalancerConfig::new("greeter"), layer, tokio_stream::once(set(&[("a", &a)])));
    let mut client = GreeterClient::new(channel);
    for _ in 0..20 {
        client.say_hello(HelloRequest { name: "s".into() }).await.expect("call");
    }
    let seen = seen.lock().expect("lock").clone();
    let ids: std::collections::BTreeSet<usize> = seen.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), 1, "one instance took every call: {seen:?}");
    assert_eq!(seen.last().map(|(_, n)| *n), Some(20), "its own count reached 20: {seen:?}");
}

#[tokio::test]
async fn a_deadline_that_passes_on_a_hung_server_is_deadline_exceeded_and_counts_against_it() {
    let hung = slow_server("hung", Duration::from_secs(30)).await;
    let channel = Balancer::spawn(BalancerConfig::new("greeter"), tokio_stream::once(set(&[("hung", &hung)])));
    let mut request = tonic::Request::new(HelloRequest { name: "x".into() });
    request.set_timeout(Duration::from_millis(300));
    let err = GreeterClient::new(channel.clone()).say_hello(request).await.expect_err("hung");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    let stats = channel.endpoints();
    // The server did not answer in time: its failure, as its breaker counts it.
    assert_eq!((stats[0].requests, stats[0].failures, stats[0].in_flight), (1, 1, 0), "{stats:?}");
}

/// A layer that answers every call itself with RESOURCE_EXHAUSTED, as a limiter would.
#[derive(Clone)]
struct Exhausted;

#[derive(Clone)]
struct Refuse;

impl<S> tower::Layer<S> for Exhausted {
    type Service = Refuse;
    fn layer(&self, _: S) -> Refuse {
        Refuse
    }
}

impl<R> tower::Service<R> for Refuse {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: R) -> Self::Future {
        std::future::ready(Err(Box::new(tonic::Status::resource_exhausted("slow down: 10/s")) as BoxError))
    }
}

#[tokio::test]
async fn a_resource_exhausted_from_a_layer_reaches_the_caller_as_it_is() {
    let a = server("a").await;
    let channel =
        Balancer::spawn_with_layer(BalancerConfig::new("greeter"), Exhausted, tokio_stream::once(set(&[("a", &a)])));
    let err = GreeterClient::new(channel).say_hello(HelloRequest { name: "x".into() }).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert_eq!(err.message(), "slow down: 10/s");
}

#[tokio::test]
async fn a_call_dropped_by_its_caller_leaves_no_call_in_flight() {
    let slow = slow_server("slow", Duration::from_secs(5)).await;
    let channel = Balancer::spawn(BalancerConfig::new("greeter"), tokio_stream::once(set(&[("slow", &slow)])));
    let mut client = GreeterClient::new(channel.clone());
    let call = tokio::spawn(async move { client.say_hello(HelloRequest { name: "x".into() }).await });
    support::wait_in_flight(&channel, 1).await;
    call.abort();
    let _ = call.await;
    let stats = &channel.endpoints()[0];
    assert_eq!((stats.in_flight, stats.failures), (0, 0), "{stats:?}");
}

/// Records the `grpc-timeout` each call carries as it reaches the endpoint's channel.
#[derive(Clone, Default)]
struct SeenTimeouts(Arc<Mutex<Vec<Option<Duration>>>>);

impl<S> tower::Layer<S> for SeenTimeouts {
    type Service = Recording<S>;
    fn layer(&self, inner: S) -> Recording<S> {
        Recording { inner, seen: self.0.clone() }
    }
}

#[derive(Clone)]
struct Recording<S> {
    inner: S,
    seen: Arc<Mutex<Vec<Option<Duration>>>>,
}

impl<S: tower::Service<http::Request<B>>, B> tower::Service<http::Request<B>> for Recording<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> S::Future {
        self.seen.lock().expect("lock").push(mesh_util::grpc::grpc_timeout(request.headers()));
        self.inner.call(request)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_waited_for_an_endpoint_is_sent_with_what_is_left_of_its_deadline() {
    // A 300 ms server behind a concurrency limit of 1: the second of two 400 ms calls waits
    // for the first. It was sent with its whole 400 ms and succeeded after ~600 ms.
    let slow = slow_server("slow", Duration::from_millis(300)).await;
    let seen = SeenTimeouts::default();
    let layer = tower::ServiceBuilder::new().layer(ConcurrencyLimitLayer::new(1)).layer(seen.clone());
    let channel =
        Balancer::spawn_with_layer(BalancerConfig::new("greeter"), layer, tokio_stream::once(set(&[("slow", &slow)])));
    let call = |name: &'static str| {
        let mut client = GreeterClient::new(channel.clone());
        async move {
            let mut request = tonic::Request::new(HelloRequest { name: name.into() });
            request.set_timeout(Duration::from_millis(400));
            client.say_hello(request).await
        }
    };
    let first = tokio::spawn(call("first"));
    support::wait_in_flight(&channel, 1).await;
    let second = call("second").await.expect_err("it waited ~300 ms of its 400 and the server takes 300");
    assert_eq!(second.code(), tonic::Code::DeadlineExceeded, "{second:?}");
    let _ = first.await;
    let seen = seen.0.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let sent = seen[1].expect("a deadline");
    assert!(sent < Duration::from_millis(400), "the waiting call was sent with {sent:?}");
}

/// Answers every call after its deadline with `code`: CANCELLED "Timeout expired" as a tonic
/// server answers a call whose deadline it saw pass, or OK a moment too late; in the headers
/// or, after a head, in trailers.
#[derive(Clone)]
struct CancelsLate {
    trailers: bool,
    code: tonic::Code,
}

impl<S> tower::Layer<S> for CancelsLate {
    type Service = CancelsLate;
    fn layer(&self, _: S) -> CancelsLate {
        self.clone()
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for CancelsLate {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let timeout = mesh_util::grpc::grpc_timeout(request.headers()).unwrap_or_default();
        let (trailers, code) = (self.trailers, self.code);
        Box::pin(async move {
            let status = tonic::Status::new(code, "Timeout expired");
            if !trailers {
                tokio::time::sleep(timeout + Duration::from_millis(20)).await;
                return Ok(status.into_http());
            }
            let mut end = http::HeaderMap::new();
            status.add_header(&mut end).expect("headers");
            let body = futures_util::stream::once(async move {
                tokio::time::sleep(timeout + Duration::from_millis(20)).await;
                Ok::<_, tonic::Status>(http_body::Frame::trailers(end))
            });
            let mut response = http::Response::new(tonic::body::Body::new(http_body_util::StreamBody::new(body)));
            response.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
            Ok(response)
        })
    }
}

#[tokio::test]
async fn a_cancelled_or_an_ok_that_comes_after_the_deadline_is_deadline_exceeded_and_counts_against_the_endpoint() {
    let a = server("a").await;
    for (trailers, code) in [(false, tonic::Code::Cancelled), (true, tonic::Code::Cancelled), (true, tonic::Code::Ok)] {
        let channel = Balancer::spawn_with_layer(
            BalancerConfig::new("greeter"),
            CancelsLate { trailers, code },
            tokio_stream::once(set(&[("a", &a)])),
        );
        let mut request = tonic::Request::new(HelloRequest { name: "x".into() });
        request.set_timeout(Duration::from_millis(50));
        let err = GreeterClient::new(channel.clone()).say_hello(request).await.expect_err("cancelled");
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "in trailers: {trailers}: {err:?}");
        let stats = &channel.endpoints()[0];
        assert_eq!((stats.requests, stats.failures, stats.in_flight), (1, 1, 0), "in trailers: {trailers}: {stats:?}");
    }
}

/// A response head, then nothing: a server frozen mid-response.
#[derive(Clone)]
struct Stalls;

impl<S> tower::Layer<S> for Stalls {
    type Service = Stalls;
    fn layer(&self, _: S) -> Stalls {
        Stalls
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Stalls {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
        let body = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<http_body::Frame<bytes::Bytes>, tonic::Status>,
        >());
        let mut response = http::Response::new(tonic::body::Body::new(body));
        response.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
        std::future::ready(Ok(response))
    }
}

#[tokio::test]
async fn a_response_that_stalls_after_its_head_ends_at_the_deadline_and_counts_against_the_endpoint() {
    let a = server("a").await;
    let channel =
        Balancer::spawn_with_layer(BalancerConfig::new("greeter"), Stalls, tokio_stream::once(set(&[("a", &a)])));
    for i in 1..=3u64 {
        let mut request = tonic::Request::new(HelloRequest { name: "x".into() });
        request.set_timeout(Duration::from_millis(50));
        let mut client = GreeterClient::new(channel.clone());
        // Bounded here only so that a stall fails the test instead of hanging it.
        let call = tokio::time::timeout(Duration::from_secs(30), client.say_hello(request)).await;
        let err = call.expect("the call ends at its deadline").expect_err("stalled");
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
        let stats = &channel.endpoints()[0];
        assert_eq!((stats.requests, stats.failures, stats.in_flight), (i, i, 0), "{stats:?}");
    }
}

#[tokio::test]
async fn a_call_whose_deadline_passed_before_it_was_sent_is_not_sent() {
    // A deadline of a microsecond: it was sent with grpc-timeout 0n, answered OK, or charged
    // to the endpoint (twelve such calls ejected a healthy one).
    let a = server("a").await;
    let channel = Balancer::spawn(BalancerConfig::new("greeter"), tokio_stream::once(set(&[("a", &a)])));
    channel.wait_ready(Duration::from_secs(5)).await.expect("ready");
    for _ in 0..12 {
        let mut request = tonic::Request::new(HelloRequest { name: "x".into() });
        request.set_timeout(Duration::from_nanos(1));
        let err = GreeterClient::new(channel.clone()).say_hello(request).await.expect_err("no time to run");
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    }
    let stats = &channel.endpoints()[0];
    assert_eq!((stats.requests, stats.failures), (0, 0), "{stats:?}");
}
