//! Resolvers: a service name in, a stream of [`EndpointSet`]s out, which is what
//! [`mesh_balancer::Balancer::spawn`] takes.
//!
//! [`EtcdResolver`] lists `{root}/services/{service}/` and watches it (mesh-etcd's
//! [`ListWatch`]). It decodes each value with [`Instance::decode`]; a value that does not
//! parse is skipped with a warning naming the key (and counted), and the rest apply. During
//! an etcd outage the last known set stays, and [`Resolution::status`] says how stale it
//! is; an empty set is published only when a successful listing or a watch event says so,
//! never because of an error. When etcd comes back restored or rebuilt (another cluster id,
//! an older revision) the endpoints known before are kept beside what it holds for a
//! settle period (default 10 s, [`EtcdResolver::with_settle`]) while servers re-register,
//! so that a client does not drop every server in between. [`StaticResolver`] serves a fixed list, for tests and
//! etcd-less use.
//!
//! ```no_run
//! use mesh_balancer::{Balancer, BalancerConfig};
//! use mesh_discovery::EtcdResolver;
//! use mesh_etcd::{Etcd, EtcdOptions};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let etcd = Etcd::new(EtcdOptions::parse_endpoints("http://127.0.0.1:2379")?);
//! let resolution = EtcdResolver::new(etcd, "/mesh", "greeter").spawn();
//! let channel = Balancer::spawn(BalancerConfig::new("greeter"), resolution.updates());
//! let mut client = mesh_proto::pb::greeter_client::GreeterClient::new(channel);
//! # Ok(())
//! # }
//! ```
//!
//! What it does not do: balance, or check that endpoints answer (the balancer does both).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use mesh_balancer::{Endpoint, EndpointSet};
use mesh_etcd::{Etcd, KeyValue, ListWatch, ViewStatus, WatchEvent};
use mesh_registry::Instance;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn};

/// Resolves a service's endpoints from its registrations in etcd.
#[derive(Debug, Clone)]
pub struct EtcdResolver {
    etcd: Etcd,
    prefix: String,
    service: String,
    settle: Duration,
}

/// A running resolution: the latest set, its freshness, and a stream of updates. The task
/// behind it stops when this and every stream from [`Resolution::updates`] are dropped.
#[derive(Debug, Clone)]
pub struct Resolution {
    set: watch::Receiver<Option<EndpointSet>>,
    status: watch::Receiver<ResolverStatus>,
    task: Arc<AbortOnDropHandle<()>>,
}

/// How a resolution is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResolverStatus {
    /// The watch's view: in sync or not, the revision, when etcd last confirmed it.
    pub view: Option<ViewStatus>,
    /// Endpoints in the current set.
    pub endpoints: usize,
    /// Values skipped because they did not parse, since the start.
    pub malformed: u64,
    /// Whether endpoints known before an etcd rebuild are still kept beside what etcd holds
    /// (the settle period).
    pub settling: bool,
}

impl EtcdResolver {
    /// Resolves `service`, registered under `root` (e.g. `/mesh`).
    pub fn new(etcd: Etcd, root: &str, service: &str) -> Self {
        EtcdResolver {
            etcd,
            prefix: mesh_registry::prefix(root, service),
            service: service.to_string(),
            settle: DEFAULT_SETTLE,
        }
    }

    /// How long endpoints known before an etcd rebuild are kept while servers re-register
    /// (default 10 s, the default lease TTL: every live server re-registers well within it).
    pub fn with_settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    /// The prefix it watches.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Spawns the task that lists and watches. Must be called within a tokio runtime.
    pub fn spawn(self) -> Resolution {
        let (set_tx, set) = watch::channel(None);
        let (status_tx, status) = watch::channel(ResolverStatus::default());
        let task = AbortOnDropHandle::new(tokio::spawn(self.run(set_tx, status_tx)));
        Resolution { set, status, task: Arc::new(task) }
    }

