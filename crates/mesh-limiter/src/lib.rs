//! Server-side rate limiting for tonic, on the leaky-bucket crate's token buckets.
//!
//! [`RateLimitLayer`] limits the calls of the services it wraps to `rate_per_sec` with a
//! `burst` ([`Limit`]), with overrides per method and, optionally, a budget per caller (the
//! peer's IP or a metadata key, [`PerCaller`]) in a table with a cap and idle expiry. Over
//! the limit a call is rejected at once with RESOURCE_EXHAUSTED ("rate limit exceeded for
//! /greeter.v1.Greeter/SayHello: 200/s, burst 20") and a `grpc-retry-pushback-ms` hint in
//! its metadata, or ([`Mode::Wait`]) waits for a permit up to `max_wait` and is rejected
//! then. Health checks and reflection are never limited.
//!
//! The buckets belong to the layer, not to the services it makes: tonic builds a server's
//! stack once per connection, and all of them draw from the same buckets, so twenty
//! connections get the server's rate, not twenty times it. [`LimiterHandle::update`]
//! changes the limits while calls run, keeping every bucket whose limit did not change and
//! what the others held. A server whose limits may come later (from live configuration)
//! starts with [`RateLimitLayer::off`], which limits nothing until it is given limits, and
//! [`LimiterHandle::turn_off`] stops limiting again.
//!
//! ```
//! use mesh_limiter::{Limit, LimiterConfig, RateLimitLayer};
//! use mesh_proto::pb::greeter_server::GreeterServer;
//!
//! # fn run(greeter: impl mesh_proto::pb::greeter_server::Greeter) -> Result<(), Box<dyn std::error::Error>> {
//! let config = LimiterConfig::try_new(Limit::try_new(200.0, 20)?)?;
//! let limiter = RateLimitLayer::try_new(config)?;
//! let handle = limiter.handle();
//! let server = tonic::transport::Server::builder().layer(limiter).add_service(GreeterServer::new(greeter));
//! # drop(server);
//! handle.update(LimiterConfig::try_new(Limit::try_new(500.0, 50)?)?)?; // live
//! # Ok(())
//! # }
//! ```
//!
//! What it does not do: limit across servers (each server has its own budget), weigh calls
//! by cost, or limit the bytes of a stream (a call takes one permit when it starts).

mod bucket;
mod config;
mod service;
mod table;

pub use config::{CallerKey, InvalidLimit, Limit, LimiterConfig, MAX_CALLER_KEY_BYTES, MAX_RATE, Mode, PerCaller};
pub use service::{LimiterHandle, PUSHBACK_KEY, RateLimit, RateLimitLayer, ResponseFuture, Scope};

/// The README's example, compiled (and run, unless marked `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
