//! The client side: a configuration that reloads, and a connect whose errors say why.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use rustls::pki_types::ServerName;
use rustls::{AlertDescription, CertificateError, ClientConfig};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::load::{Identity, TlsError, client_config};
use crate::reload::{Reloadable, Reloader};

/// TLS for a client: the CA its servers' certificates must chain to, optionally its own
/// certificate for mTLS, and the name to expect in server certificates. Clones share one
/// configuration; [`ClientTls::watch`] keeps it current as the files change.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use mesh_tls::{ClientTls, Identity};
///
/// let tls = ClientTls::load("ca.pem", Some(Identity::new("client.pem", "client.key")))?
///     .with_server_name("greeter")?;
/// let _reloading = tls.watch(std::time::Duration::from_secs(1));
/// let tcp = tokio::net::TcpStream::connect("127.0.0.1:50051").await?;
/// let stream = tls.connect(tcp, "127.0.0.1").await?; // "…not signed by a CA this client trusts", …
/// # drop(stream); Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClientTls {
    config: Arc<Reloadable<ClientConfig>>,
    server_name: Option<ServerName<'static>>,
}

impl ClientTls {
    /// Trusts the CA certificates in `ca` (PEM); presents `identity` when given.
    pub fn load(ca: impl Into<PathBuf>, identity: Option<Identity>) -> Result<Self, TlsError> {
        let ca = ca.into();
        let mut files = vec![ca.clone()];
        if let Some(identity) = &identity {
            files.extend(identity.files().map(PathBuf::from));
        }
        let load = Box::new(move || client_config(&ca, identity.as_ref()));
        Ok(ClientTls { config: Arc::new(Reloadable::new("client TLS", files, load)?), server_name: None })
    }

    /// Expects `name` in every server's certificate, whatever host is dialled: for
    /// certificates that name the service (`greeter`) rather than each host.
    pub fn with_server_name(mut self, name: &str) -> Result<Self, TlsError> {
        let parsed = ServerName::try_from(name.to_string()).map_err(|e| TlsError::invalid_name(name, e.to_string()))?;
        self.server_name = Some(parsed);
        Ok(self)
    }

    /// Loads the files again now; new connections use them. On error the configuration
    /// in use stays.
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

    /// The name `host` is checked against: the one set by [`ClientTls::with_server_name`],
    /// else `host` itself (a DNS name or an IP address).
    fn name_for(&self, host: &str) -> io::Result<ServerName<'static>> {
        if let Some(name) = &self.server_name {
            return Ok(name.clone());
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host:?} is not a TLS server name: {e}")))
    }

    /// The TLS handshake over `tcp`, with the server at `host`, and the server's first
    /// flight after it (its HTTP/2 settings, waited for at most half a second): under TLS
    /// 1.3 a server refuses a client certificate only after the handshake, and this is where
    /// that shows. A failure says why in words: the server's certificate is signed by
    /// another CA, has expired, names another host; the server refused this client's
    /// certificate; the server does not speak TLS.
    pub async fn connect(&self, tcp: TcpStream, host: &str) -> io::Result<ClientIo> {
        let name = self.name_for(host)?;
        let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| host.to_string());
        let connector = TlsConnector::from(self.config.current());
        let mut stream = connector.connect(name.clone(), tcp).await.map_err(|e| explain_io(e, &peer, &name))?;
        let mut head = vec![0u8; 256];
        match tokio::time::timeout(FIRST_FLIGHT_WAIT, stream.read(&mut head)).await {
            Ok(Ok(0)) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "TLS handshake with {peer} failed: it closed the connection at once (it refused this client's certificate, or has none to require)"
                ),
            )),
            Ok(Ok(n)) => {
                head.truncate(n);
                Ok(ClientIo { stream, head, pos: 0 })
            }
            Ok(Err(e)) => Err(explain_io(e, &peer, &name)),
            // A server that waits for the client to speak first: nothing to check.
            Err(_) => Ok(ClientIo { stream, head: Vec::new(), pos: 0 }),
        }
    }
}

