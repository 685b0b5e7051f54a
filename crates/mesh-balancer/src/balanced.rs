//! The balanced channel: a `tower::Service` over the current endpoint set that picks an
//! endpoint per call, skips endpoints that are not usable, and turns every failure into a
//! gRPC status that names the service or endpoint.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use pin_project_lite::pin_project;
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;
use tonic::Status;
use tonic::body::Body;
use tower_layer::Layer;
use tower_service::Service;
use tracing::{debug, info, warn};

use crate::connector::{Liveness, TrackingConnector};
use crate::pick::ewma::PeakEwma;
use crate::pick::{PickEndpoint, PickInput, Picker, ring};
use crate::strategy::{HashKey, MissingKey, P2cLoad, Strategy};
use crate::{BalancerConfig, Endpoint, EndpointSet};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A client channel that spreads calls over a live set of endpoints. Cheap to clone; all
/// clones share the endpoints, their connections and the strategy. Generated clients take
/// it as they take a tonic `Channel`: `GreeterClient::new(balanced)`.
///
/// It never returns an error itself: no endpoint, no usable endpoint, or a transport failure
/// comes back as a gRPC status (UNAVAILABLE, or INVALID_ARGUMENT for a missing hash key).
/// Built by [`crate::Balancer::spawn`]; the background task that applies updates stops when
/// the last clone is dropped.
#[derive(Debug)]
pub struct BalancedChannel<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for BalancedChannel<S> {
    fn clone(&self) -> Self {
        BalancedChannel { shared: self.shared.clone() }
    }
}

/// What the balancer knows of one endpoint, for tables and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStatus {
    /// The endpoint's id.
    pub id: String,
    /// Its address.
    pub address: String,
    /// Its weight.
    pub weight: u32,
    /// Whether calls may go there (not known to be down).
    pub usable: bool,
    /// Whether a connection is open.
    pub connected: bool,
    /// Calls in flight now.
    pub in_flight: usize,
    /// Calls sent there since it was added.
    pub requests: u64,
    /// Of those, calls that failed (transport error or a non-OK status in the headers).
    pub failures: u64,
}

/// Why [`BalancedChannel::wait_ready`] gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no endpoint of service {service} became reachable within {waited:?} ({endpoints} known)")]
pub struct NotReady {
    /// The service name.
    pub service: String,
    /// How long it waited.
    pub waited: Duration,
    /// How many endpoints the balancer knew of.
    pub endpoints: usize,
}

// === shared state ===

pub(crate) struct Shared<S> {
    pub(crate) service: Arc<str>,
    snapshot: ArcSwap<Snapshot<S>>,
    ticket: AtomicUsize,
    pub(crate) went_down: Arc<Notify>,
    control: Mutex<Control<S>>,
    /// Counts applied updates, so waiters can wake on change.
    pub(crate) version: watch::Sender<u64>,
    pub(crate) task: OnceLock<AbortHandle>,
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

type MakeService<S> = Box<dyn Fn(tonic::transport::Channel) -> S + Send + Sync>;

struct Control<S> {
    strategy: Strategy,
    entries: Vec<Arc<Entry<S>>>,
    make: MakeService<S>,
    config: BalancerConfig,
}

pub(crate) struct Snapshot<S> {
    pub(crate) entries: Vec<Arc<Entry<S>>>,
    picker: Picker,
    strategy: Strategy,
}

/// One endpoint as the balancer holds it. A weight or metadata change makes a new `Entry`
/// around the same `Core`, so the connection and counters survive it.
pub(crate) struct Entry<S> {
    pub(crate) endpoint: Endpoint,
    pub(crate) core: Arc<Core<S>>,
}

pub(crate) struct Core<S> {
    service: S,
    pub(crate) live: Arc<Liveness>,
    pub(crate) url: http::Uri,
    stats: Arc<Stats>,
}

/// Counters of one endpoint; held by in-flight calls too, so they outlive its removal.
#[derive(Debug)]
struct Stats {
    label: String,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    failures: AtomicU64,
    ewma: Mutex<PeakEwma>,
}

impl<S> Shared<S> {
    pub(crate) fn new(config: BalancerConfig, make: MakeService<S>) -> Self {
        let strategy = config.strategy.clone();
        Shared {
            service: config.service.as_str().into(),
            snapshot: ArcSwap::from_pointee(Snapshot {
                entries: Vec::new(),
                picker: Picker::new(&strategy, &[]),
                strategy: strategy.clone(),
            }),
            ticket: AtomicUsize::new(0),
            went_down: Arc::new(Notify::new()),
            control: Mutex::new(Control { strategy, entries: Vec::new(), make, config }),
            version: watch::Sender::new(0),
            task: OnceLock::new(),
        }
    }

