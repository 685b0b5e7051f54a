//! Prometheus metrics for tonic services and clients.
//!
//! - [`CallMetricsLayer`]: a tower layer for a tonic server or client that counts calls by
//!   method and gRPC code and times them (a histogram per method).
//! - [`install`]: puts a Prometheus recorder behind the [`metrics`] facade for the whole
//!   process, and [`Exporter::serve`] answers scrapes of `/metrics` in Prometheus' text
//!   format.
//!
//! - [`collector`]: a function called at each scrape that writes the current values of what
//!   it watches; a series is then in the scrape exactly as long as its source exists. The
//!   services read mesh's other crates that way (each endpoint of a balancer with its breaker
//!   and calls by code, the limiter per scope, retries, discovery).
//!
//! Anything else a process wants to export goes through the `metrics` facade
//! (`metrics::gauge!("…").set(…)`), as the configuration's revision does.
//!
//! ```
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use mesh_metrics::{CallMetricsLayer, Side};
//!
//! let exporter = mesh_metrics::install()?; // before the layers: a layer made without a recorder records nothing
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let _scrapes = exporter.serve(listener);
//! metrics::counter!("demo_total").increment(1);
//! assert!(exporter.render().contains("demo_total 1"));
//! // tonic::transport::Server::builder().layer(CallMetricsLayer::new(Side::Server))…
//! # let _ = (addr, CallMetricsLayer::new(Side::Server)); Ok(()) }
//! ```

mod calls;
mod collect;
mod exporter;

pub use calls::{
    CallCounts, CallMetrics, CallMetricsLayer, RecordingBody, ResponseFuture, Side, UNKNOWN_METHOD, WeakCallCounts,
    methods_in,
};
pub use collect::{Collector, Families, collector};
pub use exporter::{Exporter, MetricsError, install, installed};

/// The README's example, compiled (and run, unless marked `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
