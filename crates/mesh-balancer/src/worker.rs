//! The balancer's background task. It applies endpoint-set updates as they arrive, whether
//! or not calls flow (tonic's `balance_channel` only applies them when polled by a call),
//! and switches strategies; each new snapshot is built on tokio's blocking pool, and only
//! the newest pending set is built, so a burst of updates costs one build. It also keeps
//! every endpoint connected: a new endpoint, or one whose connection closed, is connected
//! at once; one whose connect failed is probed with jittered exponential backoff until it
//! accepts connections again.
//!
//! Connects are keyed by the endpoint's connection state itself, not by its id: when an
//! id moves to another address it gets a new connection, and a late result for the old
//! address cannot mark the new one.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use mesh_util::Backoff;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::conn::{self, Conn, EndpointState};
use crate::snapshot::{Builder, Entry, Shared, Snapshot, Switch};
use crate::{EndpointSet, Strategy};

/// A snapshot built off the runtime, with who waits for it.
type Built<S> = (Vec<Arc<Entry<S>>>, crate::pick::Picker, Strategy, bool, Vec<oneshot::Sender<()>>);

/// Connecting one endpoint.
struct Attempt {
    conn: Arc<Conn>,
    uri: http::Uri,
    next_at: Instant,
    backoff: Backoff,
    running: bool,
}

pub(crate) async fn run<S, U>(
    shared: Weak<Shared<S>>,
    updates: U,
    mut switches: mpsc::UnboundedReceiver<Switch>,
    builder: Arc<Builder<S>>,
) where
    S: Clone + Send + Sync + 'static,
    U: Stream<Item = EndpointSet> + Send + 'static,
{
    let Some(mut changes) = shared.upgrade().map(|s| s.changes.subscribe()) else { return };
    let mut updates = Box::pin(updates);
    let mut updates_open = true;
    let (mut entries, mut strategy) = match shared.upgrade() {
        Some(s) => {
            let snap = s.snapshot();
            (snap.entries.clone(), snap.strategy.clone())
        }
        None => return,
    };
    let mut generation = 0u64;
    // Whether a set has been applied: until then a strategy switch publishes no endpoints
    // as if discovery had found none.
    let mut resolved = false;
    let mut pending_set: Option<EndpointSet> = None;
    let mut pending_switch: Option<Strategy> = None;
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    let mut building: Option<JoinHandle<Built<S>>> = None;
    let mut attempts: HashMap<usize, Attempt> = HashMap::new();
    let mut running: JoinSet<(usize, std::io::Result<conn::Io>)> = JoinSet::new();
    let timer = tokio::time::sleep_until(Instant::now());
    tokio::pin!(timer);
    // Endpoints that left the set with calls still in flight: retired once those end.
    let mut retiring: Vec<(Arc<Conn>, Arc<crate::snapshot::Stats>)> = Vec::new();
    let mut drain_tick = tokio::time::interval(RETIRE_CHECK);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Start a build when one is due and none runs.
        if building.is_none() && (pending_set.is_some() || pending_switch.is_some()) {
            let set = pending_set.take();
            let next = pending_switch.take().unwrap_or_else(|| strategy.clone());
            let previous = entries.clone();
            let acks = std::mem::take(&mut waiting);
            let builder = builder.clone();
            building = Some(tokio::task::spawn_blocking(move || {
                let applied = set.is_some();
                let entries = match set {
                    Some(set) => builder.entries(&previous, set),
                    None => previous,
                };
                let picker = Builder::picker(&next, &entries);
                (entries, picker, next, applied, acks)
            }));
        }
        // Attempts that are due start now (tokio's timer would only fire on its next
        // millisecond tick); the timer waits for the next one that is not.
        let now = Instant::now();
        for (key, a) in attempts.iter_mut().filter(|(_, a)| !a.running && a.next_at <= now) {
            a.running = true;
            let (key, uri, timeout) = (*key, a.uri.clone(), builder.config.connect_timeout);
            let tls = builder.config.tls.clone();
            running.spawn(async move { (key, conn::connect(&uri, timeout, tls.as_ref()).await) });
        }
        let next_attempt = attempts.values().filter(|a| !a.running).map(|a| a.next_at).min();
        if let Some(at) = next_attempt {
            timer.as_mut().reset(at);
        }
        tokio::select! {
            update = updates.next(), if updates_open => match update {
                Some(set) => pending_set = Some(set),
                None => {
                    updates_open = false;
                    debug!("endpoint updates ended; keeping the last set");
                }
            },
            switch = switches.recv() => match switch {
                Some((next, ack)) => {
                    pending_switch = Some(next);
                    waiting.push(ack);
                }
                // Every channel is gone.
                None => return,
            },
            built = async {
                match building.as_mut() {
                    Some(build) => build.await,
                    None => std::future::pending().await,
                }
            }, if building.is_some() => {
                building = None;
                let Ok((next_entries, picker, next, applied, acks)) = built else { continue };
                let Some(shared) = shared.upgrade() else { return };
                if next != strategy {
                    info!(service = %shared.service, from = %strategy, to = %next, "strategy switched");
                }
                log_update(&shared.service, &entries, &next_entries);
                // Endpoints that left: their connections end once their calls in flight
                // have, not when the last idle clone that still holds their channel calls
                // again.
                for gone in entries.iter().filter(|e| !next_entries.iter().any(|n| Arc::ptr_eq(&n.core, &e.core))) {
                    retiring.push((gone.core.conn.clone(), gone.core.stats.clone()));
                }
                retire_idle(&mut retiring);
                generation += 1;
                resolved |= applied;
                entries = next_entries;
                strategy = next;
                shared.publish(Snapshot {
                    generation,
                    resolved,
                    entries: entries.clone(),
                    picker,
                    strategy: strategy.clone(),
                });
                for ack in acks {
                    let _ = ack.send(());
                }
            }
            changed = changes.changed() => if changed.is_err() { return },
            _ = drain_tick.tick(), if !retiring.is_empty() => retire_idle(&mut retiring),
            // The attempts it was set for start at the top of the loop.
            () = &mut timer, if next_attempt.is_some() => {}
            Some(done) = running.join_next(), if !running.is_empty() => {
                if let Ok((key, result)) = done
                    && let Some(a) = attempts.get_mut(&key)
                {
                    a.running = false;
                    match result {
                        Ok(stream) => {
                            a.conn.connected(Some(stream));
                            attempts.remove(&key);
                        }
                        Err(e) => {
                            a.conn.failed(&e);
                            a.next_at = Instant::now() + a.backoff.next_delay();
                        }
                    }
                }
            }
        }
        reconcile(&entries, &mut attempts, &builder);
    }
}

