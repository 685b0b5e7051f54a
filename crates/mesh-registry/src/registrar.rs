//! Keeping an instance registered, whatever etcd does.
//!
//! A [`Registration`] owns a task that grants a lease (TTL default 10 s), puts the key with
//! it, and then keeps it: a keepalive every TTL/3 that checks the TTL etcd answers is above
//! 0, and a watch on its own key that puts it back if someone deletes it. When the lease is
//! lost (TTL 0, "lease not found", etcd restored or rebuilt) it grants a new one and puts
//! the same key again. When etcd is unreachable it keeps trying forever with jittered
//! backoff, at most TTL/3 apart so that a lease that survived an etcd restart is refreshed
//! before it expires; the first failure is logged once as a warning with a hint.

use std::sync::Arc;
use std::time::Duration;

use mesh_etcd::{Backoff, Etcd, EtcdError, ListWatch, WatchEvent};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{Instance, RegistryError};

/// Settings of a [`Registrar`].
#[derive(Debug, Clone)]
pub struct RegistrarConfig {
    /// Root prefix of mesh's keys (default `/mesh`).
    pub root: String,
    /// Lease TTL (default 10 s, at least 1 s); the key disappears this long after the
    /// process dies without deregistering.
    pub ttl: Duration,
}

impl Default for RegistrarConfig {
    fn default() -> Self {
        RegistrarConfig { root: crate::DEFAULT_ROOT.into(), ttl: Duration::from_secs(10) }
    }
}

/// Registers instances in etcd.
#[derive(Debug, Clone)]
pub struct Registrar {
    etcd: Etcd,
    config: RegistrarConfig,
}

/// What a [`Registration`] is doing, as its task last reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistrationState {
    /// Whether the key was put with a live lease and the lease was last seen alive.
    pub registered: bool,
    /// The lease in use, if any.
    pub lease: Option<i64>,
    /// How many times the key was put (1 if nothing ever went wrong).
    pub puts: u64,
    /// How many leases were granted (1 if the first was never lost).
    pub leases_granted: u64,
    /// How many keepalives etcd answered.
    pub keepalives: u64,
    /// The last error, until the next success.
    pub last_error: Option<String>,
}

/// A registered instance. Dropping it stops the task without deregistering (the key then
/// expires with its lease, as after a crash); call [`Registration::deregister`] to leave
/// cleanly.
#[derive(Debug)]
pub struct Registration {
    key: String,
    etcd: Etcd,
    state: watch::Receiver<RegistrationState>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Registrar {
    /// A registrar writing through `etcd`.
    pub fn new(etcd: Etcd, config: RegistrarConfig) -> Self {
        Registrar { etcd, config }
    }

    /// Spawns the task that registers `instance` and keeps it registered. Returns at once,
    /// whether or not etcd is reachable.
    pub fn spawn(&self, instance: &Instance) -> Registration {
        let key = instance.key(&self.config.root);
        let value: Arc<str> = instance.encode().into();
        let (tx, state) = watch::channel(RegistrationState::default());
        let stop = CancellationToken::new();
        let keeper = Keeper {
            etcd: self.etcd.clone(),
            key: key.clone(),
            value,
            ttl: self.config.ttl.max(Duration::from_secs(1)),
            state: tx,
        };
        let task = tokio::spawn(keeper.run(stop.clone()));
        Registration { key, etcd: self.etcd.clone(), state, stop, task: Some(task) }
    }
}

impl Registration {
    /// The key it keeps.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The state, updated as it changes.
    pub fn state(&self) -> watch::Receiver<RegistrationState> {
        self.state.clone()
    }

    /// Waits until the key is registered, at most `timeout`; returns whether it is.
    pub async fn wait_registered(&self, timeout: Duration) -> bool {
        let mut state = self.state.clone();
        tokio::time::timeout(timeout, state.wait_for(|s| s.registered)).await.is_ok_and(|r| r.is_ok())
    }

