//! Test support for mesh, used as a dev-dependency only: a real etcd and in-process servers.
//!
//! - [`Etcd`]: one member or a three-member cluster of the real `etcd` binary on free
//!   loopback ports in a temp dir, waited on until healthy and killed on drop, with the faults
//!   tests need: kill -9, SIGSTOP/SIGCONT, a member slowed down, restart on the same or a
//!   fresh data dir, a snapshot saved and restored, compaction, overwrites that keep a lease,
//!   transactions of several puts and deletes.
//!   It reads and writes keys through etcd's own JSON gateway, independently of the code
//!   under test, so a test can write a value exactly as a Go program would.
//! - [`TestServer`]: any tonic service served on `127.0.0.1:0`, with a graceful shutdown and
//!   a [`TestServer::kill`] that drops every connection at once, as a crashed process would.
//! - [`NamedGreeter`]: a greeter that says who it is, optionally slow, for client tests.
//! - [`eventually`]: wait on a condition with a deadline instead of sleeping.
//!
//! ```no_run
//! # async fn run() -> Result<(), mesh_testkit::Error> {
//! let etcd = mesh_testkit::Etcd::start().await?;
//! etcd.put("/mesh/hello", "world").await?;
//! assert_eq!(etcd.get("/mesh/hello").await?.as_deref(), Some("world"));
//! # Ok(())
//! # }
//! ```
//!
//! A test that needs etcd and finds none fails with [`mesh_etcd_local::INSTALL_HINT`]; this
//! crate never installs anything (`cargo xtask test` does).

mod error;
mod etcd;
mod greeter;
pub mod prometheus;
mod secure;
mod server;
mod snapshot;
mod wait;

pub use error::Error;
pub use etcd::{Etcd, KeyValue, Status, TxnOp};
pub use greeter::NamedGreeter;
pub use mesh_etcd_local::pki;
pub use secure::{Credentials, SecureOptions};
pub use server::TestServer;
pub use snapshot::Slowdown;
pub use wait::eventually;

/// The README's example, compiled (and run, unless marked `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