/// How long [`ClientTls::connect`] waits for the server's first bytes after the handshake.
const FIRST_FLIGHT_WAIT: Duration = Duration::from_millis(500);

/// A client's TLS connection, with the server's first bytes read during
/// [`ClientTls::connect`] served first.
#[derive(Debug)]
pub struct ClientIo {
    stream: TlsStream<TcpStream>,
    head: Vec<u8>,
    pos: usize,
}

impl crate::OverTcp for ClientIo {
    fn tcp(&self) -> &TcpStream {
        self.stream.get_ref().0
    }
}

impl ClientIo {
    /// The TLS session: the server's certificates, the protocol version, …
    pub fn session(&self) -> &rustls::ClientConnection {
        self.stream.get_ref().1
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.head.len() {
            let n = buf.remaining().min(this.head.len() - this.pos);
            buf.put_slice(&this.head[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.head.len() {
                this.head = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// An I/O error from a handshake, with its cause said in words.
fn explain_io(e: io::Error, peer: &str, name: &ServerName<'_>) -> io::Error {
    let kind = e.kind();
    let message = match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(tls) => explain(tls, peer, name),
        None if matches!(kind, io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => {
            format!(
                "TLS handshake with {peer} failed: it closed the connection (a server that does not speak TLS, or one that refused this client: {e})"
            )
        }
        None => format!("TLS handshake with {peer} failed: {e}"),
    };
    io::Error::new(kind, message)
}

/// A handshake failure in words.
pub fn explain(e: &rustls::Error, peer: &str, name: &ServerName<'_>) -> String {
    use rustls::Error as E;
    let why = match e {
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                "its certificate is not signed by a CA this client trusts".to_string()
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "its certificate has expired".to_string()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "its certificate is not valid yet".to_string()
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => format!(
                "its certificate is not valid for the name {:?} (set the server name the certificates carry)",
                name.to_str()
            ),
            CertificateError::Revoked => "its certificate has been revoked".to_string(),
            other => format!("its certificate is refused: {other:?}"),
        },
        E::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => {
                "it requires a client certificate (mTLS) and this client presented none".to_string()
            }
            AlertDescription::BadCertificate | AlertDescription::UnknownCA | AlertDescription::CertificateUnknown => {
                "it refused this client's certificate (not signed by the CA it trusts)".to_string()
            }
            AlertDescription::CertificateExpired => "it refused this client's certificate: expired".to_string(),
            other => format!("it sent the alert {other:?}"),
        },
        E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
            "it does not speak TLS (a plaintext server?)".to_string()
        }
        E::NoApplicationProtocol => "it does not offer HTTP/2 over TLS (ALPN h2)".to_string(),
        other => other.to_string(),
    };
    format!("TLS handshake with {peer} failed: {why}")
}

/// The server side's view of a failed handshake, for its logs.
pub(crate) fn explain_server(e: &io::Error, peer: &str) -> String {
    use rustls::Error as E;
    let why = match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(E::NoCertificatesPresented) => {
            "the client presented no certificate, and this server requires one".to_string()
        }
        Some(E::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature)) => {
            "the client's certificate is not signed by the client CA".to_string()
        }
        Some(E::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. })) => {
            "the client's certificate has expired".to_string()
        }
        Some(E::AlertReceived(AlertDescription::UnknownCA | AlertDescription::BadCertificate)) => {
            "the client does not trust this server's certificate".to_string()
        }
        Some(E::AlertReceived(AlertDescription::CertificateExpired)) => {
            "the client says this server's certificate has expired".to_string()
        }
        Some(E::AlertReceived(AlertDescription::CertificateUnknown)) => {
            "the client refused this server's certificate".to_string()
        }
        Some(other) => other.to_string(),
        None => e.to_string(),
    };
    format!("TLS handshake with {peer} failed: {why}")
}
