//! The balanced channel: a `tower::Service` over the current endpoint set that picks an
//! endpoint per call and keeps tower's contract with the per-endpoint services under it.
//!
//! Each clone of the channel owns its own instance of each endpoint's service, cloned
//! from the endpoint's prototype the first time the clone calls it and kept for the next
//! calls, as each clone of a tonic `Channel` owns its own slot in the channel's buffer.
//! A call polls that instance's `poll_ready` with the caller's waker (the one its
//! `poll_ready` received) and calls the same instance once it is ready. So a layer that
//! reserves capacity in `poll_ready` and spends it in `call` (a concurrency limit, a
//! breaker letting one probe through) works as it does under tower's own balancer, and
//! state a layer keeps outside an `Arc` lives as long as the clone.
//!
//! The endpoint is chosen per call, in `call` (consistent hashing needs the request), among
//! endpoints whose connection is up. When none can take the call at once, the call waits,
//! bounded by its deadline (its `grpc-timeout`): for the first endpoint set before
//! discovery has produced one (also bounded by [`crate::BalancerConfig::first_resolution_timeout`]),
//! for a connection to come up, for a layer's backpressure to ease. It fails at once only
//! when every endpoint is unreachable or refuses (its `poll_ready` fails), and with "no
//! endpoints" only once a set has been applied and is empty.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Status;
use tonic::body::Body;
use tower_service::Service;

use crate::conn::EndpointState;
use crate::counted::Counted;
use crate::pick::{PickInput, ewma, ring};
use crate::snapshot::{Entry, Shared, Slot, Snapshot, now_nanos};
use crate::status::{self, BoxError};
use crate::strategy::{HashKey, MissingKey, P2cLoad, Strategy};

/// A client channel that spreads calls over a live set of endpoints. Cheap to clone; all
/// clones share the endpoints, their connections and the strategy, and each clone keeps
/// its own instance of each endpoint's service stack (see the module docs of the crate).
/// Generated clients take it as they take a tonic `Channel`:
/// `GreeterClient::new(balanced)`.
///
/// It never returns an error itself: every failure comes back as a gRPC status, the
/// endpoint's own when it gave one, UNAVAILABLE naming the service when no endpoint can
/// take the call, DEADLINE_EXCEEDED when the call's deadline passed first, and
/// INVALID_ARGUMENT for a call without the key consistent hashing was told to require.
/// Built by [`crate::Balancer::spawn`]; the background task that applies updates stops when
/// the last clone is dropped.
pub struct BalancedChannel<S> {
    shared: Arc<Shared<S>>,
    local: Local<S>,
}

/// What one clone keeps for itself.
struct Local<S> {
    /// The snapshot this clone last used, and its own service instances, by entry index.
    snap: Arc<Snapshot<S>>,
    services: Vec<Option<S>>,
    /// Round robin's and weighted round robin's turn.
    ticket: usize,
    /// State of a xorshift generator: random picks without touching shared state.
    rng: u64,
    /// The waker of the task that polled this clone ready, to poll endpoint services with.
    waker: Option<Waker>,
    /// Where a call that had to wait leaves the instance it used, for this clone to keep.
    returned: Arc<Returned<S>>,
}

/// An instance a waiting call hands back to the clone that made the call.
struct Returned<S> {
    full: AtomicBool,
    slot: Mutex<Option<(Arc<Entry<S>>, S)>>,
}

impl<S> Returned<S> {
    fn put(&self, entry: Arc<Entry<S>>, service: S) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some((entry, service));
        self.full.store(true, Ordering::Release);
    }

    fn take(&self) -> Option<(Arc<Entry<S>>, S)> {
        // A plain load first: this runs on every call, and is almost always empty.
        if !self.full.load(Ordering::Relaxed) || !self.full.swap(false, Ordering::Acquire) {
            return None;
        }
        self.slot.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl<S> std::fmt::Debug for BalancedChannel<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalancedChannel")
            .field("service", &self.shared.service)
            .field("endpoints", &self.shared.snapshot().entries.len())
            .field("strategy", &self.shared.snapshot().strategy)
            .finish_non_exhaustive()
    }
}

impl<S> Clone for BalancedChannel<S> {
    /// A new handle on the same endpoints. It keeps no service instance or readiness of the
    /// original: those belong to the clone that polled them.
    fn clone(&self) -> Self {
        BalancedChannel::from_shared(self.shared.clone())
    }
}

