//! The server side: a configuration that reloads, and an incoming stream of connections
//! for tonic that does the handshakes off the accept loop.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

use crate::client::explain_server;
use crate::guard::{Guard, H2_PREFACE, LINGER, LINGER_BYTES, Verdict};
use crate::load::{Identity, TlsError, server_config};
use crate::reload::{Reloadable, Reloader};
use crate::stream::MaybeTls;

/// TLS for a server: its certificate and key, and for mTLS the CA that client
/// certificates must chain to. Clones share one configuration; [`ServerTls::watch`] keeps
/// it current as the files change, so a renewed certificate is served without a restart.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use mesh_tls::{Identity, IncomingOptions, ServerTls, incoming};
///
/// let tls = ServerTls::load(Identity::new("server.pem", "server.key"), Some("clients-ca.pem".into()))?;
/// let _reloading = tls.watch(Duration::from_secs(1));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
/// // Handshakes run beside the accept loop; tonic gets only connections that completed one.
/// let connections = incoming(listener, Some(tls), IncomingOptions::default());
/// # let _ = connections; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ServerTls {
    config: Arc<Reloadable<ServerConfig>>,
    mutual: bool,
}

impl ServerTls {
    /// Presents `identity`; with `client_ca`, requires clients to present a certificate it
    /// signed (mTLS), refusing others at the handshake.
    pub fn load(identity: Identity, client_ca: Option<PathBuf>) -> Result<Self, TlsError> {
        let mut files: Vec<PathBuf> = identity.files().map(PathBuf::from).to_vec();
        files.extend(client_ca.clone());
        let mutual = client_ca.is_some();
        let load = Box::new(move || server_config(&identity, client_ca.as_deref()));
        Ok(ServerTls { config: Arc::new(Reloadable::new("server certificate", files, load)?), mutual })
    }

    /// Whether clients must present a certificate.
    pub fn is_mutual(&self) -> bool {
        self.mutual
    }

    /// Loads the files again now; new handshakes use them, established connections go on.
    /// On error the configuration in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.config.reload()
    }

    /// Reloads on SIGHUP and when a file changes (checked every `poll`) until dropped.
    pub fn watch(&self, poll: Duration) -> Reloader {
        self.config.watch(poll)
    }

    /// How many reloads succeeded, and how many were refused.
    pub fn reloads(&self) -> (u64, u64) {
        (self.config.reloads(), self.config.refusals())
    }

    /// The rustls configuration new handshakes use.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.current()
    }
}

/// A connection a server accepted, plain TCP or TLS over it, with the guard that watches
/// its frames: a client that sends PINGs faster than allowed gets a GOAWAY
/// ENHANCE_YOUR_CALM "too_many_pings" (what grpc-go's servers send, and its clients back off
/// on) and its connection is closed.
#[derive(Debug)]
pub struct ServerIo {
    stream: Stream,
    guard: Option<Guard>,
    /// When the connection must have sent its preface, and how long it may stay without a
    /// stream: checked when this fires.
    timer: Option<Timer>,
    closing: Option<Closing>,
    /// A close waiting for the end of the frame the server is writing.
    deferred: Option<Deferred>,
    /// Counts this connection as open while it lives.
    _open: Open,
}

#[derive(Debug)]
struct Timer {
    sleep: Pin<Box<tokio::time::Sleep>>,
    preface_within: Duration,
    max_idle: Option<Duration>,
}

type Stream = MaybeTls<TlsStream<TcpStream>>;

/// A connection its guard must close while the server is half way through a frame.
#[derive(Debug)]
struct Deferred {
    verdict: Verdict,
    linger: Pin<Box<tokio::time::Sleep>>,
    drained: usize,
}

/// A connection its guard is closing: the GOAWAY going out, then the client's last bytes
/// read and dropped for a moment, so that it reads the GOAWAY before the close.
#[derive(Debug)]
struct Closing {
    verdict: Verdict,
    goaway: Vec<u8>,
    written: usize,
    shut: bool,
    drained: usize,
    linger: Pin<Box<tokio::time::Sleep>>,
}

