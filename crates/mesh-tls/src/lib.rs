//! TLS and mTLS for tonic servers and clients, on rustls with ring (no OpenSSL).
//!
//! - [`ServerTls`]: a server's certificate and key, and for mTLS the CA its clients'
//!   certificates must chain to. [`incoming`] turns a `TcpListener` into the connections
//!   tonic's `serve_with_incoming` takes, with the handshakes beside the accept loop.
//! - [`ClientTls`]: the CA a client trusts, its own certificate for mTLS, and the server
//!   name to expect. [`ClientTls::connect`] runs a handshake whose errors say why in words:
//!   "its certificate is not signed by a CA this client trusts", "…has expired", "…is not
//!   valid for the name", "it requires a client certificate", "it does not speak TLS".
//! - Rotation: both reload their files on SIGHUP or when a file changes
//!   ([`ServerTls::watch`], [`ClientTls::watch`]). New handshakes use the new certificate;
//!   connections already open, and calls on them, go on. A new file that does not load
//!   (corrupt, a key that does not match) is refused with a warning and the old
//!   configuration stays.
//!
//! Both speak HTTP/2 only (ALPN `h2`), as gRPC does. [`incoming`] also sets what every
//! connection gets, TLS or not: TCP keepalive, so a dead peer's connection is closed, and
//! keepalive enforcement, a limit on the PING frames a client may send
//! ([`IncomingOptions`]), and it keeps the connections open at once under a cap. [`serve`]
//! serves any tonic service (`Routes`, layered or not) on them with hyper's HTTP/2, bounding
//! what one connection can hold ([`Http2Options`]). [`listen`] binds with the system's
//! backlog rather than tokio's 128.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use mesh_tls::{ClientTls, Identity, IncomingOptions, ServerTls, incoming};
//!
//! let server = ServerTls::load(Identity::new("server.pem", "server.key"), None)?;
//! let _reloading = server.watch(Duration::from_secs(1));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let connections = incoming(listener, Some(server), IncomingOptions::default());
//! // tonic::transport::Server::builder().add_service(…).serve_with_incoming(connections)
//! # drop(connections);
//!
//! let client = ClientTls::load("ca.pem", None)?;
//! let tcp = tokio::net::TcpStream::connect(addr).await?;
//! let _stream = client.connect(tcp, "localhost").await?;
//! # Ok(()) }
//! ```

mod client;
mod guard;
mod listen;
mod load;
mod reload;
mod serve;
mod server;
mod stream;

pub use client::{ClientIo, ClientTls, explain};
pub use listen::{listen, raise_fd_limit, system_backlog};
pub use load::{Identity, TlsError};
pub use reload::Reloader;
pub use serve::{Http2Options, serve};
pub use server::{IncomingOptions, ServerIo, ServerTls, incoming};
pub use stream::{MaybeTls, OverTcp};

/// The README's example, compiled (and run, unless marked `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
