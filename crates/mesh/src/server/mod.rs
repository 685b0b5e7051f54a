//! The server builder: any set of tonic services, served with mesh's whole server side.
//!
//! [`ServerBuilder::build`] checks every setting, binds the port and starts following the
//! configuration; [`Server::serve`] serves the services added, registers the instance in
//! etcd once it listens and reports SERVING, and on the shutdown signal reports NOT_SERVING,
//! deregisters, serves out a grace period for clients watching etcd, stops accepting and
//! drains in-flight calls within a bound.
//!
//! ```no_run
//! use mesh_proto::pb::greeter_server::{Greeter, GreeterServer};
//! # #[derive(Default)] struct MyGreeter;
//! # #[tonic::async_trait] impl Greeter for MyGreeter {
//! #     async fn say_hello(&self, _: tonic::Request<mesh_proto::pb::HelloRequest>) -> Result<tonic::Response<mesh_proto::pb::HelloReply>, tonic::Status> { Ok(tonic::Response::new(Default::default())) }
//! #     type SayHelloStreamStream = tokio_stream::Empty<Result<mesh_proto::pb::HelloReply, tonic::Status>>;
//! #     async fn say_hello_stream(&self, _: tonic::Request<mesh_proto::pb::HelloStreamRequest>) -> Result<tonic::Response<Self::SayHelloStreamStream>, tonic::Status> { Ok(tonic::Response::new(tokio_stream::empty())) }
//! # }
//!
//! # async fn run() -> anyhow::Result<()> {
//! let etcd = mesh::etcd("http://127.0.0.1:2379")?;
//! mesh::Server::builder("greeter")
//!     .listen("0.0.0.0:50051".parse()?)
//!     .etcd(etcd)
//!     .file_descriptor_set(mesh_proto::FILE_DESCRIPTOR_SET)
//!     .build()
//!     .await?
//!     .add_service(GreeterServer::new(MyGreeter::default()))
//!     .serve()
//!     .await
//! # }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use mesh_config::{ConfigWatcher, Layers, LiveConfig, StatusReport};
use mesh_etcd::Etcd;
use mesh_metrics::{CallMetricsLayer, Side};
use mesh_registry::{Instance, Registrar, RegistrarConfig};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tracing::{debug, info, warn};

use crate::config::{Config, LimiterSection, ServiceSection};

mod answer;
mod apply;

pub use answer::{AnswerFuture, AnswerWithin, AnswerWithinLayer};
pub use mesh_tls::{Http2Options, IncomingOptions};

/// Requests larger than this are refused by tonic before they reach health or reflection,
/// and by the services added when they are given the same bound
/// (`max_decoding_message_size`): tonic's default of 4 MiB let unfinished requests hold
/// hundreds of MiB on one connection.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// How long deregistering may take on shutdown before the server goes on without it (the
/// key then expires with its lease).
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(3);

/// The longest lease etcd grants (its `MaxLeaseTTL`); it refuses longer ones.
pub const MAX_TTL_SECS: u64 = 9_000_000_000;

/// The largest weight a server may register with.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// Sets the process's log filter: a filter string, or `None` for the one it started with.
/// [`crate::logging::init`] makes one.
pub type LogFilter = Arc<dyn Fn(Option<&str>) -> Result<(), String> + Send + Sync>;

/// What one client connection may do, so that a hostile or broken client cannot take the
/// server down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// How each HTTP/2 connection is served: streams at once, header size, rapid-reset
    /// protection, server keepalive pings, and the response bytes a stream may have waiting
    /// for a client that does not read.
    pub http2: mesh_tls::Http2Options,
    /// What every accepted connection gets: the TLS handshake timeout, the limit on client
    /// PINGs (keepalive enforcement), TCP keepalive, the idle bound and the cap on
    /// connections open at once.
    pub incoming: mesh_tls::IncomingOptions,
    /// How long a call may take to be answered (its response's headers): a request body
    /// that never ends or a handler that never answers gets DEADLINE_EXCEEDED, and what it
    /// held is freed. `None` for no bound. Streams go on after their headers.
    pub request_timeout: Option<Duration>,
}