impl ServerIo {
    fn new(stream: Stream, options: &IncomingOptions, open: Open) -> Self {
        let now = Instant::now();
        let guard = Guard::new(options.max_pings_per_sec, now);
        // The preface first: a connection that sends none in time is closed.
        let preface_within = options.handshake_timeout;
        let timer = Timer {
            sleep: Box::pin(tokio::time::sleep_until((now + preface_within).into())),
            preface_within,
            max_idle: options.max_connection_idle,
        };
        ServerIo { stream, guard: Some(guard), timer: Some(timer), closing: None, deferred: None, _open: open }
    }

    /// When the timer fires: the connection's verdict if it must go, else the timer moved
    /// to the next moment it could have to.
    fn check_timer(&mut self, cx: &mut Context<'_>) -> Option<Verdict> {
        let (Some(guard), Some(timer)) = (self.guard.as_ref(), self.timer.as_mut()) else { return None };
        if timer.sleep.as_mut().poll(cx).is_pending() {
            return None;
        }
        if !guard.preface_done() {
            return Some(Verdict::NoPreface(timer.preface_within));
        }
        let Some(max_idle) = timer.max_idle else {
            self.timer = None;
            return None;
        };
        let now = Instant::now();
        let next = if guard.open_streams() > 0 {
            // Busy: it cannot be idle before a bound from now.
            now + max_idle
        } else if now >= guard.idle_since() + max_idle {
            return Some(Verdict::Idle(max_idle));
        } else {
            guard.idle_since() + max_idle
        };
        timer.sleep.as_mut().reset(next.into());
        // Polled again so that it wakes this connection then.
        let _ = timer.sleep.as_mut().poll(cx);
        None
    }

    fn start_closing(&mut self, verdict: Verdict, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(guard) = self.guard.as_ref() else { return Poll::Ready(Ok(())) };
        match guard.goaway(verdict) {
            None => Poll::Ready(guard.end(verdict, false)),
            // The server is half way through a frame of its own: the GOAWAY waits for its
            // end, the linger at most.
            Some(_) if !guard.can_interject() => {
                self.deferred = Some(Deferred { verdict, linger: Box::pin(tokio::time::sleep(LINGER)), drained: 0 });
                self.poll_deferred(cx)
            }
            Some(goaway) => {
                self.closing = Some(Closing {
                    verdict,
                    goaway,
                    written: 0,
                    shut: false,
                    drained: 0,
                    linger: Box::pin(tokio::time::sleep(LINGER)),
                });
                self.poll_close(cx)
            }
        }
    }

