use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use arc_swap::ArcSwapOption;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::bucket::Bucket;
use crate::config::{InvalidLimit, LimiterConfig, Mode};
use crate::table::Table;

/// Paths never limited: health checks must answer during a flood, and reflection is how
/// tools look at a server under load.
const EXEMPT: [&str; 2] = ["/grpc.health.v1.", "/grpc.reflection."];

/// The metadata key of the pushback hint a rejection carries (gRPC's retry design, A6).
pub const PUSHBACK_KEY: &str = "grpc-retry-pushback-ms";

#[derive(Debug)]
struct Shared {
    /// The buckets of the limits in force; none while the limiter is off.
    table: ArcSwapOption<Table>,
    counts: Counts,
}

/// Calls admitted and rejected per [`Scope`], on a cache line of their own: every call
/// writes them, and they must not evict the table pointer that every call reads.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Counts {
    admitted: [AtomicU64; 3],
    rejected: [AtomicU64; 3],
}

impl Counts {
    fn admit(&self, scope: Scope) {
        self.admitted[scope as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn reject(&self, scope: Scope) {
        self.rejected[scope as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Which budget decided a call: what [`LimiterHandle::admitted_in`] and
/// [`LimiterHandle::rejected_in`] count by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The server's own limit, for methods without one of their own.
    Server = 0,
    /// A method's own limit.
    Method = 1,
    /// A caller's budget (with limits per caller), whether it follows the server's or a
    /// method's limit.
    Caller = 2,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 3] = [Scope::Server, Scope::Method, Scope::Caller];

    /// `server`, `method` or `caller`: the scope as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Server => "server",
            Scope::Method => "method",
            Scope::Caller => "caller",
        }
    }
}

/// Limits the calls of every service it wraps with one set of buckets: tonic layers a
/// server's stack once per connection, and every connection's copy shares them, so N
/// connections get the server's rate, not N times it.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    shared: Arc<Shared>,
}

/// Changes a limiter's settings while it runs, and reads its counters.
#[derive(Debug, Clone)]
pub struct LimiterHandle {
    shared: Arc<Shared>,
}

/// A rate-limited service; see the crate docs.
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl RateLimitLayer {
    /// A layer that limits as `config` says; the error names a bad setting.
    pub fn try_new(config: LimiterConfig) -> Result<Self, InvalidLimit> {
        config.validate()?;
        let table = Table::new(config, None);
        let shared = Shared { table: ArcSwapOption::from_pointee(table), counts: Counts::default() };
        Ok(RateLimitLayer { shared: Arc::new(shared) })
    }

    /// A layer that limits nothing until [`LimiterHandle::update`] gives it limits: for a
    /// server whose limits may come later, from live configuration.
    pub fn off() -> Self {
        let shared = Shared { table: ArcSwapOption::empty(), counts: Counts::default() };
        RateLimitLayer { shared: Arc::new(shared) }
    }

    /// A handle to change the limits live and read the counters.
    pub fn handle(&self) -> LimiterHandle {
        LimiterHandle { shared: self.shared.clone() }
    }
}

impl<S> tower_layer::Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit { inner, shared: self.shared.clone() }
    }
}

impl LimiterHandle {
    /// Applies `config` from the next call on. Buckets whose limit is unchanged are kept as
    /// they are; the others keep what they held, up to their new burst. Calls in flight and
    /// calls waiting for a permit are not affected.
    pub fn update(&self, config: LimiterConfig) -> Result<(), InvalidLimit> {
        config.validate()?;
        let previous = self.shared.table.load();
        self.shared.table.store(Some(Arc::new(Table::new(config, previous.as_deref()))));
        Ok(())
    }

    /// Stops limiting, from the next call on; [`LimiterHandle::update`] starts again, with
    /// full buckets.
    pub fn turn_off(&self) {
        self.shared.table.store(None);
    }

    /// The settings in force; `None` while the limiter is off.
    pub fn config(&self) -> Option<LimiterConfig> {
        self.shared.table.load().as_ref().map(|t| t.config.clone())
    }

    /// Calls admitted so far (exempt ones are not counted).
    pub fn admitted(&self) -> u64 {
        Scope::ALL.iter().map(|&s| self.admitted_in(s)).sum()
    }

    /// Calls rejected so far.
    pub fn rejected(&self) -> u64 {
        Scope::ALL.iter().map(|&s| self.rejected_in(s)).sum()
    }

    /// Calls a budget of `scope` admitted so far.
    pub fn admitted_in(&self, scope: Scope) -> u64 {
        self.shared.counts.admitted[scope as usize].load(Ordering::Relaxed)
    }

    /// Calls a budget of `scope` rejected so far.
    pub fn rejected_in(&self, scope: Scope) -> u64 {
        self.shared.counts.rejected[scope as usize].load(Ordering::Relaxed)
    }

    /// How many callers have buckets of their own (with limits per caller).
    pub fn callers(&self) -> usize {
        self.shared.table.load().as_ref().map_or(0, |t| t.callers())
    }
}

