//! Retries of idempotent gRPC calls for tonic clients, bounded so that they cannot turn an
//! outage into a storm.
//!
//! A call to a method the [`RetryPolicy`] lists as idempotent that fails with a code in
//! `retry_on` (UNAVAILABLE by default: the endpoint could not take it, or its connection
//! broke) or with a transport error is sent again, at most `max_attempts` times in all:
//!
//! - on another endpoint: under mesh-balancer, each retry carries [`mesh_balancer::AvoidEndpoints`]
//!   naming the endpoints earlier attempts failed at, so round robin, random and consistent
//!   hashing alike send it elsewhere while another endpoint can take it;
//! - after a jittered exponential backoff, or after exactly the pause a server asked for in
//!   `grpc-retry-pushback-ms` (gRFC A6, as grpc-go reads it): a pushback only times the
//!   retry of a code that is retryable anyway; one that is negative or malformed, or longer
//!   than `max_pushback` (1 s by default), ends the retries, so a call without a deadline
//!   is not held for as long as a server asks;
//! - within a retry budget shared by the whole client (counted as tower's `TpsBudget` counts,
//!   in thousandths of a retry, so that the ratio is the one asked for; by default 20% of
//!   calls plus 10 per second, as Finagle and linkerd budget theirs).
//!   The per-second part is a standing reserve of `budget_min_per_sec × budget_window`
//!   retries: in any window at most `budget_ratio` of the calls plus that reserve are
//!   retried, and a burst may spend the whole reserve at once (100 retries by default, in
//!   the first second of an outage as in any other);
//! - never past the call's deadline: each attempt carries the time left as its
//!   `grpc-timeout`, and no retry starts whose backoff would end past it;
//! - and the call's deadline holds for its response body too: tonic's client times a call
//!   out only until the response's head arrives, so a server that hangs after sending it
//!   would hold the call; here the body then fails with DEADLINE_EXCEEDED at the deadline
//!   (for every call through the layer, retried or not);
//! - optionally with a per-try timeout shorter than the call's deadline (as Envoy's): an
//!   attempt that runs out of it, at a hung endpoint say, is retried elsewhere with the time
//!   that is left;
//! - only before the response has begun: a status in the response's headers (a
//!   trailers-only response) can be retried, a response with messages has committed the
//!   call, so a stream is never retried after its first message.
//!
//! The request is replayed from a copy of its body, read when the call starts. A unary or
//! server-streaming call's request is one message, ready at once; a larger request than
//! `max_buffered`, or a client stream, is sent once and never retried.
//!
//! ```
//! use mesh_retry::{RetryLayer, RetryPolicy};
//! use mesh_proto::pb::greeter_client::GreeterClient;
//! use tower_layer::Layer;
//!
//! # fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let policy = RetryPolicy::default().with_max_attempts(3).with_methods(["/greeter.v1.Greeter/SayHello"]);
//! let layer = RetryLayer::try_new(policy)?;
//! let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:50051").connect_lazy();
//! let mut client = GreeterClient::new(layer.layer(channel));
//! # let _ = &mut client;
//! println!("{} retries so far", layer.stats().retries());
//! # Ok(())
//! # }
//! ```
//!
//! Why not tower's `Retry` service: its policy clones a request synchronously, and a tonic
//! request body is a stream that cannot be cloned; and it clones the whole inner service on
//! every call, which for a balanced channel costs each call a fresh set of per-endpoint
//! instances. The budget it uses is tower's.
//!
//! What it does not do: hedging (a second attempt while the first is still out), or
//! transparent retries of non-idempotent calls that never left the client (gRPC's A6);
//! a call to a method not listed is sent once.

mod budget;
mod layer;
mod policy;
mod service;

pub use layer::{RetryHandle, RetryLayer};
pub use policy::{InvalidRetryPolicy, RetryPolicy};
pub use service::{ResponseFuture, Retry, RetryStats};

/// The README's example, compiled (and run, unless marked `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
