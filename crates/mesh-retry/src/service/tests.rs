use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use mesh_balancer::{AvoidEndpoints, FailedAt};
use tonic::Code;
use tonic::body::Body;
use tower::ServiceExt as _;
use tower_layer::Layer as _;

use crate::{RetryLayer, RetryPolicy};

const SAY_HELLO: &str = "/greeter.v1.Greeter/SayHello";

/// What the fake endpoint saw of one attempt.
#[derive(Debug, Clone)]
struct Seen {
    body: Bytes,
    timeout: Option<Duration>,
    avoid: Vec<Arc<str>>,
}

/// A fake channel: answers attempts from a script (a code, and the endpoint it "ran" at),
/// and records what each attempt carried.
#[derive(Clone)]
struct Script {
    answers: Arc<Mutex<VecDeque<(Code, &'static str)>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Script {
    fn new(answers: &[(Code, &'static str)]) -> Self {
        Script { answers: Arc::new(Mutex::new(answers.iter().copied().collect())), seen: Arc::default() }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

impl tower_service::Service<http::Request<Body>> for Script {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let (code, at) = self.answers.lock().expect("lock").pop_front().unwrap_or((Code::Ok, "last"));
        let seen = self.seen.clone();
        Box::pin(async move {
            let timeout = mesh_util::grpc::grpc_timeout(request.headers());
            let avoid = request.extensions().get::<AvoidEndpoints>().map(|a| a.0.clone()).unwrap_or_default();
            let body = request.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            seen.lock().expect("lock").push(Seen { body, timeout, avoid });
            let mut response = tonic::Status::new(code, "scripted").into_http::<Body>();
            if let Some(ms) = at.strip_prefix("pushback:") {
                let mut status = tonic::Status::new(code, "slow down");
                status.metadata_mut().insert("grpc-retry-pushback-ms", ms.parse().expect("ascii"));
                response = status.into_http::<Body>();
            } else if at == "hangs" {
                // The head, then nothing: a server frozen mid-response.
                let body = http_body_util::StreamBody::new(tokio_stream::pending::<
                    Result<http_body::Frame<Bytes>, Infallible>,
                >());
                response = http::Response::new(Body::new(body));
            } else if at == "stream" {
                // A stream that sent a message, then failed in its trailers.
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", (code as i32).to_string().parse().expect("header"));
                let frames = vec![
                    Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"message"))),
                    Ok(http_body::Frame::trailers(trailers)),
                ];
                response = http::Response::new(Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames))));
            } else if code == Code::Ok {
                // A response with a message: headers first, status in trailers.
                response = http::Response::new(Body::new(http_body_util::Full::new(Bytes::from_static(b"ok"))));
            }
            response.extensions_mut().insert(FailedAt(at.into()));
            Ok(response)
        })
    }
}

fn request(path: &str, timeout: Option<Duration>) -> http::Request<Body> {
    let mut r = http::Request::new(Body::new(http_body_util::Full::new(Bytes::from_static(b"\0\0\0\0\x07hello!!"))));
    *r.uri_mut() = format!("http://greeter{path}").parse().expect("uri");
    if let Some(t) = timeout {
        r.headers_mut().insert(&mesh_util::grpc::GRPC_TIMEOUT, mesh_util::grpc::encode_grpc_timeout(t));
    }
    r
}

fn code_of(response: &http::Response<Body>) -> Code {
    mesh_util::grpc::grpc_status(response.headers()).map_or(Code::Ok, Code::from_i32)
}

fn policy() -> RetryPolicy {
    RetryPolicy::default().with_methods([SAY_HELLO])
}

#[tokio::test(start_paused = true)]
async fn unavailable_is_retried_with_the_same_bytes_away_from_the_endpoints_that_failed() {
    let script = Script::new(&[(Code::Unavailable, "a"), (Code::Unavailable, "b")]);
    let layer = RetryLayer::try_new(policy()).expect("policy");
    let svc = layer.layer(script.clone());
    let response = svc.oneshot(request(SAY_HELLO, None)).await.expect("response");
    assert_eq!(code_of(&response), Code::Ok);
    let seen = script.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.body == Bytes::from_static(b"\0\0\0\0\x07hello!!")), "{seen:?}");
    let avoid: Vec<Vec<String>> = seen.iter().map(|s| s.avoid.iter().map(|a| a.to_string()).collect()).collect();
    assert_eq!(avoid, [vec![], vec!["a".to_string()], vec!["a".to_string(), "b".to_string()]]);
    assert_eq!(layer.stats().retries(), 2);
}

