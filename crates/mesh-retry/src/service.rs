use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http_body::{Body as _, Frame};
use mesh_balancer::{AvoidEndpoints, FailedAt};
use mesh_util::grpc;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tonic::Code;
use tonic::body::Body;
use tower_service::Service;

use crate::layer::Live;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Retries idempotent calls: see the crate docs. Built by [`crate::RetryLayer`].
#[derive(Debug)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared<S>>,
}

/// Counters of a retry layer, shared by every clone of its services. Only retries are
/// counted: a counter every call touched would be one more cache line shared by all threads.
#[derive(Debug, Default)]
pub struct RetryStats {
    retries: AtomicU64,
    budget_exhausted: AtomicU64,
}

impl RetryStats {
    /// Retries made (attempts after the first).
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Retries not made because the budget was spent.
    pub fn budget_exhausted(&self) -> u64 {
        self.budget_exhausted.load(Ordering::Relaxed)
    }
}

pub(crate) struct Shared<S> {
    /// The policy and budget in force, shared with the layer's handle.
    pub(crate) live: Arc<ArcSwap<Live>>,
    pub(crate) stats: Arc<RetryStats>,
    /// The service retries are sent through: a clone of it per retry.
    prototype: S,
}

impl<S> std::fmt::Debug for Shared<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("live", &self.live).finish_non_exhaustive()
    }
}

impl<S: Clone> Retry<S> {
    pub(crate) fn new(inner: S, live: Arc<ArcSwap<Live>>, stats: Arc<RetryStats>) -> Self {
        let prototype = inner.clone();
        Retry { inner, shared: Arc::new(Shared { live, stats, prototype }) }
    }
}

impl<S> Retry<S> {
    /// The counters.
    pub fn stats(&self) -> Arc<RetryStats> {
        self.shared.stats.clone()
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for Retry<S> {
    fn clone(&self) -> Self {
        Retry { inner: self.inner.clone(), shared: self.shared.clone() }
    }
}

impl<S> Service<http::Request<Body>> for Retry<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let shared = &self.shared;
        let live = shared.live.load();
        live.budget.deposit();
        // The call's deadline, as the layers above measured it, or from now (the clock is
        // read only for a call with a deadline).
        let deadline = grpc::Deadline::of(&mut request, || Instant::now().into_std()).map(Instant::from_std);
        if !live.policy.is_retryable(request.uri().path()) {
            return ResponseFuture { state: State::Once { inner: self.inner.call(request) }, deadline };
        }
        let (parts, body) = request.into_parts();
        let (body, replay) = buffer(body, live.policy.max_buffered);
        let Some(bytes) = replay else {
            // Too large, or a stream not ready to be read: sent once.
            let request = http::Request::from_parts(parts, body);
            return ResponseFuture { state: State::Once { inner: self.inner.call(request) }, deadline };
        };
        let started = Instant::now();
        let again = Box::new(Again {
            shared: shared.clone(),
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            extensions: parts.extensions.clone(),
            bytes,
            deadline,
            failed_at: Vec::new(),
        });
        let mut request = http::Request::from_parts(parts, body);
        // The first attempt keeps the call's deadline, unless its own is shorter.
        if live.policy.per_try_timeout.is_some()
            && let Some(timeout) = again.attempt_timeout(started)
        {
            grpc::Deadline::set(&mut request, (started + timeout).into_std(), started.into_std());
        }
        ResponseFuture { state: State::First { inner: self.inner.call(request), again: Some(again) }, deadline }
    }
}

/// Reads what of `body` is ready now, to replay it on a retry. A unary request from a
/// generated client is one message that is ready at once; anything that is not (a stream
/// still being written, a request over `max` bytes) is sent on as it is, once.
///
/// The body is polled with a no-op waker: a body that is not ready goes on to the
/// transport, which polls it again with its own waker before waiting on it.
fn buffer(mut body: Body, max: usize) -> (Body, Option<Bytes>) {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut data = BytesMut::new();
    let mut first: Option<Bytes> = None;
    loop {
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(None) => {
                let bytes = match first {
                    Some(only) if data.is_empty() => only,
                    Some(head) => {
                        let mut all = BytesMut::from(&head[..]);
                        all.extend_from_slice(&data);
                        all.freeze()
                    }
                    None => Bytes::new(),
                };
                return (replay_body(bytes.clone()), Some(bytes));
            }
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(chunk) => {
                    let total = first.as_ref().map_or(0, Bytes::len) + data.len() + chunk.len();
                    if total > max {
                        let sent = prefix(first, data, chunk);
                        return (Body::new(Prefixed { prefix: Some(sent), rest: body }), None);
                    }
                    if first.is_none() {
                        first = Some(chunk);
                    } else {
                        data.extend_from_slice(&chunk);
                    }
                }
                // Request trailers: gRPC clients send none; not replayable.
                Err(frame) => {
                    let sent = prefix(first, data, Bytes::new());
                    let rest = Prefixed { prefix: None, rest: Body::new(Trailing { frame: Some(frame), rest: body }) };
                    return (Body::new(Prefixed { prefix: Some(sent), rest: Body::new(rest) }), None);
                }
            },
            Poll::Ready(Some(Err(status))) => return (Body::new(Failed { status: Some(status) }), None),
            Poll::Pending => {
                let sent = prefix(first, data, Bytes::new());
                return (Body::new(Prefixed { prefix: Some(sent), rest: body }), None);
            }
        }
    }
}

