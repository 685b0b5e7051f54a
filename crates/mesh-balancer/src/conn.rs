//! The state of an endpoint's connection, as the TCP connections under its tonic `Channel`
//! tell it, and the connector that feeds them.
//!
//! An endpoint is `Connecting` when it is new or its connection closed, `Ready` while a
//! connection is open (or a connected socket waits for tonic to take it), and `Down` when a
//! connect failed. A close by the peer is not a failure: servers close connections all the
//! time (grpc-go's `MaxConnectionAge`, a proxy's idle timeout, a graceful stop), so a closed
//! connection makes the endpoint `Connecting` and the balancer's worker connects again at
//! once. Only a connect that fails (refused, timed out, no such host) makes it `Down`; the
//! worker then probes it with backoff. The worker's connect hands its socket to tonic
//! through the connector (the "stash"), so the connection that proved the endpoint ready is
//! the one calls use, not a second one.
//!
//! An endpoint that leaves the set is retired: its open connections end (each read sees
//! the end of the stream, waking the connection's task if it waits) and no new one is
//! made, whoever still holds a clone of its channel (an idle clone of the balanced channel
//! keeps the snapshot it last used until its next call).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures_util::task::AtomicWaker;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use mesh_tls::{ClientIo, ClientTls, MaybeTls};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{info, warn};

/// How an endpoint's connection stands, as [`crate::EndpointStatus`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndpointState {
    /// New, or its connection closed: a connect is under way. Calls go elsewhere while
    /// another endpoint is ready, and wait for it otherwise.
    Connecting,
    /// Connected: calls go here.
    Ready,
    /// The last connect failed: skipped, and probed with backoff until one succeeds.
    Unreachable,
}

const CONNECTING: u8 = 0;
const READY: u8 = 1;
const DOWN: u8 = 2;

/// One endpoint's connection state, shared by its connector, its streams and the worker.
#[derive(Debug)]
pub(crate) struct Conn {
    state: AtomicU8,
    /// Streams tonic holds open.
    open: AtomicUsize,
    /// A connection the worker made, waiting for tonic's next connect.
    stash: Mutex<Option<Io>>,
    /// Why the last connect failed, until one succeeds.
    last_error: Mutex<Option<Arc<str>>>,
    /// For log lines: "endpoint a (127.0.0.1:50051) of service greeter".
    pub(crate) label: Arc<str>,
    /// Bumped on every change of state, so that waiting calls and the worker look again.
    changes: Arc<watch::Sender<u64>>,
    /// The endpoint left the set: its connections end, and no new one is made.
    retired: AtomicBool,
    /// The wakers of the open connections' reads, to end them when retired.
    readers: Mutex<Vec<Weak<AtomicWaker>>>,
}

impl Conn {
    pub(crate) fn new(label: Arc<str>, changes: Arc<watch::Sender<u64>>) -> Self {
        Conn {
            state: AtomicU8::new(CONNECTING),
            open: AtomicUsize::new(0),
            stash: Mutex::new(None),
            last_error: Mutex::new(None),
            label,
            changes,
            retired: AtomicBool::new(false),
            readers: Mutex::new(Vec::new()),
        }
    }