impl Default for ConnectionLimits {
    /// [`Http2Options::default`](mesh_tls::Http2Options) (100 streams, 16 KiB of headers,
    /// 20 pending resets, no server pings, 64 KiB waiting per stream),
    /// [`IncomingOptions::default`](mesh_tls::IncomingOptions) (10 client pings a second, 10 s
    /// for a handshake, TCP keepalive after 60 s idle, no cap on connections), 30 s to
    /// answer a call.
    fn default() -> Self {
        ConnectionLimits {
            http2: mesh_tls::Http2Options::default(),
            incoming: mesh_tls::IncomingOptions::default(),
            request_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// TLS files of a server: its certificate chain and key, and for mTLS the CA its clients'
/// certificates must be signed by. Reloaded on SIGHUP or when a file changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// mTLS: the CA (PEM) that signed the certificates clients must present.
    pub client_ca: Option<PathBuf>,
}

/// How the builder names a setting in an error: by its flag when the flags set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Code,
    Flags,
}

/// A signal to stop, or to stop sooner.
type Signal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How a server is stopped.
enum Shutdown {
    /// On SIGINT or SIGTERM; a second one cuts the shutdown short.
    Signals,
    /// When the future completes.
    Future(Pin<Box<dyn Future<Output = ()> + Send>>),
}

/// Where to listen.
enum Listen {
    Addr { addr: SocketAddr, backlog: Option<u32> },
    Listener(TcpListener),
}

/// Every setting of a server, checked by [`ServerBuilder::build`]; `S` is the service's own
/// section of the configuration document ([`crate::config::NoSection`] for none).
pub struct ServerBuilder<S = crate::config::NoSection> {
    pub(crate) origin: Origin,
    service: String,
    listen: Listen,
    advertise: Option<String>,
    instance_id: Option<String>,
    version: Option<String>,
    weight: u32,
    zone: Option<String>,
    ttl: Duration,
    etcd_prefix: String,
    etcd: Option<Result<Etcd, String>>,
    register: bool,
    live_config: bool,
    config_file: Option<PathBuf>,
    limiter: Option<LimiterSection>,
    config_source: Option<watch::Receiver<Arc<Config<S>>>>,
    tls: Option<TlsFiles>,
    limits: ConnectionLimits,
    metrics_listen: Option<SocketAddr>,
    metrics: bool,
    health_listen: Option<SocketAddr>,
    drain_timeout: Duration,
    shutdown_grace: Duration,
    descriptor_sets: Vec<&'static [u8]>,
    log_filter: Option<LogFilter>,
    shutdown: Shutdown,
}

impl<S> std::fmt::Debug for ServerBuilder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("service", &self.service)
            .field("advertise", &self.advertise)
            .field("instance_id", &self.instance_id)
            .field("weight", &self.weight)
            .field("zone", &self.zone)
            .field("ttl", &self.ttl)
            .field("etcd_prefix", &self.etcd_prefix)
            .field("register", &self.register)
            .field("live_config", &self.live_config)
            .field("tls", &self.tls)
            .field("limits", &self.limits)
            .field("metrics_listen", &self.metrics_listen)
            .field("health_listen", &self.health_listen)
            .field("drain_timeout", &self.drain_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish_non_exhaustive()
    }
}

/// Entry point: [`Server::builder`].
pub struct Server<S = crate::config::NoSection> {
    settings: Settings,
    listener: TcpListener,
    local: SocketAddr,
    instance_id: String,
    config: watch::Receiver<Arc<Config<S>>>,
    live: Option<LiveConfig<Config<S>>>,
    report: Option<StatusReport>,
    registry: Option<Registry>,
    tls: Option<mesh_tls::ServerTls>,
    routes: tonic::service::Routes,
    named: Vec<&'static str>,
    descriptor_sets: Vec<&'static [u8]>,
    served: Vec<String>,
    shutdown: Signal,
    cut_short: Signal,
    _hangups: crate::signals::Hangups,
    _metrics: Vec<tokio_util::task::AbortOnDropHandle<()>>,
}

impl<S> std::fmt::Debug for Server<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local", &self.local)
            .field("instance_id", &self.instance_id)
            .field("services", &self.named)
            .finish_non_exhaustive()
    }
}

/// What `serve` needs of the builder's settings.
struct Settings {
    limits: ConnectionLimits,
    metrics: bool,
    health_listen: Option<SocketAddr>,
    drain_timeout: Duration,
    shutdown_grace: Duration,
    log_filter: Option<LogFilter>,
}

/// The registration of a server.
struct Registry {
    etcd: Etcd,
    config: RegistrarConfig,
    instance: Instance,
    holds_id: watch::Sender<Option<i64>>,
}