fn prefix(first: Option<Bytes>, data: BytesMut, chunk: Bytes) -> Bytes {
    let mut all = BytesMut::new();
    if let Some(first) = first {
        all.extend_from_slice(&first);
    }
    all.extend_from_slice(&data);
    all.extend_from_slice(&chunk);
    all.freeze()
}

fn replay_body(bytes: Bytes) -> Body {
    if bytes.is_empty() { Body::empty() } else { Body::new(Prefixed { prefix: Some(bytes), rest: Body::empty() }) }
}

pin_project! {
    /// Bytes already read from a body, then the rest of it.
    struct Prefixed {
        prefix: Option<Bytes>,
        #[pin]
        rest: Body,
    }
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.project();
        if let Some(prefix) = this.prefix.take().filter(|p| !p.is_empty()) {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        this.rest.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.as_ref().is_none_or(Bytes::is_empty) && self.rest.is_end_stream()
    }
}

pin_project! {
    /// A non-data frame already read from a body, then the rest of it.
    struct Trailing {
        frame: Option<Frame<Bytes>>,
        #[pin]
        rest: Body,
    }
}

impl http_body::Body for Trailing {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.project();
        if let Some(frame) = this.frame.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        this.rest.poll_frame(cx)
    }
}

/// A body whose first read failed: the same error, to the transport.
struct Failed {
    status: Option<tonic::Status>,
}

impl http_body::Body for Failed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        Poll::Ready(self.status.take().map(Err))
    }
}

/// What a retry needs: the request again, and the call's deadline.
struct Again<S> {
    shared: Arc<Shared<S>>,
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
    extensions: http::Extensions,
    bytes: Bytes,
    deadline: Option<Instant>,
    /// Endpoints earlier attempts failed at, for the balancer to avoid.
    failed_at: Vec<Arc<str>>,
}

impl<S> Again<S> {
    /// Whether `result` should be retried: a code in `retry_on` in the response's headers
    /// (a response with messages has committed the call), or a transport error.
    fn wants_retry<E>(&self, result: &Result<http::Response<Body>, E>) -> bool {
        match result {
            Ok(response) => grpc::grpc_status(response.headers()).is_some_and(|code| {
                let code = Code::from_i32(code);
                let live = self.shared.live.load();
                // An attempt that ran out of its own time, with time left on the call's.
                let try_timed_out = code == Code::DeadlineExceeded
                    && live.policy.per_try_timeout.is_some()
                    && self.deadline.is_none_or(|d| Instant::now() < d);
                let retryable = code != Code::Ok && (live.policy.retry_on.contains(&code) || try_timed_out);
                // A server's pushback (gRFC A6, as grpc-go reads it) says when a retryable
                // code may be tried again; it makes no other code retryable. One that says
                // never, or asks for longer than `max_pushback`, ends the retries.
                retryable
                    && match pushback(response.headers()) {
                        Some(Pushback::After(delay)) => delay <= live.policy.max_pushback,
                        Some(Pushback::Never) => false,
                        None => true,
                    }
            }),
            Err(_) => true,
        }
    }

    /// How long an attempt starting at `now` may take: what is left of the call's
    /// deadline, or the per-try timeout if that is shorter.
    fn attempt_timeout(&self, now: Instant) -> Option<std::time::Duration> {
        let left = self.deadline.map(|d| d.saturating_duration_since(now));
        match (left, self.shared.live.load().policy.per_try_timeout) {
            (Some(left), Some(per_try)) => Some(left.min(per_try)),
            (left, per_try) => left.or(per_try),
        }
    }

    /// The request of the next attempt, carrying the time left as its `grpc-timeout`.
    fn request(&self, now: Instant) -> http::Request<Body> {
        let mut request = http::Request::new(replay_body(self.bytes.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        *request.extensions_mut() = self.extensions.clone();
        if let Some(timeout) = self.attempt_timeout(now) {
            grpc::Deadline::set(&mut request, (now + timeout).into_std(), now.into_std());
        }
        if !self.failed_at.is_empty() {
            request.extensions_mut().insert(AvoidEndpoints(self.failed_at.clone()));
        }
        request
    }
}

pin_project! {
    /// The response of a [`Retry`] call.
    pub struct ResponseFuture<F, S> {
        #[pin]
        state: State<F, S>,
        // The call's deadline, which its response body must meet too.
        deadline: Option<Instant>,
    }
}

impl<F, S> std::fmt::Debug for ResponseFuture<F, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Once { .. } => "once",
            State::First { .. } => "first attempt",
            State::Retrying { .. } => "retrying",
        };
        f.debug_struct("ResponseFuture").field("state", &state).finish()
    }
}

