//! A service's configuration document, at `{root}/config/{service}` in etcd: a `server`
//! section its servers apply and a `client` section every client of it applies.
//!
//! The governance settings are mesh's: `server.limiter` and `server.log_level`, and
//! `client.balancer`, `client.breaker`, `client.retry` and `client.timeout_ms`. A service
//! adds its own settings to the `server` section with a type of its own (a
//! [`ServiceSection`]): its fields sit beside `limiter` and `log_level`, and are checked
//! as strictly (an unknown field refuses the document).
//!
//! ```
//! use mesh::config::{Config, ServiceSection};
//! use mesh_config::Layers;
//!
//! /// Billing's own settings: `server.currency`.
//! #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
//! #[serde(deny_unknown_fields, default)]
//! struct Billing {
//!     currency: String,
//! }
//!
//! impl Default for Billing {
//!     fn default() -> Self {
//!         Billing { currency: "EUR".into() }
//!     }
//! }
//!
//! impl ServiceSection for Billing {
//!     fn validate(&self) -> Result<(), String> {
//!         if self.currency.len() == 3 { Ok(()) } else { Err(format!("currency {:?} is not an ISO code", self.currency)) }
//!     }
//! }
//!
//! let doc = br#"{"server": {"currency": "USD", "limiter": {"rate_per_sec": 200}},
//!                "client": {"balancer": {"strategy": "p2c"}, "timeout_ms": 1000}}"#;
//! let layers = Layers::defaults(&Config::<Billing>::default()).expect("defaults");
//! let config: Config<Billing> = mesh_config::parse(layers.document(), doc, "example").expect("valid");
//! assert_eq!(config.server.service.currency, "USD");
//! let refused = mesh_config::parse::<Config<Billing>>(layers.document(), br#"{"server": {"currency": "euro"}}"#, "x");
//! assert!(refused.unwrap_err().reason.contains("server.currency"));
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use mesh_breaker::BreakerConfig;
use mesh_limiter::{CallerKey, Limit, LimiterConfig, PerCaller};
use mesh_retry::RetryPolicy;
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// A service's own settings in the `server` section, beside mesh's `limiter` and
/// `log_level`. Derive serde's traits with `#[serde(deny_unknown_fields, default)]`, so
/// that a misspelt field refuses the document and a missing one takes its default.
pub trait ServiceSection:
    Serialize + DeserializeOwned + Default + Clone + PartialEq + fmt::Debug + Send + Sync + 'static
{
    /// Checks the settings beyond their types; the error names the field (it is reported
    /// as `server.` followed by it).
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// No settings of the service's own: any field beside `limiter` and `log_level` refuses
/// the document.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoSection {}

impl ServiceSection for NoSection {}

/// Whatever the servers' own settings are, unread: what a client that does not know its
/// service's section checks of it (nothing). The client section is checked in full.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AnySection(pub serde_json::Map<String, Value>);

impl ServiceSection for AnySection {}

/// The whole document of a service whose servers have the settings `S` of their own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, bound = "S: ServiceSection")]
pub struct Config<S = NoSection> {
    /// What servers apply.
    pub server: ServerSection<S>,
    /// What clients apply.
    pub client: ClientSection,
}

/// What servers apply: mesh's `limiter` and `log_level`, and the service's own fields.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerSection<S = NoSection> {
    /// Rate limits; none when absent or `null`.
    pub limiter: Option<LimiterSection>,
    /// A log filter (`info`, `debug`, `billing=debug,info`); when absent, as started.
    pub log_level: Option<String>,
    /// The service's own settings: the other fields of the section.
    pub service: S,
}

/// The fields of the `server` section that are mesh's; a service's own section may not
/// use these names.
pub const SERVER_FIELDS: [&str; 2] = ["limiter", "log_level"];

