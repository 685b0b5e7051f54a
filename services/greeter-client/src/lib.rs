//! The reference greeter.v1 client of mesh: greets and prints each reply, or drives load
//! (`bench`) and reports throughput and latency percentiles from an HDR histogram.
//!
//! Calls go through [`Mesh`] (`mesh::Client`): a per-service circuit breaker, retries of
//! the idempotent greeter methods under a budget, the balancer, and a circuit breaker per
//! endpoint. What is the greeter's own here is the greeting loop, `bench`, `health` and the
//! tables.
//!
//! ```no_run
//! use greeter_client::bench::{self, BenchConfig};
//! use std::time::Duration;
//!
//! # async fn run() -> anyhow::Result<()> {
//! let channel = greeter_client::connect("http://127.0.0.1:50051").await?;
//! let report = bench::run(channel, &BenchConfig {
//!     concurrency: 16,
//!     duration: Duration::from_secs(5),
//!     warmup: Duration::from_secs(1),
//!     name: "bench".into(),
//!     timeout: Some(Duration::from_secs(1)),
//! })
//! .await;
//! println!("{}", report.summary());
//! # Ok(())
//! # }
//! ```

pub mod bench;
mod cli;

pub use cli::{Args, Command, EndpointReport, GreetReport, HealthReport, run};
pub use mesh::client::{
    Client as Mesh, ClientBase, EndpointStack, InvalidResilience, LiveTimeout, MeshChannel, Resilience, apply,
    balanced, collect_metrics, connect, connect_tls, default_service_breaker, discovered, discovered_through, follow,
    layers,
};

/// The service name greeter clients discover unless `--service` names another.
pub const SERVICE: &str = "greeter";

/// The idempotent methods of greeter.v1, retried by default.
pub const GREETER_IDEMPOTENT: [&str; 2] = ["/greeter.v1.Greeter/SayHello", "/greeter.v1.Greeter/SayHelloStream"];

/// The codes the client retries (mesh's defaults): UNAVAILABLE and RESOURCE_EXHAUSTED.
pub const GREETER_RETRY_ON: [tonic::Code; 2] = mesh::client::RETRY_ON;

/// The greeter client's breakers and retries: mesh's defaults, with the greeter's
/// idempotent methods retried.
pub fn resilience() -> Resilience {
    Resilience::idempotent(GREETER_IDEMPOTENT)
}
