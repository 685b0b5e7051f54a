use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use greeter_config::GreeterConfig;
use mesh_config::{ConfigWatcher, StatusReport};
use tokio::sync::watch;

use anyhow::Context as _;
use mesh_proto::pb::greeter_server::GreeterServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic_health::ServingStatus;
use tracing::{debug, info, warn};

use mesh_etcd::Etcd;
use mesh_metrics::{CallMetricsLayer, Side};
use mesh_registry::{Instance, Registrar, RegistrarConfig};

use crate::{Args, Command, Greeter};

/// Requests larger than this are refused by tonic before they reach a service (greeter,
/// health or reflection): a name is at most 1 KiB and a health or reflection request far
/// less, so anything near this size is a mistake or an attack.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// How long deregistering may take on shutdown before the server goes on without it (the
/// key then expires with its lease).
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(3);

/// Sets the process's log filter: a filter string, or `None` for the one it started with.
pub type LogFilter = Arc<dyn Fn(Option<&str>) -> Result<(), String> + Send + Sync>;

/// What [`serve`] needs besides a listener.
#[derive(Clone)]
pub struct ServeOptions {
    /// Reported as `served_by`.
    pub instance_id: String,
    /// How long in-flight calls get after the shutdown signal.
    pub drain_timeout: Duration,
    /// How long to keep serving between deregistering and no longer accepting.
    pub shutdown_grace: Duration,
    /// Where and what to register; `None` to serve without etcd.
    pub registry: Option<RegistryOptions>,
    /// Faults to inject into greeter calls (none by default).
    pub fault: crate::Fault,
    /// The configuration in force and its changes (from a sender that is gone, it never
    /// changes): the limits, the greeting and the log level are applied as they come.
    pub config: watch::Receiver<Arc<GreeterConfig>>,
    /// Sets the process's log filter (`None`: back to the one it started with), when the
    /// server owns its logging; the configuration's `server.log_level` goes through it.
    pub log_filter: Option<LogFilter>,
    /// TLS (and mTLS), reloaded on SIGHUP or file change while serving; plaintext without.
    pub tls: Option<mesh_tls::ServerTls>,
    /// What one connection may do: the defences against hostile clients.
    pub limits: ConnectionLimits,
    /// Count calls and sample the limiter into the process's metrics recorder (see
    /// `mesh_metrics::install`).
    pub metrics: bool,
    /// Where to serve grpc.health.v1 alone, in plaintext, beside the main port: for probes
    /// that cannot speak TLS (the kubelet's gRPC probe). It reports what the main port does,
    /// NOT_SERVING from the first moment of the shutdown, and closes last.
    pub health_listen: Option<SocketAddr>,
}

/// What one client connection may do, so that a hostile or broken client cannot take the
/// server down: the defaults are those of `greeter-server`'s flags.
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

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("instance_id", &self.instance_id)
            .field("drain_timeout", &self.drain_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("registry", &self.registry)
            .field("fault", &self.fault)
            .field("config", &*self.config.borrow())
            .field("log_filter", &self.log_filter.as_ref().map(|_| "set"))
            .field("tls", &self.tls)
            .field("limits", &self.limits)
            .field("metrics", &self.metrics)
            .field("health_listen", &self.health_listen)
            .finish()
    }
}

/// The registration of a server.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// The etcd to register in.
    pub etcd: Etcd,
    /// Root prefix and TTL.
    pub config: RegistrarConfig,
    /// What to register.
    pub instance: Instance,
    /// Told the lease the registration holds its key with (`None` while it holds none: not
    /// yet registered, its lease lost, or another live instance holding the id), so that
    /// the status reported beside the registration is written under the same lease, by
    /// the holder only.
    pub holds_id: watch::Sender<Option<i64>>,
}