    fn control(&self) -> std::sync::MutexGuard<'_, Control<S>> {
        // Poisoning means a panic while applying an update; the data is still consistent
        // (each field is replaced whole), so keep serving.
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot<S>>> {
        self.snapshot.load()
    }

    /// Replaces the endpoint set with `set`, keeping the connections of endpoints that stay.
    pub(crate) fn apply(&self, set: EndpointSet)
    where
        S: Clone,
    {
        let mut control = self.control();
        let mut old: HashMap<&str, &Arc<Entry<S>>> =
            control.entries.iter().map(|e| (e.endpoint.id.as_str(), e)).collect();
        let mut next: Vec<Arc<Entry<S>>> = Vec::with_capacity(set.endpoints.len());
        let mut index: HashMap<String, usize> = HashMap::new();
        let (mut added, mut kept) = (0usize, 0usize);
        for endpoint in set.endpoints {
            let entry = match old.remove(endpoint.id.as_str()) {
                Some(existing) if existing.endpoint == endpoint => {
                    kept += 1;
                    existing.clone()
                }
                Some(existing) if existing.endpoint.address == endpoint.address => {
                    kept += 1;
                    Arc::new(Entry { endpoint, core: existing.core.clone() })
                }
                _ => match self.connect(&control, &endpoint) {
                    Ok(core) => {
                        added += 1;
                        Arc::new(Entry { endpoint, core: Arc::new(core) })
                    }
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
            // A later duplicate id replaces the earlier one.
            match index.get(&entry.endpoint.id) {
                Some(&i) => next[i] = entry,
                None => {
                    index.insert(entry.endpoint.id.clone(), next.len());
                    next.push(entry);
                }
            }
        }
        let removed = old.len();
        control.entries = next;
        self.publish(&control);
        info!(
            service = %self.service,
            endpoints = control.entries.len(),
            added,
            kept,
            removed,
            "endpoint set updated"
        );
    }

    pub(crate) fn set_strategy(&self, strategy: Strategy) {
        let mut control = self.control();
        info!(service = %self.service, from = %control.strategy, to = %strategy, "strategy switched");
        control.strategy = strategy;
        self.publish(&control);
    }

    fn publish(&self, control: &Control<S>) {
        let picks: Vec<PickEndpoint<'_>> =
            control.entries.iter().map(|e| PickEndpoint { id: &e.endpoint.id, weight: e.endpoint.weight }).collect();
        let picker = Picker::new(&control.strategy, &picks);
        self.snapshot.store(Arc::new(Snapshot {
            entries: control.entries.clone(),
            picker,
            strategy: control.strategy.clone(),
        }));
        self.version.send_modify(|v| *v += 1);
    }

    fn connect(&self, control: &Control<S>, endpoint: &Endpoint) -> Result<Core<S>, String> {
        let url = endpoint.url();
        let uri: http::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("{url:?} has no host"));
        }
        let cfg = &control.config;
        // No tonic connect_timeout: with a custom connector tonic would wrap every
        // connection in hyper-timeout's stream; the connector bounds the connect itself.
        let tonic_endpoint = tonic::transport::Endpoint::from(uri.clone())
            .tcp_nodelay(true)
            .http2_keep_alive_interval(cfg.keepalive_interval)
            .keep_alive_timeout(cfg.keepalive_timeout)
            .keep_alive_while_idle(true);
        let live = Arc::new(Liveness::new(self.went_down.clone()));
        let connector = TrackingConnector { live: live.clone(), timeout: cfg.connect_timeout };
        let channel = tonic_endpoint.connect_with_connector_lazy(connector);
        let stats = Arc::new(Stats {
            label: format!("endpoint {} ({}) of service {}", endpoint.id, endpoint.address, self.service),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ewma: Mutex::new(PeakEwma::default()),
        });
        Ok(Core { service: (control.make)(channel), live, url: uri, stats })
    }
}

// === impl BalancedChannel ===

impl<S> BalancedChannel<S> {
    pub(crate) fn from_shared(shared: Arc<Shared<S>>) -> Self {
        BalancedChannel { shared }
    }

