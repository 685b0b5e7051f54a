//! What every clone of a balanced channel shares: the current snapshot (endpoints, their
//! connections, the picker), published whole through an `ArcSwap` so that a call reads it
//! without a lock, and the counters of each endpoint.
//!
//! Snapshots are built by the worker on tokio's blocking pool ([`build`]): a hash ring over
//! 1000 endpoints takes tens of milliseconds to build, which must not stall a runtime
//! worker, and calls go on with the previous snapshot until the new one is stored.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tracing::warn;

use crate::conn::{Conn, Connector};
use crate::pick::ewma::PeakEwma;
use crate::pick::{PickEndpoint, Picker};
use crate::{BalancerConfig, Endpoint, EndpointSet, Strategy};

/// Builds the per-endpoint service (the caller's layer around tonic's `Channel`).
pub(crate) type MakeService<S> = Arc<dyn Fn(&Endpoint, tonic::transport::Channel) -> S + Send + Sync>;

/// A strategy switch for the worker, and who to tell once calls use it.
pub(crate) type Switch = (Strategy, oneshot::Sender<()>);

pub(crate) struct Shared<S> {
    /// Bumped (after the store) each time a snapshot is published; a clone compares it
    /// with its own copy's before each call, which costs one load.
    pub(crate) generation: AtomicU64,
    snapshot: ArcSwap<Snapshot<S>>,
    pub(crate) service: Arc<str>,
    /// Where a new clone starts round robin, so that many short-lived clones still spread.
    pub(crate) clones: AtomicUsize,
    /// Bumped on every published snapshot and every change of an endpoint's state, so that
    /// calls waiting for an endpoint look again.
    pub(crate) changes: Arc<watch::Sender<u64>>,
    /// The generation of the snapshot published last, for those who wait on updates.
    pub(crate) published: watch::Sender<u64>,
    pub(crate) switches: mpsc::UnboundedSender<Switch>,
    pub(crate) first_resolution_timeout: std::time::Duration,
    pub(crate) task: OnceLock<AbortHandle>,
    /// What a clone holds until its first call: no endpoint, and a generation no published
    /// snapshot has, so that the call takes the current one. A clone that never calls (a
    /// handle kept for its tables) then holds no endpoint the balancer has dropped.
    pub(crate) unused: Arc<Snapshot<S>>,
}

impl<S> std::fmt::Debug for Shared<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("service", &self.service)
            .field("endpoints", &self.snapshot.load().entries.len())
            .finish_non_exhaustive()
    }
}

impl<S> Drop for Shared<S> {
    fn drop(&mut self) {
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }
}

/// One consistent view: the endpoints, and the picker built over them.
pub(crate) struct Snapshot<S> {
    pub(crate) generation: u64,
    /// A set has been applied (it may be empty). Before that, calls wait for one.
    pub(crate) resolved: bool,
    pub(crate) entries: Vec<Arc<Entry<S>>>,
    pub(crate) picker: Picker,
    pub(crate) strategy: Strategy,
}

/// One endpoint as the balancer holds it. A weight or metadata change makes a new `Entry`
/// around the same `Core`, so the connection and counters survive it.
pub(crate) struct Entry<S> {
    pub(crate) endpoint: Endpoint,
    pub(crate) core: Arc<Core<S>>,
}

pub(crate) struct Core<S> {
    /// The prototype each clone of the channel clones its own instance from.
    pub(crate) service: S,
    pub(crate) conn: Arc<Conn>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) url: http::Uri,
}

/// Counters of one endpoint, in one slot per thread (up to [`max_slots`]): a call counts
/// itself in its thread's slot, so calls on different threads write different cache lines,
/// and readers add the slots up. In-flight calls hold their slot, so the counts outlive the
/// endpoint's removal.
#[derive(Debug)]
pub(crate) struct Stats {
    slots: Box<[Arc<Slot>]>,
}

/// One thread's counts of one endpoint, on cache lines of its own, and its latency
/// estimate (p2c compares endpoints by what the calling thread has seen of them).
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Slot {
    started: AtomicU64,
    finished: AtomicU64,
    failures: AtomicU64,
    ewma: Ewma,
    pub(crate) label: Arc<str>,
    /// The endpoint's id, named on the responses of calls that failed there.
    pub(crate) id: Arc<str>,
}

/// Peak EWMA latency: the estimate (f64 bits) and when it was updated (ns).
#[derive(Debug, Default)]
struct Ewma {
    estimate: AtomicU64,
    stamp: AtomicU64,
}