/// Runs the server process with `args` until SIGINT or SIGTERM, then drains and returns
/// (or runs a `config` command); SIGHUP reloads the TLS files, and ends nothing. `log_filter` lets the configuration set the log level.
pub async fn run(args: Args, log_filter: Option<LogFilter>) -> anyhow::Result<()> {
    if let Some(Command::Config(command)) = &args.command {
        return crate::config_cmd::run(&args, command).await;
    }
    // First, so that a SIGHUP during the start (a `systemctl reload`) cannot end the server.
    let _hangups = greeter_config::Hangups::install(args.tls_cert.is_some().then_some("the TLS certificate files"));
    // From the start too: a SIGTERM while starting stops the server once it serves, after
    // it registered, rather than killing it half way.
    let (shutdown, cut_short) = stop_signals();
    // Flags are checked before anything binds, so a typo costs no port.
    let etcd =
        if args.no_register { None } else { Some(args.etcd_access.etcd(&args.etcd).map_err(anyhow::Error::msg)?) };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = mesh_tls::ServerTls::load(mesh_tls::Identity::new(cert, key), args.tls_client_ca.clone())
                .context("--tls-cert/--tls-key/--tls-client-ca")?;
            info!(mutual = tls.is_mutual(), "serving TLS with {}", cert.display());
            Some(tls)
        }
        _ => None,
    };
    let limits = args.connection_limits();
    match mesh_tls::raise_fd_limit() {
        Ok((before, after)) if after > before => info!("open files: soft limit raised from {before} to {after}"),
        Ok((_, now)) => debug!("open files: limit {now}"),
        Err(e) => warn!("cannot raise the open-files limit: {e}"),
    }
    let metrics = match args.metrics_listen {
        Some(addr) => {
            let exporter = mesh_metrics::install().context("--metrics-listen")?;
            let listener =
                TcpListener::bind(addr).await.with_context(|| format!("listening on {addr} (--metrics-listen)"))?;
            let bound = listener.local_addr().context("reading the metrics address")?;
            info!("metrics at http://{bound}/metrics");
            Some(exporter.serve(listener))
        }
        None => None,
    };
    if let Some(a) = &args.advertise {
        mesh_registry::check_addr(a).with_context(|| format!("invalid --advertise {a:?}"))?;
    }
    let fault = args.fault();
    let layers = args.layers()?;
    let listener = mesh_tls::listen(args.listen, args.listen_backlog)
        .with_context(|| format!("listening on {} (--listen)", args.listen))?;
    let local = listener.local_addr().context("reading the bound address")?;
    info!(address = %local, "greeter-server listening on {local}");
    let advertise = match &args.advertise {
        Some(a) => a.clone(),
        None if local.ip().is_unspecified() => {
            match mesh_registry::pick_host_ip(&mesh_registry::interface_addrs(), local.is_ipv6()) {
                Some(ip) => {
                    let addr = SocketAddr::new(ip, local.port()).to_string();
                    info!(
                        "advertising {addr}: this host's address, as listening on {local} says nothing clients can dial (--advertise sets it)"
                    );
                    addr
                }
                None => anyhow::bail!(
                    "listening on {local}, which clients cannot dial, and this host has no address but loopback; pass --advertise HOST:{}",
                    local.port()
                ),
            }
        }
        None => local.to_string(),
    };
    let instance_id = args.instance_id.unwrap_or_else(|| advertise.clone());
    let (holds_id, holding) = watch::channel(None);
    let registry = etcd.map(|etcd| RegistryOptions {
        etcd,
        config: RegistrarConfig { root: args.etcd_prefix.clone(), ttl: args.ttl },
        instance: Instance {
            service: args.service.clone(),
            id: instance_id.clone(),
            addr: advertise,
            weight: args.weight,
            zone: args.zone.clone(),
            version: Some(env!("CARGO_PKG_VERSION").to_string()),
            tls: tls.is_some(),
        },
        holds_id,
    });
    if fault.is_on() {
        warn!(
            "FAULT INJECTION ON: {:.0}% of greeter calls fail with {:?}, each delayed {:?}",
            fault.error_rate * 100.0,
            fault.code,
            fault.delay
        );
    }
    // Live configuration: the file and flag settings at once, the document in etcd when
    // it is read; what this instance applied is reported beside its registration.
    let etcd = registry.as_ref().map(|r| r.etcd.clone()).filter(|_| !args.no_config);
    let live = match &etcd {
        Some(etcd) => {
            let key = mesh_config::config_key(&args.etcd_prefix, &args.service);
            info!(key = %key, "watching the configuration");
            Some(ConfigWatcher::<GreeterConfig>::new(etcd.clone(), key, &layers)?.spawn())
        }
        None => None,
    };
    let config = match &live {
        Some(live) => live.subscribe(),
        None => watch::channel(Arc::new(layers.build::<GreeterConfig>()?)).1,
    };
    let _config_metrics = match (&live, &metrics) {
        (Some(live), Some(_)) => {
            Some(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(greeter_config::config_metrics(live.status()))))
        }
        _ => None,
    };
    let report = live.as_ref().zip(etcd).map(|(live, etcd)| {
        let key = mesh_config::status_key(&args.etcd_prefix, &args.service, &instance_id);
        StatusReport::spawn_under(etcd, key, instance_id.clone(), live.status(), holding)
    });
    let options = ServeOptions {
        instance_id,
        drain_timeout: args.drain_timeout,
        shutdown_grace: args.shutdown_grace,
        registry,
        fault,
        config,
        log_filter,
        tls,
        limits,
        metrics: metrics.is_some(),
        health_listen: args.health_listen,
    };
    let result = serve_until(listener, options, shutdown, cut_short).await;
    if let Some(report) = report
        && let Err(e) = report.stop(DEREGISTER_TIMEOUT).await
    {
        warn!("removing the config status: {e}");
    }
    result
}