impl<S: ServiceSection> Serialize for ServerSection<S> {
    fn serialize<Z: Serializer>(&self, serializer: Z) -> Result<Z::Ok, Z::Error> {
        use serde::ser::Error as _;
        let mut fields = match serde_json::to_value(&self.service).map_err(Z::Error::custom)? {
            Value::Object(fields) => fields,
            Value::Null => serde_json::Map::new(),
            other => {
                return Err(Z::Error::custom(format!(
                    "a service's own section must serialize as a struct, not {other}"
                )));
            }
        };
        for name in SERVER_FIELDS {
            if fields.contains_key(name) {
                return Err(Z::Error::custom(format!("a service's own section may not have a field named {name}")));
            }
        }
        fields.insert("limiter".into(), serde_json::to_value(&self.limiter).map_err(Z::Error::custom)?);
        fields.insert("log_level".into(), serde_json::to_value(&self.log_level).map_err(Z::Error::custom)?);
        fields.serialize(serializer)
    }
}

impl<'de, S: ServiceSection> Deserialize<'de> for ServerSection<S> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(SectionVisitor(PhantomData))
    }
}

struct SectionVisitor<S>(PhantomData<S>);

impl<'de, S: ServiceSection> Visitor<'de> for SectionVisitor<S> {
    type Value = ServerSection<S>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the server section, an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        // mesh's fields are taken as they pass; the service's type reads the others from the
        // same map, so that an error in them (an unknown field too) names its path like any
        // other.
        let mut mine = Mine { limiter: None, log_level: None };
        let service = S::deserialize(Section { map, mine: &mut mine })?;
        Ok(ServerSection { limiter: mine.limiter.flatten(), log_level: mine.log_level.flatten(), service })
    }
}

struct Mine {
    limiter: Option<Option<LimiterSection>>,
    log_level: Option<Option<String>>,
}

/// The `server` section as the service's type sees it: a map without mesh's fields.
struct Section<'a, A> {
    map: A,
    mine: &'a mut Mine,
}

impl<'de, A: MapAccess<'de>> Deserializer<'de> for Section<'_, A> {
    type Error = A::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, A::Error> {
        visitor.visit_map(Filtered { inner: self.map, mine: self.mine, fields: None })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        visitor.visit_map(Filtered { inner: self.map, mine: self.mine, fields: Some(fields) })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

/// The map of the `server` section without mesh's fields.
struct Filtered<'a, A> {
    inner: A,
    mine: &'a mut Mine,
    /// The fields the service's type has, when it is a struct: any other is refused.
    fields: Option<&'static [&'static str]>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Filtered<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        loop {
            let Some(key) = self.inner.next_key_seed(Key { fields: self.fields })? else { return Ok(None) };
            match key.as_str() {
                "limiter" if self.mine.limiter.is_none() => self.mine.limiter = Some(self.inner.next_value()?),
                "log_level" if self.mine.log_level.is_none() => self.mine.log_level = Some(self.inner.next_value()?),
                "limiter" | "log_level" => return Err(de::Error::custom(format_args!("duplicate field `{key}`"))),
                _ => return seed.deserialize(IntoDeserializer::<A::Error>::into_deserializer(key)).map(Some),
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.inner.next_value_seed(seed)
    }
}

/// A key of the `server` section: one of mesh's, or of the service's fields. Refused here,
/// as it is read, an unknown one is reported at its own path (`server.colour`).
struct Key {
    fields: Option<&'static [&'static str]>,
}

impl<'de> DeserializeSeed<'de> for Key {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        let key = String::deserialize(deserializer)?;
        match self.fields {
            Some(fields) if !SERVER_FIELDS.contains(&key.as_str()) && !fields.contains(&key.as_str()) => {
                let mut expected: Vec<&'static str> = SERVER_FIELDS.to_vec();
                expected.extend(fields);
                Err(de::Error::unknown_field(&key, leak(expected)))
            }
            _ => Ok(key),
        }
    }
}