/// How many slots each endpoint's counters have: twice the machine's parallelism (threads
/// take slots in turn, and runtime workers, blocking threads and others all count), from 2
/// to 32.
fn max_slots() -> usize {
    static SLOTS: OnceLock<usize> = OnceLock::new();
    *SLOTS.get_or_init(|| (2 * std::thread::available_parallelism().map_or(1, |n| n.get())).clamp(2, 32))
}

/// This thread's slot.
fn my_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    SLOT.with(|s| *s) % max_slots()
}

impl Stats {
    fn new(label: Arc<str>, id: Arc<str>) -> Self {
        let slots = (0..max_slots())
            .map(|_| {
                Arc::new(Slot {
                    started: AtomicU64::new(0),
                    finished: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    ewma: Ewma::default(),
                    label: label.clone(),
                    id: id.clone(),
                })
            })
            .collect();
        Stats { slots }
    }

    /// Counts a call as started; the slot it was counted in, for [`Slot::finished`].
    pub(crate) fn started(&self) -> Arc<Slot> {
        let slot = &self.slots[my_slot()];
        slot.started.fetch_add(1, Ordering::Relaxed);
        slot.clone()
    }

    fn sum(&self, counter: impl Fn(&Slot) -> &AtomicU64) -> u64 {
        self.slots.iter().fold(0u64, |n, s| n.wrapping_add(counter(s).load(Ordering::Relaxed)))
    }

    /// Calls sent here.
    pub(crate) fn requests(&self) -> u64 {
        self.sum(|s| &s.started)
    }

    pub(crate) fn failures(&self) -> u64 {
        self.sum(|s| &s.failures)
    }

    /// Calls in flight now (finished read first, so it never goes below zero).
    pub(crate) fn in_flight(&self) -> u64 {
        let finished = self.sum(|s| &s.finished);
        self.requests().saturating_sub(finished)
    }

    /// The calling thread's slot: the load p2c compares (calls this thread has in flight
    /// there, and the latency it saw). Reading only its own slot, a pick touches no cache
    /// line another thread writes; p2c is known to do well on stale or partial load
    /// (Mitzenmacher, "How useful is old information?", 2000), and a slow endpoint piles
    /// up calls in flight on every thread alike.
    pub(crate) fn here(&self) -> &Slot {
        &self.slots[my_slot()]
    }
}

impl Slot {
    /// Calls counted in this slot that have not finished.
    pub(crate) fn in_flight(&self) -> u64 {
        let finished = self.finished.load(Ordering::Relaxed);
        self.started.load(Ordering::Relaxed).saturating_sub(finished)
    }

    pub(crate) fn ewma(&self) -> PeakEwma {
        self.ewma.get()
    }