/// The descriptors of every service the server serves: greeter, health, reflection.
const DESCRIPTOR_SETS: [&[u8]; 4] = [
    mesh_proto::FILE_DESCRIPTOR_SET,
    tonic_health::pb::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
];

/// How many method limits a log line spells out.
const DESCRIBED_METHODS: usize = 5;

/// The limits in a log line: "200/s, burst 20, reject; /a.B/C 5/s, burst 1, reject".
fn describe(config: &mesh_limiter::LimiterConfig) -> String {
    let one = |l: &mesh_limiter::Limit| {
        let mode = match l.mode {
            mesh_limiter::Mode::Reject => "reject".to_string(),
            mesh_limiter::Mode::Wait { max_wait } => format!("wait up to {max_wait:?}"),
        };
        let admits = l.effective_rate_per_sec();
        let rounded = if (admits - l.rate_per_sec).abs() > l.rate_per_sec * 0.005 {
            format!(
                " (admits {admits}/s: tokens come in whole milliseconds; a burst of {} gives the full rate)",
                l.burst_for_full_rate()
            )
        } else {
            String::new()
        };
        format!("{}/s, burst {}{rounded}, {mode}", l.rate_per_sec, l.burst)
    };
    let mut out = one(&config.default);
    // A document may set thousands of method limits: a log line names a few and counts
    // the rest.
    for (path, limit) in config.methods.iter().take(DESCRIBED_METHODS) {
        out.push_str(&format!("; {path} {}", one(limit)));
    }
    if config.methods.len() > DESCRIBED_METHODS {
        out.push_str(&format!("; and {} more method limits", config.methods.len() - DESCRIBED_METHODS));
    }
    if let Some(p) = &config.per_caller {
        let each = p.limit.as_ref().map_or_else(|| "the same".to_string(), one);
        out.push_str(&format!("; and per caller by {:?} ({each} each), at most {} callers", p.key, p.max_callers));
    }
    out
}

/// Serves greeter, health and reflection on `listener` until `shutdown` completes; then
/// reports NOT_SERVING, stops accepting and waits for in-flight calls, at most
/// `drain_timeout`.
pub async fn serve(
    listener: TcpListener,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_until(listener, options, shutdown, std::future::pending()).await
}