    /// The endpoint left the set: ends its open connections, and refuses new ones.
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.stash().take();
        let readers = std::mem::take(&mut *self.readers.lock().unwrap_or_else(|p| p.into_inner()));
        for reader in readers.iter().filter_map(Weak::upgrade) {
            reader.wake();
        }
    }

    fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// A new connection's read waker, kept to end it when the endpoint is retired.
    fn reader(&self) -> Arc<AtomicWaker> {
        let reader = Arc::new(AtomicWaker::new());
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        readers.retain(|r| r.strong_count() > 0);
        readers.push(Arc::downgrade(&reader));
        reader
    }

    pub(crate) fn state(&self) -> EndpointState {
        match self.state.load(Ordering::Relaxed) {
            READY => EndpointState::Ready,
            DOWN => EndpointState::Unreachable,
            _ => EndpointState::Connecting,
        }
    }

    /// Whether a connection is open, or connected and waiting for tonic.
    pub(crate) fn is_connected(&self) -> bool {
        self.open.load(Ordering::Relaxed) > 0 || self.stash().is_some()
    }

    fn stash(&self) -> std::sync::MutexGuard<'_, Option<Io>> {
        // A panic while holding this lock leaves an Option behind; it is still valid.
        self.stash.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why the last connect failed, while the endpoint is unreachable.
    pub(crate) fn last_error(&self) -> Option<Arc<str>> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, to: u8) -> u8 {
        let from = self.state.swap(to, Ordering::Relaxed);
        if from != to {
            self.changes.send_modify(|n| *n += 1);
        }
        from
    }

    /// A connect succeeded: `stream` waits for tonic (when given, and tonic has no open
    /// connection meanwhile), and calls come.
    pub(crate) fn connected(&self, stream: Option<Io>) {
        if let Some(stream) = stream
            && self.open.load(Ordering::Relaxed) == 0
        {
            *self.stash() = Some(stream);
        }
        if self.set(READY) == DOWN {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
            info!("{} is reachable again", self.label);
        }
    }

    /// A connect failed: skip the endpoint until a probe connects. Logged once per outage.
    pub(crate) fn failed(&self, error: &io::Error) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string().into());
        if self.set(DOWN) != DOWN {
            match error.kind() {
                // A handshake or a policy refused it: it answers, but no call may go there.
                io::ErrorKind::InvalidData | io::ErrorKind::PermissionDenied => {
                    warn!("{} is refused: {error}; no call goes there", self.label);
                }
                _ => warn!("{} is unreachable: {error}; skipping it until it accepts connections", self.label),
            }
        }
    }

    /// A connection closed: connect again (the worker does, at once).
    fn closed(&self) {
        let left = self.open.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        if left == 0
            && self.stash().is_none()
            && self.state.compare_exchange(READY, CONNECTING, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// The stashed connection, if it is still open.
    async fn take_stash(&self) -> Option<Io> {
        let stream = self.stash().take()?;
        // A socket the peer closed while it waited reads end-of-file at once; one with
        // nothing to read yet is fine (a server may send its settings first, which stay).
        let mut probe = [0u8; 1];
        match tokio::time::timeout(Duration::ZERO, stream.tcp().peek(&mut probe)).await {
            Ok(Ok(0) | Err(_)) => None,
            Ok(Ok(_)) | Err(_) => Some(stream),
        }
    }
}

/// A connection to the authority of `uri` within `timeout`, with Nagle off: plain TCP for
/// `http://`, TLS over it for `https://`. A TLS client never connects in plaintext, and an
/// endpoint that speaks TLS is not dialled without TLS settings; both are refused with
/// [`io::ErrorKind::PermissionDenied`], before any byte is sent.
pub(crate) async fn connect(uri: &Uri, timeout: Duration, tls: Option<&ClientTls>) -> io::Result<Io> {
    let host = uri.host().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri} has no host")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let secure = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let refuse = |why: &str| Err(io::Error::new(io::ErrorKind::PermissionDenied, why.to_string()));
    match (secure, tls) {
        (false, Some(_)) => {
            return refuse(
                "it speaks plaintext (its registration does not say TLS), and this client sends calls over TLS only",
            );
        }
        (true, None) => return refuse("it speaks TLS, and this client has no TLS settings (a CA to trust)"),
        _ => {}
    }
    let connect = async {
        let stream = TcpStream::connect((host, port)).await?;
        stream.set_nodelay(true)?;
        match tls {
            Some(tls) => Ok(MaybeTls::Tls(Box::new(tls.connect(stream, host).await?))),
            None => Ok(MaybeTls::Plain(stream)),
        }
    };
    tokio::time::timeout(timeout, connect).await.map_err(|_| {
        io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {host}:{port} timed out after {timeout:?}"))
    })?
}

/// A connection to an endpoint: plain TCP, or TLS over it.
pub(crate) type Io = MaybeTls<ClientIo>;

// === impl Connector ===

/// tonic's connector for one endpoint: takes the worker's connection when there is one,
/// connects otherwise, and tracks what becomes of the connection. It dials `target` (the
/// endpoint's own URL, `https://` when it speaks TLS) whatever URI tonic passes, which is
/// always `http://` so that tonic leaves TLS to this connector.
#[derive(Debug, Clone)]
pub(crate) struct Connector {
    pub(crate) conn: Arc<Conn>,
    pub(crate) timeout: Duration,
    pub(crate) target: Uri,
    pub(crate) tls: Option<ClientTls>,
}

type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<TokioIo<TrackedStream>>> + Send>>;

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TrackedStream>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let conn = self.conn.clone();
        let timeout = self.timeout;
        let (uri, tls) = (self.target.clone(), self.tls.clone());
        Box::pin(async move {
            if conn.is_retired() {
                return Err(io::Error::other(format!("{} left the endpoint set", conn.label)));
            }
            let stream = match conn.take_stash().await {
                Some(stream) => stream,
                None => match connect(&uri, timeout, tls.as_ref()).await {
                    Ok(stream) => stream,
                    Err(e) => {
                        conn.failed(&e);
                        return Err(e);
                    }
                },
            };
            conn.open.fetch_add(1, Ordering::Relaxed);
            conn.connected(None);
            let reader = conn.reader();
            Ok(TokioIo::new(TrackedStream { inner: stream, conn, reader, closed: false }))
        })
    }
}

/// A connection that tells its endpoint when it closes, by the peer or by us.
#[derive(Debug)]
pub(crate) struct TrackedStream {
    inner: Io,
    conn: Arc<Conn>,
    /// Woken when the endpoint is retired.
    reader: Arc<AtomicWaker>,
    closed: bool,
}

impl TrackedStream {
    fn close(&mut self) {
        if !std::mem::replace(&mut self.closed, true) {
            self.conn.closed();
        }
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.conn.is_retired() {
            // The end of the stream: the connection closes.
            self.close();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &poll {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => self.close(),
            Poll::Ready(Err(_)) => self.close(),
            Poll::Pending => {
                self.reader.register(cx.waker());
                if self.conn.is_retired() {
                    self.close();
                    return Poll::Ready(Ok(()));
                }
            }
            _ => {}
        }
        poll
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Err(_)) = &poll {
            self.close();
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
            self.close();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        self.close();
    }
}