impl Server {
    /// A builder for the servers of `service` (the name it registers under and clients
    /// discover). The defaults: listen on 127.0.0.1:50051, no etcd (serve only), TTL 10 s,
    /// weight 1, [`ConnectionLimits::default`], 10 s to drain, 1 s of grace, stop on
    /// SIGINT/SIGTERM.
    pub fn builder(service: impl Into<String>) -> ServerBuilder {
        ServerBuilder::new(service)
    }
}

impl<S: ServiceSection> ServerBuilder<S> {
    /// See [`Server::builder`].
    pub fn new(service: impl Into<String>) -> Self {
        ServerBuilder {
            origin: Origin::Code,
            service: service.into(),
            listen: Listen::Addr { addr: SocketAddr::from(([127, 0, 0, 1], 50051)), backlog: None },
            advertise: None,
            instance_id: None,
            version: None,
            weight: 1,
            zone: None,
            ttl: Duration::from_secs(10),
            etcd_prefix: mesh_registry::DEFAULT_ROOT.to_string(),
            etcd: None,
            register: true,
            live_config: true,
            config_file: None,
            limiter: None,
            config_source: None,
            tls: None,
            limits: ConnectionLimits::default(),
            metrics_listen: None,
            metrics: false,
            health_listen: None,
            drain_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(1),
            descriptor_sets: Vec::new(),
            log_filter: None,
            shutdown: Shutdown::Signals,
        }
    }

    /// The service's own section of the configuration document is `T` from now on.
    pub fn section<T: ServiceSection>(self) -> ServerBuilder<T> {
        ServerBuilder {
            origin: self.origin,
            service: self.service,
            listen: self.listen,
            advertise: self.advertise,
            instance_id: self.instance_id,
            version: self.version,
            weight: self.weight,
            zone: self.zone,
            ttl: self.ttl,
            etcd_prefix: self.etcd_prefix,
            etcd: self.etcd,
            register: self.register,
            live_config: self.live_config,
            config_file: self.config_file,
            limiter: self.limiter,
            config_source: None,
            tls: self.tls,
            limits: self.limits,
            metrics_listen: self.metrics_listen,
            metrics: self.metrics,
            health_listen: self.health_listen,
            drain_timeout: self.drain_timeout,
            shutdown_grace: self.shutdown_grace,
            descriptor_sets: self.descriptor_sets,
            log_filter: self.log_filter,
            shutdown: self.shutdown,
        }
    }