    async fn run(self, set_tx: watch::Sender<Option<EndpointSet>>, status_tx: watch::Sender<ResolverStatus>) {
        let mut list_watch = ListWatch::new(self.etcd.clone(), self.prefix.clone());
        let mut view_status = list_watch.status();
        let mut view: BTreeMap<String, Instance> = BTreeMap::new();
        // Endpoints known before etcd was rebuilt, kept until the settle timer fires.
        let mut kept: BTreeMap<String, Instance> = BTreeMap::new();
        let settle = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(settle);
        let mut settling = false;
        let mut malformed = 0u64;
        loop {
            tokio::select! {
                () = &mut settle, if settling => {
                    info!(service = %self.service, "settled after the etcd rebuild; now only what etcd holds");
                    kept.clear();
                    settling = false;
                }
                event = list_watch.next() => match event {
                    WatchEvent::Reset { kvs, rebuilt, .. } => {
                        let mut fresh = BTreeMap::new();
                        for kv in kvs {
                            if let Some(instance) = self.decode(&kv, &mut malformed) {
                                fresh.insert(kv.key, instance);
                            }
                        }
                        if rebuilt {
                            kept.extend(std::mem::take(&mut view));
                            settle.as_mut().reset(tokio::time::Instant::now() + self.settle);
                            settling = true;
                            info!(
                                service = %self.service,
                                kept = kept.len(),
                                settle = ?self.settle,
                                "etcd was rebuilt; keeping the endpoints known before while servers re-register"
                            );
                        }
                        view = fresh;
                    }
                    WatchEvent::Put(kv) => {
                        // What etcd now holds under a key settles it: a copy kept from before
                        // a rebuild no longer stands in for it.
                        kept.remove(&kv.key);
                        // A value that no longer parses keeps the last good one.
                        if let Some(instance) = self.decode(&kv, &mut malformed) {
                            view.insert(kv.key, instance);
                        }
                    }
                    WatchEvent::Delete { key, .. } => {
                        // A server that re-registered and then left (deregistered, expired)
                        // is gone, settling or not.
                        kept.remove(&key);
                        view.remove(&key);
                    }
                },
                changed = view_status.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let v = view_status.borrow_and_update().clone();
                    status_tx.send_modify(|s| s.view = Some(v));
                    continue;
                }
            }
            let set = published(&view, &kept);
            let n = set.len();
            let changed = set_tx.send_if_modified(|current| {
                if current.as_ref() == Some(&set) {
                    return false;
                }
                *current = Some(set);
                true
            });
            if changed {
                info!(service = %self.service, endpoints = n, "endpoints changed");
            }
            status_tx.send_modify(|s| {
                s.endpoints = n;
                s.malformed = malformed;
                s.settling = settling;
            });
        }
    }

    fn decode(&self, kv: &KeyValue, malformed: &mut u64) -> Option<Instance> {
        match Instance::decode(&self.prefix, &kv.key, &kv.value) {
            Ok(instance) => Some(instance),
            Err(e) => {
                *malformed += 1;
                warn!(service = %self.service, key = %kv.key, "skipping registration: {e}");
                None
            }
        }
    }
}

/// What etcd holds, plus endpoints kept from before a rebuild that have not re-registered
/// (under the same key, or the same instance id or address under another).
fn published(view: &BTreeMap<String, Instance>, kept: &BTreeMap<String, Instance>) -> EndpointSet {
    let mut endpoints: Vec<Endpoint> = view.values().map(endpoint).collect();
    for (key, old) in kept {
        let back = view.contains_key(key) || view.values().any(|i| i.id == old.id || i.addr == old.addr);
        if !back {
            endpoints.push(endpoint(old));
        }
    }
    EndpointSet::new(endpoints)
}

/// How long endpoints from before an etcd rebuild are kept by default.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(10);

fn endpoint(i: &Instance) -> Endpoint {
    // The scheme carries whether it speaks TLS, so that the balancer dials it right and a
    // change of mind (a restart with TLS on) is a new connection.
    let address = if i.tls { format!("https://{}", i.addr) } else { i.addr.clone() };
    Endpoint { id: i.id.clone(), address, weight: i.weight, metadata: i.labels() }
}

impl Resolution {
    /// Every new set, starting with the current one once etcd has been listed; what
    /// [`mesh_balancer::Balancer::spawn`] takes. Keeps the resolution running.
    pub fn updates(&self) -> impl Stream<Item = EndpointSet> + Send + 'static {
        let guard = self.task.clone();
        WatchStream::new(self.set.clone()).filter_map(move |set| {
            let _keep_running = &guard;
            std::future::ready(set)
        })
    }

    /// The current set; `None` until etcd has been listed once.
    pub fn current(&self) -> Option<EndpointSet> {
        self.set.borrow().clone()
    }

    /// Waits until etcd has been listed once, at most `timeout`; returns the set then.
    pub async fn wait_listed(&self, timeout: Duration) -> Option<EndpointSet> {
        let mut set = self.set.clone();
        let listed = tokio::time::timeout(timeout, set.wait_for(Option::is_some)).await;
        match listed {
            Ok(Ok(set)) => set.clone(),
            _ => None,
        }
    }

    /// Freshness and counters, updated as they change.
    pub fn status(&self) -> watch::Receiver<ResolverStatus> {
        self.status.clone()
    }
}

/// A fixed set of endpoints, for tests and for clients without etcd.
#[derive(Debug, Clone)]
pub struct StaticResolver {
    set: EndpointSet,
}

impl StaticResolver {
    /// Resolves to `set`, always.
    pub fn new(set: EndpointSet) -> Self {
        StaticResolver { set }
    }

    /// A stream that yields the set once and then stays open (the balancer keeps it).
    pub fn updates(&self) -> impl Stream<Item = EndpointSet> + Send + 'static {
        tokio_stream::once(self.set.clone()).chain(tokio_stream::pending())
    }
}

/// The README's example, compiled (and run, unless marked `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
