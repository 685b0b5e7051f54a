//! The tower layer that counts calls by method and gRPC code and times them.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Instant;

use arc_swap::ArcSwap;
use http_body::Frame;
use pin_project_lite::pin_project;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Methods given their own label; calls to any other path count as `method="other"`, so a
/// client that sends random paths cannot grow the metrics without bound.
const MAX_METHODS: usize = 256;

/// The label of every call to a path a [`CallMetricsLayer::serving`] layer was not told of.
pub const UNKNOWN_METHOD: &str = "unknown";

/// gRPC's names of its codes, by number.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];
const CANCELLED: i32 = 1;
const UNKNOWN: i32 = 2;
const UNAVAILABLE: i32 = 14;

/// Which side of a call the layer sits on: it names the metrics
/// (`mesh_server_calls_total`, `mesh_client_calls_total`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Side {
    /// Calls a server answered.
    Server,
    /// Calls a client made.
    Client,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
        }
    }
}

/// Upper bounds of the latency buckets, in nanoseconds: 100 µs to 10 s.
const BOUNDS_NANOS: [u64; 14] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    10_000_000_000,
];

/// One method's counts: calls per code, and a latency histogram. Plain atomics, written with
/// relaxed adds on every call and read when scraped; no registry lookup and no allocation
/// per call (the `metrics` facade's histogram pushes every sample into a shared bucket,
/// which cost the client stack a few percent).
#[derive(Debug)]
struct Method {
    name: Box<str>,
    codes: [AtomicU64; 17],
    /// Calls per latency bucket, not cumulative; the last counts those above every bound.
    buckets: [AtomicU64; BOUNDS_NANOS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Method {
    fn new(name: &str) -> Self {
        Method {
            name: name.into(),
            codes: Default::default(),
            buckets: Default::default(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Counts a call that ended with `code`, and times it if it was timed.
    fn record(&self, code: i32, started: Option<Instant>) {
        let index = usize::try_from(code).ok().filter(|&c| c < CODE_NAMES.len()).unwrap_or(UNKNOWN as usize);
        self.codes[index].fetch_add(1, Ordering::Relaxed);
        let Some(started) = started else { return };
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_NANOS.iter().position(|&b| nanos <= b).unwrap_or(BOUNDS_NANOS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct Table {
    side: Side,
    /// Whether calls are timed: a `for_collector` table counts codes only, which is what a
    /// collector writes, and saves reading the clock twice per call.
    timed: bool,
    methods: ArcSwap<HashMap<Box<str>, Arc<Method>>>,
    /// Made the first time a method finds the table full, or (with `known`) the first
    /// time a path it does not hold comes.
    other: OnceLock<Arc<Method>>,
    /// The only paths given their own label, when the layer was told what is served.
    known: Option<std::collections::HashSet<Box<str>>>,
    grow: std::sync::Mutex<()>,
}

impl Table {
    /// The metrics of `path`: read without a lock; made once per new method.
    fn method(&self, path: &str) -> Arc<Method> {
        if let Some(m) = self.methods.load().get(path) {
            return m.clone();
        }
        let _grow = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.methods.load_full();
        if let Some(m) = current.get(path) {
            return m.clone();
        }
        match &self.known {
            Some(known) if !known.contains(path) => {
                return self.other.get_or_init(|| Arc::new(Method::new(UNKNOWN_METHOD))).clone();
            }
            Some(_) => {}
            None if current.len() >= MAX_METHODS => {
                return self.other.get_or_init(|| Arc::new(Method::new("other"))).clone();
            }
            None => {}
        }
        let method = Arc::new(Method::new(path));
        let mut next = (*current).clone();
        next.insert(path.into(), method.clone());
        self.methods.store(Arc::new(next));
        method
    }
}

/// Every live layer's table, for the scrape.
static TABLES: std::sync::Mutex<Vec<Weak<Table>>> = std::sync::Mutex::new(Vec::new());

/// The call metrics of every layer in the process in Prometheus' text format; methods seen
/// by several layers of one side are added up.
pub(crate) fn render() -> String {
    let tables: Vec<Arc<Table>> = {
        let mut all = TABLES.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|t| t.strong_count() > 0);
        all.iter().filter_map(Weak::upgrade).collect()
    };
    // side → method → (calls per code, buckets, sum)
    type Sums = ([u64; 17], [u64; BOUNDS_NANOS.len() + 1], u64);
    let mut sums: BTreeMap<Side, BTreeMap<String, Sums>> = BTreeMap::new();
    for table in &tables {
        let methods = table.methods.load();
        for m in methods.values().chain(table.other.get()) {
            let entry = sums.entry(table.side).or_default().entry(m.name.to_string()).or_default();
            for (total, c) in entry.0.iter_mut().zip(&m.codes) {
                *total += c.load(Ordering::Relaxed);
            }
            for (total, b) in entry.1.iter_mut().zip(&m.buckets) {
                *total += b.load(Ordering::Relaxed);
            }
            entry.2 += m.sum_nanos.load(Ordering::Relaxed);
        }
    }
    let mut out = String::new();
    for (side, methods) in sums {
        let side = side.name();
        out.push_str(&format!(
            "# HELP mesh_{side}_calls_total Calls by method and gRPC code.\n# TYPE mesh_{side}_calls_total counter\n"
        ));
        for (method, (codes, _, _)) in &methods {
            let method = escape(method);
            for (code, n) in codes.iter().enumerate().filter(|(_, n)| **n > 0) {
                out.push_str(&format!(
                    "mesh_{side}_calls_total{{method=\"{method}\",code=\"{}\"}} {n}\n",
                    CODE_NAMES[code]
                ));
            }
        }
        out.push_str(&format!(
            "# HELP mesh_{side}_call_duration_seconds Time from request to the end of the response, by method.\n\
             # TYPE mesh_{side}_call_duration_seconds histogram\n"
        ));
        for (method, (_, buckets, sum)) in &methods {
            let method = escape(method);
            let mut cumulative = 0;
            for (bound, n) in BOUNDS_NANOS.iter().zip(buckets) {
                cumulative += n;
                let le = *bound as f64 / 1e9;
                out.push_str(&format!(
                    "mesh_{side}_call_duration_seconds_bucket{{method=\"{method}\",le=\"{le}\"}} {cumulative}\n"
                ));
            }
            cumulative += buckets[BOUNDS_NANOS.len()];
            out.push_str(&format!(
                "mesh_{side}_call_duration_seconds_bucket{{method=\"{method}\",le=\"+Inf\"}} {cumulative}\n"
            ));
            out.push_str(&format!(
                "mesh_{side}_call_duration_seconds_sum{{method=\"{method}\"}} {}\n",
                *sum as f64 / 1e9
            ));
            out.push_str(&format!("mesh_{side}_call_duration_seconds_count{{method=\"{method}\"}} {cumulative}\n"));
        }
    }
    out
}

/// The call counts of a [`CallMetricsLayer::for_collector`] layer: calls by method and gRPC
/// code, shared with every service the layer made.
#[derive(Debug, Clone)]
pub struct CallCounts(Arc<Table>);

/// [`CallCounts`] that do not keep the counts alive: for a table whose entries should go
/// when the layer that counts does.
#[derive(Debug, Clone)]
pub struct WeakCallCounts(std::sync::Weak<Table>);

impl WeakCallCounts {
    /// The counts, while the layer (or another handle) still holds them.
    pub fn upgrade(&self) -> Option<CallCounts> {
        self.0.upgrade().map(CallCounts)
    }

    /// Whether the counts are gone.
    pub fn is_gone(&self) -> bool {
        self.0.strong_count() == 0
    }
}

impl CallCounts {
    /// Counts that do not keep these alive.
    pub fn downgrade(&self) -> WeakCallCounts {
        WeakCallCounts(Arc::downgrade(&self.0))
    }

    /// Calls by method and code name (`OK`, `UNAVAILABLE`, …), codes without calls left out.
    pub fn by_method_and_code(&self) -> Vec<(String, &'static str, u64)> {
        let mut out = Vec::new();
        for m in self.0.methods.load().values().chain(self.0.other.get()) {
            for (code, n) in m.codes.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    out.push((m.name.to_string(), CODE_NAMES[code], n));
                }
            }
        }
        out.sort();
        out
    }
}

/// A label value as Prometheus' text format wants it.
pub(crate) fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Counts every call that goes through it by method and gRPC code
/// (`mesh_{side}_calls_total{method,code}`) and times it from request to the end of its
/// response (`mesh_{side}_call_duration_seconds{method}`, a histogram). A call whose
/// response was dropped before its end counts as CANCELLED; one that failed without a
/// response, as UNAVAILABLE. Clones share the metrics.
///
/// ```
/// use mesh_metrics::{CallMetricsLayer, Side};
/// use tower_layer::Layer as _;
///
/// # fn f(channel: tonic::transport::Channel) {
/// let counted = CallMetricsLayer::new(Side::Client).layer(channel);
/// let _client = mesh_proto::pb::greeter_client::GreeterClient::new(counted);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct CallMetricsLayer {
    /// `None` when no recorder was installed: calls pass through untouched.
    table: Option<Arc<Table>>,
}

impl CallMetricsLayer {
    /// A layer for `side`. The metrics go to the recorder installed in the process by
    /// [`crate::install`]; a layer made before that (or without it) passes calls through at
    /// no cost and records nothing.
    pub fn new(side: Side) -> Self {
        Self::registered(side, None)
    }

    /// A server's layer that labels only the `methods` it serves (paths such as
    /// `/greeter.v1.Greeter/SayHello`, as [`crate::methods_in`] lists them) and counts every
    /// other path under `method="unknown"`: a client that calls made-up paths gets one
    /// series, and cannot push real methods out of the metrics. [`CallMetricsLayer::new`]
    /// instead labels the first 256 paths it sees and counts the rest as `other`, which
    /// suits a client, whose paths are its own code's.
    pub fn serving<I, P>(side: Side, methods: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<Box<str>>,
    {
        Self::registered(side, Some(methods.into_iter().map(Into::into).collect()))
    }

    fn registered(side: Side, known: Option<std::collections::HashSet<Box<str>>>) -> Self {
        let layer = Self::unregistered(side, true, known);
        if let Some(table) = &layer.table {
            TABLES.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::downgrade(table));
        }
        layer
    }

    /// A layer that records nothing and passes calls through, for a process that turned
    /// metrics off but wants one service type either way.
    pub fn off() -> Self {
        CallMetricsLayer { table: None }
    }

    /// A layer that counts calls by method and code (it does not time them) and whose counts
    /// are not in the per-method metrics of every scrape but are written by a [`crate::collector`] that holds its [`CallMetricsLayer::counts`], with the
    /// labels it chooses and only while it chooses to: say, the calls to each endpoint a
    /// balancer has now, so that an endpoint that leaves takes its series with it.
    pub fn for_collector(side: Side) -> Self {
        Self::unregistered(side, false, None)
    }

    /// The counts of this layer's calls, for a collector; `None` without a recorder.
    pub fn counts(&self) -> Option<CallCounts> {
        self.table.clone().map(CallCounts)
    }

    fn unregistered(side: Side, timed: bool, known: Option<std::collections::HashSet<Box<str>>>) -> Self {
        if !crate::installed() {
            return CallMetricsLayer { table: None };
        }
        let table = Arc::new(Table {
            side,
            timed,
            methods: ArcSwap::from_pointee(HashMap::new()),
            other: OnceLock::new(),
            known,
            grow: std::sync::Mutex::new(()),
        });
        CallMetricsLayer { table: Some(table) }
    }
}

impl<S> tower_layer::Layer<S> for CallMetricsLayer {
    type Service = CallMetrics<S>;

    fn layer(&self, inner: S) -> CallMetrics<S> {
        CallMetrics { inner, table: self.table.clone() }
    }
}

/// The service of [`CallMetricsLayer`].
#[derive(Debug, Clone)]
pub struct CallMetrics<S> {
    inner: S,
    table: Option<Arc<Table>>,
}

impl<S, ReqB, ResB> tower_service::Service<http::Request<ReqB>> for CallMetrics<S>
where
    S: tower_service::Service<http::Request<ReqB>, Response = http::Response<ResB>>,
    ResB: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = http::Response<RecordingBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqB>) -> Self::Future {
        let record = self.table.as_ref().map(|table| Record {
            method: table.method(request.uri().path()),
            started: table.timed.then(Instant::now),
            done: false,
        });
        ResponseFuture { inner: self.inner.call(request), record }
    }
}

/// Records one call, once; dropped unrecorded, the call was cancelled.
#[derive(Debug)]
struct Record {
    method: Arc<Method>,
    started: Option<Instant>,
    done: bool,
}

impl Record {
    fn finish(&mut self, code: i32) {
        if !std::mem::replace(&mut self.done, true) {
            self.method.record(code, self.started);
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.finish(CANCELLED);
    }
}

pin_project! {
    /// The response future of [`CallMetrics`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        record: Option<Record>,
    }
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResB>, E>>,
    ResB: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Output = Result<http::Response<RecordingBody<ResB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        // Taken once; a future polled again after completion has nothing left to record.
        let record = this.record.take();
        Poll::Ready(match result {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                // A trailers-only response carries its status in its headers; otherwise the
                // body records the call at its end. Not boxed: whoever needs one box (a
                // balancer, a breaker) makes it, and a generated client takes any body.
                let record = match (record, mesh_util::grpc::grpc_status(&parts.headers)) {
                    (Some(mut record), Some(code)) => {
                        record.finish(code);
                        None
                    }
                    (record, _) => record,
                };
                let body = RecordingBody { inner: body, record };
                Ok(http::Response::from_parts(parts, body))
            }
            Err(e) => {
                if let Some(mut record) = record {
                    record.finish(UNAVAILABLE);
                }
                Err(e)
            }
        })
    }
}