impl<S> RateLimit<S> {
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

/// RESOURCE_EXHAUSTED naming the method, the limit and (for a caller's own budget) what
/// tells callers apart, never the caller's key: it may be a credential. The pushback hint
/// goes in its metadata.
fn rejection<B: Default>(path: &str, caller_kind: Option<&str>, bucket: &Bucket) -> http::Response<B> {
    let limit = &bucket.limit;
    let who = caller_kind.map(|k| format!(" for this caller (by {k})")).unwrap_or_default();
    let mut status = tonic::Status::resource_exhausted(format!(
        "rate limit exceeded for {path}{who}: {}/s, burst {}",
        limit.rate_per_sec, limit.burst
    ));
    if let Ok(value) = bucket.pushback_ms().to_string().parse() {
        status.metadata_mut().insert(PUSHBACK_KEY, value);
    }
    status.into_http()
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RateLimit<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The bucket depends on the method and the caller, which only the request names, so
        // the permit is taken in `call`.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        if EXEMPT.iter().any(|p| path.starts_with(p)) {
            return ResponseFuture::inner(self.inner.call(request));
        }
        let guard = self.shared.table.load();
        let Some(table) = guard.as_deref() else {
            return ResponseFuture::inner(self.inner.call(request));
        };
        let caller = table.caller(&request);
        // Admitted calls, the most common by far, touch the bucket without cloning it.
        let (mut bucket, mut scope) =
            table.with_bucket(path, caller, |b, scope| ((!b.try_admit()).then(|| b.clone()), scope));
        // Per caller, the server's (or method's) budget applies to all callers together too.
        // A caller over its own budget is turned away before it takes from the shared one.
        let mut then_shared = None;
        if caller.is_some() {
            let (shared, shared_scope) = table.shared_bucket(path);
            if bucket.is_some() {
                then_shared = Some((shared.clone(), shared_scope));
            } else if !shared.try_admit() {
                (bucket, scope) = (Some(shared.clone()), shared_scope);
            }
        }
        let Some(bucket) = bucket else {
            self.shared.counts.admit(scope);
            return ResponseFuture::inner(self.inner.call(request));
        };
        let caller_kind = (scope == Scope::Caller).then(|| table.caller_kind()).flatten();
        match bucket.limit.mode {
            Mode::Reject => {
                self.shared.counts.reject(scope);
                ResponseFuture::rejected(rejection(path, caller_kind.as_deref(), &bucket))
            }
            Mode::Wait { max_wait } => {
                // The instance polled ready goes with the call; this one takes a clone.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let shared = self.shared.clone();
                let path = path.to_owned();
                ResponseFuture::waiting(Box::pin(async move {
                    let deadline = tokio::time::Instant::now() + max_wait;
                    if !bucket.admit_within(max_wait).await {
                        shared.counts.reject(scope);
                        return Ok(rejection(&path, caller_kind.as_deref(), &bucket));
                    }
                    // Past its own budget, a caller still waits for the shared one.
                    if let Some((all, all_scope)) = then_shared {
                        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                        if !all.admit_within(left).await {
                            shared.counts.reject(all_scope);
                            return Ok(rejection(&path, None, &all));
                        }
                    }
                    shared.counts.admit(scope);
                    inner.call(request).await
                }))
            }
        }
    }
}

type Waiting<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

pin_project! {
    /// The response of a [`RateLimit`] call.
    pub struct ResponseFuture<F, R, E> {
        #[pin]
        kind: Kind<F, R, E>,
    }
}

pin_project! {
    #[project = Proj]
    enum Kind<F, R, E> {
        // Admitted: the inner call.
        Inner { #[pin] future: F },
        // Rejected at once.
        Rejected { response: Option<R> },
        // Waiting for a permit, then the inner call.
        Waiting { future: Waiting<R, E> },
    }
}

impl<F, R, E> ResponseFuture<F, R, E> {
    fn inner(future: F) -> Self {
        ResponseFuture { kind: Kind::Inner { future } }
    }

    fn rejected(response: R) -> Self {
        ResponseFuture { kind: Kind::Rejected { response: Some(response) } }
    }

    fn waiting(future: Waiting<R, E>) -> Self {
        ResponseFuture { kind: Kind::Waiting { future } }
    }
}

impl<F, R, E> std::fmt::Debug for ResponseFuture<F, R, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.kind {
            Kind::Inner { .. } => "admitted",
            Kind::Rejected { .. } => "rejected",
            Kind::Waiting { .. } => "waiting",
        };
        f.debug_struct("ResponseFuture").field("state", &state).finish()
    }
}

impl<F, R, E> Future for ResponseFuture<F, R, E>
where
    F: Future<Output = Result<R, E>>,
{
    type Output = Result<R, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            Proj::Inner { future } => future.poll(cx),
            Proj::Rejected { response } => {
                // Answered without I/O: spend tokio's cooperative budget, so that a client
                // flooding over one connection cannot starve the server's other tasks.
                std::task::ready!(tokio::task::coop::poll_proceed(cx)).made_progress();
                match response.take() {
                    Some(r) => Poll::Ready(Ok(r)),
                    None => Poll::Pending,
                }
            }
            Proj::Waiting { future } => future.as_mut().poll(cx),
        }
    }
}
