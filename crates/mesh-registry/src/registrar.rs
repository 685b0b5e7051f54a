//! Keeping an instance registered, whatever etcd does.
//!
//! A [`Registration`] owns a task that grants a lease (TTL default 10 s), puts the key with
//! it, and then keeps it: a keepalive every TTL/3 that checks the TTL etcd answers is above
//! 0, and one watch on its own key, kept for the registration's whole life, that puts the
//! key back if someone deletes it. When the lease is lost (TTL 0, "lease not found", etcd
//! restored or rebuilt) it grants a new one and puts the same key again. When etcd is
//! unreachable it keeps trying forever with jittered backoff, at most TTL/3 apart so that a
//! lease that survived an etcd restart is refreshed before it expires; the first failure is
//! logged once as a warning with a hint.
//!
//! Every put is a compare-and-put against the revision the watch last showed, so two
//! writers of one key cannot both win. A key held by another live lease is never taken: two
//! servers started with one instance id would otherwise overwrite each other forever, and
//! etcd, which keeps every revision until compaction, would fill up to its space quota and
//! stop taking writes for the whole cluster. The second server logs an error naming the key
//! and the other address, and registers once the key is free (the other deregistered, or
//! its lease expired). Two exceptions take the key at once: a key of one of this
//! registration's own earlier leases, and, before this registration ever held the key, a
//! key that names this very address, which is this instance's previous run, restarted
//! before its lease expired.

use std::sync::Arc;
use std::time::Duration;