/// A request extension: the ids of endpoints this call should not go to unless no other
/// endpoint can take it. A retry layer sets it to the endpoints earlier attempts failed at
/// (see [`FailedAt`]), so that a retry goes elsewhere under every strategy, consistent
/// hashing included.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AvoidEndpoints(pub Vec<Arc<str>>);

/// A response extension on every call that failed at an endpoint (a non-OK status in the
/// response's headers, or a transport error): the id of that endpoint. Calls that succeed
/// do not carry it, so that the common path adds nothing to the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedAt(pub Arc<str>);

/// What the balancer knows of one endpoint, for tables and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointStatus {
    /// The endpoint's id.
    pub id: String,
    /// Its address.
    pub address: String,
    /// Its weight.
    pub weight: u32,
    /// Its connection's state.
    pub state: EndpointState,
    /// Whether calls may go there (it is not unreachable).
    pub usable: bool,
    /// Whether a connection is open.
    pub connected: bool,
    /// Calls in flight now.
    pub in_flight: u64,
    /// Calls sent there since it was added.
    pub requests: u64,
    /// Of those, calls that failed there: a transport error, or a non-OK status other than
    /// CANCELLED (the caller's, not the endpoint's). A deadline that passed there counts.
    pub failures: u64,
    /// Why the last connect failed, while it is unreachable: refused, timed out, or a TLS
    /// handshake that failed ("its certificate is not signed by a CA this client trusts").
    pub last_error: Option<String>,
}

/// Why [`BalancedChannel::wait_ready`] gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no endpoint of service {service} became reachable within {waited:?} ({endpoints} known)")]
#[non_exhaustive]
pub struct NotReady {
    /// The service name.
    pub service: String,
    /// How long it waited.
    pub waited: Duration,
    /// How many endpoints the balancer knew of.
    pub endpoints: usize,
}

// === impl BalancedChannel ===

impl<S> BalancedChannel<S> {
    pub(crate) fn from_shared(shared: Arc<Shared<S>>) -> Self {
        // The current snapshot is taken at the first call.
        let snap = shared.unused.clone();
        let ticket = shared.clones.fetch_add(1, Ordering::Relaxed);
        let rng = rand::random::<u64>() | 1;
        let returned = Arc::new(Returned { full: AtomicBool::new(false), slot: Mutex::new(None) });
        BalancedChannel { shared, local: Local { snap, services: Vec::new(), ticket, rng, waker: None, returned } }
    }

    /// Switches the strategy for every clone; returns once calls use it. In-flight calls
    /// are not affected.
    pub async fn set_strategy(&self, strategy: Strategy) {
        let (ack, applied) = tokio::sync::oneshot::channel();
        if self.shared.switches.send((strategy, ack)).is_ok() {
            let _ = applied.await;
        }
    }

    /// The strategy in use.
    pub fn strategy(&self) -> Strategy {
        self.shared.snapshot().strategy.clone()
    }

    /// The service name the balancer was built for.
    pub fn service(&self) -> &str {
        &self.shared.service
    }