    /// Switches the strategy for every clone, from the next call on; in-flight calls are
    /// not affected.
    pub fn set_strategy(&self, strategy: Strategy) {
        self.shared.set_strategy(strategy);
    }

    /// The strategy in use.
    pub fn strategy(&self) -> Strategy {
        self.shared.snapshot().strategy.clone()
    }

    /// The service name the balancer was built for.
    pub fn service(&self) -> &str {
        &self.shared.service
    }

    /// A receiver that is marked changed each time an endpoint-set update or a strategy
    /// switch has been applied; for waiting on the balancer instead of polling it.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.shared.version.subscribe()
    }

    /// The endpoints now in the set, with their state and counters.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        self.shared
            .snapshot()
            .entries
            .iter()
            .map(|e| EndpointStatus {
                id: e.endpoint.id.clone(),
                address: e.endpoint.address.clone(),
                weight: e.endpoint.weight,
                usable: e.core.live.usable(),
                connected: e.core.live.is_up(),
                in_flight: e.core.stats.in_flight.load(Ordering::Relaxed),
                requests: e.core.stats.requests.load(Ordering::Relaxed),
                failures: e.core.stats.failures.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Waits until every endpoint has been probed once and at least one is reachable, so
    /// that the first calls of a short-lived client do not race the probes. Returns how many
    /// endpoints are usable.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<usize, NotReady> {
        let mut changes = self.shared.version.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let snap = self.shared.snapshot();
            let pending = snap.entries.iter().any(|e| e.core.live.is_new());
            let usable = snap.entries.iter().filter(|e| e.core.live.usable()).count();
            if !pending && usable > 0 {
                return Ok(usable);
            }
            let endpoints = snap.entries.len();
            drop(snap);
            let wait = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    _ = changes.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
            });
            if wait.await.is_err() {
                return Err(NotReady { service: self.shared.service.to_string(), waited: timeout, endpoints });
            }
        }
    }
}

impl<S> Service<http::Request<Body>> for BalancedChannel<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The endpoint is chosen per call (consistent hashing needs the request), so
        // readiness is checked in `call`, where unready endpoints are skipped.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let shared = &self.shared;
        let snap = shared.snapshot();
        let n = snap.entries.len();
        if n == 0 {
            return ResponseFuture::failed(Status::unavailable(format!("no endpoints for service {}", shared.service)));
        }
        let key = match &snap.strategy {
            Strategy::ConsistentHash(cfg) => match hash_key_of(&request, &cfg.header) {
                Some(key) => Some(key),
                None if cfg.on_missing_key == MissingKey::Reject => {
                    return ResponseFuture::failed(Status::invalid_argument(format!(
                        "service {} balances by consistent hash and the call has no key: set the {} header",
                        shared.service, cfg.header
                    )));
                }
                None => None,
            },
            _ => None,
        };
        let needs_random = matches!(snap.strategy, Strategy::Random | Strategy::P2c(_)) || key.is_none();
        let input = PickInput {
            ticket: shared.ticket.fetch_add(1, Ordering::Relaxed),
            random: if needs_random { rand::random() } else { 0 },
            key,
        };
        let now = match snap.strategy {
            Strategy::P2c(P2cLoad::PeakEwma { .. }) => now_nanos(),
            _ => 0,
        };
        let load = |i: usize| load_of(&snap.entries[i], &snap.strategy, now);
        let Some(first) = snap.picker.first(&input, load) else {
            return ResponseFuture::failed(Status::unavailable(format!("no endpoints for service {}", shared.service)));
        };
        if let Some(svc) = ready(&snap.entries[first]) {
            return call(&snap.entries[first], svc, request, &snap.strategy);
        }
        let mut tried = 1;
        for i in snap.picker.fallbacks(first, &input) {
            tried += 1;
            if let Some(svc) = ready(&snap.entries[i]) {
                return call(&snap.entries[i], svc, request, &snap.strategy);
            }
        }
        ResponseFuture::failed(Status::unavailable(format!(
            "all {n} endpoints of service {} are unavailable (tried {tried})",
            shared.service
        )))
    }
}

fn hash_key_of(request: &http::Request<Body>, header: &http::HeaderName) -> Option<u64> {
    if let Some(HashKey(key)) = request.extensions().get::<HashKey>() {
        return Some(ring::hash_key(key.as_bytes()));
    }
    request.headers().get(header).map(|v| ring::hash_key(v.as_bytes()))
}

