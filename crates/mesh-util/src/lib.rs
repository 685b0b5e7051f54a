//! Small pieces that several mesh crates need, written once: [`Backoff`], the jittered
//! exponential backoff of every recovery loop (etcd watches, the registry, the balancer's
//! probes), and [`error_chain`], which turns an error and its sources into one line for
//! logs and gRPC messages, [`grpc`], the `grpc-status` and `grpc-timeout` headers that
//! the balancer, the breaker and the retry layer all read, and [`transport`], what a
//! transport error says of the server.
//!
//! ```
//! use std::time::Duration;
//! use mesh_util::{Backoff, error_chain};
//!
//! let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
//! let first = backoff.next_delay();
//! assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
//!
//! let io = std::io::Error::other("connection refused");
//! assert_eq!(error_chain(&io), "connection refused");
//! ```
//!
//! What it does not do: sleep or spawn. Callers own their timers, so a backoff can be a
//! deadline kept across cancellations.

mod backoff;
pub mod grpc;
pub mod transport;

pub use backoff::Backoff;

/// `e` and each of its sources, joined by `": "`, leaving out a source whose text the line
/// already holds (many errors repeat their source in their own message).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests;

/// The README's example, compiled (and run, unless marked `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