    pub(crate) fn finished(&self, failed: bool) {
        self.finished.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Folds in a response time. Two completions at once may each write their own
    /// estimate; losing one sample of a moving average is harmless, and cheaper than a lock.
    pub(crate) fn observe(&self, now_ns: u64, rtt_ns: u64, decay_ns: u64) {
        let mut ewma = self.ewma.get();
        ewma.observe(now_ns, rtt_ns, decay_ns);
        let (estimate, stamp) = ewma.parts();
        self.ewma.estimate.store(estimate.to_bits(), Ordering::Relaxed);
        self.ewma.stamp.store(stamp, Ordering::Relaxed);
    }
}

impl Ewma {
    fn get(&self) -> PeakEwma {
        PeakEwma::from_parts(f64::from_bits(self.estimate.load(Ordering::Relaxed)), self.stamp.load(Ordering::Relaxed))
    }
}

/// Nanoseconds on one process-wide monotonic clock, for peak EWMA.
pub(crate) fn now_nanos() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl<S> Shared<S> {
    pub(crate) fn new(config: &BalancerConfig, switches: mpsc::UnboundedSender<Switch>) -> Self {
        let strategy = config.strategy.clone();
        Shared {
            generation: AtomicU64::new(0),
            snapshot: ArcSwap::from_pointee(Snapshot {
                generation: 0,
                resolved: false,
                entries: Vec::new(),
                picker: Picker::new(&strategy, &[]),
                strategy,
            }),
            service: config.service.as_str().into(),
            clones: AtomicUsize::new(0),
            changes: Arc::new(watch::Sender::new(0)),
            published: watch::Sender::new(0),
            switches,
            first_resolution_timeout: config.first_resolution_timeout,
            task: OnceLock::new(),
            unused: Arc::new(Snapshot {
                generation: u64::MAX,
                resolved: false,
                entries: Vec::new(),
                picker: Picker::new(&config.strategy, &[]),
                strategy: config.strategy.clone(),
            }),
        }
    }

    pub(crate) fn snapshot(&self) -> Arc<Snapshot<S>> {
        self.snapshot.load_full()
    }

    /// Completes once a first endpoint set has been applied (at once if it has been), or
    /// when the balancer stops.
    pub(crate) async fn first_set(&self) {
        let mut changes = self.changes.subscribe();
        while !self.snapshot().resolved {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Makes `snapshot` the one calls use.
    pub(crate) fn publish(&self, snapshot: Snapshot<S>) {
        let generation = snapshot.generation;
        self.snapshot.store(Arc::new(snapshot));
        self.generation.store(generation, Ordering::Release);
        self.published.send_replace(generation);
        self.changes.send_modify(|n| *n += 1);
    }
}

/// What building a snapshot needs besides the set: the same for every build.
pub(crate) struct Builder<S> {
    pub(crate) service: Arc<str>,
    pub(crate) config: BalancerConfig,
    pub(crate) make: MakeService<S>,
    pub(crate) changes: Arc<watch::Sender<u64>>,
}

impl<S> Builder<S> {
    /// The entries for `set`, keeping the connections (and counters) of endpoints whose id
    /// and address stay; a later duplicate id replaces an earlier one.
    pub(crate) fn entries(&self, previous: &[Arc<Entry<S>>], set: EndpointSet) -> Vec<Arc<Entry<S>>> {
        let mut old: HashMap<&str, &Arc<Entry<S>>> = previous.iter().map(|e| (e.endpoint.id.as_str(), e)).collect();
        let mut next: Vec<Arc<Entry<S>>> = Vec::with_capacity(set.endpoints.len());
        let mut index: HashMap<String, usize> = HashMap::with_capacity(set.endpoints.len());
        for endpoint in set.endpoints {
            let entry = match old.remove(endpoint.id.as_str()) {
                Some(existing) if existing.endpoint == endpoint => existing.clone(),
                // Same place, new weight or labels: same connection.
                Some(existing) if existing.endpoint.address == endpoint.address => {
                    Arc::new(Entry { endpoint, core: existing.core.clone() })
                }
                // New, or moved to another address: a new connection, probed afresh.
                _ => match self.core(&endpoint) {
                    Ok(core) => Arc::new(Entry { endpoint, core: Arc::new(core) }),
                    Err(reason) => {
                        warn!(
                            service = %self.service,
                            id = %endpoint.id,
                            address = %endpoint.address,
                            "skipping endpoint with a malformed address: {reason}"
                        );
                        continue;
                    }
                },
            };
            match index.get(&entry.endpoint.id) {
                Some(&i) => next[i] = entry,
                None => {
                    index.insert(entry.endpoint.id.clone(), next.len());
                    next.push(entry);
                }
            }
        }
        next
    }

    /// The picker of `strategy` over `entries`.
    pub(crate) fn picker(strategy: &Strategy, entries: &[Arc<Entry<S>>]) -> Picker {
        let picks: Vec<PickEndpoint<'_>> =
            entries.iter().map(|e| PickEndpoint { id: &e.endpoint.id, weight: e.endpoint.weight }).collect();
        Picker::new(strategy, &picks)
    }

    fn core(&self, endpoint: &Endpoint) -> Result<Core<S>, String> {
        let url = endpoint.url();
        let uri: http::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("{url:?} has no host"));
        }
        let cfg = &self.config;
        let label: Arc<str> =
            format!("endpoint {} ({}) of service {}", endpoint.id, endpoint.address, self.service).into();
        // No tonic connect_timeout: with a custom connector tonic would wrap every
        // connection in hyper-timeout's stream; the connector bounds the connect itself.
        // tonic is given http:// whatever the scheme: TLS is the connector's.
        let plain = http::Uri::builder()
            .scheme("http")
            .authority(uri.authority().map_or("", |a| a.as_str()))
            .path_and_query("/")
            .build()
            .map_err(|e| format!("{url:?}: {e}"))?;
        let tonic_endpoint = tonic::transport::Endpoint::from(plain)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(cfg.keepalive_interval)
            .keep_alive_timeout(cfg.keepalive_timeout)
            .keep_alive_while_idle(true);
        let conn = Arc::new(Conn::new(label.clone(), self.changes.clone()));
        let connector =
            Connector { conn: conn.clone(), timeout: cfg.connect_timeout, target: uri.clone(), tls: cfg.tls.clone() };
        let channel = tonic_endpoint.connect_with_connector_lazy(connector);
        let stats = Arc::new(Stats::new(label, endpoint.id.as_str().into()));
        Ok(Core { service: (self.make)(endpoint, channel), conn, stats, url: uri })
    }
}
