use std::time::Duration;

/// An etcd operation that failed, naming the operation and why.
#[derive(Debug, thiserror::Error)]
#[error("etcd {op}: {kind}")]
pub struct EtcdError {
    op: String,
    kind: ErrorKind,
    #[source]
    source: Option<etcd_client::Error>,
}

/// Why an etcd operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// etcd could not be reached, or refused to serve (no leader, shutting down).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// No answer within the request timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The lease does not exist (expired, revoked, or etcd lost its data).
    #[error("lease not found")]
    LeaseNotFound,
    /// The revision asked for has been compacted away.
    #[error("revision compacted (oldest kept: {0})")]
    Compacted(i64),
    /// The etcd user's roles do not allow the operation.
    #[error("permission denied ({0}): the etcd user has no role that allows this")]
    PermissionDenied(String),
    /// etcd refused the user name and password, or wants them and got none.
    #[error("authentication failed ({0}): check --etcd-user and its password")]
    AuthFailed(String),
    /// Bad options or arguments: not etcd's fault and not worth retrying.
    #[error("{0}")]
    Invalid(String),
    /// Anything else etcd answered.
    #[error("{0}")]
    Other(String),
}

impl EtcdError {
    pub(crate) fn new(op: impl Into<String>, kind: ErrorKind) -> Self {
        EtcdError { op: op.into(), kind, source: None }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        EtcdError::new("options", ErrorKind::Invalid(message.into()))
    }

    /// `op` got no answer within `after`; for callers that bound a call more tightly than
    /// the request timeout.
    pub fn timeout(op: impl Into<String>, after: Duration) -> Self {
        EtcdError::new(op, ErrorKind::Timeout(after))
    }

    /// Wraps an etcd-client error, classifying it.
    pub(crate) fn from_client(op: impl Into<String>, e: etcd_client::Error) -> Self {
        let kind = classify(&e);
        EtcdError { op: op.into(), kind, source: Some(e) }
    }

    /// What failed.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The operation, e.g. `put /mesh/services/greeter/10.0.0.5:50051`.
    pub fn op(&self) -> &str {
        &self.op
    }

    /// Whether the lease is gone, so a new one must be granted.
    pub fn is_lease_not_found(&self) -> bool {
        self.kind == ErrorKind::LeaseNotFound
    }

    /// Whether retrying later may succeed (etcd down, slow, or leaderless).
    pub fn is_transient(&self) -> bool {
        matches!(self.kind, ErrorKind::Unavailable(_) | ErrorKind::Timeout(_))
    }
}

fn classify(e: &etcd_client::Error) -> ErrorKind {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(status) => {
            let message = status.message();
            if message.contains("lease not found") {
                ErrorKind::LeaseNotFound
            } else if status.code() == tonic::Code::PermissionDenied || message.contains("permission denied") {
                ErrorKind::PermissionDenied(message.to_string())
            } else if message.contains("authentication failed")
                || message.contains("user name is empty")
                || message.contains("invalid auth token")
            {
                ErrorKind::AuthFailed(message.to_string())
            } else if message.contains("compacted") {
                ErrorKind::Compacted(0)
            } else {
                match status.code() {
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                        ErrorKind::Unavailable(message.to_string())
                    }
                    tonic::Code::DeadlineExceeded => ErrorKind::Unavailable(message.to_string()),
                    tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition | tonic::Code::OutOfRange => {
                        ErrorKind::Invalid(message.to_string())
                    }
                    _ => ErrorKind::Other(format!("{:?}: {message}", status.code())),
                }
            }
        }
        E::TransportError(t) => ErrorKind::Unavailable(mesh_util::error_chain(t)),
        E::IoError(io) => ErrorKind::Unavailable(io.to_string()),
        E::InvalidArgs(m) | E::EndpointError(m) => ErrorKind::Invalid(m.clone()),
        E::InvalidUri(u) => ErrorKind::Invalid(u.to_string()),
        // A keepalive stream reports a lease that is gone as a stream error.
        E::WatchError(m) | E::LeaseKeepAliveError(m) if m.contains("lease not found") => ErrorKind::LeaseNotFound,
        E::WatchError(m) | E::LeaseKeepAliveError(m) => ErrorKind::Unavailable(m.clone()),
        other => ErrorKind::Other(other.to_string()),
    }
}
