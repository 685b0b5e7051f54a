//! The tower layer that counts calls by method and gRPC code and times them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use arc_swap::ArcSwap;
use http_body::Frame;
use metrics::{Counter, Histogram};
use pin_project_lite::pin_project;
use tonic::body::Body;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Methods given their own label; calls to any other path count as `method="other"`, so a
/// client that sends random paths cannot grow the metrics without bound.
const MAX_METHODS: usize = 256;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Calls a server answered.
    Server,
    /// Calls a client made.
    Client,
}

impl Side {
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Side::Server => ("mesh_server_calls_total", "mesh_server_call_duration_seconds"),
            Side::Client => ("mesh_client_calls_total", "mesh_client_call_duration_seconds"),
        }
    }
}

/// One method's metrics: a counter per code, made on first use, and its latency histogram.
#[derive(Debug)]
struct Method {
    name: Box<str>,
    calls: String,
    codes: [OnceLock<Counter>; 17],
    duration: Histogram,
}

impl Method {
    fn new(side: Side, name: &str) -> Self {
        let (calls, duration) = side.names();
        Method {
            name: name.into(),
            calls: calls.to_string(),
            codes: Default::default(),
            duration: metrics::histogram!(duration, "method" => name.to_string()),
        }
    }

    fn record(&self, code: i32, started: Instant) {
        let index = usize::try_from(code).ok().filter(|&c| c < CODE_NAMES.len()).unwrap_or(UNKNOWN as usize);
        let counter = self.codes[index].get_or_init(
            || metrics::counter!(self.calls.clone(), "method" => self.name.to_string(), "code" => CODE_NAMES[index]),
        );
        counter.increment(1);
        self.duration.record(started.elapsed().as_secs_f64());
    }
}

#[derive(Debug)]
struct Table {
    side: Side,
    methods: ArcSwap<HashMap<Box<str>, Arc<Method>>>,
    /// Made the first time a method finds the table full.
    other: OnceLock<Arc<Method>>,
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
        if current.len() >= MAX_METHODS {
            return self.other.get_or_init(|| Arc::new(Method::new(self.side, "other"))).clone();
        }
        let method = Arc::new(Method::new(self.side, path));
        let mut next = (*current).clone();
        next.insert(path.into(), method.clone());
        self.methods.store(Arc::new(next));
        method
    }
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
        if !crate::installed() {
            return CallMetricsLayer { table: None };
        }
        CallMetricsLayer {
            table: Some(Arc::new(Table {
                side,
                methods: ArcSwap::from_pointee(HashMap::new()),
                other: OnceLock::new(),
                grow: std::sync::Mutex::new(()),
            })),
        }
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
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqB>) -> Self::Future {
        let record = self.table.as_ref().map(|table| Record {
            method: table.method(request.uri().path()),
            started: Instant::now(),
            done: false,
        });
        ResponseFuture { inner: self.inner.call(request), record }
    }
}

/// Records one call, once; dropped unrecorded, the call was cancelled.
#[derive(Debug)]
struct Record {
    method: Arc<Method>,
    started: Instant,
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
    type Output = Result<http::Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        // Taken once; a future polled again after completion has nothing left to record.
        let record = this.record.take();
        Poll::Ready(match result {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                // A trailers-only response carries its status in its headers; without a
                // recorder the body passes as it is (no new box for a tonic Body).
                let body = match (record, mesh_util::grpc::grpc_status(&parts.headers)) {
                    (None, _) => Body::new(body),
                    (Some(mut record), Some(code)) => {
                        record.finish(code);
                        Body::new(body)
                    }
                    (record, None) => Body::new(RecordingBody { inner: body, record }),
                };
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
    /// A response body that records the call at its end: its trailers' status, UNKNOWN for
    /// an end without one, UNAVAILABLE for an error.
    struct RecordingBody<B> {
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
