//! The Instance record, its key and its value in etcd.
//!
//! Key: `{root}/services/{service}/{instance_id}`. Value: the JSON shape of etcd's Go naming
//! package (`go.etcd.io/etcd/client/v3/naming/endpoints.Update`), so Go clients of etcd's
//! gRPC resolver find our servers and we find Go servers (a Go client dials
//! `etcd:////mesh/services/greeter`: the resolver drops the first `/` of the path):
//!
//! ```json
//! {"Op":0,"Addr":"10.0.0.5:50051","Metadata":{"weight":100,"zone":"eu-1a","version":"0.3.0","instance":"10.0.0.5:50051","tls":true}}
//! ```
//!
//! Reading is tolerant: field names in any case, unknown fields ignored, `Metadata` null,
//! absent or not an object (Go allows any value) means weight 1; `Op` is ignored (every put
//! is an upsert). A value that still does not make sense is a [`DecodeError`] naming why.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

/// The largest value read; anything bigger is not a registration.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// The default root prefix.
pub const DEFAULT_ROOT: &str = "/mesh";

/// One running instance of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The service name, e.g. `greeter`.
    pub service: String,
    /// Stable across restarts (default: the advertised `host:port`), never a lease id.
    pub id: String,
    /// Where clients dial it: `host:port`.
    pub addr: String,
    /// Relative weight for weighted balancing, at least 1.
    pub weight: u32,
    /// Its zone, if known.
    pub zone: Option<String>,
    /// Its version, if known.
    pub version: Option<String>,
    /// Whether it speaks TLS (`"tls": true` in the Metadata). Clients with TLS settings
    /// dial only such endpoints; clients without, only the others.
    pub tls: bool,
}

/// Why a registration value was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The key is not `{prefix}{instance_id}` with a non-empty id and no further `/`.
    #[error("unexpected key shape: expected {prefix}<instance-id>")]
    KeyShape {
        /// The prefix expected.
        prefix: String,
    },
    /// Too large to be a registration.
    #[error("value is {0} bytes; at most {MAX_VALUE_BYTES} are read")]
    TooLarge(usize),
    /// Not JSON, or not a JSON object.
    #[error("value is not a JSON object: {0}")]
    NotJson(String),
    /// A field has the wrong type or an impossible value.
    #[error("{0}")]
    Field(String),
}

impl Instance {
    /// An instance of `service` at `addr`, its id the address, weight 1.
    pub fn new(service: impl Into<String>, addr: impl Into<String>) -> Self {
        let addr = addr.into();
        Instance { service: service.into(), id: addr.clone(), addr, weight: 1, zone: None, version: None, tls: false }
    }

    /// Its key under `root`.
    pub fn key(&self, root: &str) -> String {
        format!("{}{}", prefix(root, &self.service), self.id)
    }

    /// The value written to etcd, in the Go naming package's shape.
    pub fn encode(&self) -> String {
        #[derive(Serialize)]
        struct Metadata<'a> {
            weight: u32,
            #[serde(skip_serializing_if = "Option::is_none")]
            zone: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            version: Option<&'a str>,
            instance: &'a str,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            tls: bool,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "PascalCase")]
        struct Update<'a> {
            op: u8,
            addr: &'a str,
            metadata: Metadata<'a>,
        }
        let update = Update {
            op: 0,
            addr: &self.addr,
            metadata: Metadata {
                weight: self.weight.max(1),
                zone: self.zone.as_deref(),
                version: self.version.as_deref(),
                instance: &self.id,
                tls: self.tls,
            },
        };
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_string(&update).unwrap_or_default()
    }

    /// Reads the instance stored at `key` under `prefix` (see [`prefix`]).
    pub fn decode(prefix: &str, key: &str, value: &[u8]) -> Result<Instance, DecodeError> {
        let id = key
            .strip_prefix(prefix)
            .filter(|id| check_name(id).is_ok())
            .ok_or_else(|| DecodeError::KeyShape { prefix: prefix.to_string() })?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(DecodeError::TooLarge(value.len()));
        }
        let json: Value = serde_json::from_slice(value).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let Value::Object(fields) = json else {
            return Err(DecodeError::NotJson(format!("found {}", kind(&json))));
        };
        let field = |name: &str| fields.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v);
        let addr = match field("addr") {
            Some(Value::String(a)) => a.trim().to_string(),
            Some(other) => return Err(DecodeError::Field(format!("Addr must be a string, found {}", kind(other)))),
            None => return Err(DecodeError::Field("no Addr".into())),
        };
        check_addr(&addr)?;
        let service = prefix.trim_end_matches('/').rsplit('/').next().unwrap_or_default().to_string();
        let mut instance =
            Instance { service, id: id.to_string(), addr, weight: 1, zone: None, version: None, tls: false };
        if let Some(Value::Object(meta)) = field("metadata") {
            let meta_field = |name: &str| meta.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v);
            match meta_field("weight") {
                None | Some(Value::Null) => {}
                Some(Value::Number(n)) => {
                    instance.weight =
                        n.as_u64().and_then(|w| u32::try_from(w).ok()).filter(|&w| w >= 1).ok_or_else(|| {
                            DecodeError::Field(format!("Metadata.weight must be a whole number ≥ 1, found {n}"))
                        })?;
                }
                Some(other) => {
                    return Err(DecodeError::Field(format!("Metadata.weight must be a number, found {}", kind(other))));
                }
            }
            instance.zone = meta_field("zone").and_then(Value::as_str).map(str::to_string);
            instance.version = meta_field("version").and_then(Value::as_str).map(str::to_string);
            instance.tls = match meta_field("tls") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => true,
                Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => false,
                Some(other) => {
                    return Err(DecodeError::Field(format!(
                        "Metadata.tls must be true or false, found {}",
                        kind(other)
                    )));
                }
            };
        }
        Ok(instance)
    }

    /// Metadata for the balancer: zone and version, when known.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::new();
        if let Some(z) = &self.zone {
            labels.insert("zone".into(), z.clone());
        }
        if let Some(v) = &self.version {
            labels.insert("version".into(), v.clone());
        }
        labels
    }
}

/// `{root}/services/{service}/`: the prefix under which instances of `service` live.
pub fn prefix(root: &str, service: &str) -> String {
    format!("{}/services/{service}/", root.trim_end_matches('/'))
}

/// Checks that `name` can be one segment of a key: an instance id (the last segment, which
/// every client reads back as the id) or a service name. It must not be empty nor hold a
/// `/`, or the key it makes lands outside `{root}/services/{service}/{id}` and every client
/// skips it.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty; give a name without '/'".into());
    }
    if name.contains('/') {
        return Err(format!("{name:?} holds a '/', which would put its key outside the service's prefix"));
    }
    Ok(())
}

/// Checks that `addr` is `host:port` with a host and a port from 1 to 65535.
pub fn check_addr(addr: &str) -> Result<(), DecodeError> {
    let bad = |why: &str| DecodeError::Field(format!("Addr {addr:?} {why}; expected host:port"));
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("has no port"))?;
    if host.is_empty() || host == "[]" || host.contains(char::is_whitespace) || host.contains('/') {
        return Err(bad("has no valid host"));
    }
    match port.parse::<u16>() {
        Ok(0) => Err(bad("has port 0")),
        Ok(_) => Ok(()),
        Err(_) => Err(bad("has no valid port")),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests;
