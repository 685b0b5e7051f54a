//! Each instance's applied status in etcd, under a lease of its own, so that an operator
//! sees which instance runs which revision and what it refused:
//! `etcdctl get --prefix /mesh/status/`.

use std::time::Duration;

use mesh_etcd::{Backoff, Etcd, EtcdError, LeaseKeepAlive};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{ConfigStatus, Rejection};

/// The key of an instance's applied status: `{root}/status/{service}/{instance_id}`.
pub fn status_key(root: &str, service: &str, instance_id: &str) -> String {
    format!("{}/status/{service}/{instance_id}", root.trim_end_matches('/'))
}

/// The JSON an instance writes at its status key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct AppliedStatus {
    /// The instance.
    pub instance: String,
    /// The revision of the config document it runs; `null` on its file and flag settings.
    pub revision: Option<i64>,
    /// Documents applied since it started.
    pub applied: u64,
    /// The last document it refused.
    pub last_rejection: Option<Rejection>,
}

impl AppliedStatus {
    fn of(instance: &str, status: &ConfigStatus) -> Self {
        AppliedStatus {
            instance: instance.to_string(),
            revision: status.revision,
            applied: status.applied,
            last_rejection: status.last_rejection.clone(),
        }
    }
}

/// Writes an instance's [`ConfigStatus`] to its status key whenever it changes, under a
/// lease it keeps alive (every TTL/3) and grants again when lost; etcd unreachable is
/// retried forever with backoff. [`StatusReport::stop`] revokes the lease, which removes
/// the key; dropping it leaves the key to expire with the lease.
#[derive(Debug)]
pub struct StatusReport {
    key: String,
    etcd: Etcd,
    lease: watch::Receiver<Option<i64>>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl StatusReport {
    /// Starts reporting `status` of `instance` at `key` with a lease of `ttl` (at least 1 s).
    pub fn spawn(
        etcd: Etcd,
        key: impl Into<String>,
        instance: impl Into<String>,
        ttl: Duration,
        status: watch::Receiver<ConfigStatus>,
    ) -> Self {
        let (always, gate) = watch::channel(true);
        let report = Self::spawn_while(etcd, key, instance, ttl, status, gate);
        // Nothing ever closes the gate: the report outlives the sender.
        drop(always);
        report
    }

    /// Like [`StatusReport::spawn`], but reports only while `gate` says so: a server
    /// reports only while it holds its instance id, so a second process started with the
    /// same id, waiting for the key, never writes over the status of the one that holds it.
    /// When the gate closes the lease is revoked (the key goes with it, if it is still
    /// ours); a gate whose sender is gone stays as it last was.
    pub fn spawn_while(
        etcd: Etcd,
        key: impl Into<String>,
        instance: impl Into<String>,
        ttl: Duration,
        status: watch::Receiver<ConfigStatus>,
        gate: watch::Receiver<bool>,
    ) -> Self {
        let key = key.into();
        let (lease_tx, lease) = watch::channel(None);
        let stop = CancellationToken::new();
        let reporter = Reporter {
            etcd: etcd.clone(),
            key: key.clone(),
            instance: instance.into(),
            ttl: ttl.max(Duration::from_secs(1)),
            status,
            gate,
            lease: lease_tx,
        };
        let task = tokio::spawn(reporter.run(stop.clone()));
        StatusReport { key, etcd, lease, stop, task: Some(task) }
    }

    /// The key it writes.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Stops reporting and revokes the lease (removing the key), within `timeout`.
    pub async fn stop(mut self, timeout: Duration) -> Result<(), EtcdError> {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let Some(lease) = *self.lease.borrow() else {
            return Ok(());
        };
        match tokio::time::timeout(timeout, self.etcd.revoke(lease)).await {
            Ok(Err(e)) if !e.is_lease_not_found() => Err(e),
            _ => Ok(()),
        }
    }
}

impl Drop for StatusReport {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

struct Reporter {
    etcd: Etcd,
    key: String,
    instance: String,
    ttl: Duration,
    status: watch::Receiver<ConfigStatus>,
    gate: watch::Receiver<bool>,
    lease: watch::Sender<Option<i64>>,
}

impl Reporter {
    async fn run(mut self, stop: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), (self.ttl / 3).min(Duration::from_secs(3)));
        let mut warned = false;
        loop {
            let gate = &mut self.gate;
            let opened = async move {
                // A gate whose sender is gone stays as it last was.
                if gate.wait_for(|open| *open).await.is_err() && !*gate.borrow() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = opened => {}
            }
            let result = tokio::select! {
                () = stop.cancelled() => return,
                r = self.session(&stop) => r,
            };
            if let Err(e) = result {
                if warned {
                    debug!(key = %self.key, "status report: {e}");
                } else {
                    warn!(key = %self.key, "cannot write the config status yet, retrying: {e}");
                    warned = true;
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// One lease's life: grant, put, then keep it alive and put again on every change,
    /// until something fails.
    async fn session(&mut self, stop: &CancellationToken) -> Result<(), EtcdError> {
        let lease = self.etcd.grant(self.ttl).await?;
        self.lease.send_replace(Some(lease.id));
        let mut keepalive: LeaseKeepAlive = self.etcd.keep_alive(lease.id).await?;
        self.put(lease.id).await?;
        info!(key = %self.key, "reporting the config status");
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.tick().await;
        let mut gate = self.gate.clone();
        let closed = async move {
            if gate.wait_for(|open| !*open).await.is_err() {
                // The gate's sender is gone: it stays open.
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(closed);
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    keepalive.refresh().await?;
                }
                () = &mut closed => {
                    info!(key = %self.key, "no longer reporting the config status: another instance holds the id");
                    self.lease.send_replace(None);
                    return self.etcd.revoke(lease.id).await;
                }
                changed = self.status.changed() => {
                    if changed.is_err() {
                        // The configuration is gone; keep the last status until stopped.
                        stop.cancelled().await;
                        return Ok(());
                    }
                    self.put(lease.id).await?;
                }
            }
        }
    }

    async fn put(&mut self, lease: i64) -> Result<(), EtcdError> {
        let status = AppliedStatus::of(&self.instance, &self.status.borrow_and_update());
        let value = serde_json::to_vec(&status).unwrap_or_default();
        self.etcd.put(&self.key, value, Some(lease)).await?;
        Ok(())
    }
}
