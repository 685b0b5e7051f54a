//! Serving HTTP/2 on the connections [`incoming`](crate::incoming) hands out, with hyper
//! directly: what tonic's server sets, and what it does not let a server set, the send
//! buffer of each stream.

use std::future::Future;
use std::io;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Connected;
use tower_service::Service;
use tracing::debug;

use crate::ServerIo;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How each HTTP/2 connection is served.
///
/// What one connection can make the server hold is bounded by these: at most
/// `max_concurrent_streams` calls, each with at most `max_send_buffer` of response waiting
/// for a client that does not read (plus the message being encoded), and its request
/// bounded by the services' own message limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Options {
    /// Streams open at once per connection; more are refused with REFUSED_STREAM.
    pub max_concurrent_streams: u32,
    /// Largest header list of a request, in bytes.
    pub max_header_list_size: u32,
    /// Streams a client may reset before the server took them (HTTP/2 rapid reset,
    /// CVE-2023-44487) before its connection is closed.
    pub max_pending_resets: usize,
    /// How often the server pings each connection; `None` for never.
    pub keepalive_interval: Option<Duration>,
    /// How long a ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Response bytes one stream may have waiting to be sent, in bytes: past it the
    /// response is not asked for more until the client reads. hyper's default (400 KiB)
    /// let one connection that never reads hold 55–90 MiB.
    pub max_send_buffer: usize,
}

impl Default for Http2Options {
    /// 100 streams, 16 KiB of headers, 20 pending resets, no server pings, 10 s for a
    /// ping's answer, 64 KiB waiting per stream (grpc-go's write quota per stream).
    fn default() -> Self {
        Http2Options {
            max_concurrent_streams: 100,
            max_header_list_size: 16 * 1024,
            max_pending_resets: 20,
            keepalive_interval: None,
            keepalive_timeout: Duration::from_secs(10),
            max_send_buffer: 64 * 1024,
        }
    }
}

/// Serves `service` on every connection `connections` yields until `shutdown` completes;
/// then stops taking connections, tells every open one to finish (a GOAWAY: calls under
/// way complete, no new ones start) and returns once all have closed. Each request carries
/// its connection's [`TcpConnectInfo`](tonic::transport::server::TcpConnectInfo), so that
/// `tonic::Request::remote_addr` works as under tonic's own server.
///
/// Dropping the future closes every connection at once, calls in flight too.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use mesh_tls::{Http2Options, IncomingOptions, incoming, serve};
///
/// let (_health, health) = tonic_health::server::health_reporter();
/// let routes = tonic::service::Routes::new(health).prepare();
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
/// let connections = incoming(listener, None, IncomingOptions::default());
/// let shutdown = async {
///     let _ = tokio::signal::ctrl_c().await;
/// };
/// serve(connections, routes, Http2Options::default(), shutdown).await;
/// # Ok(()) }
/// ```
pub async fn serve<C, S, B>(connections: C, service: S, options: Http2Options, shutdown: impl Future<Output = ()>)
where
    C: Stream<Item = io::Result<ServerIo>>,
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(options.max_concurrent_streams)
        .max_header_list_size(options.max_header_list_size)
        .max_pending_accept_reset_streams(options.max_pending_resets)
        .keep_alive_interval(options.keepalive_interval)
        .keep_alive_timeout(options.keepalive_timeout)
        .max_send_buf_size(options.max_send_buffer)
        // gRPC has no use for a `date` on every response.
        .auto_date_header(false);
    let (stop, stopping) = watch::channel(());
    let mut open = JoinSet::new();
    {
        // Scoped, so that the listener closes as soon as serving stops taking connections.
        let mut connections = std::pin::pin!(connections);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = open.join_next(), if !open.is_empty() => {}
                next = connections.next() => match next {
                    Some(Ok(io)) => {
                        spawn_connection(&mut open, builder.clone(), io, service.clone(), stopping.clone());
                    }
                    Some(Err(e)) => debug!("a connection was not served: {e}"),
                    None => break,
                },
            }
        }
    }
    let _ = stop.send(());
    while open.join_next().await.is_some() {}
}

/// One connection, until it ends or, once `stopping` changes, until its calls are done.
fn spawn_connection<S, B>(
    open: &mut JoinSet<()>,
    builder: hyper::server::conn::http2::Builder<TokioExecutor>,
    io: ServerIo,
    service: S,
    stopping: watch::Receiver<()>,
) where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let info = io.connect_info();
    let peer = info.remote_addr();
    let each = hyper::service::service_fn(move |request: http::Request<Incoming>| {
        let mut request = request.map(tonic::body::Body::new);
        request.extensions_mut().insert(info.clone());
        // As tower's contract asks: a clone of its own, ready before it is called.
        let mut service = service.clone();
        async move {
            std::future::poll_fn(|cx| service.poll_ready(cx)).await.map_err(boxed)?;
            service.call(request).await.map_err(boxed)
        }
    });
    drive(open, builder.serve_connection(TokioIo::new(io), each), peer, stopping);
}

/// Spawned apart from [`spawn_connection`], whose service type it need not name (what
/// tonic does too, for rust-lang/rust#102211).
fn drive<H, B>(
    open: &mut JoinSet<()>,
    conn: hyper::server::conn::http2::Connection<TokioIo<ServerIo>, H, TokioExecutor>,
    peer: Option<std::net::SocketAddr>,
    mut stopping: watch::Receiver<()>,
) where
    H: hyper::service::HttpService<Incoming, ResBody = B> + Send + 'static,
    H::Future: Send + 'static,
    H::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    open.spawn(async move {
        let mut conn = std::pin::pin!(conn);
        let mut asked = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        debug!("connection from {peer:?} ended: {}", mesh_util::error_chain(&e));
                    }
                    return;
                }
                _ = stopping.changed(), if !asked => {
                    asked = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    });
}

fn boxed(e: impl Into<BoxError>) -> BoxError {
    e.into()
}