type Retrying = Pin<Box<dyn Future<Output = Result<http::Response<Body>, BoxError>> + Send>>;

pin_project! {
    #[project = StateProj]
    enum State<F, S> {
        // Not retryable: the one attempt.
        Once { #[pin] inner: F },
        // The first attempt of a retryable call.
        First { #[pin] inner: F, again: Option<Box<Again<S>>> },
        // Retrying.
        Retrying { future: Retrying },
    }
}

impl<F, S, E> Future for ResponseFuture<F, S>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
    E: Into<BoxError>,
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Output = Result<http::Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut state = this.state;
        let result = loop {
            match state.as_mut().project() {
                StateProj::Once { inner } => break std::task::ready!(inner.poll(cx)).map_err(Into::into),
                StateProj::First { inner, again } => {
                    let result = std::task::ready!(inner.poll(cx)).map_err(Into::into);
                    let retry = again.take().filter(|a| a.wants_retry(&result));
                    let Some(again) = retry else { break result };
                    let future = Box::pin(retry_loop(*again, result));
                    state.set(State::Retrying { future });
                }
                StateProj::Retrying { future } => break std::task::ready!(future.as_mut().poll(cx)),
            }
        };
        Poll::Ready(result.map(|response| within_deadline(response, *this.deadline)))
    }
}

/// What a server's `grpc-retry-pushback-ms` says.
enum Pushback {
    /// Try again after this long.
    After(std::time::Duration),
    /// Do not try again (a negative or malformed value, as gRFC A6 reads it).
    Never,
}

/// The `grpc-retry-pushback-ms` of a response, if it has one.
fn pushback(headers: &http::HeaderMap) -> Option<Pushback> {
    static PUSHBACK: http::HeaderName = http::HeaderName::from_static("grpc-retry-pushback-ms");
    let value = headers.get(&PUSHBACK)?;
    Some(match value.to_str().ok().and_then(|v| v.parse::<u64>().ok()) {
        Some(ms) => Pushback::After(std::time::Duration::from_millis(ms)),
        None => Pushback::Never,
    })
}

/// `response`, whose body fails with DEADLINE_EXCEEDED if it has not ended by `deadline`:
/// tonic's client times a call out only until the response's head arrives, and a server that
/// hangs after sending it would otherwise hold the call past its deadline.
fn within_deadline(response: http::Response<Body>, deadline: Option<Instant>) -> http::Response<Body> {
    match deadline {
        // A trailers-only response has ended already.
        Some(deadline) if grpc::grpc_status(response.headers()).is_none() => {
            response.map(|body| Body::new(DeadlineBody { inner: body, deadline, timer: None }))
        }
        _ => response,
    }
}

pin_project! {
    /// A response body held to the call's deadline. The timer is made only if the body has
    /// to wait: a unary response usually arrives whole with its head.
    struct DeadlineBody {
        #[pin]
        inner: Body,
        deadline: Instant,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let deadline = *this.deadline;
        let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        std::task::ready!(timer.as_mut().poll(cx));
        Poll::Ready(Some(Err(tonic::Status::deadline_exceeded(
            "the call's deadline passed while its response was still arriving",
        ))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Retries after a first attempt that ended in `last`, while the policy, the budget and
/// the deadline allow; the last attempt's result is the call's.
async fn retry_loop<S>(
    mut again: Again<S>,
    mut last: Result<http::Response<Body>, BoxError>,
) -> Result<http::Response<Body>, BoxError>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    use tower::ServiceExt as _;

    let shared = again.shared.clone();
    // The policy as the first retry finds it, for the rest of the call.
    let live = shared.live.load_full();
    let policy = &live.policy;
    let mut backoff = mesh_util::Backoff::new(policy.backoff, policy.max_backoff);
    let mut attempts = 1;
    loop {
        if let Ok(response) = &last
            && let Some(FailedAt(id)) = response.extensions().get::<FailedAt>()
            && !again.failed_at.contains(id)
        {
            again.failed_at.push(id.clone());
        }
        if attempts >= policy.max_attempts || !again.wants_retry(&last) {
            return last;
        }
        // The server's pushback replaces the backoff.
        let pushed = last.as_ref().ok().and_then(|r| match pushback(r.headers()) {
            Some(Pushback::After(delay)) => Some(delay),
            _ => None,
        });
        let delay = pushed.unwrap_or_else(|| backoff.next_delay());
        if again.deadline.is_some_and(|d| Instant::now() + delay >= d) {
            return last;
        }
        if !live.budget.withdraw() {
            shared.stats.budget_exhausted.fetch_add(1, Ordering::Relaxed);
            return last;
        }
        tokio::time::sleep(delay).await;
        attempts += 1;
        shared.stats.retries.fetch_add(1, Ordering::Relaxed);
        let mut svc = shared.prototype.clone();
        let ready: Result<(), BoxError> = svc.ready().await.map(drop).map_err(Into::into);
        last = match ready {
            Ok(()) => svc.call(again.request(Instant::now())).await.map_err(Into::into),
            Err(e) => Err(e),
        };
    }
}

#[cfg(test)]
mod tests;