    /// How many endpoint sets and strategy switches have been applied so far. A count, not
    /// an event: `applied().wait_for(|&n| n > seen)` also sees one applied before it
    /// subscribed.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.shared.published.subscribe()
    }

    /// Waits until the first endpoint set has been applied (at once if it has), at most
    /// `timeout`; returns whether it has. Calls do this themselves; this is for callers
    /// that want to know, say, to report that discovery found nothing.
    pub async fn resolved(&self, timeout: Duration) -> bool {
        let _ = timeout_at(deadline_after(timeout), self.shared.first_set()).await;
        self.shared.snapshot().resolved
    }

    /// The endpoints now in the set, with their state and counters.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        self.shared
            .snapshot()
            .entries
            .iter()
            .map(|e| {
                let state = e.core.conn.state();
                let stats = &e.core.stats;
                EndpointStatus {
                    id: e.endpoint.id.clone(),
                    address: e.endpoint.address.clone(),
                    weight: e.endpoint.weight,
                    state,
                    usable: state != EndpointState::Unreachable,
                    connected: e.core.conn.is_connected(),
                    in_flight: stats.in_flight(),
                    requests: stats.requests(),
                    failures: stats.failures(),
                    last_error: (state == EndpointState::Unreachable)
                        .then(|| e.core.conn.last_error().map(|m| m.to_string()))
                        .flatten(),
                }
            })
            .collect()
    }

    /// Waits until a set has been applied, no endpoint is still connecting and at least one
    /// is connected, so that a short-lived client can tell "cannot reach any server" before
    /// its first call. Returns how many endpoints are connected.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<usize, NotReady> {
        let mut changes = self.shared.changes.subscribe();
        let deadline = deadline_after(timeout);
        loop {
            changes.borrow_and_update();
            let snap = self.shared.snapshot();
            let count = |s: EndpointState| snap.entries.iter().filter(|e| e.core.conn.state() == s).count();
            let (ready, connecting) = (count(EndpointState::Ready), count(EndpointState::Connecting));
            if snap.resolved && connecting == 0 && ready > 0 {
                return Ok(ready);
            }
            let endpoints = snap.entries.len();
            drop(snap);
            if timeout_at(deadline, changes.changed()).await.is_err() {
                return Err(NotReady { service: self.shared.service.to_string(), waited: timeout, endpoints });
            }
        }
    }

    /// Takes the newest snapshot if one was published since this clone last looked,
    /// keeping its instances of the endpoints that stay, and an instance a waiting call
    /// handed back.
    fn refresh(&mut self) {
        self.take_snapshot();
        if let Some((entry, service)) = self.local.returned.take() {
            self.keep(entry, service);
        }
    }

    fn take_snapshot(&mut self) {
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation == self.local.snap.generation {
            return;
        }
        let snap = self.shared.snapshot();
        let local = &mut self.local;
        let mut kept: HashMap<*const crate::snapshot::Core<S>, S> = HashMap::new();
        for (entry, service) in local.snap.entries.iter().zip(local.services.drain(..)) {
            if let Some(service) = service {
                kept.insert(Arc::as_ptr(&entry.core), service);
            }
        }
        if !kept.is_empty() {
            local.services = snap.entries.iter().map(|e| kept.remove(&Arc::as_ptr(&e.core))).collect();
        }
        local.snap = snap;
    }
}

impl<S> BalancedChannel<S> {
    /// Keeps `service`, an instance of `entry`'s stack a waiting call used, unless this
    /// clone has one already or the endpoint left the snapshot it uses.
    fn keep(&mut self, entry: Arc<Entry<S>>, service: S) {
        let local = &mut self.local;
        if let Some(i) = local.snap.entries.iter().position(|e| Arc::ptr_eq(&e.core, &entry.core)) {
            if local.services.len() != local.snap.entries.len() {
                local.services.resize_with(local.snap.entries.len(), || None);
            }
            local.services[i].get_or_insert(service);
        }
    }
}

/// `timeout` from now, or never if it does not fit in an `Instant`.
fn deadline_after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// `future`, or `Err(())` once `deadline` (if any) has passed.
async fn timeout_at<F: Future>(deadline: Option<Instant>, future: F) -> Result<F::Output, ()> {
    match deadline {
        Some(at) => tokio::time::timeout_at(at, future).await.map_err(drop),
        None => Ok(future.await),
    }
}

