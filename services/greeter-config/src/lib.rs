//! The greeter service's own part of its configuration document: `server.greeting`, beside
//! the governance sections every mesh service has (`server.limiter`, `server.log_level`
//! and the `client` section, which are mesh's: see `mesh::config`). Both greeter binaries
//! read the whole document with the same checks, so a document one of them refuses, all
//! refuse.
//!
//! ```
//! use greeter_config::GreeterConfig;
//! use mesh_config::Layers;
//!
//! let doc = br#"{"server": {"greeting": "Hi, {name}!", "limiter": {"rate_per_sec": 200, "burst": 20}},
//!                "client": {"balancer": {"strategy": "p2c"}, "timeout_ms": 1000}}"#;
//! let layers = Layers::defaults(&GreeterConfig::default()).expect("defaults");
//! let config: GreeterConfig = mesh_config::parse(layers.document(), doc, "example").expect("valid");
//! assert_eq!(config.server.service.greet("Ada"), "Hi, Ada!");
//! assert!(mesh_config::parse::<GreeterConfig>(layers.document(), br#"{"server": {"colour": 1}}"#, "x").is_err());
//! ```

use serde::{Deserialize, Serialize};

pub use mesh::config::{ClientSection, LimiterSection, MethodLimit, code_name, parse_code};

/// The whole document of the greeter service.
pub type GreeterConfig = mesh::Config<GreeterSection>;

/// The greeting of a server with no configuration.
pub const DEFAULT_GREETING: &str = "Hello, {name}!";

/// The longest greeting template, in bytes.
pub const MAX_GREETING_BYTES: usize = 1024;

/// What the greeter's servers apply of their own: the greeting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GreeterSection {
    /// The reply, with `{name}` replaced by the caller's name.
    pub greeting: String,
}

impl Default for GreeterSection {
    fn default() -> Self {
        GreeterSection { greeting: DEFAULT_GREETING.into() }
    }
}

impl GreeterSection {
    /// The greeting for `name`.
    pub fn greet(&self, name: &str) -> String {
        self.greeting.replace("{name}", name)
    }
}

impl mesh::ServiceSection for GreeterSection {
    fn validate(&self) -> Result<(), String> {
        if self.greeting.is_empty() || self.greeting.len() > MAX_GREETING_BYTES {
            return Err(format!("greeting is {} bytes; give 1 to {MAX_GREETING_BYTES}", self.greeting.len()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
