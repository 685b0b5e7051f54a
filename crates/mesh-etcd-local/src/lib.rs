//! Finding, installing and launching a local etcd, written once for `xtask` (the detached
//! etcd of `cargo xtask etcd-up`) and `mesh-testkit` (an etcd per test, killed on drop).
//!
//! It depends on the standard library and `nix` (for signals) only, so that `xtask` stays
//! quick to build, and it speaks to etcd only through its HTTP `/health` endpoint: anything
//! richer goes through `mesh-etcd`.
//!
//! ```no_run
//! use mesh_etcd_local::{ensure_etcd, ClusterSpec, start_member};
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), mesh_etcd_local::Error> {
//! let etcd = ensure_etcd()?;
//! let dir = std::env::temp_dir().join("my-etcd");
//! let spec = ClusterSpec::on_free_ports(&dir, 1)?;
//! let mut child = start_member(&etcd, &spec, 0)
//!     .stderr(std::process::Stdio::null())
//!     .spawn()
//!     .map_err(|source| mesh_etcd_local::Error::Spawn { binary: etcd.clone(), source })?;
//! spec.wait_healthy(Duration::from_secs(10))?;
//! println!("etcd at {}", spec.client_urls().join(","));
//! child.kill().ok();
//! child.wait().ok();
//! # Ok(())
//! # }
//! ```
//!
//! With the `pki` feature it also makes the certificates of a local etcd under TLS
//! ([`pki`]); [`Security`] and [`setup_auth`] start one with TLS and auth on and mesh's
//! least-privilege roles ([`server_role`], [`client_role`], [`admin_role`]).
//!
//! What it does not do: manage membership (adding or removing members of a running cluster),
//! or run etcd in a container.

mod error;
mod find;
mod health;
mod launch;
#[cfg(feature = "pki")]
pub mod pki;
mod secure;

pub use error::Error;
pub use find::{INSTALL_HINT, ensure_etcd, ensure_tool, find_etcd, find_etcdctl, find_snapshot_restorer, install_etcd};
pub use health::{gateway_post, is_healthy, wait_until};
pub use launch::{ClusterSpec, MemberSpec, Signal, free_port, process_is_etcd, signal, start_member};
pub use secure::{
    Access, Permission, Role, Security, User, admin_role, client_role, prefix_end, random_password, server_role,
    setup_auth,
};

#[cfg(test)]
mod tests;

/// The README's example, compiled (and run, unless marked `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
