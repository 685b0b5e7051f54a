use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use http::HeaderName;

/// How the balancer chooses an endpoint for each call. Switchable at runtime with
/// [`crate::BalancedChannel::set_strategy`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// The same key always goes to the same endpoint while the set is unchanged, and only the
    /// keys of a removed endpoint move (a hash ring with virtual nodes).
    ConsistentHash(HashConfig),
    /// Weighted round robin on [`crate::Endpoint::weight`], from a precomputed schedule
    /// that spreads each endpoint's turns through the cycle.
    Weighted,
    /// Power of two choices: two endpoints at random, the less loaded one wins.
    P2c(P2cLoad),
}

/// Settings of [`Strategy::ConsistentHash`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashConfig {
    /// The request header that carries the key (default `x-mesh-hash-key`). A
    /// [`HashKey`] request extension takes precedence.
    pub header: HeaderName,
    /// Points per endpoint on the ring (default 160); more spreads keys more evenly.
    pub virtual_nodes: u32,
    /// What to do with a call that carries no key.
    pub on_missing_key: MissingKey,
}

/// What consistent hashing does with a call that has no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingKey {
    /// Pick an endpoint at random.
    #[default]
    Random,
    /// Fail the call with INVALID_ARGUMENT.
    Reject,
}

/// The load that [`Strategy::P2c`] compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum P2cLoad {
    /// Calls in flight to the endpoint (least requests).
    #[default]
    InFlight,
    /// Peak EWMA of response latency times calls in flight (Finagle's and tower's
    /// `PeakEwma`), with the given decay time.
    PeakEwma {
        /// How fast an old latency peak is forgotten.
        decay: Duration,
    },
}

/// The key of a call for consistent hashing, set as a request extension
/// (`request.extensions_mut().insert(HashKey("user-42".into()))`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashKey(pub String);

/// The header consistent hashing reads by default.
pub const DEFAULT_HASH_HEADER: &str = "x-mesh-hash-key";
/// Virtual nodes per endpoint by default.
pub const DEFAULT_VIRTUAL_NODES: u32 = 160;
const MAX_VIRTUAL_NODES: u32 = 10_000;

/// A strategy that cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidStrategy {
    /// An unknown strategy name.
    #[error("unknown strategy {0:?}; expected round_robin, random, consistent_hash, weighted, p2c or p2c_ewma")]
    UnknownName(String),
    /// A header name that HTTP does not allow.
    #[error("invalid hash header {0:?}: header names are lowercase letters, digits and -")]
    BadHeader(String),
    /// Virtual nodes out of range.
    #[error("virtual nodes must be 1 to {MAX_VIRTUAL_NODES}, not {0}")]
    BadVirtualNodes(u32),
}

impl HashConfig {
    /// A config reading `header`, with `virtual_nodes` points per endpoint.
    pub fn try_new(header: &str, virtual_nodes: u32, on_missing_key: MissingKey) -> Result<Self, InvalidStrategy> {
        let header =
            HeaderName::from_bytes(header.as_bytes()).map_err(|_| InvalidStrategy::BadHeader(header.into()))?;
        if !(1..=MAX_VIRTUAL_NODES).contains(&virtual_nodes) {
            return Err(InvalidStrategy::BadVirtualNodes(virtual_nodes));
        }
        Ok(HashConfig { header, virtual_nodes, on_missing_key })
    }
}

impl Default for HashConfig {
    fn default() -> Self {
        HashConfig {
            header: HeaderName::from_static(DEFAULT_HASH_HEADER),
            virtual_nodes: DEFAULT_VIRTUAL_NODES,
            on_missing_key: MissingKey::Random,
        }
    }
}

impl Strategy {
    /// Consistent hashing with the default header and virtual nodes.
    pub fn consistent_hash() -> Self {
        Strategy::ConsistentHash(HashConfig::default())
    }

    /// The strategy's name, as [`FromStr`] reads it.
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::Random => "random",
            Strategy::ConsistentHash(_) => "consistent_hash",
            Strategy::Weighted => "weighted",
            Strategy::P2c(P2cLoad::InFlight) => "p2c",
            Strategy::P2c(P2cLoad::PeakEwma { .. }) => "p2c_ewma",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = InvalidStrategy;

    /// `round_robin`, `random`, `consistent_hash` (defaults), `weighted`, `p2c` (in flight),
    /// `p2c_ewma` (peak EWMA, 10 s decay).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "round_robin" | "rr" => Strategy::RoundRobin,
            "random" => Strategy::Random,
            "consistent_hash" | "hash" => Strategy::consistent_hash(),
            "weighted" | "wrr" => Strategy::Weighted,
            "p2c" | "least_request" => Strategy::P2c(P2cLoad::InFlight),
            "p2c_ewma" | "peak_ewma" => Strategy::P2c(P2cLoad::PeakEwma { decay: Duration::from_secs(10) }),
            _ => return Err(InvalidStrategy::UnknownName(s.into())),
        })
    }
}

#[cfg(test)]
mod tests;
