use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::body::Body;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::Error;

/// A tonic service served in-process on loopback, for tests.
///
/// [`TestServer::shutdown`] stops it as a well-behaved server does (stop accepting, finish
/// in-flight calls); [`TestServer::kill`] and dropping it cut every connection at once, as a
/// crashed process would, so clients see their in-flight calls fail.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    kill: CancellationToken,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl TestServer {
    /// Serves `svc` on `127.0.0.1:0`. Several services go in one
    /// [`tonic::service::Routes`].
    pub async fn serve<S, B>(svc: S) -> Result<Self, Error>
    where
        S: tower_service::Service<http::Request<Body>, Response = http::Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        Self::serve_at(SocketAddr::from(([127, 0, 0, 1], 0)), svc).await
    }

    /// Serves `svc` on `addr`, e.g. the address of a server killed before, to bring it back.
    pub async fn serve_at<S, B>(addr: SocketAddr, svc: S) -> Result<Self, Error>
    where
        S: tower_service::Service<http::Request<Body>, Response = http::Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let listener = TcpListener::bind(addr).await.map_err(Error::Serve)?;
        let addr = listener.local_addr().map_err(Error::Serve)?;
        let kill = CancellationToken::new();
        let (stop, stopped) = oneshot::channel::<()>();
        let conn_kill = kill.clone();
        let incoming = TcpListenerStream::new(listener).map(move |conn| {
            conn.map(|stream| {
                let _ = stream.set_nodelay(true);
                Killable::new(stream, &conn_kill)
            })
        });
        let signal_kill = kill.clone();
        let signal = async move {
            tokio::select! {
                _ = stopped => {}
                _ = signal_kill.cancelled() => {}
            }
        };
        let task =
            tokio::spawn(tonic::transport::Server::builder().serve_with_incoming_shutdown(svc, incoming, signal));
        Ok(TestServer { addr, stop: Some(stop), kill, task: Some(task) })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, what a tonic `Endpoint` takes.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting and waits for in-flight calls to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Closes the listener and every connection at once; in-flight calls fail.
    pub async fn kill(mut self) {
        self.kill.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill.cancel();
    }
}

// === impl Killable ===

/// A TCP stream that fails every read and write once its token is cancelled, so that hyper
/// closes the connection as if the server process had died.
struct Killable {
    inner: TcpStream,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Killable {
    fn new(inner: TcpStream, token: &CancellationToken) -> Self {
        Killable { inner, killed: Box::pin(token.clone().cancelled_owned()) }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.killed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(io::ErrorKind::ConnectionReset, "test server killed")),
            Poll::Pending => Ok(()),
        }
    }
}

impl Connected for Killable {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Killable {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Killable {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