    /// Listen on `addr` (port 0 picks a free port; the bound one is advertised), with the
    /// system's backlog.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Listen::Addr { addr, backlog: None };
        self
    }

    /// Connections the kernel queues before they are accepted (capped by
    /// `net.core.somaxconn`); `None` for the system's.
    pub fn listen_backlog(mut self, backlog: Option<u32>) -> Self {
        if let Listen::Addr { backlog: b, .. } = &mut self.listen {
            *b = backlog;
        }
        self
    }

    /// Serve on a listener bound already.
    pub fn listener(mut self, listener: TcpListener) -> Self {
        self.listen = Listen::Listener(listener);
        self
    }

    /// The `host:port` clients dial, as registered; default the bound address, or on
    /// 0.0.0.0 / `[::]` this host's first private address with the bound port.
    pub fn advertise(mut self, addr: impl Into<String>) -> Self {
        self.advertise = Some(addr.into());
        self
    }

    /// The id this instance registers under; default the advertised `host:port`.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// The version registered in the instance's metadata.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// The weight for weighted balancing, 1 to [`MAX_WEIGHT`].
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// The zone registered in the instance's metadata.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// The registration's lease TTL: whole seconds, at least 1 s.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The root prefix of mesh's keys in etcd (default `/mesh`).
    pub fn etcd_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.etcd_prefix = prefix.into();
        self
    }

    /// Register in this etcd and follow the configuration in it
    /// (`{prefix}/config/{service}`). Without etcd the server only serves.
    pub fn etcd(mut self, etcd: Etcd) -> Self {
        self.etcd = Some(Ok(etcd));
        self
    }

    /// Like [`ServerBuilder::etcd`] with a handle that may not have been made: its error
    /// is reported by `build`.
    pub(crate) fn etcd_result(mut self, etcd: Option<Result<Etcd, String>>) -> Self {
        self.etcd = etcd;
        self
    }

    /// Whether to register in etcd (default yes, when there is an etcd).
    pub fn register(mut self, register: bool) -> Self {
        self.register = register;
        self
    }

    /// Whether to follow the configuration document in etcd (default yes, when there is an
    /// etcd).
    pub fn live_config(mut self, follow: bool) -> Self {
        self.live_config = follow;
        self
    }

    /// A configuration file (TOML, or JSON by any other name) with the document's sections,
    /// below the limits set here and the document in etcd.
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config_file = Some(path.into());
        self
    }

    /// Rate limits before any document sets them (the flags' `--rate` and its friends).
    pub fn limiter(mut self, limiter: LimiterSection) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// Follow a configuration you publish yourself instead of one from the file and etcd.
    pub fn config_source(mut self, config: watch::Receiver<Arc<Config<S>>>) -> Self {
        self.config_source = Some(config);
        self
    }

    /// Serve TLS (mTLS with a client CA), reloaded on SIGHUP or file change.
    pub fn tls(mut self, tls: TlsFiles) -> Self {
        self.tls = Some(tls);
        self
    }

    /// What one connection may do.
    pub fn connection_limits(mut self, limits: ConnectionLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Serve Prometheus metrics at `http://addr/metrics` (calls, the limiter, the
    /// configuration), installing the process's metrics recorder.
    pub fn metrics_listen(mut self, addr: SocketAddr) -> Self {
        self.metrics_listen = Some(addr);
        self.metrics = true;
        self
    }

    /// Count calls and sample the limiter into a metrics recorder the process installed
    /// itself (`mesh_metrics::install`), with no endpoint of this server's.
    pub fn metrics(mut self, on: bool) -> Self {
        self.metrics = on;
        self
    }

    /// Serve grpc.health.v1 alone, in plaintext, on this address too: for probes that
    /// cannot speak TLS. It reports what the main port does and closes last.
    pub fn health_listen(mut self, addr: SocketAddr) -> Self {
        self.health_listen = Some(addr);
        self
    }

    /// How long in-flight calls get after the shutdown signal (default 10 s).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// How long to keep serving between deregistering and no longer accepting (default 1 s).
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// An encoded `FileDescriptorSet` of services added (`tonic_prost_build`'s
    /// `file_descriptor_set_path`): served by reflection, and the methods metrics label.
    pub fn file_descriptor_set(mut self, set: &'static [u8]) -> Self {
        self.descriptor_sets.push(set);
        self
    }

    /// Lets the document's `server.log_level` set the process's log filter.
    pub fn log_filter(mut self, filter: LogFilter) -> Self {
        self.log_filter = Some(filter);
        self
    }

    /// Stop when `signal` completes instead of on SIGINT/SIGTERM.
    pub fn shutdown_on(mut self, signal: impl Future<Output = ()> + Send + 'static) -> Self {
        self.shutdown = Shutdown::Future(Box::pin(signal));
        self
    }

    /// Checks every setting, binds the port, and starts following the configuration; the
    /// error names the setting at fault. Call it inside a tokio runtime. Unless
    /// [`shutdown_on`](ServerBuilder::shutdown_on) was given, SIGINT and SIGTERM are the
    /// server's from here on (they stop it once it serves), and SIGHUP no longer ends the
    /// process.
    pub async fn build(self) -> anyhow::Result<Server<S>> {
        // First, so that a SIGHUP during the start (a `systemctl reload`) cannot end the
        // server, and a SIGTERM stops it once it serves rather than half way.
        let hangups = crate::signals::Hangups::install(self.tls.is_some().then_some("the TLS certificate files"));
        let (shutdown, cut_short): (Signal, Signal) = match self.shutdown {
            Shutdown::Signals => {
                let (first, second) = crate::signals::stop_signals();
                (Box::pin(first), Box::pin(second))
            }
            Shutdown::Future(f) => (f, Box::pin(std::future::pending())),
        };
        // Settings are checked before anything binds, so a typo costs no port.
        let name = |flag: &str, method: &str| match self.origin {
            Origin::Flags => {
                let vars: Vec<String> = flag
                    .split('/')
                    .map(|f| format!("MESH_{}", f.trim_start_matches("--").replace('-', "_").to_ascii_uppercase()))
                    .collect();
                format!("{flag} ({})", vars.join("/"))
            }
            Origin::Code => method.to_string(),
        };
        mesh_registry::check_name(&self.service)
            .map_err(|e| anyhow::anyhow!("invalid {} {:?}: {e}", name("--service", "service name"), self.service))?;
        if let Some(id) = &self.instance_id {
            mesh_registry::check_name(id)
                .map_err(|e| anyhow::anyhow!("invalid {} {id:?}: {e}", name("--instance-id", "instance_id")))?;
        }
        check_ttl(self.ttl).map_err(|e| anyhow::anyhow!("invalid {}: {e}", name("--ttl", "ttl")))?;
        if !(1..=MAX_WEIGHT).contains(&self.weight) {
            anyhow::bail!("invalid {} {}: give 1 to {MAX_WEIGHT}", name("--weight", "weight"), self.weight);
        }
        if let Some(a) = &self.advertise {
            mesh_registry::check_addr(a)
                .with_context(|| format!("invalid {} {a:?}", name("--advertise", "advertise")))?;
        }
        let etcd = match self.etcd {
            Some(Ok(etcd)) => Some(etcd),
            Some(Err(e)) => anyhow::bail!(e),
            None => None,
        };
        let tls = match &self.tls {
            Some(files) => {
                let tls = mesh_tls::ServerTls::load(
                    mesh_tls::Identity::new(&files.cert, &files.key),
                    files.client_ca.clone(),
                )
                .with_context(|| name("--tls-cert/--tls-key/--tls-client-ca", "tls"))?;
                info!(mutual = tls.is_mutual(), "serving TLS with {}", files.cert.display());
                Some(tls)
            }
            None => None,
        };
        let limits = self.limits;
        let layers = match &self.config_source {
            Some(_) => None,
            None => Some(layers::<S>(self.config_file.as_deref(), self.limiter.as_ref(), self.origin)?),
        };
        let descriptor_sets = self.descriptor_sets.clone();
        // The methods the metrics label (whatever paths clients make up): read here, so that
        // a bad descriptor set stops the start.
        let mut served = Vec::new();
        for set in descriptor_sets.iter().chain(&SERVED_ALWAYS) {
            served
                .extend(mesh_metrics::methods_in(set).context("reading a file descriptor set (file_descriptor_set)")?);
        }
        match mesh_tls::raise_fd_limit() {
            Ok((before, after)) if after > before => info!("open files: soft limit raised from {before} to {after}"),
            Ok((_, now)) => debug!("open files: limit {now}"),
            Err(e) => warn!("cannot raise the open-files limit: {e}"),
        }
        let mut metrics = Vec::new();
        if let Some(addr) = self.metrics_listen {
            let exporter = crate::metrics::exporter().with_context(|| name("--metrics-listen", "metrics_listen"))?;
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr} ({})", name("--metrics-listen", "metrics_listen")))?;
            let bound = listener.local_addr().context("reading the metrics address")?;
            info!("metrics at http://{bound}/metrics");
            metrics.push(tokio_util::task::AbortOnDropHandle::new(exporter.serve(listener)));
        }
        let listener = match self.listen {
            Listen::Addr { addr, backlog } => mesh_tls::listen(addr, backlog)
                .with_context(|| format!("listening on {addr} ({})", name("--listen", "listen")))?,
            Listen::Listener(listener) => listener,
        };
        let local = listener.local_addr().context("reading the bound address")?;
        info!(address = %local, "{} listening on {local}", self.service);
        let advertise = match &self.advertise {
            Some(a) => a.clone(),
            None if local.ip().is_unspecified() => {
                match mesh_registry::pick_host_ip(&mesh_registry::interface_addrs(), local.is_ipv6()) {
                    Some(ip) => {
                        let addr = SocketAddr::new(ip, local.port()).to_string();
                        info!(
                            "advertising {addr}: this host's address, as listening on {local} says nothing clients can dial ({} sets it)",
                            name("--advertise", "advertise")
                        );
                        addr
                    }
                    None => anyhow::bail!(
                        "listening on {local}, which clients cannot dial, and this host has no address but loopback; give {} HOST:{}",
                        name("--advertise", "advertise"),
                        local.port()
                    ),
                }
            }
            None => local.to_string(),
        };
        let instance_id = self.instance_id.clone().unwrap_or_else(|| advertise.clone());
        let (holds_id, holding) = watch::channel(None);
        let registry = etcd.clone().filter(|_| self.register).map(|etcd| Registry {
            etcd,
            config: RegistrarConfig { root: self.etcd_prefix.clone(), ttl: self.ttl },
            instance: Instance {
                service: self.service.clone(),
                id: instance_id.clone(),
                addr: advertise,
                weight: self.weight,
                zone: self.zone.clone(),
                version: self.version.clone(),
                tls: tls.is_some(),
            },
            holds_id,
        });
        // Live configuration: the file and flag settings at once, the document in etcd when
        // it is read; what this instance applied is reported beside its registration.
        let following = etcd.filter(|_| self.live_config);
        let (config, live) = match (self.config_source, layers, &following) {
            (Some(config), _, _) => (config, None),
            (None, Some(layers), Some(etcd)) => {
                let key = mesh_config::config_key(&self.etcd_prefix, &self.service);
                info!(key = %key, "watching the configuration");
                let live = ConfigWatcher::<Config<S>>::new(etcd.clone(), key, &layers)?.spawn();
                (live.subscribe(), Some(live))
            }
            (None, layers, _) => {
                let layers = match layers {
                    Some(layers) => layers,
                    None => Layers::defaults(&Config::<S>::default())?,
                };
                (watch::channel(Arc::new(layers.build::<Config<S>>()?)).1, None)
            }
        };
        if let Some(live) = live.as_ref().filter(|_| self.metrics) {
            metrics.push(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(crate::etcd::config_metrics(
                live.status(),
            ))));
        }
        let report = live.as_ref().zip(following).map(|(live, etcd)| {
            let key = mesh_config::status_key(&self.etcd_prefix, &self.service, &instance_id);
            StatusReport::spawn_under(etcd, key, instance_id.clone(), live.status(), holding)
        });
        Ok(Server {
            settings: Settings {
                limits,
                metrics: self.metrics,
                health_listen: self.health_listen,
                drain_timeout: self.drain_timeout,
                shutdown_grace: self.shutdown_grace,
                log_filter: self.log_filter,
            },
            listener,
            local,
            instance_id,
            config,
            live,
            report,
            registry,
            tls,
            routes: tonic::service::Routes::default(),
            named: Vec::new(),
            descriptor_sets,
            served,
            shutdown,
            cut_short,
            _hangups: hangups,
            _metrics: metrics,
        })
    }
}