/// The names an unknown-field error lists: serde takes them as `'static`, and a document
/// with an unknown field is refused once, so the few bytes are not worth a cache.
fn leak(names: Vec<&'static str>) -> &'static [&'static str] {
    Box::leak(names.into_boxed_slice())
}

impl<S> ServerSection<S> {
    /// This section with the service's own settings as `T`, mesh's kept.
    pub fn with_service<T>(self, service: T) -> ServerSection<T> {
        ServerSection { limiter: self.limiter, log_level: self.log_level, service }
    }
}

/// Rate limits of a server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimiterSection {
    /// Calls per second for the whole server.
    pub rate_per_sec: f64,
    /// Calls at once after a quiet spell; default a tenth of the rate (at least 1).
    #[serde(default)]
    pub burst: Option<u32>,
    /// `reject` (default) or `wait`.
    #[serde(default = "reject")]
    pub mode: String,
    /// In `wait` mode, the longest a call waits, in milliseconds (default 100).
    #[serde(default = "hundred")]
    pub max_wait_ms: u64,
    /// `peer-ip` or `metadata:KEY`: a budget per caller as well as the server's.
    #[serde(default)]
    pub per_caller: Option<String>,
    /// Each caller's calls per second, with `per_caller`; default the server's rate (the
    /// server's limit applies to all callers together either way).
    #[serde(default)]
    pub caller_rate_per_sec: Option<f64>,
    /// Each caller's burst; default a tenth of its rate (at least 1).
    #[serde(default)]
    pub caller_burst: Option<u32>,
    /// Limits of single methods, by path.
    #[serde(default)]
    pub methods: BTreeMap<String, MethodLimit>,
}

fn reject() -> String {
    "reject".into()
}

fn hundred() -> u64 {
    100
}

/// One method's limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodLimit {
    /// Calls per second.
    pub rate_per_sec: f64,
    /// Calls at once; default a tenth of the rate (at least 1).
    #[serde(default)]
    pub burst: Option<u32>,
}

/// A tenth of `rate`, at least 1: the burst when none is given.
pub fn default_burst(rate: f64) -> u32 {
    if rate.is_finite() && rate > 0.0 { ((rate / 10.0).ceil().min(f64::from(u32::MAX)) as u32).max(1) } else { 1 }
}

/// `peer-ip` or `metadata:KEY` as a caller key.
pub fn parse_caller(s: &str) -> Result<CallerKey, String> {
    match s {
        "peer-ip" => Ok(CallerKey::PeerIp),
        _ => match s.strip_prefix("metadata:") {
            Some(key) if !key.is_empty() => Ok(CallerKey::Metadata(key.to_ascii_lowercase())),
            _ => Err(format!("{s:?}: give peer-ip or metadata:KEY, e.g. metadata:x-tenant")),
        },
    }
}

impl LimiterSection {
    /// The limiter's settings; the error names the setting.
    pub fn limiter_config(&self) -> Result<LimiterConfig, String> {
        let limit = |rate: f64, burst: Option<u32>| -> Result<Limit, String> {
            let limit =
                Limit::try_new(rate, burst.unwrap_or_else(|| default_burst(rate))).map_err(|e| e.to_string())?;
            match self.mode.as_str() {
                "reject" => Ok(limit),
                "wait" => Ok(limit.waiting(Duration::from_millis(self.max_wait_ms))),
                other => Err(format!("mode is {other:?}; give reject or wait")),
            }
        };
        let mut config = LimiterConfig::try_new(limit(self.rate_per_sec, self.burst)?).map_err(|e| e.to_string())?;
        for (path, m) in &self.methods {
            config = config.with_method(
                path.clone(),
                limit(m.rate_per_sec, m.burst).map_err(|e| format!("methods[{path}]: {e}"))?,
            );
        }
        match (&self.per_caller, self.caller_rate_per_sec, self.caller_burst) {
            (Some(key), rate, burst) => {
                let mut per_caller = PerCaller::new(parse_caller(key).map_err(|e| format!("per_caller: {e}"))?);
                if rate.is_some() || burst.is_some() {
                    let rate = rate.unwrap_or(self.rate_per_sec);
                    per_caller = per_caller.with_limit(limit(rate, burst).map_err(|e| format!("caller limit: {e}"))?);
                }
                config = config.with_per_caller(per_caller);
            }
            (None, None, None) => {}
            (None, _, _) => return Err("caller_rate_per_sec and caller_burst need per_caller".into()),
        }
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

/// What clients of the service apply; each setting left out keeps what the client was
/// built with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientSection {
    /// Balancing.
    pub balancer: BalancerSection,
    /// The per-endpoint circuit breaker.
    pub breaker: BreakerSection,
    /// Retries.
    pub retry: RetrySection,
    /// The deadline of each call that has none of its own, in milliseconds.
    pub timeout_ms: Option<u64>,
}

/// Balancing settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalancerSection {
    /// `round_robin`, `random`, `consistent_hash`, `weighted`, `p2c`, `p2c_ewma`.
    pub strategy: Option<String>,
    /// The header consistent hashing reads its key from.
    pub hash_header: Option<String>,
}

