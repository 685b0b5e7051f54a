//! What the client's resilience layers cost per call, over a dummy endpoint that answers at
//! once with a message and OK trailers (as a unary call's response looks), with the request
//! a generated client sends: a retry layer, an endpoint breaker (consecutive failures), a
//! service breaker (failure rate over a window), and the three stacked as greeter-client
//! stacks them (without the balancer, which has its own bench). Each call is made, its body
//! read to the trailers. Run by `cargo xtask bench`.

use std::convert::Infallible;
use std::hint::black_box;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::BodyExt as _;
use mesh_breaker::{BreakerConfig, BreakerLayer, FailureRate};
use mesh_retry::{RetryLayer, RetryPolicy};
use tonic::body::Body;
use tower::ServiceExt as _;
use tower_layer::Layer as _;

/// Answers every call at once: one message, then `grpc-status: 0` trailers.
#[derive(Clone)]
struct Dummy;

impl tower_service::Service<http::Request<Body>> for Dummy {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        drop(request);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames = [
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"\0\0\0\0\x02ok"))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
        std::future::ready(Ok(http::Response::new(Body::new(body))))
    }
}

fn request() -> http::Request<Body> {
    let mut r =
        http::Request::new(Body::new(http_body_util::Full::new(Bytes::from_static(b"\0\0\0\0\x07\n\x05bench"))));
    *r.method_mut() = http::Method::POST;
    *r.uri_mut() = http::Uri::from_static("http://greeter/greeter.v1.Greeter/SayHello");
    let h = r.headers_mut();
    h.insert("te", http::HeaderValue::from_static("trailers"));
    h.insert("content-type", http::HeaderValue::from_static("application/grpc"));
    h.insert("grpc-timeout", http::HeaderValue::from_static("1000000u"));
    r
}

async fn once<S>(svc: &mut S)
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Error: std::fmt::Debug,
{
    let response = svc.ready().await.expect("ready").call(request()).await.expect("response");
    black_box(response.into_body().collect().await.expect("body").trailers().is_some());
}

fn layers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    let retry =
        RetryLayer::try_new(RetryPolicy::default().with_methods(["/greeter.v1.Greeter/SayHello"])).expect("policy");
    let endpoint = BreakerLayer::try_new("endpoint", BreakerConfig::default()).expect("config");
    let service_config = BreakerConfig::default().with_failure_threshold(0).with_failure_rate(FailureRate::new(
        0.5,
        Duration::from_secs(10),
        20,
    ));
    let service = BreakerLayer::try_new("greeter", service_config).expect("config").fail_fast();

    let mut group = c.benchmark_group("layers");
    let mut direct = Dummy;
    group.bench_function("direct", |b| b.iter(|| rt.block_on(once(&mut direct))));
    let mut retried = retry.layer(Dummy);
    group.bench_function("retry", |b| b.iter(|| rt.block_on(once(&mut retried))));
    let mut endpoint_breaker = endpoint.layer(Dummy);
    group.bench_function("endpoint_breaker", |b| b.iter(|| rt.block_on(once(&mut endpoint_breaker))));
    let mut service_breaker = service.layer(Dummy);
    group.bench_function("service_breaker", |b| b.iter(|| rt.block_on(once(&mut service_breaker))));
    let mut stack = service.layer(retry.layer(endpoint.layer(Dummy)));
    group.bench_function("all_three", |b| b.iter(|| rt.block_on(once(&mut stack))));
    group.finish();
}

criterion_group!(benches, layers);
criterion_main!(benches);
