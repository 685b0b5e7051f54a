//! The reference greeter.v1 client of mesh: greets and prints each reply, or drives load
//! (`bench`) and reports throughput and latency percentiles from an HDR histogram.
//!
//! Calls go through [`Mesh`]: a per-service circuit breaker, retries of the idempotent
//! greeter methods under a budget, the balancer, and a circuit breaker per endpoint.
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
mod connect;
mod live;
mod stack;

pub use cli::{Args, Command, EndpointReport, GreetReport, HealthReport, run};
pub use connect::{balanced, connect, connect_tls, discovered, discovered_through};
pub use live::{ClientBase, LiveTimeout, apply, follow, layers};
pub use stack::{
    EndpointStack, GREETER_IDEMPOTENT, GREETER_RETRY_ON, InvalidResilience, Mesh, MeshChannel, Resilience,
    collect_metrics, default_service_breaker,
};