fn load_of<S>(entry: &Entry<S>, strategy: &Strategy, now: u64) -> u64 {
    let stats = &entry.core.stats;
    let in_flight = stats.in_flight.load(Ordering::Relaxed);
    match strategy {
        Strategy::P2c(P2cLoad::PeakEwma { decay }) => {
            let decay = u64::try_from(decay.as_nanos()).unwrap_or(u64::MAX);
            let ewma = *stats.ewma.lock().unwrap_or_else(|p| p.into_inner());
            ewma.cost(now, decay, in_flight)
        }
        _ => in_flight as u64,
    }
}

/// A clone of the endpoint's service that is ready now, or `None` to skip the endpoint.
fn ready<S>(entry: &Entry<S>) -> Option<S>
where
    S: Service<http::Request<Body>> + Clone,
    S::Error: Into<BoxError>,
{
    if !entry.core.live.usable() {
        return None;
    }
    let mut svc = entry.core.service.clone();
    // Readiness is a snapshot: an endpoint that is not ready at once is skipped, not
    // waited for, so no waker is needed.
    match svc.poll_ready(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(())) => Some(svc),
        Poll::Ready(Err(e)) => {
            debug!(endpoint = %entry.core.stats.label, "not ready: {}", e.into());
            None
        }
        Poll::Pending => None,
    }
}

fn call<S>(entry: &Entry<S>, mut svc: S, request: http::Request<Body>, strategy: &Strategy) -> ResponseFuture<S::Future>
where
    S: Service<http::Request<Body>>,
{
    let stats = entry.core.stats.clone();
    stats.requests.fetch_add(1, Ordering::Relaxed);
    stats.in_flight.fetch_add(1, Ordering::Relaxed);
    let started = matches!(strategy, Strategy::P2c(P2cLoad::PeakEwma { .. })).then(Instant::now);
    let decay = match strategy {
        Strategy::P2c(P2cLoad::PeakEwma { decay }) => *decay,
        _ => Duration::ZERO,
    };
    ResponseFuture { kind: Kind::Called { inner: svc.call(request), guard: CallGuard { stats, started, decay } } }
}

// === impl ResponseFuture ===

pin_project! {
    /// The response of a [`BalancedChannel`] call.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = Proj]
    #[derive(Debug)]
    enum Kind<F> {
        // Failed before any endpoint was called.
        Failed { status: Option<Status> },
        // Sent to an endpoint.
        Called { #[pin] inner: F, guard: CallGuard },
    }
}

impl<F> ResponseFuture<F> {
    fn failed(status: Status) -> Self {
        ResponseFuture { kind: Kind::Failed { status: Some(status) } }
    }
}

/// Keeps an endpoint's in-flight count right even when a call is dropped unfinished.
#[derive(Debug)]
pub struct CallGuard {
    stats: Arc<Stats>,
    started: Option<Instant>,
    decay: Duration,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl CallGuard {
    fn finish(&self, failed: bool) {
        if failed {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(started) = self.started {
            let rtt = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let decay = u64::try_from(self.decay.as_nanos()).unwrap_or(u64::MAX);
            let now = now_nanos();
            let mut ewma = self.stats.ewma.lock().unwrap_or_else(|p| p.into_inner());
            ewma.observe(now, rtt, decay);
        }
    }
}

/// Nanoseconds on one process-wide monotonic clock, for peak EWMA.
fn now_nanos() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<http::Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            Proj::Failed { status } => {
                let status = status.take().unwrap_or_else(|| Status::internal("response polled after completion"));
                Poll::Ready(Ok(status.into_http()))
            }
            Proj::Called { inner, guard } => match inner.poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(response)) => {
                    let failed = response.headers().get("grpc-status").is_some_and(|code| code.as_bytes() != b"0");
                    guard.finish(failed);
                    Poll::Ready(Ok(response))
                }
                Poll::Ready(Err(e)) => {
                    guard.finish(true);
                    let e: BoxError = e.into();
                    let status = Status::unavailable(format!("{}: {}", guard.stats.label, error_chain(&*e)));
                    Poll::Ready(Ok(status.into_http()))
                }
            },
        }
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        source = s.source();
    }
    out
}

// === construction ===

pub(crate) fn make_with<L>(layer: L) -> MakeService<L::Service>
where
    L: Layer<tonic::transport::Channel> + Send + Sync + 'static,
{
    Box::new(move |channel| layer.layer(channel))
}