    /// Stops keeping the key, deletes it (so watchers see it go at once, not after the
    /// TTL) and revokes the lease, all within `timeout`.
    pub async fn deregister(mut self, timeout: Duration) -> Result<(), RegistryError> {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let (lease, puts) = {
            let state = self.state.borrow();
            (state.lease, state.puts)
        };
        let key = self.key.clone();
        if lease.is_none() && puts == 0 {
            // Never got as far as a lease (etcd unreachable all along): nothing to remove.
            info!(key = %key, "never registered; nothing to deregister");
            return Ok(());
        }
        let work = async {
            self.etcd.delete(&key).await?;
            if let Some(lease) = lease {
                self.etcd.revoke(lease).await?;
            }
            Ok::<(), EtcdError>(())
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok(())) => {
                info!(key = %key, "deregistered");
                Ok(())
            }
            Ok(Err(source)) => Err(RegistryError::Deregister { key, source }),
            Err(_) => Err(RegistryError::DeregisterTimeout { key, timeout }),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

// === impl Keeper ===

struct Keeper {
    etcd: Etcd,
    key: String,
    value: Arc<str>,
    ttl: Duration,
    state: watch::Sender<RegistrationState>,
}

/// Why keeping the key stopped.
enum Lost {
    /// The lease is gone: grant a new one.
    Lease,
    /// etcd failed: retry after a backoff with the same lease.
    Etcd(EtcdError),
}

impl Keeper {
    async fn run(self, stop: CancellationToken) {
        tokio::select! {
            () = stop.cancelled() => {}
            () = self.keep() => {}
        }
    }

    /// Bounds one etcd call by a third of the TTL: a call that hangs longer (etcd electing a
    /// leader, a member gone) would let a live lease expire before the next attempt.
    async fn bounded<T>(
        &self,
        op: &str,
        call: impl std::future::Future<Output = Result<T, EtcdError>>,
    ) -> Result<T, EtcdError> {
        let limit = (self.ttl / 3).min(self.etcd.options().request_timeout);
        tokio::time::timeout(limit, call)
            .await
            .unwrap_or_else(|_| Err(EtcdError::timeout(format!("{op} {}", self.key), limit)))
    }

    async fn keep(&self) {
        let max = self.etcd.options().retry_backoff_max.min(self.ttl / 3).max(Duration::from_millis(100));
        let mut backoff = Backoff::new(Duration::from_millis(100), max);
        let mut lease: Option<i64> = None;
        let mut warned = false;
        loop {
            let id = match lease {
                Some(id) => id,
                None => match self.bounded("grant a lease for", self.etcd.grant(self.ttl)).await {
                    Ok(l) => {
                        self.state.send_modify(|s| s.leases_granted += 1);
                        l.id
                    }
                    Err(e) => {
                        self.failed(&e, &mut warned);
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                },
            };
            let revision = match self.bounded("put", self.etcd.put(&self.key, self.value.as_bytes(), Some(id))).await {
                Ok(revision) => revision,
                Err(e) if e.is_lease_not_found() => {
                    info!(key = %self.key, lease = %format!("{id:x}"), "lease lost; granting a new one");
                    lease = None;
                    continue;
                }
                Err(e) => {
                    lease = Some(id);
                    self.failed(&e, &mut warned);
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            lease = Some(id);
            backoff.reset();
            if warned {
                info!(key = %self.key, "etcd is back; registered");
                warned = false;
            } else {
                info!(key = %self.key, lease = %format!("{id:x}"), ttl = ?self.ttl, "registered");
            }
            self.state.send_modify(|s| {
                s.registered = true;
                s.lease = Some(id);
                s.puts += 1;
                s.last_error = None;
            });
            match self.maintain(id, revision).await {
                Lost::Lease => {
                    warn!(key = %self.key, lease = %format!("{id:x}"), "lease lost (expired, revoked, or etcd lost its data); registering again");
                    self.state.send_modify(|s| s.registered = false);
                    lease = None;
                }
                Lost::Etcd(e) => {
                    self.failed(&e, &mut warned);
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// Keeps lease `id` alive and the key present until something is lost.
    async fn maintain(&self, id: i64, put_revision: i64) -> Lost {
        let mut keepalive = match self.bounded("keep alive", self.etcd.keep_alive(id)).await {
            Ok(k) => k,
            Err(e) if e.is_lease_not_found() => return Lost::Lease,
            Err(e) => return Lost::Etcd(e),
        };
        let mut own = ListWatch::resume_key(self.etcd.clone(), self.key.clone(), put_revision + 1);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + self.ttl / 3, self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => match self.bounded("keep alive", keepalive.refresh()).await {
                    Ok(ttl) => {
                        debug!(key = %self.key, ttl, "lease refreshed");
                        self.state.send_modify(|s| {
                            s.registered = true;
                            s.keepalives += 1;
                            s.last_error = None;
                        });
                    }
                    Err(e) if e.is_lease_not_found() => return Lost::Lease,
                    Err(e) => return Lost::Etcd(e),
                },
                event = own.next() => {
                    let gone = match &event {
                        WatchEvent::Delete { .. } => true,
                        WatchEvent::Reset { kvs, .. } => !kvs.iter().any(|kv| kv.lease == id),
                        WatchEvent::Put(kv) => kv.lease != id,
                    };
                    if gone {
                        warn!(key = %self.key, "our key was deleted or replaced; putting it back");
                        match self.bounded("put", self.etcd.put(&self.key, self.value.as_bytes(), Some(id))).await {
                            Ok(_) => self.state.send_modify(|s| s.puts += 1),
                            Err(e) if e.is_lease_not_found() => return Lost::Lease,
                            Err(e) => return Lost::Etcd(e),
                        }
                    }
                }
            }
        }
    }

    fn failed(&self, e: &EtcdError, warned: &mut bool) {
        if *warned {
            debug!(key = %self.key, "{e}");
        } else {
            warn!(
                key = %self.key,
                "cannot register in etcd at {}: {e}; serving anyway and registering when etcd comes (for a local one: `cargo xtask etcd-up`)",
                self.etcd.endpoints()
            );
            *warned = true;
        }
        let message = e.to_string();
        self.state.send_modify(|s| {
            s.registered = false;
            s.last_error = Some(message);
        });
    }
}
