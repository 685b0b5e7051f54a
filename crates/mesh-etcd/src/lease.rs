use std::time::Duration;

use crate::{ErrorKind, EtcdError};

/// A keepalive stream for one lease: each [`LeaseKeepAlive::refresh`] sends one keepalive
/// and waits for its answer. etcd-client runs no loop of its own; the caller decides when.
#[derive(Debug)]
pub struct LeaseKeepAlive {
    id: i64,
    keeper: etcd_client::LeaseKeeper,
    stream: etcd_client::LeaseKeepAliveStream,
    timeout: Duration,
}

impl LeaseKeepAlive {
    pub(crate) fn new(
        id: i64,
        keeper: etcd_client::LeaseKeeper,
        stream: etcd_client::LeaseKeepAliveStream,
        timeout: Duration,
    ) -> Self {
        LeaseKeepAlive { id, keeper, stream, timeout }
    }

    /// The lease id.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Refreshes the lease; returns the TTL etcd reset it to. A TTL of 0 or less means the
    /// lease is gone ([`ErrorKind::LeaseNotFound`]); a stream that ended means etcd went
    /// away ([`ErrorKind::Unavailable`]): open a new stream to try again.
    pub async fn refresh(&mut self) -> Result<i64, EtcdError> {
        let op = || format!("keep lease {:x} alive", self.id);
        let exchange = async {
            self.keeper.keep_alive().await?;
            self.stream.message().await
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Err(EtcdError::timeout(op(), self.timeout)),
            Ok(Err(e)) => Err(EtcdError::from_client(op(), e)),
            Ok(Ok(None)) => Err(EtcdError::new(op(), ErrorKind::Unavailable("keepalive stream ended".into()))),
            Ok(Ok(Some(resp))) if resp.ttl() <= 0 => Err(EtcdError::new(op(), ErrorKind::LeaseNotFound)),
            Ok(Ok(Some(resp))) => Ok(resp.ttl()),
        }
    }
}