use mesh_etcd::{Backoff, Etcd, EtcdError, KeyValue, LeaseKeepAlive, ListWatch, WatchEvent};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

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
#[non_exhaustive]
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
    /// While another live instance holds the key: its address (as its value names it).
    pub conflict: Option<String>,
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
        let (tx, state) = watch::channel(RegistrationState::default());
        let stop = CancellationToken::new();
        let keeper = Keeper {
            etcd: self.etcd.clone(),
            key: key.clone(),
            prefix: crate::prefix(&self.config.root, &instance.service),
            addr: instance.addr.clone(),
            value: instance.encode().into(),
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

    /// Stops keeping the key and revokes its lease within `timeout`, which deletes the key
    /// at once (watchers see it go now, not after the TTL) if this registration holds it,
    /// and leaves it alone if another instance does.
    pub async fn deregister(mut self, timeout: Duration) -> Result<(), RegistryError> {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let lease = self.state.borrow().lease;
        let key = self.key.clone();
        let Some(lease) = lease else {
            // Never got as far as a lease (etcd unreachable all along): nothing to remove.
            info!(key = %key, "never registered; nothing to deregister");
            return Ok(());
        };
        match tokio::time::timeout(timeout, self.etcd.revoke(lease)).await {
            Ok(Ok(())) => {
                info!(key = %key, "deregistered");
                Ok(())
            }
            Ok(Err(e)) if e.is_lease_not_found() => {
                info!(key = %key, "deregistered (the lease had already expired with the key)");
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
    /// The prefix the key lives under, to read another holder's value.
    prefix: String,
    addr: String,
    value: Arc<str>,
    ttl: Duration,
    state: watch::Sender<RegistrationState>,
}

/// How many of its own earlier leases a registration remembers, to recognise its key
/// under one of them (say, in a restored etcd) and take it back.
const OWN_LEASES_KEPT: usize = 8;

/// What the keeper knows and holds.
#[derive(Default)]
struct Session {
    /// The lease to put with, once granted; it may have expired since.
    lease: Option<i64>,
    /// When etcd last confirmed `lease` alive (granted or refreshed).
    lease_confirmed: Option<Instant>,
    keepalive: Option<LeaseKeepAlive>,
    /// Leases this registration granted, newest last.
    own_leases: Vec<i64>,
    /// The key is ours: put with `lease`, and not seen deleted or taken since.
    holding: bool,
    /// This registration held the key at least once.
    ever_held: bool,
    /// A keepalive is due (the tick came, or the last one failed).
    refresh_due: bool,
    /// The watch showed the key held deleted or replaced: read it to tell a real loss
    /// from an event older than our own put.
    verify: bool,
    /// The watch showed the key under our lease with a value that is not ours (an
    /// `etcdctl put --ignore-lease`): put ours back over the key at this revision.
    repair: Option<i64>,
    /// What the key holds, as the watch or a read last showed it; `None` until known.
    view: Option<Option<KeyValue>>,
    /// The key changed under an attempt, or another live instance holds it: wait until the
    /// watch shows something new.
    waiting: bool,
    /// The lease of the other holder last logged, so a conflict is logged once, not on
    /// every event.
    conflict_logged: Option<i64>,
    /// The kind of failure last logged as a warning; later ones of the same kind go to
    /// debug until a success, and one of another kind (a refusal after a timeout) is a
    /// warning again, so the log always says the reason that holds now.
    warned: Option<FailureKind>,
}

/// What a failure to register says to an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureKind {
    /// etcd refused: a role or the credentials are wrong.
    Refused,
    /// etcd did not answer, or answered with some other error.
    Unreachable,
}

/// Why a step failed.
enum Failed {
    /// The lease is gone: grant a new one and put again, at once.
    Lease,
    /// etcd failed: retry after a backoff.
    Etcd(EtcdError),
}

impl From<EtcdError> for Failed {
    fn from(e: EtcdError) -> Self {
        if e.is_lease_not_found() { Failed::Lease } else { Failed::Etcd(e) }
    }
}

impl Keeper {
    async fn run(self, stop: CancellationToken) {
        tokio::select! {
            () = stop.cancelled() => {}
            () = self.keep() => {}
        }
    }

    /// A third of the TTL: how often the lease is refreshed, and the longest any one etcd
    /// call or backoff may take, so that a live lease is never let expire.
    fn step(&self) -> Duration {
        self.ttl / 3
    }

    /// Bounds one etcd call by a third of the TTL: a call that hangs longer (etcd electing a
    /// leader, a member gone) would let a live lease expire before the next attempt.
    async fn bounded<T>(
        &self,
        op: &str,
        call: impl std::future::Future<Output = Result<T, EtcdError>>,
    ) -> Result<T, EtcdError> {
        let limit = self.step().min(self.etcd.options().request_timeout);
        tokio::time::timeout(limit, call)
            .await
            .unwrap_or_else(|_| Err(EtcdError::timeout(format!("{op} {}", self.key), limit)))
    }

    async fn keep(&self) {
        let max = self.etcd.options().retry_backoff_max.min(self.step()).max(Duration::from_millis(100));
        let mut backoff = Backoff::new(Duration::from_millis(100), max);
        // One watch for the registration's whole life; its backoff is a deadline bounded
        // like ours, so a deleted key is noticed within TTL/3 even right after an outage.
        let mut own = ListWatch::key(self.etcd.clone(), self.key.clone()).with_backoff_max(max);
        let mut tick = tokio::time::interval_at(Instant::now() + self.step(), self.step());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut s = Session::default();
        let mut retry_at = Instant::now();
        loop {
            let act = if s.holding { s.refresh_due || s.verify || s.repair.is_some() } else { !s.waiting };
            // A step that is due runs at once: tokio's timer would only fire on its next
            // millisecond tick.
            if act && retry_at <= Instant::now() {
                let result = if !s.holding {
                    self.acquire(&mut s).await
                } else if s.verify {
                    self.verify(&mut s).await
                } else if let Some(revision) = s.repair {
                    self.repair(&mut s, revision).await
                } else {
                    self.refresh(&mut s).await
                };
                retry_at = Instant::now();
                match result {
                    Ok(()) => backoff.reset(),
                    Err(Failed::Lease) => self.lease_lost(&mut s),
                    Err(Failed::Etcd(e)) => {
                        self.failed(&e, &mut s);
                        retry_at += backoff.next_delay();
                    }
                }
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep_until(retry_at), if act => {}
                _ = tick.tick() => s.refresh_due = s.holding,
                event = own.next() => self.observe(&mut s, event),
            }
        }
    }

    /// Puts the key if it is free or ours to take; otherwise waits for the watch.
    async fn acquire(&self, s: &mut Session) -> Result<(), Failed> {
        loop {
            // Before the key is known it is taken to be absent: right in the common case,
            // and a put that finds it present fails harmlessly and reads it.
            let expected = match &s.view {
                Some(Some(kv)) => match self.holder(s, kv) {
                    None => Ok(kv.mod_revision),
                    Some(other) => Err((kv.lease, other)),
                },
                _ => Ok(0),
            };
            let expected = match expected {
                Ok(revision) => revision,
                Err((lease, other)) => {
                    self.conflict(s, lease, other);
                    s.waiting = true;
                    return Ok(());
                }
            };
            // A lease etcd last confirmed more than TTL/3 ago (granted before a wait for a
            // key another instance held, say) may expire right after the put, which would
            // lose the key again at once: take a fresh one.
            let id = match s.lease {
                Some(id) if s.lease_confirmed.is_some_and(|at| at.elapsed() < self.step()) => id,
                _ => {
                    s.keepalive = None;
                    self.grant(s).await?
                }
            };
            let put = self.etcd.put_if(&self.key, self.value.as_bytes(), Some(id), expected);
            if self.bounded("put", put).await?.is_some() {
                break;
            }
            // The key changed since we last saw it: read it, and decide again.
            debug!(key = %self.key, expected, "the key changed under the put; reading it");
            s.view = Some(self.bounded("get", self.etcd.get(&self.key)).await?);
        }
        s.holding = true;
        s.ever_held = true;
        s.refresh_due = false;
        s.verify = false;
        s.repair = None;
        s.conflict_logged = None;
        let id = s.lease.unwrap_or_default();
        if s.warned.take().is_some() {
            info!(key = %self.key, "etcd is back; registered");
        } else {
            info!(key = %self.key, lease = %format!("{id:x}"), ttl = ?self.ttl, "registered");
        }
        self.state.send_modify(|st| {
            st.registered = true;
            st.lease = Some(id);
            st.puts += 1;
            st.last_error = None;
            st.conflict = None;
        });
        Ok(())
    }

    async fn grant(&self, s: &mut Session) -> Result<i64, Failed> {
        let lease = self.bounded("grant a lease for", self.etcd.grant(self.ttl)).await?;
        s.lease = Some(lease.id);
        s.lease_confirmed = Some(Instant::now());
        s.own_leases.push(lease.id);
        if s.own_leases.len() > OWN_LEASES_KEPT {
            s.own_leases.remove(0);
        }
        self.state.send_modify(|st| {
            st.leases_granted += 1;
            st.lease = Some(lease.id);
        });
        Ok(lease.id)
    }

    /// Reads the key after the watch showed it gone or replaced while we held it.
    async fn verify(&self, s: &mut Session) -> Result<(), Failed> {
        let now = self.bounded("get", self.etcd.get(&self.key)).await?;
        s.verify = false;
        match &now {
            // An event from before our own put: the key is still ours.
            Some(kv) if Some(kv.lease) == s.lease => {}
            Some(kv) => {
                s.holding = false;
                let by = Instance::decode(&self.prefix, &kv.key, &kv.value).map_or_else(|e| e.to_string(), |i| i.addr);
                warn!(key = %self.key, other = %by, "our key was replaced by another lease");
                self.state.send_modify(|st| st.registered = false);
            }
            None => {
                s.holding = false;
                warn!(key = %self.key, "our key was deleted; putting it back");
                self.state.send_modify(|st| st.registered = false);
            }
        }
        s.view = Some(now);
        Ok(())
    }

    /// Puts our value back over one someone wrote under our lease, if the key is still at
    /// `revision`; otherwise the watch shows what it became, and we decide again.
    async fn repair(&self, s: &mut Session, revision: i64) -> Result<(), Failed> {
        let put = self.etcd.put_if(&self.key, self.value.as_bytes(), s.lease, revision);
        let done = self.bounded("put", put).await?;
        s.repair = None;
        if done.is_some() {
            warn!(key = %self.key, "our key held another value under our lease; put ours back");
            self.state.send_modify(|st| st.puts += 1);
        }
        Ok(())
    }

    /// Refreshes the lease of the key held.
    async fn refresh(&self, s: &mut Session) -> Result<(), Failed> {
        let Some(id) = s.lease else { return Err(Failed::Lease) };
        let keepalive = match &mut s.keepalive {
            Some(k) => k,
            None => s.keepalive.insert(self.bounded("keep alive", self.etcd.keep_alive(id)).await?),
        };
        match self.bounded("keep alive", keepalive.refresh()).await {
            Ok(ttl) => {
                debug!(key = %self.key, ttl, "lease refreshed");
                s.lease_confirmed = Some(Instant::now());
                s.refresh_due = false;
                if s.warned.take().is_some() {
                    info!(key = %self.key, "etcd is back; the lease is alive");
                }
                self.state.send_modify(|st| {
                    st.registered = true;
                    st.keepalives += 1;
                    st.last_error = None;
                });
                Ok(())
            }
            Err(e) => {
                // A failed stream is opened anew on the next attempt.
                s.keepalive = None;
                Err(e.into())
            }
        }
    }

    /// Who else holds the key, if anyone may not be displaced: `None` when it is ours to
    /// take, else the other holder's address.
    fn holder(&self, s: &Session, kv: &KeyValue) -> Option<String> {
        if kv.lease == 0 || s.own_leases.contains(&kv.lease) {
            // No live lease holds it (written by hand), or it is ours from before.
            return None;
        }
        let addr = match Instance::decode(&self.prefix, &kv.key, &kv.value) {
            Ok(other) => other.addr,
            Err(e) => format!("an unreadable value ({e})"),
        };
        if !s.ever_held && addr == self.addr {
            info!(
                key = %self.key,
                lease = %format!("{:x}", kv.lease),
                "replacing the registration left by a previous run at this address"
            );
            return None;
        }
        Some(addr)
    }

    fn conflict(&self, s: &mut Session, lease: i64, other: String) {
        if s.conflict_logged != Some(lease) {
            s.conflict_logged = Some(lease);
            error!(
                key = %self.key,
                other = %other,
                lease = %format!("{lease:x}"),
                "not registering: {} is held by another live instance at {other}; do two servers share one instance id? registering once the key is free",
                self.key
            );
        }
        self.state.send_modify(|st| {
            st.registered = false;
            st.conflict = Some(other);
        });
    }

    /// Applies what the watch saw of the key.
    fn observe(&self, s: &mut Session, event: WatchEvent) {
        let now = match event {
            WatchEvent::Reset { kvs, .. } => kvs.into_iter().find(|kv| kv.key == self.key),
            WatchEvent::Put(kv) => Some(kv),
            WatchEvent::Delete { .. } => None,
        };
        s.waiting = false;
        s.repair = None;
        if s.holding && now.as_ref().is_none_or(|kv| Some(kv.lease) != s.lease) {
            // The event may predate our own put (revisions cannot tell: etcd may have been
            // rebuilt since), so read the key before giving it up.
            s.verify = true;
        } else if let Some(kv) = now.as_ref().filter(|kv| s.holding && kv.value != self.value.as_bytes()) {
            s.repair = Some(kv.mod_revision);
        }
        s.view = Some(now);
    }

    fn lease_lost(&self, s: &mut Session) {
        match s.lease.take() {
            Some(id) if s.holding => warn!(
                key = %self.key,
                lease = %format!("{id:x}"),
                "lease lost (expired, revoked, or etcd lost its data); registering again"
            ),
            // A lease granted for a put that found the key taken, and left to expire while
            // waiting for it: nothing was lost.
            Some(id) => {
                debug!(key = %self.key, lease = %format!("{id:x}"), "the lease granted before waiting expired; granting another")
            }
            None => {}
        }
        s.keepalive = None;
        s.holding = false;
        self.state.send_modify(|st| {
            st.registered = false;
            st.lease = None;
        });
    }

    fn failed(&self, e: &EtcdError, s: &mut Session) {
        let kind = match e.kind() {
            mesh_etcd::ErrorKind::PermissionDenied(_) | mesh_etcd::ErrorKind::AuthFailed(_) => FailureKind::Refused,
            _ => FailureKind::Unreachable,
        };
        if s.warned == Some(kind) {
            debug!(key = %self.key, "{e}");
        } else {
            match kind {
                FailureKind::Refused => warn!(
                    key = %self.key,
                    "cannot register in etcd at {}: {e}; serving anyway, unregistered, and trying again \
                     (a server of this service needs readwrite on {} in etcd)",
                    self.etcd.endpoints(),
                    self.prefix
                ),
                FailureKind::Unreachable => warn!(
                    key = %self.key,
                    "cannot register in etcd at {}: {e}; serving anyway and registering when etcd comes (for a local one: `cargo xtask etcd-up`)",
                    self.etcd.endpoints()
                ),
            }
            s.warned = Some(kind);
        }
        let message = e.to_string();
        self.state.send_modify(|st| {
            st.registered = false;
            st.last_error = Some(message);
        });
    }
}
