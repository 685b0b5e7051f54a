//! A document from etcd, merged over the layers below it, decoded and checked.

use serde_json::Value;

use crate::{ConfigError, Document};

/// `bytes` (a JSON object) merged over `base` (a JSON merge patch, except that the
/// sections of [`Document::WHOLE_SECTIONS`] it sets replace those of `base` whole), as a
/// checked `T`. `origin` names the document in errors ("/mesh/config/greeter at revision 42").
pub fn parse<T: Document>(base: &Value, bytes: &[u8], origin: &str) -> Result<T, ConfigError> {
    let patch: Value = serde_json::from_slice(bytes).map_err(|e| ConfigError::new(origin, format!("not JSON: {e}")))?;
    if !patch.is_object() {
        return Err(ConfigError::new(origin, format!("must be a JSON object, not {}", crate::layers::kind(&patch))));
    }
    let mut document = base.clone();
    for path in T::WHOLE_SECTIONS {
        // A section the document sets replaces what the layers below set there.
        if lookup(&patch, path).is_some_and(|v| !v.is_null())
            && let Some(below) = lookup_mut(&mut document, path)
        {
            *below = Value::Null;
        }
    }
    crate::layers::merge(&mut document, &patch);
    decode(&document, origin)
}

fn lookup<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(*key))
}

fn lookup_mut<'a>(value: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    path.iter().try_fold(value, |v, key| v.get_mut(*key))
}

/// `document` as a checked `T`: a wrong type or an unknown field names its path.
pub(crate) fn decode<T: Document>(document: &Value, origin: &str) -> Result<T, ConfigError> {
    let value: T = serde_path_to_error::deserialize(document).map_err(|e| {
        let path = e.path().to_string();
        let reason = e.into_inner().to_string();
        if path == "." {
            ConfigError::new(origin, reason)
        } else {
            ConfigError::new(origin, format!("{path}: {reason}"))
        }
    })?;
    value.validate().map_err(|reason| ConfigError::new(origin, reason))?;
    Ok(value)
}