/// xorshift64*: a fresh random number from a clone's own state, without the shared or
/// thread-local state of a general-purpose generator.
fn next_random(rng: &mut u64) -> u64 {
    let mut x = *rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *rng = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// Why no endpoint took a call at once.
#[derive(Default)]
struct Skipped {
    connecting: usize,
    unreachable: usize,
    refused: usize,
    last_refusal: Option<BoxError>,
}

impl Skipped {
    /// UNAVAILABLE saying why none of `n` endpoints can take the call.
    fn status(&self, n: usize, service: &str) -> Status {
        let why = match (self.unreachable, self.refused) {
            (u, 0) if u == n => "are unreachable".to_string(),
            (0, r) if r == n => "are ejected".to_string(),
            (u, r) => format!("are unavailable ({u} unreachable, {r} ejected)"),
        };
        let mut message = format!("all {n} endpoints of service {service} {why}");
        if let Some(e) = &self.last_refusal {
            message.push_str(&format!("; the last said: {}", mesh_util::error_chain(&**e)));
        }
        Status::unavailable(message)
    }
}

impl<S> Service<http::Request<Body>> for BalancedChannel<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The endpoint is chosen in `call`, where the request is known; its service is
        // polled there with this waker, and the call waits in its future when none is
        // ready, bounded by its deadline, which only the request carries.
        match &self.local.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => self.local.waker = Some(cx.waker().clone()),
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        self.refresh();
        // The deadline every layer below measures, and this one ends the response at.
        let deadline = mesh_util::grpc::Deadline::of(&mut request, || Instant::now().into_std());
        // A call whose deadline has passed is not sent (nor counted against an endpoint).
        if deadline.is_some_and(|d| Instant::now().into_std() >= d) {
            return ResponseFuture::failed(Status::deadline_exceeded(format!(
                "the call's deadline passed before it was sent to service {}",
                self.shared.service
            )));
        }
        let shared = &self.shared;
        let Local { snap, services, ticket, rng, waker, returned } = &mut self.local;
        let Some(waker) = waker.as_ref() else {
            // Called without `poll_ready`: nothing to poll with here, so the future does it.
            return ResponseFuture::waiting(shared.clone(), request, Vec::new(), returned.clone());
        };
        if !snap.resolved {
            return ResponseFuture::waiting(shared.clone(), request, Vec::new(), returned.clone());
        }
        let n = snap.entries.len();
        if n == 0 {
            return ResponseFuture::failed(no_endpoints(&shared.service));
        }
        if services.len() != n {
            services.resize_with(n, || None);
        }
        let key = match hash_key(&snap.strategy, &request, &shared.service) {
            Ok(key) => key,
            Err(status) => return ResponseFuture::failed(status),
        };
        let needs_random = matches!(snap.strategy, Strategy::Random | Strategy::P2c(_)) || key.is_none();
        let input = PickInput { ticket: *ticket, random: if needs_random { next_random(rng) } else { 0 }, key };
        let now = match snap.strategy {
            Strategy::P2c(P2cLoad::PeakEwma { .. }) => now_nanos(),
            _ => 0,
        };
        let Some(first) = snap.picker.first(&input, |i| load(&snap.entries[i], &snap.strategy, now)) else {
            return ResponseFuture::failed(no_endpoints(&shared.service));
        };
        let mut cx = Context::from_waker(waker);
        let mut skipped = Skipped::default();
        let mut pending = Vec::new();
        // Endpoints a retry asks to avoid are tried last: first every other one, then them.
        let avoid = request.extensions().get::<AvoidEndpoints>().filter(|a| !a.0.is_empty()).cloned();
        let is_avoided =
            |entry: &Entry<S>| avoid.as_ref().is_some_and(|a| a.0.iter().any(|id| **id == *entry.endpoint.id));
        for avoided_pass in [false, true] {
            if avoided_pass && avoid.is_none() {
                break;
            }
            // Fallbacks are only worked out when the first choice cannot take the call.
            let mut fallbacks = None;
            for tried in 1..=n {
                let i = if tried == 1 {
                    first
                } else {
                    match fallbacks.get_or_insert_with(|| snap.picker.fallbacks(first, &input)).next() {
                        Some(i) => i,
                        None => break,
                    }
                };
                let entry = &snap.entries[i];
                if avoid.is_some() && is_avoided(entry) != avoided_pass {
                    continue;
                }
                match entry.core.conn.state() {
                    EndpointState::Ready => {}
                    EndpointState::Connecting => {
                        skipped.connecting += 1;
                        continue;
                    }
                    EndpointState::Unreachable => {
                        skipped.unreachable += 1;
                        continue;
                    }
                }
                let svc = services[i].get_or_insert_with(|| entry.core.service.clone());
                match svc.poll_ready(&mut cx) {
                    Poll::Ready(Ok(())) => {
                        // Round robin goes on after the endpoint it used, so that skipping one
                        // does not send the next one two turns. Kept below the picker's period,
                        // so that a pick needs no division.
                        let advance = if matches!(snap.strategy, Strategy::RoundRobin) { tried } else { 1 };
                        let period = snap.picker.period();
                        *ticket += advance;
                        if *ticket >= period {
                            *ticket %= period;
                        }
                        return start(entry, svc, request, &snap.strategy, now, deadline);
                    }
                    Poll::Ready(Err(e)) => {
                        // A layer refused (a breaker open, say): skip it for this call. The
                        // instance is dropped; the next call clones a fresh one.
                        services[i] = None;
                        skipped.refused += 1;
                        skipped.last_refusal = Some(e.into());
                    }
                    // Backpressure: the instance keeps the caller's waker and goes with the
                    // call, which waits for it (or another) to become ready.
                    Poll::Pending => {
                        if let Some(svc) = services[i].take() {
                            pending.push((entry.clone(), svc));
                        }
                    }
                }
            }
            if !pending.is_empty() || skipped.connecting > 0 {
                break;
            }
        }
        if pending.is_empty() && skipped.connecting == 0 {
            return ResponseFuture::failed(skipped.status(n, &shared.service));
        }
        ResponseFuture::waiting(shared.clone(), request, pending, returned.clone())
    }
}

