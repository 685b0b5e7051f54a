//! Circuit breaking for tonic clients: stop sending calls to what keeps failing, and let a
//! few through now and then to learn when it has healed.
//!
//! - [`Circuit`] is the state machine, pure and told the time: Closed → Open after
//!   `failure_threshold` consecutive failures (or a failure rate over a window), Open →
//!   HalfOpen once the open time has passed, HalfOpen → Closed after `success_threshold`
//!   successful probes, or back to Open on a failed one. The open time doubles on each
//!   repeated trip up to a cap, less a random share (Envoy's outlier detection grows its
//!   ejection time the same way).
//! - [`BreakerLayer`] wraps a service in a [`Breaker`]. Each `layer` call makes one circuit
//!   that all clones of the service share, so the breaker of an endpoint or a service is one
//!   breaker however many tasks call it. Admitting a call to a closed circuit and recording
//!   its success take no lock and read no clock.
//! - [`GrpcClassifier`] judges a call by its gRPC status, read from the headers of a
//!   trailers-only response or from the trailers (so a streaming call counts when it ends),
//!   or from a transport error. UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, UNKNOWN and
//!   DATA_LOSS count by default; RESOURCE_EXHAUSTED (a server's pushback) and a call its
//!   caller cancelled do not, but a call dropped or cancelled once its deadline had passed
//!   (the call's `grpc-timeout`, or the `mesh_util::grpc::Deadline` a layer above set) is a
//!   failure: the endpoint did not answer in time, whichever layer ended the call. Any
//!   [`Classify`] can replace it.
//! - A half-open probe's verdict is its first message: a stream that answers closes the
//!   circuit at once rather than when it ends, and the rest of it counts as a call let
//!   through while closed.
//!
//! Two shapes, for the two places a client wants a breaker:
//! - per endpoint, under a balancer: an open breaker refuses in `poll_ready` with
//!   [`BreakerOpen`], which a balancer such as mesh-balancer takes as "skip this endpoint",
//!   like outlier ejection;
//! - per service, around the whole client ([`BreakerLayer::fail_fast`]): an open breaker
//!   answers each call at once with UNAVAILABLE "circuit open for greeter", sending nothing.
//!
//! ```
//! use std::time::Duration;
//! use mesh_breaker::{BreakerConfig, BreakerLayer};
//! use mesh_proto::pb::greeter_client::GreeterClient;
//! use tower_layer::Layer;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = BreakerConfig::default()
//!     .with_failure_threshold(5)
//!     .with_open_time(Duration::from_secs(1), Duration::from_secs(30));
//! let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:50051").connect_lazy();
//! let breaker = BreakerLayer::try_new("greeter", config)?.fail_fast().layer(channel);
//! let handle = breaker.handle();
//! let mut client = GreeterClient::new(breaker);
//! # let _ = &mut client;
//! println!("circuit of {} is {}", handle.name(), handle.state());
//! # Ok(())
//! # }
//! ```
//!
//! What it does not do: retry (a refused call is refused; retrying is a layer above),
//! health-check endpoints on its own (probes are real calls), or time calls out (the call's
//! deadline does, and a deadline that passes counts as DEADLINE_EXCEEDED).

mod classify;
mod config;
mod error;
mod future;
mod layer;
mod service;
mod shared;
mod state;

pub use classify::{Classify, GrpcClassifier};
pub use config::{BreakerConfig, FailureRate, InvalidBreakerConfig};
pub use error::BreakerOpen;
pub use future::ResponseFuture;
pub use layer::BreakerLayer;
pub use service::{Breaker, BreakerHandle, WeakBreakerHandle};
pub use state::{Admission, Circuit, Outcome, State};

/// The README's example, compiled (and run, unless marked `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