#[tokio::test(start_paused = true)]
async fn at_most_max_attempts_and_the_last_status_is_the_calls() {
    let script = Script::new(&[(Code::Unavailable, "a"); 10]);
    let svc = RetryLayer::try_new(policy().with_max_attempts(3)).expect("policy").layer(script.clone());
    let response = svc.oneshot(request(SAY_HELLO, None)).await.expect("response");
    assert_eq!(code_of(&response), Code::Unavailable);
    assert_eq!(script.seen().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn codes_not_listed_methods_not_listed_and_committed_responses_are_not_retried() {
    for code in [Code::Internal, Code::DeadlineExceeded, Code::ResourceExhausted, Code::InvalidArgument] {
        let script = Script::new(&[(code, "a")]);
        let svc = RetryLayer::try_new(policy()).expect("policy").layer(script.clone());
        let response = svc.oneshot(request(SAY_HELLO, None)).await.expect("response");
        assert_eq!(code_of(&response), code);
        assert_eq!(script.seen().len(), 1, "{code:?} is not retried");
    }
    let script = Script::new(&[(Code::Unavailable, "a")]);
    let svc = RetryLayer::try_new(policy()).expect("policy").layer(script.clone());
    let response = svc.oneshot(request("/greeter.v1.Greeter/Charge", None)).await.expect("response");
    assert_eq!(code_of(&response), Code::Unavailable);
    assert_eq!(script.seen().len(), 1, "a method not listed is sent once");
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_sent_a_message_is_not_retried_though_it_ends_unavailable() {
    let script = Script::new(&[(Code::Unavailable, "stream")]);
    let svc = RetryLayer::try_new(policy()).expect("policy").layer(script.clone());
    let response = svc.oneshot(request(SAY_HELLO, None)).await.expect("response");
    assert_eq!(mesh_util::grpc::grpc_status(response.headers()), None, "the head has no status");
    let collected = response.into_body().collect().await.expect("body");
    assert_eq!(collected.trailers().and_then(mesh_util::grpc::grpc_status), Some(Code::Unavailable as i32));
    assert_eq!(script.seen().len(), 1, "committed at its first message: no retry");
}

#[tokio::test(start_paused = true)]
async fn a_response_that_stops_after_its_head_ends_at_the_deadline_with_deadline_exceeded() {
    for path in [SAY_HELLO, "/greeter.v1.Greeter/Charge"] {
        let script = Script::new(&[(Code::Ok, "hangs")]);
        let svc = RetryLayer::try_new(policy()).expect("policy").layer(script.clone());
        let started = tokio::time::Instant::now();
        let response = svc.oneshot(request(path, Some(Duration::from_millis(300)))).await.expect("response");
        let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect()).await;
        let err = body.expect("the body ends at the deadline").expect_err("the body cannot end well");
        assert_eq!(err.code(), Code::DeadlineExceeded, "{path}: {err:?}");
        assert_eq!(started.elapsed(), Duration::from_millis(300), "{path}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_pushback_times_the_retry_of_a_retryable_code_and_makes_no_other_code_retryable() {
    // UNAVAILABLE is retryable: after exactly the pushback, not a backoff.
    let script = Script::new(&[(Code::Unavailable, "pushback:150")]);
    let svc = RetryLayer::try_new(policy()).expect("policy").layer(script.clone());
    let started = tokio::time::Instant::now();
    let response = svc.oneshot(request(SAY_HELLO, Some(Duration::from_secs(1)))).await.expect("response");
    assert_eq!(code_of(&response), Code::Ok);
    assert_eq!(started.elapsed(), Duration::from_millis(150), "after the pushback, not a backoff");
    assert_eq!(script.seen().len(), 2);

    // Not in retry_on, pushback or not: the call's (INVALID_ARGUMENT took 3 attempts).
    for (code, pushback) in [
        (Code::InvalidArgument, "pushback:10"),
        (Code::ResourceExhausted, "pushback:150"),
        (Code::ResourceExhausted, "a"),
    ] {
        let script = Script::new(&[(code, pushback)]);
        let svc = RetryLayer::try_new(policy()).expect("policy").layer(script.clone());
        let response = svc.oneshot(request(SAY_HELLO, Some(Duration::from_secs(1)))).await.expect("response");
        assert_eq!((code_of(&response), script.seen().len()), (code, 1), "{code:?} {pushback}");
    }

    // A rate limit's RESOURCE_EXHAUSTED is retried when the policy says so, after its pushback.
    let script = Script::new(&[(Code::ResourceExhausted, "pushback:150")]);
    let retrying = policy().with_retry_on(&[Code::Unavailable, Code::ResourceExhausted]);
    let svc = RetryLayer::try_new(retrying).expect("policy").layer(script.clone());
    let started = tokio::time::Instant::now();
    let response = svc.oneshot(request(SAY_HELLO, Some(Duration::from_secs(1)))).await.expect("response");
    assert_eq!((code_of(&response), script.seen().len()), (Code::Ok, 2));
    assert_eq!(started.elapsed(), Duration::from_millis(150));

    // A pushback past the deadline, one that says never, or one over max_pushback on a call
    // with no deadline (3000 ms made it wait 6 s): no retry.
    for (pushback, timeout) in [
        ("pushback:2000", Some(1000)),
        ("pushback:-1", Some(1000)),
        ("pushback:soon", Some(1000)),
        ("pushback:3000", None),
    ] {
        let script = Script::new(&[(Code::Unavailable, pushback)]);
        let svc = RetryLayer::try_new(policy()).expect("policy").layer(script.clone());
        let started = tokio::time::Instant::now();
        let response = svc.oneshot(request(SAY_HELLO, timeout.map(Duration::from_millis))).await.expect("response");
        assert_eq!((code_of(&response), script.seen().len()), (Code::Unavailable, 1), "{pushback}");
        assert_eq!(started.elapsed(), Duration::ZERO, "{pushback}");
    }
}

#[tokio::test(start_paused = true)]
async fn each_attempt_carries_the_time_left_and_no_retry_starts_past_the_deadline() {
    let script = Script::new(&[(Code::Unavailable, "a"); 10]);
    let policy = policy().with_max_attempts(10).with_backoff(Duration::from_millis(40), Duration::from_millis(40));
    let svc = RetryLayer::try_new(policy).expect("policy").layer(script.clone());
    let started = tokio::time::Instant::now();
    let response = svc.oneshot(request(SAY_HELLO, Some(Duration::from_millis(100)))).await.expect("response");
    assert_eq!(code_of(&response), Code::Unavailable);
    assert!(started.elapsed() <= Duration::from_millis(100), "ended after {:?}", started.elapsed());
    let timeouts: Vec<Duration> = script.seen().iter().map(|s| s.timeout.expect("a grpc-timeout")).collect();
    assert!(timeouts.len() >= 2 && timeouts.len() <= 5, "{timeouts:?}");
    assert!(timeouts.windows(2).all(|w| w[1] < w[0]), "the time left shrinks: {timeouts:?}");
    assert_eq!(timeouts[0], Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn an_attempt_past_its_per_try_timeout_is_retried_with_the_time_left() {
    let script = Script::new(&[(Code::DeadlineExceeded, "hung")]);
    let per_try = policy().with_per_try_timeout(Duration::from_millis(250));
    let svc = RetryLayer::try_new(per_try).expect("policy").layer(script.clone());
    let response = svc.oneshot(request(SAY_HELLO, Some(Duration::from_secs(1)))).await.expect("response");
    assert_eq!(code_of(&response), Code::Ok);
    let seen = script.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].timeout, Some(Duration::from_millis(250)), "the first attempt gets the per-try timeout");
    assert_eq!(seen[1].timeout, Some(Duration::from_millis(250)));
    assert_eq!(seen[1].avoid.iter().map(|a| a.to_string()).collect::<Vec<_>>(), ["hung"]);

    // Without a per-try timeout, DEADLINE_EXCEEDED is the call's: not retried.
    let script = Script::new(&[(Code::DeadlineExceeded, "hung")]);
    let svc = RetryLayer::try_new(policy()).expect("policy").layer(script.clone());
    let response = svc.oneshot(request(SAY_HELLO, Some(Duration::from_secs(1)))).await.expect("response");
    assert_eq!(code_of(&response), Code::DeadlineExceeded);
    assert_eq!(script.seen().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn when_every_attempt_fails_the_budget_bounds_the_retries() {
    let calls = 500u64;
    let script = Script::new(&vec![(Code::Unavailable, "a"); 10_000]);
    // 20% of calls, plus a minimum of 1 retry per second over a 10 s window: 10 retries.
    let policy = policy().with_budget(0.2, 1, Duration::from_secs(10));
    let layer = RetryLayer::try_new(policy).expect("policy");
    let svc = layer.layer(script.clone());
    for _ in 0..calls {
        let response = svc.clone().oneshot(request(SAY_HELLO, None)).await.expect("response");
        assert_eq!(code_of(&response), Code::Unavailable);
    }
    let attempts = script.seen().len() as u64;
    let bound = calls + calls / 5 + 10;
    assert!(attempts <= bound, "{attempts} attempts for {calls} calls; the budget allows {bound}");
    assert!(attempts >= calls + calls / 5, "the budget was used: {attempts} attempts");
    assert!(layer.stats().budget_exhausted() > 0);
}

#[test]
fn bad_policies_are_refused_by_name() {
    for (policy, setting) in [
        (RetryPolicy::default().with_max_attempts(0), "max_attempts"),
        (RetryPolicy::default().with_methods(["SayHello"]), "methods"),
        (RetryPolicy::default().with_retry_on(&[Code::Ok]), "retry_on"),
        (RetryPolicy::default().with_backoff(Duration::ZERO, Duration::ZERO), "backoff"),
        (RetryPolicy::default().with_budget(f32::NAN, 10, Duration::from_secs(10)), "budget_ratio"),
        (RetryPolicy::default().with_budget(0.2, 10, Duration::from_secs(61)), "budget_window"),
    ] {
        let err = RetryLayer::try_new(policy).expect_err(setting);
        assert_eq!(err.setting, setting);
    }
    let p = RetryPolicy::default().with_methods(["/greeter.v1.Greeter/*"]);
    assert!(p.is_retryable(SAY_HELLO));
    assert!(!p.is_retryable("/other.v1.Other/SayHello"));
}

#[tokio::test(start_paused = true)]
async fn a_handle_changes_the_policy_of_every_service_the_layer_made() {
    let layer = RetryLayer::try_new(policy().with_max_attempts(2)).expect("policy");
    let handle = layer.handle();
    let mut answers = vec![(Code::Unavailable, "a"); 2];
    answers.extend([(Code::Internal, "b"); 10]);
    let script = Script::new(&answers);
    let svc = layer.layer(script.clone());
    let response = svc.clone().oneshot(request(SAY_HELLO, None)).await.expect("response");
    assert_eq!((code_of(&response), script.seen().len()), (Code::Unavailable, 2));

    // More attempts, and INTERNAL retried too, for the service made before.
    handle.update(policy().with_max_attempts(4).with_retry_on(&[Code::Unavailable, Code::Internal])).expect("valid");
    let response = svc.oneshot(request(SAY_HELLO, None)).await.expect("response");
    assert_eq!((code_of(&response), script.seen().len()), (Code::Internal, 2 + 4));
    assert_eq!(layer.policy().max_attempts, 4);

    // A bad policy changes nothing.
    let err = handle.update(policy().with_max_attempts(0)).expect_err("refused");
    assert_eq!(err.setting, "max_attempts");
    assert_eq!(handle.policy().max_attempts, 4);
}
