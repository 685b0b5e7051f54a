use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::Frame;
use http_body_util::BodyExt as _;
use tonic::Code;
use tower::ServiceExt as _;
use tower_layer::Layer as _;
use tower_service::Service as _;

use crate::{BreakerConfig, BreakerLayer, State};

/// A response body of given frames.
struct Frames(VecDeque<Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

fn trailers(code: Code) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("grpc-status", (code as i32).to_string().parse().expect("header"));
    h
}

/// What the fake endpoint answers next.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// A message, then trailers with this code.
    Message(Code),
    /// A trailers-only response with this code.
    TrailersOnly(Code),
}

#[derive(Clone)]
struct Endpoint {
    answer: Arc<Mutex<Answer>>,
    calls: Arc<AtomicUsize>,
}

impl Endpoint {
    fn new(answer: Answer) -> Self {
        Endpoint { answer: Arc::new(Mutex::new(answer)), calls: Arc::new(AtomicUsize::new(0)) }
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock().expect("lock") = answer;
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl tower_service::Service<http::Request<()>> for Endpoint {
    type Response = http::Response<Frames>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<()>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let response = match *self.answer.lock().expect("lock") {
            Answer::Message(code) => http::Response::new(Frames(VecDeque::from([
                Frame::data(Bytes::from_static(b"\0\0\0\0\0")),
                Frame::trailers(trailers(code)),
            ]))),
            Answer::TrailersOnly(code) => {
                let mut r = http::Response::new(Frames(VecDeque::new()));
                *r.headers_mut() = trailers(code);
                r
            }
        };
        std::future::ready(Ok(response))
    }
}

fn config() -> BreakerConfig {
    BreakerConfig::default().with_failure_threshold(3).with_jitter(0.0)
}

/// Makes a call and reads the response to its end; the gRPC code it ended with.
async fn call<S>(svc: &mut S) -> Result<Code, String>
where
    S: tower_service::Service<http::Request<()>, Response = http::Response<tonic::body::Body>>,
    S::Error: std::fmt::Display,
{
    let response = svc.ready().await.map_err(|e| e.to_string())?.call(http::Request::new(())).await;
    let response = response.map_err(|e| e.to_string())?;
    if let Some(code) = mesh_util::grpc::grpc_status(response.headers()) {
        return Ok(Code::from_i32(code));
    }
    let collected = response.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok(collected.trailers().and_then(mesh_util::grpc::grpc_status).map_or(Code::Unknown, Code::from_i32))
}

#[tokio::test(start_paused = true)]
async fn an_error_in_trailers_after_data_counts_when_the_trailers_arrive() {
    let endpoint = Endpoint::new(Answer::Message(Code::Internal));
    let mut breaker = BreakerLayer::try_new("a", config()).expect("config").layer(endpoint.clone());
    let handle = breaker.handle();
    for _ in 0..2 {
        assert_eq!(call(&mut breaker).await, Ok(Code::Internal));
    }
    // The third response's body is not read yet: the call has not ended.
    let response = breaker.ready().await.expect("ready").call(http::Request::new(())).await.expect("response");
    assert_eq!(handle.state(), State::Closed);
    drop(response.into_body().collect().await.expect("body"));
    assert_eq!(handle.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn an_open_endpoint_breaker_refuses_in_poll_ready_and_sends_nothing() {
    let endpoint = Endpoint::new(Answer::TrailersOnly(Code::Unavailable));
    let mut breaker = BreakerLayer::try_new("127.0.0.1:50051", config()).expect("config").layer(endpoint.clone());
    for _ in 0..3 {
        assert_eq!(call(&mut breaker).await, Ok(Code::Unavailable));
    }
    let err = call(&mut breaker).await.expect_err("refused");
    assert_eq!(err, "circuit open for 127.0.0.1:50051; next probe in 1000ms");
    assert_eq!(endpoint.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn an_open_service_breaker_fails_fast_with_unavailable_and_the_server_sees_nothing() {
    let endpoint = Endpoint::new(Answer::TrailersOnly(Code::Unavailable));
    let mut breaker = BreakerLayer::try_new("greeter", config()).expect("config").fail_fast().layer(endpoint.clone());
    for _ in 0..3 {
        assert_eq!(call(&mut breaker).await, Ok(Code::Unavailable));
    }
    for _ in 0..100 {
        let response = breaker.ready().await.expect("ready").call(http::Request::new(())).await.expect("response");
        let status = tonic::Status::from_header_map(response.headers()).expect("a status");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().starts_with("circuit open for greeter"), "{}", status.message());
    }
    assert_eq!(endpoint.calls(), 3, "no call reached the server while open");
}

#[tokio::test(start_paused = true)]
async fn after_the_open_time_one_probe_goes_and_its_success_closes_the_circuit() {
    let endpoint = Endpoint::new(Answer::TrailersOnly(Code::Unavailable));
    let layer = BreakerLayer::try_new("a", config()).expect("config");
    let mut breaker = layer.layer(endpoint.clone());
    let handle = breaker.handle();
    for _ in 0..3 {
        let _ = call(&mut breaker).await;
    }
    tokio::time::advance(Duration::from_millis(1000)).await;
    endpoint.set(Answer::Message(Code::Ok));
    // 100 clones ask at once: one is let through.
    let mut clones: Vec<_> = (0..100).map(|_| breaker.clone()).collect();
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    let mut ready = Vec::new();
    for (i, b) in clones.iter_mut().enumerate() {
        if let Poll::Ready(Ok(())) = b.poll_ready(&mut cx) {
            ready.push(i);
        }
    }
    assert_eq!(ready.len(), 1, "exactly one probe of 100");
    assert_eq!(handle.state(), State::HalfOpen);
    let probe = &mut clones[ready[0]];
    let response = probe.call(http::Request::new(())).await.expect("response");
    drop(response.into_body().collect().await.expect("body"));
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(endpoint.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_probe_cancelled_by_its_caller_frees_its_place() {
    let endpoint = Endpoint::new(Answer::TrailersOnly(Code::Unavailable));
    let mut breaker = BreakerLayer::try_new("a", config()).expect("config").layer(endpoint.clone());
    let handle = breaker.handle();
    for _ in 0..3 {
        let _ = call(&mut breaker).await;
    }
    tokio::time::advance(Duration::from_millis(1000)).await;
    endpoint.set(Answer::Message(Code::Ok));
    // A probe whose response body the caller drops unread: cancelled, not a verdict.
    let response = breaker.ready().await.expect("probe").call(http::Request::new(())).await.expect("response");
    assert!(breaker.clone().ready().await.is_err(), "the only probe is out");
    drop(response);
    assert_eq!(handle.state(), State::HalfOpen);
    // A probe reserved by poll_ready and never called: dropping the breaker frees it too.
    let mut reserved = breaker.clone();
    reserved.ready().await.expect("probe");
    drop(reserved);
    assert_eq!(call(&mut breaker).await, Ok(Code::Ok));
    assert_eq!(handle.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn resource_exhausted_and_cancelled_never_trip_it() {
    let endpoint = Endpoint::new(Answer::TrailersOnly(Code::ResourceExhausted));
    let mut breaker = BreakerLayer::try_new("a", config()).expect("config").layer(endpoint.clone());
    for _ in 0..50 {
        assert_eq!(call(&mut breaker).await, Ok(Code::ResourceExhausted));
    }
    endpoint.set(Answer::Message(Code::Cancelled));
    for _ in 0..50 {
        assert_eq!(call(&mut breaker).await, Ok(Code::Cancelled));
    }
    assert_eq!(breaker.handle().state(), State::Closed);
    assert_eq!(breaker.handle().transitions(), 0);
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_circuit() {
    let endpoint = Endpoint::new(Answer::TrailersOnly(Code::Unavailable));
    let breaker = BreakerLayer::try_new("a", config()).expect("config").layer(endpoint.clone());
    for _ in 0..3 {
        let _ = call(&mut breaker.clone()).await;
    }
    assert!(breaker.clone().ready().await.is_err(), "a fresh clone sees the open circuit");
    // Each layer call makes its own circuit.
    let layer = BreakerLayer::try_new("b", config()).expect("config");
    let other = layer.layer(Endpoint::new(Answer::Message(Code::Ok)));
    assert_eq!(other.handle().state(), State::Closed);
}

#[tokio::test(flavor = "current_thread")]
async fn a_caller_looping_on_an_open_circuit_lets_other_tasks_run() {
    let endpoint = Endpoint::new(Answer::TrailersOnly(Code::Unavailable));
    let mut breaker = BreakerLayer::try_new("greeter", config()).expect("config").fail_fast().layer(endpoint);
    for _ in 0..3 {
        let _ = call(&mut breaker).await;
    }
    let other_ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = other_ran.clone();
    tokio::spawn(async move { flag.store(true, Ordering::SeqCst) });
    // On one thread, the spawned task runs only if a call yields.
    let mut calls = 0u64;
    while !other_ran.load(Ordering::SeqCst) && calls < 100_000 {
        let response = breaker.ready().await.expect("ready").call(http::Request::new(())).await.expect("response");
        assert_eq!(mesh_util::grpc::grpc_status(response.headers()), Some(Code::Unavailable as i32));
        calls += 1;
    }
    assert!(other_ran.load(Ordering::SeqCst), "{calls} calls answered at once never yielded");
}

#[tokio::test(start_paused = true)]
async fn successes_counted_in_batches_still_weigh_in_the_failure_rate() {
    let breaker = BreakerLayer::try_new("greeter", config_with_rate()).expect("config").layer(());
    let handle = breaker.handle();
    let call = |outcome| {
        let admitted = handle.admit();
        handle.record(admitted, outcome);
    };
    // 30 successes (fewer than a batch: they wait), then failures: 30 of 60 opens it.
    for _ in 0..30 {
        call(crate::Outcome::Success);
    }
    for _ in 0..29 {
        call(crate::Outcome::Failure);
    }
    assert_eq!(handle.state(), State::Closed, "29 failures of 59 calls is under half");
    call(crate::Outcome::Failure);
    assert_eq!(handle.state(), State::Open, "30 of 60 is half");

    // 100 successes: one batch of 64 went into the window, 36 wait.
    let breaker = BreakerLayer::try_new("greeter", config_with_rate()).expect("config").layer(());
    let handle = breaker.handle();
    for _ in 0..100 {
        let admitted = handle.admit();
        handle.record(admitted, crate::Outcome::Success);
    }
    for _ in 0..99 {
        let admitted = handle.admit();
        handle.record(admitted, crate::Outcome::Failure);
    }
    assert_eq!(handle.state(), State::Closed, "99 failures of 199 calls is under half");
    let admitted = handle.admit();
    handle.record(admitted, crate::Outcome::Failure);
    assert_eq!(handle.state(), State::Open, "100 of 200 is half");
}

fn config_with_rate() -> BreakerConfig {
    let rate = crate::FailureRate::new(0.5, Duration::from_secs(10), 20);
    BreakerConfig::default().with_failure_threshold(0).with_failure_rate(rate)
}

#[tokio::test(start_paused = true)]
async fn a_handle_changes_the_settings_every_clone_shares_and_refuses_bad_ones() {
    let endpoint = Endpoint::new(Answer::TrailersOnly(Code::Unavailable));
    let layer = BreakerLayer::try_new("a", config().with_failure_threshold(100)).expect("config");
    let mut breaker = layer.layer(endpoint.clone());
    let mut clone = breaker.clone();
    let handle = breaker.handle();
    assert_eq!(call(&mut breaker).await, Ok(Code::Unavailable));
    let bad = config().with_failure_threshold(0);
    let err = handle.reconfigure(bad).expect_err("no threshold and no rate");
    assert_eq!(err.setting, "failure_threshold");
    assert_eq!(handle.config().failure_threshold, 100, "a refused setting changes nothing");
    handle.reconfigure(config().with_failure_threshold(2)).expect("valid");
    assert_eq!(handle.config().failure_threshold, 2);
    // The failure counted before, and one more through a clone: open.
    assert_eq!(call(&mut clone).await, Ok(Code::Unavailable));
    assert_eq!(handle.state(), State::Open);
    assert!(call(&mut breaker).await.is_err(), "refused by every clone");
}