/// What a call gets once a set has been applied and it is empty.
fn no_endpoints(service: &str) -> Status {
    Status::unavailable(format!("no endpoints for service {service}"))
}

/// The hashed key of a call under consistent hashing: the [`HashKey`] extension, else the
/// configured header; an error when it is required and missing.
fn hash_key(strategy: &Strategy, request: &http::Request<Body>, service: &str) -> Result<Option<u64>, Status> {
    let Strategy::ConsistentHash(cfg) = strategy else { return Ok(None) };
    if let Some(HashKey(key)) = request.extensions().get::<HashKey>() {
        return Ok(Some(ring::hash_key(key.as_bytes())));
    }
    match request.headers().get(&cfg.header) {
        Some(v) => Ok(Some(ring::hash_key(v.as_bytes()))),
        None if cfg.on_missing_key == MissingKey::Reject => Err(Status::invalid_argument(format!(
            "service {service} balances by consistent hash and the call has no key: set the {} header",
            cfg.header
        ))),
        None => Ok(None),
    }
}

/// The load p2c compares, as the calling thread sees it (see `Stats::here`).
fn load<S>(entry: &Entry<S>, strategy: &Strategy, now: u64) -> u64 {
    let here = entry.core.stats.here();
    let in_flight = here.in_flight();
    match strategy {
        Strategy::P2c(P2cLoad::PeakEwma { decay }) => {
            let decay = u64::try_from(decay.as_nanos()).unwrap_or(u64::MAX);
            let clock = now.saturating_add(ewma::calls_offset(decay));
            here.ewma().cost(clock, decay, usize::try_from(in_flight).unwrap_or(usize::MAX))
        }
        _ => in_flight,
    }
}

/// Calls `svc`, which has just been polled ready, and counts the call against `entry`
/// until its response ends, or its `deadline`.
fn start<S>(
    entry: &Entry<S>,
    svc: &mut S,
    request: http::Request<Body>,
    strategy: &Strategy,
    now: u64,
    deadline: Option<std::time::Instant>,
) -> ResponseFuture<S::Future>
where
    S: Service<http::Request<Body>>,
{
    let slot = entry.core.stats.started();
    let ewma = match strategy {
        Strategy::P2c(P2cLoad::PeakEwma { decay }) => {
            let decay = u64::try_from(decay.as_nanos()).unwrap_or(u64::MAX);
            let offset = ewma::calls_offset(decay);
            ewma::count_call();
            Some((if now == 0 { now_nanos() } else { now }, offset, decay))
        }
        _ => None,
    };
    let guard = Some(Guard { slot, ewma, deadline, done: false });
    ResponseFuture { kind: Kind::Called { inner: svc.call(request), guard } }
}

// === impl ResponseFuture ===

