//! A TCP connector for tonic that tells the balancer when an endpoint's connection fails or
//! dies, so that calls stop going there at once instead of failing one by one until tonic's
//! lazy reconnect gives up. A dead endpoint is probed in the background (see `worker`) and
//! becomes usable again when a TCP connect succeeds.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Added, not probed yet: usable (a call may race the first probe).
const NEW: u8 = 0;
/// Probed or closed by us: usable; tonic connects on the next call.
const IDLE: u8 = 1;
/// Connected.
const UP: u8 = 2;
/// Connect failed or the connection died: skipped until a probe connects.
const DOWN: u8 = 3;

/// Whether an endpoint can take calls, as its connections tell.
#[derive(Debug)]
pub(crate) struct Liveness {
    state: AtomicU8,
    /// Wakes the balancer's worker to probe endpoints that went down.
    went_down: Arc<Notify>,
}

impl Liveness {
    pub(crate) fn new(went_down: Arc<Notify>) -> Self {
        Liveness { state: AtomicU8::new(NEW), went_down }
    }

    /// Not known to be down: never connected yet, connected, or probed back.
    pub(crate) fn usable(&self) -> bool {
        self.state.load(Ordering::Relaxed) != DOWN
    }

    pub(crate) fn is_up(&self) -> bool {
        self.state.load(Ordering::Relaxed) == UP
    }

    pub(crate) fn is_new(&self) -> bool {
        self.state.load(Ordering::Relaxed) == NEW
    }

    pub(crate) fn is_down(&self) -> bool {
        self.state.load(Ordering::Relaxed) == DOWN
    }

    pub(crate) fn set_up(&self) {
        self.state.store(UP, Ordering::Relaxed);
    }

    /// A probe connected: let calls try again (tonic connects lazily on the next one).
    pub(crate) fn set_idle(&self) {
        // A connection made meanwhile is better news than the probe's; keep UP.
        let _ = self.state.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| (s != UP).then_some(IDLE));
    }

    pub(crate) fn set_down(&self) {
        if self.state.swap(DOWN, Ordering::Relaxed) != DOWN {
            self.went_down.notify_one();
        }
    }
}

/// Connects to `host:port` of the URI tonic gives it, with a timeout, and marks the
/// endpoint up, or down when that fails.
#[derive(Debug, Clone)]
pub(crate) struct TrackingConnector {
    pub(crate) live: Arc<Liveness>,
    pub(crate) timeout: Duration,
}

type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<TokioIo<TrackedStream>>> + Send>>;

impl tower_service::Service<Uri> for TrackingConnector {
    type Response = TokioIo<TrackedStream>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let live = self.live.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let result = connect(&uri, timeout).await;
            match result {
                Ok(stream) => {
                    live.set_up();
                    Ok(TokioIo::new(TrackedStream { inner: stream, live }))
                }
                Err(e) => {
                    live.set_down();
                    Err(e)
                }
            }
        })
    }
}

/// A TCP connect to the authority of `uri` within `timeout`, with Nagle off.
pub(crate) async fn connect(uri: &Uri, timeout: Duration) -> io::Result<TcpStream> {
    let host = uri.host().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri} has no host")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::time::timeout(timeout, TcpStream::connect((host, port))).await.map_err(|_| {
        io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {host}:{port} timed out after {timeout:?}"))
    })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A TCP stream that marks its endpoint down when the peer closes it or it fails.
#[derive(Debug)]
pub(crate) struct TrackedStream {
    inner: TcpStream,
    live: Arc<Liveness>,
}

impl AsyncRead for TrackedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &poll {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => self.live.set_down(),
            Poll::Ready(Err(_)) => self.live.set_down(),
            _ => {}
        }
        poll
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Err(_)) = &poll {
            self.live.set_down();
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Err(_)) = &poll {
            self.live.set_down();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        // Closed by our side (endpoint removed, channel dropped): not known to be down.
        let _ = self.live.state.compare_exchange(UP, IDLE, Ordering::Relaxed, Ordering::Relaxed);
    }
}
