//! Prometheus metrics for tonic services and clients.
//!
//! - [`CallMetricsLayer`]: a tower layer for a tonic server or client that counts calls by
//!   method and gRPC code and times them (a histogram per method).
//! - [`install`]: puts a Prometheus recorder behind the [`metrics`] facade for the whole
//!   process, and [`Exporter::serve`] answers scrapes of `/metrics` in Prometheus' text
//!   format.
//!
//! Anything else a process wants to export goes through the same facade
//! (`metrics::gauge!("…").set(…)`); the services sample what mesh's other crates count
//! (breakers, retries, the limiter, discovery, configuration) that way.
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

pub use calls::{CallCounts, CallMetrics, CallMetricsLayer, RecordingBody, ResponseFuture, Side};
pub use collect::{Collector, Families, collector};
pub use exporter::{Exporter, MetricsError, install, installed};

/// The README's example, compiled (and run, unless marked `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