/// How often endpoints that left with calls in flight are looked at again.
const RETIRE_CHECK: Duration = Duration::from_millis(500);

/// Retires the endpoints of `retiring` that have no call in flight left.
fn retire_idle(retiring: &mut Vec<(Arc<Conn>, Arc<crate::snapshot::Stats>)>) {
    retiring.retain(|(conn, stats)| {
        let busy = stats.in_flight() > 0;
        if !busy {
            conn.retire();
        }
        busy
    });
}

/// Starts connecting endpoints that need it; forgets attempts of endpoints that left or
/// connected by other means (tonic's own connect).
fn reconcile<S>(entries: &[Arc<Entry<S>>], attempts: &mut HashMap<usize, Attempt>, builder: &Builder<S>) {
    let cfg = &builder.config;
    let mut wanted = std::collections::HashSet::with_capacity(attempts.len());
    for e in entries {
        let conn = &e.core.conn;
        let key = Arc::as_ptr(conn) as usize;
        match conn.state() {
            EndpointState::Ready => continue,
            state => {
                wanted.insert(key);
                attempts.entry(key).or_insert_with(|| {
                    let mut backoff = Backoff::new(cfg.probe_backoff_min, cfg.probe_backoff_max);
                    // A connection that closed is connected again at once; an endpoint that
                    // tonic just failed to reach is most likely still gone.
                    let wait =
                        if state == EndpointState::Unreachable { backoff.next_delay() } else { Default::default() };
                    Attempt {
                        conn: conn.clone(),
                        uri: e.core.url.clone(),
                        next_at: Instant::now() + wait,
                        backoff,
                        running: false,
                    }
                });
            }
        }
    }
    // A running attempt is kept until it reports, so that its result lands on its own
    // connection state; one of an endpoint that left is dropped then.
    attempts.retain(|key, a| a.running || wanted.contains(key));
}

fn log_update<S>(service: &str, before: &[Arc<Entry<S>>], after: &[Arc<Entry<S>>]) {
    let old: std::collections::HashSet<*const crate::snapshot::Core<S>> =
        before.iter().map(|e| Arc::as_ptr(&e.core)).collect();
    let kept = after.iter().filter(|e| old.contains(&Arc::as_ptr(&e.core))).count();
    info!(
        service = %service,
        endpoints = after.len(),
        added = after.len() - kept,
        kept,
        removed = before.len() - kept,
        "endpoint set updated"
    );
}
