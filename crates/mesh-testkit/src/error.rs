/// What went wrong starting or driving a test etcd or server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Finding, starting or reaching etcd failed.
    #[error(transparent)]
    Etcd(#[from] mesh_etcd_local::Error),
    /// etcd answered a gateway call with something unexpected.
    #[error("etcd gateway {call}: {detail}")]
    Gateway {
        /// The call, e.g. `put /mesh/x`.
        call: String,
        /// What was wrong with the answer.
        detail: String,
    },
    /// A member index outside the cluster, or an operation the cluster shape does not allow.
    #[error("{0}")]
    Usage(String),
    /// Binding or serving a test server failed.
    #[error("test server: {0}")]
    Serve(#[source] std::io::Error),
    /// A condition did not hold before its deadline.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long was waited.
        after: std::time::Duration,
    },
}