    /// The read side while the GOAWAY waits for the server's frame to end: the client's
    /// bytes are read and dropped, and the close starts once the frame is done (or
    /// without a GOAWAY when the linger passes first).
    fn poll_deferred(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(guard) = self.guard.as_ref() else { return Poll::Ready(Ok(())) };
        let Some(deferred) = self.deferred.as_mut() else { return Poll::Ready(Ok(())) };
        let verdict = deferred.verdict;
        if guard.can_interject() {
            self.deferred = None;
            return self.start_closing(verdict, cx);
        }
        if deferred.linger.as_mut().poll(cx).is_ready() {
            return Poll::Ready(guard.end(verdict, false));
        }
        let mut scratch = [0u8; 4096];
        loop {
            let mut read = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.stream).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if !read.filled().is_empty() => {
                    deferred.drained += read.filled().len();
                    if deferred.drained >= LINGER_BYTES {
                        return Poll::Ready(guard.end(verdict, false));
                    }
                }
                Poll::Ready(_) => return Poll::Ready(guard.end(verdict, false)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// A write while the GOAWAY waits: only what finishes the server's frame goes out; once
    /// it has, the rest is dropped and the read side (woken) sends the GOAWAY.
    fn write_deferred(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let Some(guard) = self.guard.as_mut() else { return Poll::Ready(Ok(data.len())) };
        let left = guard.to_interjection();
        if left == 0 {
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(data.len()));
        }
        let take = left.min(data.len());
        let poll = Pin::new(&mut self.stream).poll_write(cx, &data[..take]);
        if let Poll::Ready(Ok(n)) = poll {
            guard.wrote(&data[..n]);
            if guard.can_interject() {
                cx.waker().wake_by_ref();
            }
        }
        poll
    }

    /// The TLS session, for a connection that completed a handshake: the client's
    /// certificates (under mTLS), the protocol version, …
    pub fn tls_session(&self) -> Option<&rustls::ServerConnection> {
        self.stream.tls().map(|s| s.get_ref().1)
    }

    /// Sends the GOAWAY, shuts the writing side, lingers; ends with the guard's error.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let ServerIo { stream, guard, closing, .. } = self;
        let (Some(closing), Some(guard)) = (closing.as_mut(), guard.as_ref()) else {
            return Poll::Ready(Ok(()));
        };
        let verdict = closing.verdict;
        let done = || Poll::Ready(guard.end(verdict, true));
        if closing.linger.as_mut().poll(cx).is_ready() {
            return done();
        }
        while closing.written < closing.goaway.len() {
            match Pin::new(&mut *stream).poll_write(cx, &closing.goaway[closing.written..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return done(),
                Poll::Ready(Ok(n)) => closing.written += n,
                Poll::Pending => return Poll::Pending,
            }
        }
        if !closing.shut {
            match Pin::new(&mut *stream).poll_shutdown(cx) {
                Poll::Ready(_) => closing.shut = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        // Whatever the client still sends is read and dropped: a socket closed with unread
        // data resets, which can reach the client before the GOAWAY does.
        let mut scratch = [0u8; 4096];
        loop {
            let mut read = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *stream).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if !read.filled().is_empty() => {
                    closing.drained += read.filled().len();
                    if closing.drained >= LINGER_BYTES {
                        return done();
                    }
                }
                Poll::Ready(_) => return done(),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The peer's address, as for plain TCP, so that per-caller limits work the same with TLS.
impl Connected for ServerIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.tcp().connect_info()
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closing.is_some() {
            return this.poll_close(cx);
        }
        if this.deferred.is_some() {
            return this.poll_deferred(cx);
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.stream).poll_read(cx, buf);
        match (&poll, this.guard.as_mut()) {
            (Poll::Ready(Ok(())), Some(guard)) => {
                if let Some(verdict) = guard.read(&buf.filled()[before..], Instant::now) {
                    buf.set_filled(before);
                    return this.start_closing(verdict, cx);
                }
            }
            // Nothing to read: the moment to check for a missing preface or idleness.
            (Poll::Pending, Some(_)) => {
                if let Some(verdict) = this.check_timer(cx) {
                    return this.start_closing(verdict, cx);
                }
            }
            _ => {}
        }
        poll
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closing.is_some() {
            // The connection is ending with the guard's GOAWAY: nothing more goes out.
            return Poll::Ready(Ok(data.len()));
        }
        if this.deferred.is_some() {
            return this.write_deferred(cx, data);
        }
        let poll = Pin::new(&mut this.stream).poll_write(cx, data);
        if let (Poll::Ready(Ok(n)), Some(guard)) = (&poll, this.guard.as_mut()) {
            guard.wrote(&data[..*n]);
        }
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closing.is_some() {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        if this.deferred.is_some() {
            let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
            return this.write_deferred(cx, first);
        }
        let poll = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if let (Poll::Ready(Ok(n)), Some(guard)) = (&poll, this.guard.as_mut()) {
            let mut left = *n;
            for b in bufs {
                if left == 0 {
                    break;
                }
                let take = left.min(b.len());
                guard.wrote(&b[..take]);
                left -= take;
            }
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closing.is_some() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closing.is_some() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

/// One connection counted as open, from its accept to its close (or its failed handshake).
#[derive(Debug)]
struct Open(Arc<AtomicUsize>);

impl Open {
    /// Counts one more, unless `max` are open.
    fn take(count: &Arc<AtomicUsize>, max: Option<usize>) -> Option<Open> {
        let max = max.unwrap_or(usize::MAX);
        count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Open(count.clone()))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Handshakes under way at once. Accepting never stops: a connection past this many sheds
/// the oldest handshake still pending (its socket closed), so a flood of connections that
/// never finish a handshake holds at most this many sockets and delays a real client by no
/// more than its own handshake.
const MAX_HANDSHAKES: usize = 512;

/// The handshakes under way, oldest first, to shed from when there are too many.
#[derive(Debug, Default)]
struct Pending {
    next: u64,
    tasks: std::collections::BTreeMap<u64, tokio::task::AbortHandle>,
    shed: u64,
}

/// How [`incoming`] treats each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IncomingOptions {
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// PING frames a client may send a second, on average and at once, counted between the
    /// headers and data the server sends it (a client may ping as data comes, for bandwidth
    /// estimates); more get GOAWAY ENHANCE_YOUR_CALM "too_many_pings" and the connection
    /// closed. 0 for no limit.
    pub max_pings_per_sec: u32,
    /// TCP keepalive: after this long idle the kernel probes the peer, so a dead peer's
    /// connection is closed (three probes, this far apart / 6). `None` for off.
    pub tcp_keepalive: Option<Duration>,
    /// A connection with no call open for this long is closed with GOAWAY(NO_ERROR) "idle"
    /// (its client dials again when it next calls). `None`: never. A connection must also
    /// send its HTTP/2 preface within `handshake_timeout` of being accepted (or of its TLS
    /// handshake), else it is closed.
    pub max_connection_idle: Option<Duration>,
    /// Connections open at once, counting those still in their TLS handshake: one more is
    /// closed as soon as it is accepted (its client sees the connection reset and may dial
    /// another server), with a warning at most once a second. `None` (the default) for no
    /// cap: a cap bounds memory, but whoever holds that many connections (cheap ones, idle
    /// or with a stream each) keeps every other client out until they close.
    pub max_connections: Option<usize>,
}

impl Default for IncomingOptions {
    /// 10 s for a handshake and for the preface, 10 pings a second, TCP keepalive after
    /// 60 s idle, a connection without calls closed after 5 minutes, no cap on connections.
    fn default() -> Self {
        IncomingOptions {
            handshake_timeout: Duration::from_secs(10),
            max_pings_per_sec: 10,
            tcp_keepalive: Some(Duration::from_secs(60)),
            max_connection_idle: Some(Duration::from_secs(300)),
            max_connections: None,
        }
    }
}

/// The connections `listener` accepts, for tonic's `serve_with_incoming`: plain TCP
/// without `tls`; with it, only those that completed a handshake within the options'
/// timeout. Handshakes run in their own tasks, so a slow or silent client does not hold up
/// the others. A plaintext HTTP/2 client is told, in a GOAWAY it can show, that this port
/// speaks TLS; failed handshakes are logged with their cause (at most one line a second).
/// Every connection gets TCP keepalive and the PING limit of `options`. Accepting stops
/// when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<ServerTls>,
    options: IncomingOptions,
) -> ReceiverStream<io::Result<ServerIo>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, tls, options, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<ServerTls>,
    options: IncomingOptions,
    tx: mpsc::Sender<io::Result<ServerIo>>,
) {
    let IncomingOptions { handshake_timeout, tcp_keepalive, .. } = options;
    let pending = Arc::new(std::sync::Mutex::new(Pending::default()));
    let throttle = Arc::new(Throttle::default());
    let (open_now, refusals) = (Arc::new(AtomicUsize::new(0)), Throttle::default());
    let mut refused = 0u64;
    loop {
        let accepted = tokio::select! {
            () = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: pause rather than spin.
                if throttle.allow() {
                    warn!("accepting a connection failed: {e}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(open) = Open::take(&open_now, options.max_connections) else {
            // Closed at once: the cap is what keeps the memory connections hold bounded.
            refused += 1;
            if refusals.allow() {
                warn!(
                    "{} connections open (the cap): closed a new one from {peer} ({refused} so far)",
                    open_now.load(Ordering::Acquire)
                );
            }
            drop(tcp);
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            debug!("setting TCP_NODELAY for {peer}: {e}");
        }
        if let Some(idle) = tcp_keepalive {
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval((idle / 6).max(Duration::from_secs(1)))
                .with_retries(3);
            if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive) {
                debug!("setting TCP keepalive for {peer}: {e}");
            }
        }
        let Some(tls) = &tls else {
            if tx.send(Ok(ServerIo::new(MaybeTls::Plain(tcp), &options, open))).await.is_err() {
                return;
            }
            continue;
        };
        let acceptor = TlsAcceptor::from(tls.config());
        // The task waits for its id, so that it cannot finish (and leave) before it is in.
        let (id_tx, id_rx) = tokio::sync::oneshot::channel::<u64>();
        let (handed, warnings, done) = (tx.clone(), throttle.clone(), pending.clone());
        let task = tokio::spawn(async move {
            let Ok(id) = id_rx.await else { return };
            let leave = Leave { pending: done, id };
            let peer = peer.to_string();
            let outcome = tokio::time::timeout(handshake_timeout, handshake(tcp, acceptor, &peer)).await;
            // Done with the handshake: no longer one to shed, even while tonic is busy.
            drop(leave);
            match outcome {
                Ok(Ok(stream)) => {
                    let _ = handed.send(Ok(ServerIo::new(MaybeTls::Tls(Box::new(stream)), &options, open))).await;
                }
                // A connection closed before a word (a TCP probe, a port scan) is routine.
                Ok(Err(Refused::Quiet(why))) => debug!("{why}"),
                Ok(Err(Refused::Loud(why))) => {
                    if warnings.allow() {
                        warn!("{why}");
                    } else {
                        debug!("{why}");
                    }
                }
                Err(_) => debug!("TLS handshake with {peer} did not finish within {handshake_timeout:?}; closed"),
            }
        });
        let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
        let id = p.next;
        p.next += 1;
        p.tasks.insert(id, task.abort_handle());
        let _ = id_tx.send(id);
        if p.tasks.len() > MAX_HANDSHAKES
            && let Some((_, oldest)) = p.tasks.pop_first()
        {
            oldest.abort();
            p.shed += 1;
            if throttle.allow() {
                warn!(
                    "more than {MAX_HANDSHAKES} TLS handshakes under way: closed the oldest ({} so far); a flood of silent connections?",
                    p.shed
                );
            }
        }
    }
}

/// Takes a handshake out of [`Pending`] when it ends, however it ends.
struct Leave {
    pending: Arc<std::sync::Mutex<Pending>>,
    id: u64,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).tasks.remove(&self.id);
    }
}

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Why a connection was not handed to the server, and whether that is worth a warning.
enum Refused {
    Quiet(String),
    Loud(String),
}

async fn handshake(mut tcp: TcpStream, acceptor: TlsAcceptor, peer: &str) -> Result<TlsStream<TcpStream>, Refused> {
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(0) => return Err(Refused::Quiet(format!("{peer} closed the connection before a TLS handshake"))),
        Ok(_) if first[0] != TLS_HANDSHAKE => {
            tell_plaintext_client(&mut tcp).await;
            return Err(Refused::Loud(format!(
                "{peer} spoke plaintext to this TLS port; refused (it must dial with TLS)"
            )));
        }
        Ok(_) => {}
        Err(e) => return Err(Refused::Quiet(format!("reading from {peer}: {e}"))),
    }
    acceptor.accept(tcp).await.map_err(|e| Refused::Loud(explain_server(&e, peer)))
}

/// Answers a plaintext HTTP/2 client with its settings and a GOAWAY whose debug data says
/// why, so that the client's error names the cause instead of "connection reset".
async fn tell_plaintext_client(tcp: &mut TcpStream) {
    let mut preface = [0u8; H2_PREFACE.len()];
    let read =
        tokio::time::timeout(Duration::from_secs(1), tokio::io::AsyncReadExt::read_exact(tcp, &mut preface)).await;
    if !matches!(read, Ok(Ok(_))) || preface != H2_PREFACE {
        return;
    }
    const WHY: &[u8] = b"this server speaks TLS only: dial it with TLS";
    let mut frames = Vec::with_capacity(9 + 9 + 8 + WHY.len());
    // SETTINGS, empty.
    frames.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    // GOAWAY: last stream 0, PROTOCOL_ERROR, the reason as debug data.
    let len = (8 + WHY.len()) as u32;
    frames.extend_from_slice(&len.to_be_bytes()[1..]);
    frames.extend_from_slice(&[0x7, 0, 0, 0, 0, 0]);
    frames.extend_from_slice(&0u32.to_be_bytes());
    frames.extend_from_slice(&1u32.to_be_bytes());
    frames.extend_from_slice(WHY);
    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(&frames)).await;
    let _ = tcp.shutdown().await;
    // Read what the client sent after its preface before closing: a socket closed with
    // unread data sends a reset, which can reach the client before the GOAWAY does.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut sink = [0u8; 4096];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match tokio::io::AsyncReadExt::read(tcp, &mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// At most one warning a second, so a flood of bad handshakes does not flood the log.
#[derive(Debug, Default)]
struct Throttle {
    last_ms: AtomicU64,
}

impl Throttle {
    fn allow(&self) -> bool {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let now = START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1000;
        let last = self.last_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= 1000
            && self.last_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}