pin_project! {
    /// The response body of [`CallMetrics`]: the inner body, which records the call at its
    /// end (its trailers' status, UNKNOWN for an end without one, UNAVAILABLE for an error)
    /// unless the call was recorded already.
    #[derive(Debug)]
    pub struct RecordingBody<B> {
        #[pin]
        inner: B,
        record: Option<Record>,
    }
}

impl<B> http_body::Body for RecordingBody<B>
where
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        let end = match &frame {
            Some(Ok(f)) => f.trailers_ref().map(|t| mesh_util::grpc::grpc_status(t).unwrap_or(UNKNOWN)),
            Some(Err(_)) => Some(UNAVAILABLE),
            None => Some(UNKNOWN),
        };
        if let Some(code) = end
            && let Some(mut record) = this.record.take()
        {
            record.finish(code);
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.record.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The paths of every method of every service in an encoded `FileDescriptorSet` (what
/// `tonic-prost-build` writes and reflection serves), as `/package.Service/Method`: what a
/// server serves, for [`CallMetricsLayer::serving`].
///
/// ```
/// let paths = mesh_metrics::methods_in(mesh_proto::FILE_DESCRIPTOR_SET).expect("a descriptor set");
/// assert!(paths.contains(&"/greeter.v1.Greeter/SayHello".to_string()));
/// ```
pub fn methods_in(file_descriptor_set: &[u8]) -> Result<Vec<String>, prost::DecodeError> {
    let set = <prost_types::FileDescriptorSet as prost::Message>::decode(file_descriptor_set)?;
    let mut paths = Vec::new();
    for file in &set.file {
        let package = file.package.as_deref().unwrap_or("");
        for service in &file.service {
            let service_name = service.name.as_deref().unwrap_or("");
            let full = if package.is_empty() { service_name.to_string() } else { format!("{package}.{service_name}") };
            for method in &service.method {
                paths.push(format!("/{full}/{}", method.name.as_deref().unwrap_or("")));
            }
        }
    }
    Ok(paths)
}
