//! The breaker's own error.

use std::sync::Arc;
use std::time::Duration;

/// A call refused because the circuit is open (or half-open with every probe out). No
/// request was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("circuit open for {name}{}", match .retry_in {
    Some(d) => format!("; next probe in {}ms", d.as_millis()),
    None => "; its probes are out".to_string(),
})]
#[non_exhaustive]
pub struct BreakerOpen {
    /// What the breaker guards: an endpoint's address, or a service's name.
    pub name: Arc<str>,
    /// How long until a probe goes through, when the circuit is open.
    pub retry_in: Option<Duration>,
}

impl BreakerOpen {
    /// The gRPC status a caller sees: UNAVAILABLE with this error's message.
    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::unavailable(self.to_string())
    }
}
