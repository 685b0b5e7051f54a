//! Each instance's applied status in etcd, under a lease (its own, or its registration's), so that an operator
//! sees which instance runs which revision and what it refused:
//! `etcdctl get --prefix /mesh/status/`.

use std::time::Duration;

use mesh_etcd::{Backoff, Etcd, EtcdError, KeyValue, LeaseKeepAlive, ListWatch, WatchEvent};
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
        Self::start(etcd, key.into(), instance.into(), ttl.max(Duration::from_secs(1)), status, |r, stop| r.run(stop))
    }

    /// Like [`StatusReport::spawn`], but under a lease someone else keeps: the lease of
    /// the instance's registration, as `lease` says it now; `None` while the instance
    /// holds no registration. The status then lives and dies with the registration: a
    /// second process started with the same instance id, waiting for the key another holds,
    /// never writes over the holder's status, and a lost lease takes the status with it
    /// until the next one is granted. [`StatusReport::stop`] revokes nothing (the
    /// registration's deregistration removes both).
    pub fn spawn_under(
        etcd: Etcd,
        key: impl Into<String>,
        instance: impl Into<String>,
        status: watch::Receiver<ConfigStatus>,
        lease: watch::Receiver<Option<i64>>,
    ) -> Self {
        // The TTL is the registration's business here.
        Self::start(etcd, key.into(), instance.into(), Duration::ZERO, status, |r, stop| r.run_under(lease, stop))
    }

    fn start<F, Fut>(
        etcd: Etcd,
        key: String,
        instance: String,
        ttl: Duration,
        status: watch::Receiver<ConfigStatus>,
        run: F,
    ) -> Self
    where
        F: FnOnce(Reporter, CancellationToken) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (lease_tx, lease) = watch::channel(None);
        let stop = CancellationToken::new();
        let reporter = Reporter { etcd: etcd.clone(), key: key.clone(), instance, ttl, status, lease: lease_tx };
        let task = tokio::spawn(run(reporter, stop.clone()));
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
    lease: watch::Sender<Option<i64>>,
}

impl Reporter {
    async fn run(mut self, stop: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), (self.ttl / 3).min(Duration::from_secs(3)));
        let mut warned = false;
        loop {
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
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    keepalive.refresh().await?;
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

    /// Writes the status under the lease `under` names, again on every change of either,
    /// and again whenever the key in etcd is not what was written (deleted, overwritten, or
    /// an older copy restored from a snapshot), as a registration is repaired.
    async fn run_under(mut self, mut under: watch::Receiver<Option<i64>>, stop: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
        let mut warned = false;
        // The lease the status in force was written under, and what was written.
        let mut written: Option<i64> = None;
        let mut value: Vec<u8> = Vec::new();
        // The revision of the last write: an event older than it (the watch delivering an
        // earlier write of ours after a later one) says nothing of what etcd holds now.
        let mut written_at: i64 = 0;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut own = ListWatch::key(self.etcd.clone(), self.key.clone());
        loop {
            let lease = *under.borrow_and_update();
            let due = retry_at.is_none_or(|at| at <= tokio::time::Instant::now());
            if let Some(lease) = lease.filter(|l| written != Some(*l) && due) {
                retry_at = None;
                match self.put(lease).await {
                    Ok((put, revision)) => {
                        if written.is_none() {
                            info!(key = %self.key, lease = %format!("{lease:x}"), "reporting the config status");
                        }
                        written = Some(lease);
                        value = put;
                        written_at = revision;
                        backoff.reset();
                        warned = false;
                    }
                    // The registration lost that lease; its next one is reported to us.
                    Err(e) if e.is_lease_not_found() => {
                        debug!(key = %self.key, "status report: {e}; waiting for the registration's next lease");
                        written = Some(lease);
                    }
                    Err(e) => {
                        if warned {
                            debug!(key = %self.key, "status report: {e}");
                        } else {
                            warn!(key = %self.key, "cannot write the config status yet, retrying: {e}");
                            warned = true;
                        }
                        retry_at = Some(tokio::time::Instant::now() + backoff.next_delay());
                    }
                }
            }
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = retry => {}
                changed = under.changed() => {
                    if changed.is_err() {
                        // The registration is gone: what was written stays until stopped.
                        stop.cancelled().await;
                        return;
                    }
                }
                changed = self.status.changed() => {
                    if changed.is_err() {
                        stop.cancelled().await;
                        return;
                    }
                    written = None;
                }
                event = own.next() => {
                    let ours = |kv: &KeyValue| written.is_some_and(|l| l == kv.lease) && kv.value == value;
                    let intact = match &event {
                        WatchEvent::Reset { kvs, revision, .. } => {
                            // A listing behind our last write (etcd restored from a snapshot)
                            // starts the revisions afresh: later events are compared to it.
                            written_at = written_at.min(*revision);
                            kvs.iter().find(|kv| kv.key == self.key).is_some_and(ours)
                        }
                        WatchEvent::Put(kv) => ours(kv) || kv.mod_revision < written_at,
                        // A deletion from before our last write (the watch delivering it late,
                        // after a restore) says nothing of what etcd holds now: the write came
                        // after it.
                        WatchEvent::Delete { revision, .. } => *revision < written_at,
                    };
                    // Written again under whatever lease the registration holds next, even
                    // when it holds none at this moment: a registration that puts its own
                    // key back under the same lease (none, then that lease again) would
                    // otherwise leave the status missing for good.
                    if !intact && written.is_some() {
                        info!(key = %self.key, "the config status in etcd is not what this instance wrote; writing it again");
                        written = None;
                    }
                }
            }
        }
    }

    /// Writes the status under `lease`; what was written, and at which revision.
    async fn put(&mut self, lease: i64) -> Result<(Vec<u8>, i64), EtcdError> {
        let status = AppliedStatus::of(&self.instance, &self.status.borrow_and_update());
        let value = serde_json::to_vec(&status).unwrap_or_default();
        let revision = self.etcd.put(&self.key, value.clone(), Some(lease)).await?;
        Ok((value, revision))
    }
}