/// The descriptors of what every server serves beside the user's services.
const SERVED_ALWAYS: [&[u8]; 3] = [
    tonic_health::pb::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
];

/// A lease TTL etcd grants: whole seconds, 1 s to [`MAX_TTL_SECS`].
pub fn check_ttl(ttl: Duration) -> Result<(), String> {
    if ttl < Duration::from_secs(1) || ttl.subsec_nanos() != 0 {
        return Err(format!("{ttl:?}: etcd leases count whole seconds; use 1s or more, e.g. 10s"));
    }
    if ttl.as_secs() > MAX_TTL_SECS {
        return Err(format!("{ttl:?}: etcd grants leases of at most {MAX_TTL_SECS} seconds (about 285 years)"));
    }
    Ok(())
}

/// The configuration's layers below etcd: defaults, then the file, then the limits set by
/// flags or code; the error names the file or the setting.
pub(crate) fn layers<S: ServiceSection>(
    file: Option<&std::path::Path>,
    limiter: Option<&LimiterSection>,
    origin: Origin,
) -> anyhow::Result<Layers> {
    let mut layers = Layers::defaults(&Config::<S>::default())?;
    if let Some(file) = file {
        layers = layers.file(file)?;
        layers.build_as::<Config<S>>(&format!("config file {}", file.display()))?;
    }
    if let Some(section) = limiter {
        section.limiter_config().map_err(|e| match origin {
            Origin::Flags => {
                anyhow::anyhow!("invalid --rate/--burst/--limit-method/--limit-per-caller/--limit-max-wait: {e}")
            }
            Origin::Code => anyhow::anyhow!("invalid limiter: {e}"),
        })?;
        let patch = serde_json::json!({ "server": { "limiter": section } });
        layers = layers.patch("the limit flags", patch)?;
    }
    // Checked here, so that a bad file or setting stops the start with its reason.
    layers.build::<Config<S>>()?;
    Ok(layers)
}