pin_project! {
    /// The response of a [`BalancedChannel`] call.
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

type Waiting = Pin<Box<dyn Future<Output = http::Response<Body>> + Send>>;

pin_project! {
    #[project = Proj]
    enum Kind<F> {
        // Failed before any endpoint was called.
        Failed { status: Option<Status> },
        // Sent to an endpoint.
        Called { #[pin] inner: F, guard: Option<Guard> },
        // Waiting for an endpoint to take it.
        Waiting { future: Waiting },
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.kind {
            Kind::Failed { .. } => "failed",
            Kind::Called { .. } => "called",
            Kind::Waiting { .. } => "waiting for an endpoint",
        };
        f.debug_struct("ResponseFuture").field("state", &state).finish()
    }
}

impl<F> ResponseFuture<F> {
    fn failed(status: Status) -> Self {
        ResponseFuture { kind: Kind::Failed { status: Some(status) } }
    }
}

impl<F: Send + 'static> ResponseFuture<F> {
    fn waiting<S>(
        shared: Arc<Shared<S>>,
        request: http::Request<Body>,
        pending: Vec<(Arc<Entry<S>>, S)>,
        returned: Arc<Returned<S>>,
    ) -> Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Future = F> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
    {
        let future = wait_for_endpoint(shared, request, pending, returned);
        ResponseFuture { kind: Kind::Waiting { future: Box::pin(future) } }
    }
}

/// Keeps an endpoint's counters right, also when a call is dropped unfinished.
pub(crate) struct Guard {
    pub(crate) slot: Arc<Slot>,
    /// For peak EWMA: when the call started, its thread's clock offset for the calls it
    /// sent (see [`ewma::calls_offset`]) and the decay (ns); taken at the response head.
    ewma: Option<(u64, u64, u64)>,
    /// The call's deadline, on tokio's clock.
    pub(crate) deadline: Option<std::time::Instant>,
    done: bool,
}

impl Guard {
    /// The response head arrived (or the call failed before it): peak EWMA's sample.
    fn answered(&mut self) {
        if let Some((started, offset, decay)) = self.ewma.take() {
            let now = now_nanos();
            self.slot.observe(now.saturating_add(offset), now.saturating_sub(started), decay);
        }
    }

    /// The call ended, `failed` at the endpoint or not.
    pub(crate) fn finish(&mut self, failed: bool) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.answered();
        self.slot.finished(failed);
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Dropped unfinished: the caller gave up (a cancellation), not the endpoint's fault,
        // unless the deadline had passed: a layer above ended the call at its deadline, and
        // the endpoint had not answered in time.
        let late = self.deadline.is_some_and(|d| Instant::now().into_std() >= d);
        self.finish(late);
    }
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
                // Failed without I/O: spend tokio's cooperative budget, so that a caller
                // looping on calls that fail at once yields to the other tasks of its thread.
                std::task::ready!(tokio::task::coop::poll_proceed(cx)).made_progress();
                let status = status.take().unwrap_or_else(|| Status::internal("response polled after completion"));
                Poll::Ready(Ok(status.into_http()))
            }
            Proj::Waiting { future } => future.as_mut().poll(cx).map(Ok),
            Proj::Called { inner, guard: slot } => match inner.poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(result) => {
                    let Some(mut guard) = slot.take() else {
                        return Poll::Ready(Ok(Status::internal("response polled after completion").into_http()));
                    };
                    guard.answered();
                    Poll::Ready(Ok(match result {
                        Ok(mut response) => {
                            let now = || Instant::now().into_std();
                            let Some(code) = status::code_at(response.headers_mut(), guard.deadline, now) else {
                                // The call goes on in its body, and counts until that ends.
                                return Poll::Ready(Ok(response.map(|body| Body::new(Counted::new(body, guard)))));
                            };
                            guard.finish(status::counts_against_endpoint(code));
                            if code != tonic::Code::Ok {
                                response.extensions_mut().insert(FailedAt(guard.slot.id.clone()));
                            }
                            response
                        }
                        Err(e) => {
                            let e = e.into();
                            // A call the server never took (a graceful GOAWAY) says nothing of it.
                            let taken = !mesh_util::transport::never_taken(&*e);
                            let mut status = status::of_error(e, &guard.slot.label);
                            if status.code() == tonic::Code::Cancelled
                                && guard.deadline.is_some_and(|d| Instant::now().into_std() >= d)
                            {
                                let message = format!("{}: the call's deadline passed", guard.slot.label);
                                status = Status::deadline_exceeded(message);
                            }
                            guard.finish(taken && status::counts_against_endpoint(status.code()));
                            let mut response = status.into_http();
                            response.extensions_mut().insert(FailedAt(guard.slot.id.clone()));
                            response
                        }
                    }))
                }
            },
        }
    }
}

// === waiting for an endpoint ===

