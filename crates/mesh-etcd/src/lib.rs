//! The one crate of mesh that talks to etcd: [`EtcdOptions`] (endpoints,
//! timeouts, HTTP/2 keepalive, require-leader, user and password), [`Etcd`] (a lazily
//! connecting handle whose every request is bounded by a timeout), [`EtcdError`] (what
//! failed, classified, with etcd-client's error as its source), [`LeaseKeepAlive`], and
//! [`ListWatch`], the list-then-watch primitive that registry, discovery and config share.
//!
//! ```no_run
//! use mesh_etcd::{Etcd, EtcdOptions, ListWatch, WatchEvent};
//!
//! # async fn run() -> Result<(), mesh_etcd::EtcdError> {
//! let etcd = Etcd::new(EtcdOptions::parse_endpoints("http://127.0.0.1:2379")?);
//! etcd.put("/mesh/hello", "world", None).await?;
//! let mut watch = ListWatch::new(etcd.clone(), "/mesh/");
//! loop {
//!     match watch.next().await {
//!         WatchEvent::Reset { kvs, revision, .. } => println!("{} keys at {revision}", kvs.len()),
//!         WatchEvent::Put(kv) => println!("put {}", kv.key),
//!         WatchEvent::Delete { key, .. } => println!("deleted {key}"),
//!     }
//! }
//! # }
//! ```
//!
//! TLS and auth: [`EtcdOptions::with_tls`] (an `https://` endpoint without a CA is refused at
//! start with a message), and a user whose password comes from a file or the environment
//! ([`read_password`]), never from argv; an expired auth token is renewed, watches included.
//!
//! What it does not do: any policy (what to register, what to do with events): that is the
//! other crates' business.

mod client;
mod error;
mod lease;
mod options;
mod watch;

pub use client::{Etcd, KeyValue, Lease, Listing};
pub use error::{ErrorKind, EtcdError};
pub use lease::LeaseKeepAlive;
pub use mesh_util::Backoff;
pub use options::{DEFAULT_LIST_PAGE_SIZE, EtcdOptions, EtcdTls, MAX_MESSAGE_BYTES, PASSWORD_ENV, read_password};
pub use watch::{ListWatch, ViewStatus, WatchEvent};

/// The README's example, compiled (and run, unless marked `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
