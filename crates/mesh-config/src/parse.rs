//! A document from etcd, merged over the layers below it, decoded and checked.

use serde_json::Value;

use crate::{ConfigError, Document};

/// `bytes` (a JSON object) merged over `base`, as a checked `T`. `origin` names the
/// document in errors ("/mesh/config/greeter at revision 42").
pub fn parse<T: Document>(base: &Value, bytes: &[u8], origin: &str) -> Result<T, ConfigError> {
    let patch: Value = serde_json::from_slice(bytes).map_err(|e| ConfigError::new(origin, format!("not JSON: {e}")))?;
    if !patch.is_object() {
        return Err(ConfigError::new(origin, format!("must be a JSON object, not {}", crate::layers::kind(&patch))));
    }
    let mut document = base.clone();
    crate::layers::merge(&mut document, &patch);
    decode(&document, origin)
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