impl<S: ServiceSection> Server<S> {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The id it registers under (and that services may report as the one serving).
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The configuration in force, and its changes as they are applied: the service's own
    /// section is `config.borrow().server.service`.
    pub fn config(&self) -> watch::Receiver<Arc<Config<S>>> {
        self.config.clone()
    }

    /// Serves `service` beside the others, health and reflection; reported SERVING under
    /// its name while the server serves.
    pub fn add_service<T>(mut self, service: T) -> Self
    where
        T: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        T::Future: Send + 'static,
    {
        self.routes = self.routes.add_service(service);
        self.named.push(T::NAME);
        self
    }

    /// Serves until the shutdown signal, then reports NOT_SERVING, deregisters, serves out
    /// the grace period, stops accepting and drains in-flight calls (within the drain
    /// timeout). A second signal cuts the shutdown short.
    pub async fn serve(mut self) -> anyhow::Result<()> {
        let report = self.report.take();
        let result = self.serve_inner().await;
        if let Some(report) = report
            && let Err(e) = report.stop(DEREGISTER_TIMEOUT).await
        {
            warn!("removing the config status: {e}");
        }
        result
    }

    async fn serve_inner(self) -> anyhow::Result<()> {
        if self.named.is_empty() {
            anyhow::bail!("no service to serve: add one with add_service before serve");
        }
        let Server {
            settings,
            listener,
            local,
            instance_id,
            config,
            live: _live,
            report: _,
            registry,
            tls,
            routes,
            named,
            descriptor_sets,
            served,
            shutdown,
            cut_short,
            _hangups,
            _metrics,
        } = self;
        let (health, health_service) = tonic_health::server::health_reporter();
        let health_service = health_service.max_decoding_message_size(MAX_REQUEST_BYTES);
        for name in &named {
            health.set_service_status(*name, ServingStatus::Serving).await;
        }
        // The same descriptors for both versions, so older grpcurl and Python tools work too.
        let reflection = || {
            let mut builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
            for set in &descriptor_sets {
                builder = builder.register_encoded_file_descriptor_set(set);
            }
            builder
        };
        let reflection_v1 = reflection()
            .build_v1()
            .context("building the reflection service")?
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .context("building the reflection service")?
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        let initial = config.borrow().clone();
        // The limiter is always in place, off without limits, so that configuration can turn
        // it on.
        let limiter = match &initial.server.limiter {
            Some(section) => {
                let config = section.limiter_config().map_err(|e| anyhow::anyhow!("the rate limit: {e}"))?;
                info!("rate limit: {}", apply::describe(&config));
                mesh_limiter::RateLimitLayer::try_new(config).context("the rate limit")?
            }
            None => mesh_limiter::RateLimitLayer::off(),
        };
        if let (Some(set), Some(level)) = (&settings.log_filter, &initial.server.log_level)
            && let Err(e) = set(Some(level))
        {
            warn!("log level {level:?} not applied: {e}");
        }
        let _limiter_metrics = settings.metrics.then(|| apply::limiter_metrics(limiter.handle()));
        let applier =
            tokio::spawn(apply::apply_changes(config.clone(), limiter.handle(), settings.log_filter.clone(), initial));
        // Health alone, in plaintext, for probes that cannot do TLS; bound before registering.
        let (stop_health, health_stopped) = oneshot::channel::<()>();
        let health_server = match settings.health_listen {
            Some(addr) => {
                let listener =
                    mesh_tls::listen(addr, None).with_context(|| format!("listening on {addr} (--health-listen)"))?;
                let bound = listener.local_addr().context("reading the health address")?;
                info!("grpc.health.v1 in plaintext on {bound}");
                let incoming = mesh_tls::incoming(listener, None, settings.limits.incoming);
                let routes = tower::ServiceBuilder::new()
                    .layer(AnswerWithinLayer::new(settings.limits.request_timeout))
                    .service(tonic::service::Routes::new(health_service.clone()).prepare());
                // Without server pings: a probe's connection is short.
                let http2 = mesh_tls::Http2Options { keepalive_interval: None, ..settings.limits.http2 };
                Some(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(mesh_tls::serve(
                    incoming,
                    routes,
                    http2,
                    async {
                        let _ = health_stopped.await;
                    },
                ))))
            }
            None => None,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        // New handshakes use a renewed certificate as soon as it is on disk (or on SIGHUP).
        let _reloading = tls.as_ref().map(|tls| tls.watch(Duration::from_secs(1)));
        let limits = settings.limits;
        let incoming = mesh_tls::incoming(listener, tls.clone(), limits.incoming);
        let routes =
            routes.add_service(health_service).add_service(reflection_v1).add_service(reflection_v1alpha).prepare();
        let routes = tower::ServiceBuilder::new()
            .layer(if settings.metrics {
                CallMetricsLayer::serving(Side::Server, served)
            } else {
                CallMetricsLayer::off()
            })
            .layer(AnswerWithinLayer::new(limits.request_timeout))
            .layer(limiter)
            .service(routes);
        let mut server = tokio::spawn(mesh_tls::serve(incoming, routes, limits.http2, async {
            let _ = stopped.await;
        }));
        let scheme = match &tls {
            Some(tls) if tls.is_mutual() => "mTLS",
            Some(_) => "TLS",
            None => "plaintext",
        };
        info!(instance = %instance_id, "serving {} on {local} ({scheme})", named.join(", "));
        // Registered only now that it listens and reports SERVING.
        let registration =
            registry.as_ref().map(|r| Registrar::new(r.etcd.clone(), r.config.clone()).spawn(&r.instance));
        let _holding = registry.as_ref().zip(registration.as_ref()).map(|(r, registration)| {
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(follow_holding(
                registration.state(),
                r.holds_id.clone(),
            )))
        });

