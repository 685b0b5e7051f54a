//! The reference greeter.v1 client of mesh: greets and prints each reply, or drives load
//! (`bench`) and reports throughput and latency percentiles from an HDR histogram.
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
//! })
//! .await;
//! println!("{}", report.summary());
//! # Ok(())
//! # }
//! ```

pub mod bench;
mod cli;
mod connect;

pub use cli::{Args, Command, EndpointReport, GreetReport, run};
pub use connect::{balanced, connect, discovered};