/// Circuit breaker settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSection {
    /// Consecutive failures that open it.
    pub failure_threshold: Option<u32>,
    /// How long it stays open after a first trip, in milliseconds.
    pub open_ms: Option<u64>,
    /// The longest it stays open after repeated trips, in milliseconds.
    pub max_open_ms: Option<u64>,
    /// Probes let through while half-open.
    pub half_open_max_requests: Option<u32>,
}

/// Retry settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySection {
    /// Attempts per call, the first included.
    pub max_attempts: Option<u32>,
    /// Status codes retried, by name (`UNAVAILABLE`).
    pub codes: Option<Vec<String>>,
    /// Retries as a share of calls, in percent.
    pub budget_percent: Option<f64>,
}

/// The longest call timeout a document may set: an hour.
const MAX_TIMEOUT_MS: u64 = 3_600_000;

impl ClientSection {
    /// The balancing strategy, if the document names one.
    pub fn strategy(&self) -> Result<Option<mesh_balancer::Strategy>, String> {
        let Some(name) = &self.balancer.strategy else {
            return Ok(None);
        };
        let mut strategy: mesh_balancer::Strategy = name.parse().map_err(|e| format!("balancer.strategy: {e}"))?;
        if let (mesh_balancer::Strategy::ConsistentHash(hash), Some(header)) =
            (&mut strategy, &self.balancer.hash_header)
        {
            hash.header = http::HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| format!("balancer.hash_header: {header:?} is not a header name"))?;
        }
        Ok(Some(strategy))
    }

    /// `base` with what the document sets; the error names the setting.
    pub fn breaker(&self, base: &BreakerConfig) -> Result<BreakerConfig, String> {
        let b = &self.breaker;
        let mut config = base.clone();
        if let Some(n) = b.failure_threshold {
            config.failure_threshold = n;
        }
        if let Some(ms) = b.open_ms {
            config.open_time = Duration::from_millis(ms);
        }
        if let Some(ms) = b.max_open_ms {
            config.max_open_time = Duration::from_millis(ms);
        }
        if let Some(n) = b.half_open_max_requests {
            config.half_open_probes = n;
            config.success_threshold = config.success_threshold.min(n.max(1));
        }
        config.validate().map_err(|e| format!("breaker: {e}"))?;
        Ok(config)
    }

    /// `base` with what the document sets; the error names the setting.
    pub fn retry(&self, base: &RetryPolicy) -> Result<RetryPolicy, String> {
        let r = &self.retry;
        let mut policy = base.clone();
        if let Some(n) = r.max_attempts {
            policy.max_attempts = n;
        }
        if let Some(names) = &r.codes {
            let codes = names
                .iter()
                .map(|c| parse_code(c))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("retry.codes: {e}"))?;
            policy.retry_on = codes;
        }
        if let Some(percent) = r.budget_percent {
            if !(0.0..=100.0).contains(&percent) {
                return Err(format!("retry.budget_percent is {percent}; give 0 to 100"));
            }
            policy.budget_ratio = (percent / 100.0) as f32;
        }
        policy.validate().map_err(|e| format!("retry: {e}"))?;
        Ok(policy)
    }

    /// The call timeout, if the document sets one.
    pub fn timeout(&self) -> Result<Option<Duration>, String> {
        match self.timeout_ms {
            None => Ok(None),
            Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => Ok(Some(Duration::from_millis(ms))),
            Some(ms) => Err(format!("timeout_ms is {ms}; give 1 to {MAX_TIMEOUT_MS}")),
        }
    }
}