/// A call that no endpoint could take at once: waits for the first set, for a connection,
/// or for backpressure to ease, bounded by the call's deadline, then calls the first
/// endpoint service to become ready. `pending` are instances already polled (with the
/// caller's waker) that were not ready; the one that takes the call goes back to the
/// caller's clone through `returned`.
async fn wait_for_endpoint<S>(
    shared: Arc<Shared<S>>,
    mut request: http::Request<Body>,
    mut pending: Vec<(Arc<Entry<S>>, S)>,
    returned: Arc<Returned<S>>,
) -> http::Response<Body>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let started = Instant::now();
    let timeout = status::grpc_timeout(request.headers());
    let call_deadline = mesh_util::grpc::Deadline::of(&mut request, || started.into_std());
    let deadline = call_deadline.map(Instant::from_std);
    let service = shared.service.clone();
    let past_deadline = || {
        Status::deadline_exceeded(format!(
            "the call's deadline ({:?}) passed while waiting for an endpoint of service {service}",
            timeout.unwrap_or_default()
        ))
        .into_http()
    };
    let mut changes = shared.changes.subscribe();

    // gRPC's wait for the first resolver result: bounded by the deadline and by the
    // balancer's first-resolution timeout, whichever comes first.
    if !shared.snapshot().resolved {
        let limit = started + shared.first_resolution_timeout;
        let until = deadline.map_or(limit, |d| d.min(limit));
        if tokio::time::timeout_at(until, shared.first_set()).await.is_err() {
            if deadline.is_some_and(|d| d <= limit) {
                return past_deadline();
            }
            return Status::unavailable(format!(
                "no endpoints for service {service}: none were resolved within {:?}",
                shared.first_resolution_timeout
            ))
            .into_http();
        }
    }

    let mut rng = rand::random::<u64>() | 1;
    loop {
        changes.borrow_and_update();
        let snap = shared.snapshot();
        let n = snap.entries.len();
        if n == 0 {
            return no_endpoints(&service).into_http();
        }
        let key = match hash_key(&snap.strategy, &request, &service) {
            Ok(key) => key,
            Err(status) => return status.into_http(),
        };
        // Instances of endpoints that left the set are dropped; every ready endpoint not
        // yet waited on is added, in the strategy's order.
        pending.retain(|(entry, _)| snap.entries.iter().any(|e| Arc::ptr_eq(&e.core, &entry.core)));
        let input = PickInput { ticket: next_random(&mut rng) as usize, random: next_random(&mut rng), key };
        let mut skipped = Skipped::default();
        if let Some(first) = snap.picker.first(&input, |i| load(&snap.entries[i], &snap.strategy, now_nanos())) {
            for i in std::iter::once(first).chain(snap.picker.fallbacks(first, &input).take(n)) {
                let entry = &snap.entries[i];
                match entry.core.conn.state() {
                    EndpointState::Ready => {
                        if !pending.iter().any(|(e, _)| Arc::ptr_eq(&e.core, &entry.core)) {
                            pending.push((entry.clone(), entry.core.service.clone()));
                        }
                    }
                    EndpointState::Connecting => skipped.connecting += 1,
                    EndpointState::Unreachable => skipped.unreachable += 1,
                }
            }
        }
        // Poll every candidate with this task's waker; the first ready one takes the call.
        let ready = std::future::poll_fn(|cx| {
            let mut i = 0;
            while i < pending.len() {
                match pending[i].1.poll_ready(cx) {
                    Poll::Ready(Ok(())) => return Poll::Ready(Some(i)),
                    Poll::Ready(Err(e)) => {
                        skipped.refused += 1;
                        skipped.last_refusal = Some(e.into());
                        pending.swap_remove(i);
                    }
                    Poll::Pending => i += 1,
                }
            }
            if pending.is_empty() { Poll::Ready(None) } else { Poll::Pending }
        });
        let deadline_passed = || async move {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            chosen = ready => match chosen {
                Some(i) => {
                    let (entry, mut svc) = pending.swap_remove(i);
                    // The others' reservations go with them.
                    pending.clear();
                    // The time spent waiting is taken off the deadline the endpoint is sent.
                    let mut request = request;
                    if let Some(at) = call_deadline {
                        let now = Instant::now().into_std();
                        if now >= at {
                            return past_deadline();
                        }
                        mesh_util::grpc::Deadline::set(&mut request, at, now);
                    }
                    let future = start(&entry, &mut svc, request, &snap.strategy, 0, call_deadline);
                    returned.put(entry, svc);
                    return match future.await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    };
                }
                None if skipped.connecting == 0 => return skipped.status(n, &service).into_http(),
                // Only connecting endpoints are left: wait for one below.
                None => {
                    tokio::select! {
                        changed = changes.changed() => if changed.is_err() {
                            return Status::unavailable(format!("the balancer of service {service} stopped")).into_http();
                        },
                        () = deadline_passed() => return past_deadline(),
                    }
                }
            },
            changed = changes.changed() => if changed.is_err() {
                return Status::unavailable(format!("the balancer of service {service} stopped")).into_http();
            },
            () = deadline_passed() => return past_deadline(),
        }
    }
}
