//! What admitting a call costs: the limiter's bucket lookup and token take, for one
//! server-wide budget, a method override, and per caller (a metadata key, the peer IP), on a bucket with
//! tokens to spare. Each iteration builds the request too; `none` (the same service without
//! the limiter) is the baseline to subtract. Run by `cargo xtask bench`.

use std::convert::Infallible;
use std::hint::black_box;
use std::task::{Context, Poll};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mesh_limiter::{CallerKey, Limit, LimiterConfig, PerCaller, RateLimitLayer};
use tower_layer::Layer as _;
use tower_service::Service as _;

/// Answers at once with an empty response.
#[derive(Clone)]
struct Ready;

impl tower_service::Service<http::Request<()>> for Ready {
    type Response = http::Response<()>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<http::Response<()>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<()>) -> Self::Future {
        std::future::ready(Ok(http::Response::new(())))
    }
}

fn request() -> http::Request<()> {
    let mut r = http::Request::new(());
    *r.uri_mut() = http::Uri::from_static("http://greeter/greeter.v1.Greeter/SayHello");
    r.headers_mut().insert("x-tenant", http::HeaderValue::from_static("tenant-7"));
    let peer = Some(std::net::SocketAddr::from(([10, 0, 0, 7], 50_000)));
    r.extensions_mut().insert(tonic::transport::server::TcpConnectInfo { local_addr: None, remote_addr: peer });
    r
}

fn admit(c: &mut Criterion) {
    // A rate it never reaches, and a bucket that never empties (this loop calls faster
    // than the highest rate a limit takes): every call is admitted on the fast path.
    let limit = Limit::try_new(1_000_000.0, u32::MAX).expect("valid");
    let configs = [
        ("server", LimiterConfig::try_new(limit).expect("valid")),
        ("method", LimiterConfig::try_new(limit).expect("valid").with_method("/greeter.v1.Greeter/SayHello", limit)),
        (
            "per_caller_key",
            LimiterConfig::try_new(limit)
                .expect("valid")
                .with_per_caller(PerCaller::new(CallerKey::Metadata("x-tenant".into()))),
        ),
        (
            "per_caller_ip",
            LimiterConfig::try_new(limit).expect("valid").with_per_caller(PerCaller::new(CallerKey::PeerIp)),
        ),
    ];
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    let _guard = rt.enter();
    let mut group = c.benchmark_group("limiter");
    let mut cx = Context::from_waker(std::task::Waker::noop());
    for (name, config) in configs {
        let mut svc = RateLimitLayer::try_new(config).expect("valid").layer(Ready);
        group.bench_function(BenchmarkId::new("admit", name), |b| {
            b.iter(|| {
                let mut fut = std::pin::pin!(svc.call(request()));
                black_box(std::future::Future::poll(fut.as_mut(), &mut cx).is_ready())
            })
        });
    }
    let mut direct = Ready;
    group.bench_function(BenchmarkId::new("admit", "none"), |b| {
        b.iter(|| {
            let mut fut = std::pin::pin!(direct.call(request()));
            black_box(std::future::Future::poll(fut.as_mut(), &mut cx).is_ready())
        })
    });
    group.finish();
}

criterion_group!(benches, admit);
criterion_main!(benches);