/// [`serve`], with the shutdown cut short when `cut_short` completes (a second signal): what
/// is left of deregistering, the grace period and the drain is skipped, and calls still in
/// flight are cut.
pub async fn serve_until(
    listener: TcpListener,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
    cut_short: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let local: SocketAddr = listener.local_addr().context("reading the bound address")?;
    let (health, health_service) = tonic_health::server::health_reporter();
    // Every service refuses messages over the bound, health and reflection too: tonic's
    // default of 4 MiB let unfinished requests hold hundreds of MiB on one connection.
    let health_service = health_service.max_decoding_message_size(MAX_REQUEST_BYTES);
    health.set_serving::<GreeterServer<Greeter>>().await;

    // The same descriptors for both versions, so older grpcurl and Python tools work too.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(mesh_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // The metrics label these paths only, whatever paths clients make up.
    let mut served = Vec::new();
    for set in DESCRIPTOR_SETS {
        served.extend(mesh_metrics::methods_in(set).context("reading the services' descriptors")?);
    }
    let reflection_v1 = reflection()
        .build_v1()
        .context("building the reflection service")?
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("building the reflection service")?
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let initial = options.config.borrow().clone();
    let greeter = Greeter::new(options.instance_id.clone()).with_fault(options.fault.clone());
    let greeting = greeter.greeting();
    greeting.store(Arc::new(initial.server.greeting.clone()));
    let greeter = GreeterServer::new(greeter).max_decoding_message_size(MAX_REQUEST_BYTES);

    // The limiter is always in place, off without limits, so that configuration can turn
    // it on.
    let limiter = match &initial.server.limiter {
        Some(section) => {
            let config = section.limiter_config().map_err(|e| anyhow::anyhow!("the rate limit: {e}"))?;
            info!("rate limit: {}", describe(&config));
            mesh_limiter::RateLimitLayer::try_new(config).context("the rate limit")?
        }
        None => mesh_limiter::RateLimitLayer::off(),
    };
    if let (Some(set), Some(level)) = (&options.log_filter, &initial.server.log_level)
        && let Err(e) = set(Some(level))
    {
        warn!("log level {level:?} not applied: {e}");
    }
    let _limiter_metrics = options.metrics.then(|| limiter_metrics(limiter.handle()));
    let applier = tokio::spawn(apply_changes(
        options.config.clone(),
        limiter.handle(),
        greeting,
        options.log_filter.clone(),
        initial,
    ));
    // Health alone, in plaintext, for probes that cannot do TLS; bound before registering.
    let (stop_health, health_stopped) = oneshot::channel::<()>();
    let health_server = match options.health_listen {
        Some(addr) => {
            let listener =
                mesh_tls::listen(addr, None).with_context(|| format!("listening on {addr} (--health-listen)"))?;
            let bound = listener.local_addr().context("reading the health address")?;
            info!("grpc.health.v1 in plaintext on {bound}");
            let incoming = mesh_tls::incoming(listener, None, options.limits.incoming);
            let routes = tower::ServiceBuilder::new()
                .layer(crate::answer::AnswerWithinLayer::new(options.limits.request_timeout))
                .service(tonic::service::Routes::new(health_service.clone()).prepare());
            // Without server pings: a probe's connection is short.
            let http2 = mesh_tls::Http2Options { keepalive_interval: None, ..options.limits.http2 };
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
    let _reloading = options.tls.as_ref().map(|tls| tls.watch(Duration::from_secs(1)));
    let limits = options.limits;
    let incoming = mesh_tls::incoming(listener, options.tls.clone(), limits.incoming);
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(greeter)
        .prepare();
    let routes = tower::ServiceBuilder::new()
        .layer(if options.metrics { CallMetricsLayer::serving(Side::Server, served) } else { CallMetricsLayer::off() })
        .layer(crate::answer::AnswerWithinLayer::new(limits.request_timeout))
        .layer(limiter)
        .service(routes);
    let mut server = tokio::spawn(mesh_tls::serve(incoming, routes, limits.http2, async {
        let _ = stopped.await;
    }));
    let scheme = match &options.tls {
        Some(tls) if tls.is_mutual() => "mTLS",
        Some(_) => "TLS",
        None => "plaintext",
    };
    info!(instance = %options.instance_id, "serving greeter.v1 on {local} ({scheme})");
    // Registered only now that it listens and reports SERVING.
    let registration =
        options.registry.as_ref().map(|r| Registrar::new(r.etcd.clone(), r.config.clone()).spawn(&r.instance));
    let _holding = options.registry.as_ref().zip(registration.as_ref()).map(|(r, registration)| {
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(follow_holding(registration.state(), r.holds_id.clone())))
    });

    tokio::select! {
        result = &mut server => {
            // The server stopped without being asked: its task panicked, or the accept loop
            // ended.
            result.context("server task")?;
            anyhow::bail!("stopped serving on {local} without being asked");
        }
        () = shutdown => {}
    }

    info!("shutting down: reporting NOT_SERVING");
    health.set_service_status("", ServingStatus::NotServing).await;
    health.set_not_serving::<GreeterServer<Greeter>>().await;
    let mut hurry = Hurry::new(cut_short);
    if let Some(r) = options.registry.as_ref().zip(registration) {
        let ttl = r.0.config.ttl;
        let held = r.1.state().borrow().lease.is_some();
        match hurry.unless(r.1.deregister(DEREGISTER_TIMEOUT)).await {
            // Never registered (etcd unreachable all along): no client found it through
            // etcd, so there is nothing to wait for.
            Some(Ok(())) if !held => info!("never registered; no grace period to serve"),
            Some(Ok(())) => {
                // Clients watching etcd drop this endpoint now; keep serving until they have.
                info!(grace = ?options.shutdown_grace, "deregistered; serving out the grace period");
            }
            Some(Err(e)) => warn!(
                grace = ?options.shutdown_grace,
                "{} (TTL {ttl:?}); serving out the grace period",
                mesh_util::error_chain(&e)
            ),
            None => warn!("not deregistered (shutdown cut short); the key stays until its lease expires (TTL {ttl:?})"),
        }
        if held {
            hurry.unless(tokio::time::sleep(options.shutdown_grace)).await;
        }
    }
    applier.abort();
    let _ = stop.send(());
    info!(timeout = ?options.drain_timeout, "draining in-flight calls");
    match hurry.unless(tokio::time::timeout(options.drain_timeout, &mut server)).await {
        Some(Ok(result)) => {
            result.context("server task")?;
            info!("drained; bye");
        }
        Some(Err(_)) => {
            warn!(timeout = ?options.drain_timeout, "calls still in flight after the drain timeout were cut");
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

/// The second signal of a shutdown: once it came, every step still to wait for is skipped.
struct Hurry {
    signal: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    came: bool,
}

impl Hurry {
    fn new(signal: impl Future<Output = ()> + Send + 'static) -> Self {
        Hurry { signal: Box::pin(signal), came: false }
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

/// Applies each new configuration: the limits (kept buckets where unchanged), the greeting
/// and the log level, each only when it changed.
async fn apply_changes(
    mut config: watch::Receiver<Arc<GreeterConfig>>,
    limits: mesh_limiter::LimiterHandle,
    greeting: Arc<ArcSwap<String>>,
    log_filter: Option<LogFilter>,
    mut previous: Arc<GreeterConfig>,
) {
    while config.changed().await.is_ok() {
        let next = config.borrow_and_update().clone();
        let (old, new) = (&previous.server, &next.server);
        if old.limiter != new.limiter {
            match &new.limiter {
                // The document was checked before it was published.
                Some(section) => match section.limiter_config() {
                    Ok(c) => match limits.update(c.clone()) {
                        Ok(()) => info!("rate limit now: {}", describe(&c)),
                        Err(e) => warn!("rate limit not applied: {e}"),
                    },
                    Err(e) => warn!("rate limit not applied: {e}"),
                },
                None => {
                    limits.turn_off();
                    info!("rate limit now off");
                }
            }
        }
        if old.greeting != new.greeting {
            greeting.store(Arc::new(new.greeting.clone()));
            info!(greeting = %new.greeting, "greeting now");
        }
        if old.log_level != new.log_level
            && let Some(set) = &log_filter
        {
            match set(new.log_level.as_deref()) {
                Ok(()) => info!(level = ?new.log_level, "log level now"),
                Err(e) => warn!("log level {:?} not applied: {e}", new.log_level),
            }
        }
        previous = next;
    }
}

/// The limiter's counts as metrics, read at each scrape while the collector lives: admitted
/// and rejected calls by the scope whose budget decided them, and the callers told apart.
fn limiter_metrics(limits: mesh_limiter::LimiterHandle) -> mesh_metrics::Collector {
    mesh_metrics::collector(move |out| {
        for scope in mesh_limiter::Scope::ALL {
            let labels = [("scope", scope.as_str())];
            out.counter(
                "mesh_limiter_admitted_total",
                "Calls the rate limiter admitted, by the budget that decided: server, method or caller.",
                &labels,
                limits.admitted_in(scope),
            );
            out.counter(
                "mesh_limiter_rejected_total",
                "Calls the rate limiter rejected with RESOURCE_EXHAUSTED, by the budget that decided.",
                &labels,
                limits.rejected_in(scope),
            );
        }
        out.gauge(
            "mesh_limiter_callers",
            "Callers with a budget of their own (per-caller limits).",
            &[],
            limits.callers() as f64,
        );
    })
}

/// SIGINT and SIGTERM, handled from now on: the first future completes on the first of
/// them (the shutdown), the second on the next (cutting the shutdown short). Each is logged.
fn stop_signals() -> (impl Future<Output = ()>, impl Future<Output = ()> + Send + 'static) {
    let (first, first_came) = oneshot::channel::<()>();
    let (second, second_came) = oneshot::channel::<()>();
    let mut next = signal_names();
    tokio::spawn(async move {
        let Some(name) = next.recv().await else { return };
        info!("{name} received");
        let _ = first.send(());
        let Some(name) = next.recv().await else { return };
        warn!("{name} received during the shutdown: cutting it short");
        let _ = second.send(());
    });
    // A sender gone without a signal (no handler could be installed) stops nothing.
    let wait = |came: oneshot::Receiver<()>| async move {
        if came.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    (wait(first_came), wait(second_came))
}

/// The names of SIGINT and SIGTERM as they come; the handlers are installed before this
/// returns.
fn signal_names() -> tokio::sync::mpsc::UnboundedReceiver<&'static str> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    #[cfg(unix)]
    for (kind, name) in [
        (tokio::signal::unix::SignalKind::interrupt(), "SIGINT"),
        (tokio::signal::unix::SignalKind::terminate(), "SIGTERM"),
    ] {
        match tokio::signal::unix::signal(kind) {
            Ok(mut signal) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while signal.recv().await.is_some() {
                        if tx.send(name).is_err() {
                            return;
                        }
                    }
                });
            }
            Err(e) => warn!("cannot listen for {name}: {e}"),
        }
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            if tx.send("Ctrl-C").is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests;
