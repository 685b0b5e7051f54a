//! The deadline of calls that come without one: a client's `timeout`, live from the
//! document's `client.timeout_ms`, sent as `grpc-timeout` so that every layer below (the
//! retries, the balancer's wait, the server) keeps to it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tower::Service;

/// The call timeout in force, shared by the calls and the configuration that sets it.
#[derive(Debug, Clone)]
pub struct LiveTimeout(Arc<AtomicU64>);

/// Milliseconds as stored; 0 is no timeout (a timeout is at least 1 ms).
fn millis(d: Option<Duration>) -> u64 {
    match d {
        Some(d) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1),
        None => 0,
    }
}

impl LiveTimeout {
    /// Starts at `timeout`.
    pub fn new(timeout: Duration) -> Self {
        LiveTimeout(Arc::new(AtomicU64::new(millis(Some(timeout)))))
    }

    /// Starts with no timeout.
    pub fn none() -> Self {
        LiveTimeout(Arc::new(AtomicU64::new(0)))
    }

    /// The timeout in force, if any.
    pub fn get(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Sets the timeout of the calls from now on (`None`: calls without a deadline of
    /// their own have none).
    pub fn set(&self, timeout: Option<Duration>) {
        self.0.store(millis(timeout), Ordering::Relaxed);
    }
}

/// Gives a request without a `grpc-timeout` the [`LiveTimeout`] in force.
#[derive(Debug, Clone)]
pub struct DefaultDeadline<S> {
    inner: S,
    timeout: LiveTimeout,
}

impl<S> DefaultDeadline<S> {
    /// Calls of `inner` without a deadline get `timeout`'s.
    pub fn new(inner: S, timeout: LiveTimeout) -> Self {
        DefaultDeadline { inner, timeout }
    }

    /// The service inside.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, B> Service<http::Request<B>> for DefaultDeadline<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if let Some(timeout) = self.timeout.get()
            && !request.headers().contains_key(&mesh_util::grpc::GRPC_TIMEOUT)
        {
            request
                .headers_mut()
                .insert(mesh_util::grpc::GRPC_TIMEOUT.clone(), mesh_util::grpc::encode_grpc_timeout(timeout));
        }
        self.inner.call(request)
    }
}
