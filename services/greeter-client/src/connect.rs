use std::time::Duration;

use anyhow::Context as _;
use tonic::transport::{Channel, Endpoint};

/// How long connecting to a target may take before it counts as unreachable.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Connects to one target such as `http://127.0.0.1:50051`; the error names the address.
pub async fn connect(target: &str) -> anyhow::Result<Channel> {
    endpoint(target)?
        .connect()
        .await
        .with_context(|| format!("cannot reach greeter at {target}"))
}

/// The endpoint for `target`, with the timeouts and keepalive mesh uses everywhere.
pub(crate) fn endpoint(target: &str) -> anyhow::Result<Endpoint> {
    if !(target.starts_with("http://") || target.starts_with("https://")) {
        anyhow::bail!("invalid --target {target:?}; expected a URL like http://127.0.0.1:50051");
    }
    Ok(Endpoint::from_shared(target.to_string())
        .with_context(|| {
            format!("invalid --target {target:?}; expected a URL like http://127.0.0.1:50051")
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}
