//! Typed live configuration for a tonic service, from one JSON document in etcd.
//!
//! A configuration is a serde type of yours that implements [`Document`] (its `validate`
//! checks what types cannot: a rate above 0, a known strategy). Its layers are merged in
//! order: defaults, a file (TOML or JSON), what flags set ([`Layers`]), and on top of them
//! the document at `{root}/config/{service}` in etcd, watched through mesh-etcd's
//! list-then-watch ([`ConfigWatcher`]). Each layer's fields replace the ones below (JSON
//! merge patch), so a document in etcd that sets only a greeting leaves the rest as the
//! file and flags say.
//!
//! Every document put is parsed, merged, decoded and validated, then swapped in whole and
//! published through a `tokio::sync::watch` ([`LiveConfig::subscribe`]). A document that
//! fails (not JSON, a wrong type, an unknown field, a value `validate` refuses) is refused
//! whole: a warning names the key, the revision and the reason, [`ConfigStatus`] keeps
//! it, and the last good configuration stays. etcd down at the start: the file and flag
//! settings are in force, and the document is applied when etcd answers. A revision older
//! than one already seen is ignored. The document deleted on a live etcd: back to the
//! file and flag settings. etcd rebuilt (another cluster, the document gone): the
//! configuration in force stays.
//!
//! [`StatusReport`] writes what an instance applied (the revision, and the last refusal
//! with its reason) to `{root}/status/{service}/{instance_id}` under a lease of its own, so
//! that `etcdctl get --prefix /mesh/status/` shows which instance runs what.
//!
//! ```no_run
//! use mesh_config::{ConfigWatcher, Document, Layers, config_key};
//! use mesh_etcd::{Etcd, EtcdOptions};
//!
//! #[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
//! #[serde(deny_unknown_fields, default)]
//! struct Server {
//!     greeting: String,
//!     rate_per_sec: f64,
//! }
//!
//! impl Document for Server {
//!     fn validate(&self) -> Result<(), String> {
//!         if self.rate_per_sec > 0.0 { Ok(()) } else { Err(format!("rate_per_sec is {}; it must be above 0", self.rate_per_sec)) }
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let etcd = Etcd::new(EtcdOptions::parse_endpoints("http://127.0.0.1:2379")?);
//! let defaults = Server { greeting: "Hello, {name}!".into(), rate_per_sec: 100.0 };
//! let layers = Layers::defaults(&defaults)?.file("greeter.toml")?;
//! let config = ConfigWatcher::<Server>::new(etcd, config_key("/mesh", "greeter"), &layers)?.spawn();
//! let mut changes = config.subscribe();
//! while changes.changed().await.is_ok() {
//!     println!("now: {:?}", changes.borrow_and_update());
//! }
//! # Ok(())
//! # }
//! ```
//!
//! What it does not do: write documents (a `put` through mesh-etcd does), or know what a
//! configuration means; applying it is the service's business.

mod layers;
mod live;
mod parse;
mod status;

pub use layers::{Layers, merge};
pub use live::{ConfigStatus, ConfigWatcher, LiveConfig, Rejection, config_key};
pub use parse::parse;
pub use status::{AppliedStatus, StatusReport, status_key};

/// A configuration document: a serde type with the checks types cannot express. Use
/// `#[serde(deny_unknown_fields)]` on it, so that a misspelt field is an error, not a
/// silent default.
pub trait Document: serde::de::DeserializeOwned + Send + Sync + 'static {
    /// Sections a document from etcd replaces whole instead of merging field by field over
    /// the file and flags, as paths of field names (`&[&["server", "limiter"]]`): settings
    /// that are only valid together, so that a document is valid or not whatever flags an
    /// instance was started with, and `config validate` can say which.
    const WHOLE_SECTIONS: &'static [&'static [&'static str]] = &[];

    /// Checks the values; the error says what is wrong, naming the field.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// What is wrong with a configuration, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration in {origin}: {reason}")]
#[non_exhaustive]
pub struct ConfigError {
    /// The layer or document ("config file greeter.toml", "/mesh/config/greeter at revision 42").
    pub origin: String,
    /// What is wrong, naming the field.
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(origin: &str, reason: impl Into<String>) -> Self {
        ConfigError { origin: origin.to_string(), reason: reason.into() }
    }
}

/// The README's example, compiled (and run, unless marked `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
