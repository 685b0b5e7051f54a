//! Service registration in etcd: the [`Instance`] record with its key layout and codec (the
//! JSON shape of etcd's Go naming package, read tolerantly), and [`Registrar`] →
//! [`Registration`], which keeps an instance registered through etcd restarts, outages,
//! compactions, lost leases and deleted keys, and deregisters cleanly.
//!
//! ```no_run
//! use std::time::Duration;
//! use mesh_etcd::{Etcd, EtcdOptions};
//! use mesh_registry::{Instance, Registrar, RegistrarConfig};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let etcd = Etcd::new(EtcdOptions::parse_endpoints("http://127.0.0.1:2379")?);
//! let registrar = Registrar::new(etcd, RegistrarConfig::default());
//! let registration = registrar.spawn(&Instance::new("greeter", "10.0.0.5:50051"));
//! // … serve …
//! registration.deregister(Duration::from_secs(3)).await?;
//! # Ok(())
//! # }
//! ```
//!
//! What it does not do: decide when to register (the server does, once it listens and
//! reports SERVING) or read registrations (mesh-discovery does, with [`Instance::decode`]).

mod host;
mod record;
mod registrar;

pub use host::{InterfaceAddr, interface_addrs, pick_host_ip};
pub use record::{DEFAULT_ROOT, DecodeError, Instance, MAX_VALUE_BYTES, check_addr, check_name, prefix};
pub use registrar::{Registrar, RegistrarConfig, Registration, RegistrationState};

/// Why leaving the registry failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Deleting the key or revoking the lease failed.
    #[error("deregistering {key}: {source}; the key expires with its lease")]
    Deregister {
        /// The key.
        key: String,
        /// What etcd said.
        #[source]
        source: mesh_etcd::EtcdError,
    },
    /// etcd did not answer in time.
    #[error("deregistering {key}: no answer from etcd within {timeout:?}; the key expires with its lease")]
    DeregisterTimeout {
        /// The key.
        key: String,
        /// How long was waited.
        timeout: std::time::Duration,
    },
}

/// The README's example, compiled (and run, unless marked `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