        tokio::select! {
            result = &mut server => {
                // The server stopped without being asked: its task panicked, or the accept
                // loop ended.
                result.context("server task")?;
                anyhow::bail!("stopped serving on {local} without being asked");
            }
            () = shutdown => {}
        }

        info!("shutting down: reporting NOT_SERVING");
        health.set_service_status("", ServingStatus::NotServing).await;
        for name in &named {
            health.set_service_status(*name, ServingStatus::NotServing).await;
        }
        let mut hurry = Hurry::new(cut_short);
        if let Some(r) = registry.as_ref().zip(registration) {
            let ttl = r.0.config.ttl;
            let held = r.1.state().borrow().lease.is_some();
            match hurry.unless(r.1.deregister(DEREGISTER_TIMEOUT)).await {
                // Never registered (etcd unreachable all along): no client found it through
                // etcd, so there is nothing to wait for.
                Some(Ok(())) if !held => info!("never registered; no grace period to serve"),
                Some(Ok(())) => {
                    // Clients watching etcd drop this endpoint now; keep serving until they
                    // have.
                    info!(grace = ?settings.shutdown_grace, "deregistered; serving out the grace period");
                }
                Some(Err(e)) => warn!(
                    grace = ?settings.shutdown_grace,
                    "{} (TTL {ttl:?}); serving out the grace period",
                    mesh_util::error_chain(&e)
                ),
                None => {
                    warn!("not deregistered (shutdown cut short); the key stays until its lease expires (TTL {ttl:?})")
                }
            }
            if held {
                hurry.unless(tokio::time::sleep(settings.shutdown_grace)).await;
            }
        }
        applier.abort();
        let _ = stop.send(());
        info!(timeout = ?settings.drain_timeout, "draining in-flight calls");
        match hurry.unless(tokio::time::timeout(settings.drain_timeout, &mut server)).await {
            Some(Ok(result)) => {
                result.context("server task")?;
                info!("drained; bye");
            }
            Some(Err(_)) => {
                warn!(timeout = ?settings.drain_timeout, "calls still in flight after the drain timeout were cut");
                server.abort();
            }
            None => {
                warn!("shutdown cut short: calls still in flight were cut");
                server.abort();
            }
        }
        // Probes have seen NOT_SERVING all along the drain; the health port closes last.
        let _ = stop_health.send(());
        if let Some(health) = health_server {
            let _ = tokio::time::timeout(Duration::from_secs(1), health).await;
        }
        Ok(())
    }
}

/// The second signal of a shutdown: once it came, every step still to wait for is skipped.
struct Hurry {
    signal: Signal,
    came: bool,
}

impl Hurry {
    fn new(signal: Signal) -> Self {
        Hurry { signal, came: false }
    }

    /// `step`'s output, or `None` when the signal comes first (or came before).
    async fn unless<T>(&mut self, step: impl Future<Output = T>) -> Option<T> {
        if self.came {
            return None;
        }
        tokio::select! {
            biased;
            () = &mut self.signal => {
                self.came = true;
                None
            }
            out = step => Some(out),
        }
    }
}

/// Tells `holds` the lease the registration holds its key with, as it changes.
async fn follow_holding(
    mut state: watch::Receiver<mesh_registry::RegistrationState>,
    holds: watch::Sender<Option<i64>>,
) {
    loop {
        let lease = {
            let s = state.borrow_and_update();
            s.lease.filter(|_| s.registered)
        };
        holds.send_if_modified(|held| std::mem::replace(held, lease) != lease);
        if state.changed().await.is_err() {
            return;
        }
    }
}
