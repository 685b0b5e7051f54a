//! The layers below etcd: defaults, then a file, then flags, merged into one JSON document
//! that the document in etcd is merged over.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::{ConfigError, Document};

/// A configuration's layers below etcd, merged in order: each one's fields replace the
/// ones before (objects merge field by field, anything else is replaced whole, and `null`
/// removes a field: JSON merge patch, RFC 7386).
#[derive(Debug, Clone, PartialEq)]
pub struct Layers {
    document: Value,
}

impl Default for Layers {
    fn default() -> Self {
        Layers { document: Value::Object(Default::default()) }
    }
}

impl Layers {
    /// Starts from `defaults`, as they serialize.
    pub fn defaults<T: Serialize>(defaults: &T) -> Result<Self, ConfigError> {
        let document = serde_json::to_value(defaults).map_err(|e| ConfigError::new("the defaults", e.to_string()))?;
        Ok(Layers { document: object("the defaults", document)? })
    }

    /// Merges the file at `path`: TOML when its name ends in `.toml`, JSON otherwise.
    pub fn file(self, path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let origin = format!("config file {}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(&origin, e.to_string()))?;
        let value = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("toml")) {
            toml::from_str::<Value>(&text).map_err(|e| ConfigError::new(&origin, format!("not TOML: {e}")))?
        } else {
            serde_json::from_str::<Value>(&text).map_err(|e| ConfigError::new(&origin, format!("not JSON: {e}")))?
        };
        self.patch(&origin, value)
    }

    /// Merges `patch` (say, what flags set), which must be an object; `origin` names it in
    /// errors.
    pub fn patch(mut self, origin: &str, patch: Value) -> Result<Self, ConfigError> {
        merge(&mut self.document, &object(origin, patch)?);
        Ok(self)
    }

    /// The merged document.
    pub fn document(&self) -> &Value {
        &self.document
    }

    /// The merged document as a `T`, checked; the error says what is wrong.
    pub fn build<T: Document>(&self) -> Result<T, ConfigError> {
        self.build_as("the file and flag settings")
    }

    /// [`Layers::build`], naming the layers `origin` in errors (say, the file just merged).
    pub fn build_as<T: Document>(&self, origin: &str) -> Result<T, ConfigError> {
        crate::parse::decode(&self.document, origin)
    }
}

fn object(origin: &str, value: Value) -> Result<Value, ConfigError> {
    match value {
        Value::Object(_) => Ok(value),
        other => Err(ConfigError::new(origin, format!("must be an object, not {}", kind(&other)))),
    }
}

/// What kind of JSON value `v` is, in words.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Merges `patch` into `target` (JSON merge patch, RFC 7386).
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    if let Value::Object(existing) = target {
        for (name, value) in fields {
            if value.is_null() {
                existing.remove(name);
            } else {
                merge(existing.entry(name.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

#[cfg(test)]
mod tests;