impl<S: ServiceSection> mesh_config::Document for Config<S> {
    /// A document's rate limits stand alone: its `server.limiter` replaces what a server's
    /// `--rate` flags or file set, rather than completing it, so that `{"limiter":
    /// {"burst": 5}}` is refused by every server alike (no rate), not taken by those
    /// started with `--rate`.
    const WHOLE_SECTIONS: &'static [&'static [&'static str]] = &[&["server", "limiter"]];

    fn validate(&self) -> Result<(), String> {
        let s = &self.server;
        if let Some(limiter) = &s.limiter {
            limiter.limiter_config().map_err(|e| format!("server.limiter: {e}"))?;
        }
        if let Some(level) = &s.log_level {
            check_log_level(level)?;
        }
        s.service.validate().map_err(|e| format!("server.{e}"))?;
        let c = &self.client;
        let client = |r: Result<(), String>| r.map_err(|e| format!("client.{e}"));
        client(c.strategy().map(drop))?;
        client(c.breaker(&BreakerConfig::default()).map(drop))?;
        client(c.retry(&RetryPolicy::default()).map(drop))?;
        client(c.timeout().map(drop))?;
        Ok(())
    }
}

impl<S> Config<S> {
    /// Where this document, valid over the defaults, is refused by instances started with
    /// some flags: settings checked against one another, of which the document sets one
    /// and leaves the other to each client's flags. Empty when it is valid everywhere.
    pub fn flag_dependencies(&self) -> Vec<String> {
        let b = &self.client.breaker;
        let mut notes = Vec::new();
        match (b.open_ms, b.max_open_ms) {
            (Some(open), None) => notes.push(format!(
                "client.breaker.open_ms is {open}; clients started with --breaker-max-open below {open}ms refuse this \
                 document (set client.breaker.max_open_ms too)"
            )),
            (None, Some(max)) => notes.push(format!(
                "client.breaker.max_open_ms is {max}; clients started with --breaker-open above {max}ms refuse this \
                 document (set client.breaker.open_ms too)"
            )),
            _ => {}
        }
        notes
    }
}

/// A gRPC status code by its name (any case, `_` or `-`) or its number.
pub fn parse_code(s: &str) -> Result<tonic::Code, String> {
    if let Ok(n) = s.parse::<i32>() {
        return match tonic::Code::from_i32(n) {
            tonic::Code::Unknown if n != 2 => Err(format!("{s:?} is not a gRPC status code (0 to 16)")),
            code => Ok(code),
        };
    }
    let wanted = s.to_ascii_lowercase().replace('-', "_");
    (0..=16)
        .map(tonic::Code::from_i32)
        .find(|c| code_name(*c) == wanted)
        .ok_or_else(|| format!("{s:?} is not a gRPC status code; try unavailable, internal or deadline_exceeded"))
}

/// `unavailable`, `deadline_exceeded`, …: a code's name in snake case.
pub fn code_name(code: tonic::Code) -> String {
    let debug = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// A log filter as `RUST_LOG` takes it, where a bare word must be a level: tracing reads
/// `debgu` as "everything of target debgu, nothing else", which silences a server.
fn check_log_level(level: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !directive.contains(['=', '[']) && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "server.log_level {level:?}: {directive:?} is not a level (trace, debug, info, warn, error, off) or target=level"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(level).map(drop).map_err(|e| format!("server.log_level {level:?}: {e}"))
}

#[cfg(test)]
mod tests;
