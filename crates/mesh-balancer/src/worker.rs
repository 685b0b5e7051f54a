//! The balancer's background task: applies endpoint-set updates as they arrive, whether or
//! not calls flow (tonic's `balance_channel` only applies them when polled by a call), and
//! probes endpoints that are new or went down with a TCP connect, with jittered exponential
//! backoff, so that a dead endpoint is skipped until it accepts connections again.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use rand::Rng as _;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::EndpointSet;
use crate::balanced::Shared;
use crate::connector::{self, Liveness};

/// Backoff of the probes of one endpoint.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProbeBackoff {
    pub(crate) min: Duration,
    pub(crate) max: Duration,
    pub(crate) timeout: Duration,
}

struct Probe {
    live: Arc<Liveness>,
    uri: http::Uri,
    next_at: Instant,
    backoff: Duration,
    running: bool,
}

pub(crate) async fn run<S, U>(shared: Weak<Shared<S>>, updates: U, backoff: ProbeBackoff)
where
    S: Clone + Send + Sync + 'static,
    U: Stream<Item = EndpointSet> + Send + 'static,
{
    let Some(went_down) = shared.upgrade().map(|s| s.went_down.clone()) else {
        return;
    };
    let mut updates = Box::pin(updates);
    let mut updates_open = true;
    let mut probes: HashMap<String, Probe> = HashMap::new();
    let mut running: JoinSet<(String, std::io::Result<()>)> = JoinSet::new();
    loop {
        let next_probe = probes.values().filter(|p| !p.running).map(|p| p.next_at).min();
        tokio::select! {
            update = updates.next(), if updates_open => match update {
                Some(set) => match shared.upgrade() {
                    Some(shared) => shared.apply(set),
                    None => return,
                },
                None => {
                    updates_open = false;
                    debug!("endpoint updates ended; keeping the last set");
                }
            },
            () = went_down.notified() => {}
            () = sleep_until(next_probe) => {
                let now = Instant::now();
                for (id, p) in probes.iter_mut().filter(|(_, p)| !p.running && p.next_at <= now) {
                    p.running = true;
                    let (id, uri, timeout) = (id.clone(), p.uri.clone(), backoff.timeout);
                    running.spawn(async move {
                        let result = connector::connect(&uri, timeout).await.map(drop);
                        (id, result)
                    });
                }
            }
            Some(done) = running.join_next(), if !running.is_empty() => {
                if let Ok((id, result)) = done {
                    finish_probe(&mut probes, &id, result, backoff);
                }
            }
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        schedule(&shared, &mut probes, backoff);
    }
}

fn finish_probe(probes: &mut HashMap<String, Probe>, id: &str, result: std::io::Result<()>, backoff: ProbeBackoff) {
    let Some(p) = probes.get_mut(id) else { return };
    p.running = false;
    match result {
        Ok(()) => {
            if p.live.is_down() {
                info!(endpoint = %id, "endpoint reachable again");
            }
            p.live.set_idle();
            probes.remove(id);
        }
        Err(e) => {
            if !p.live.is_down() {
                info!(endpoint = %id, "endpoint unreachable, skipping it: {e}");
            }
            p.live.set_down();
            p.backoff = (p.backoff * 2).min(backoff.max);
            p.next_at = Instant::now() + jitter(p.backoff);
        }
    }
}

/// Adds a probe for each endpoint that is new or down and has none; drops probes of
/// endpoints that left the set.
fn schedule<S>(shared: &Shared<S>, probes: &mut HashMap<String, Probe>, backoff: ProbeBackoff) {
    let snap = shared.snapshot();
    let now = Instant::now();
    for e in &snap.entries {
        let live = &e.core.live;
        if (live.is_new() || live.is_down()) && !probes.contains_key(&e.endpoint.id) {
            // A new endpoint is probed at once; one that just died after a short pause, as
            // its server is most likely still gone.
            let first = if live.is_new() { Duration::ZERO } else { backoff.min };
            probes.insert(
                e.endpoint.id.clone(),
                Probe {
                    live: live.clone(),
                    uri: e.core.url.clone(),
                    next_at: now + first,
                    backoff: backoff.min,
                    running: false,
                },
            );
        }
    }
    probes.retain(|id, p| snap.entries.iter().any(|e| &e.endpoint.id == id && Arc::ptr_eq(&e.core.live, &p.live)));
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Full jitter between half and all of `d`, so that many clients do not probe in step.
fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}
