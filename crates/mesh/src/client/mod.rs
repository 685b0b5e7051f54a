//! The client builder: one `Clone` channel that any generated tonic client takes, with
//! mesh's whole client side behind it.
//!
//! Calls go, outermost first, through the default deadline, a per-service circuit breaker
//! that fails fast, retries of the methods declared idempotent (never others) under a
//! budget, the balancer over the servers discovered in etcd (or a static list), and a
//! circuit breaker per endpoint that ejects it while open. With etcd, the `client` section
//! of the service's configuration document is followed live.
//!
//! ```no_run
//! use mesh_proto::pb::{HelloRequest, greeter_client::GreeterClient};
//! use std::time::Duration;
//!
//! # async fn run() -> anyhow::Result<()> {
//! let client = mesh::Client::builder("greeter")
//!     .etcd(mesh::etcd("http://127.0.0.1:2379")?)
//!     .idempotent(["/greeter.v1.Greeter/SayHello"])
//!     .timeout(Duration::from_secs(1))
//!     .build()
//!     .await?;
//! let mut greeter = GreeterClient::new(client.channel());
//! let reply = greeter.say_hello(HelloRequest { name: "world".into() }).await?;
//! println!("{}", reply.into_inner().message);
//! # Ok(())
//! # }
//! ```

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{AnySection, ServiceSection};
use crate::server::Origin;
use anyhow::{Context as _, bail};
use mesh_etcd::Etcd;

mod connect;
mod deadline;
mod live;
mod stack;

pub use mesh_balancer::{EndpointState, Strategy};
pub use mesh_breaker::{BreakerConfig, FailureRate};
pub use mesh_retry::RetryPolicy;

pub use connect::{balanced, connect, connect_tls, discovered, discovered_through};
pub use deadline::{DefaultDeadline, LiveTimeout};
pub use live::{ClientBase, apply, follow, layers};
pub use stack::{
    Client, EndpointStack, InvalidResilience, MeshChannel, RETRY_ON, Resilience, collect_metrics,
    default_service_breaker,
};

/// How long a client waits for its configuration document before its first call.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(3);

/// TLS towards the servers: calls go over TLS only, to servers registered as speaking it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// The CA that signed the servers' certificates (PEM).
    pub ca: PathBuf,
    /// This client's certificate and key (PEM), for servers that require one (mTLS).
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name the servers' certificates carry, when it is not the host dialled.
    pub server_name: Option<String>,
}

impl ClientTlsFiles {
    /// Loads the files; the error names the file.
    pub fn load(&self) -> anyhow::Result<mesh_tls::ClientTls> {
        let identity = self.identity.as_ref().map(|(c, k)| mesh_tls::Identity::new(c, k));
        let mut tls = mesh_tls::ClientTls::load(&self.ca, identity)?;
        if let Some(name) = &self.server_name {
            tls = tls.with_server_name(name)?;
        }
        Ok(tls)
    }
}

/// Where a client finds its servers.
#[derive(Debug)]
enum Source {
    Etcd(Result<Etcd, String>),
    Targets { targets: Vec<String>, weights: Vec<u32> },
}

/// Every setting of a client, checked by [`ClientBuilder::build`]. `S` is the type of the
/// servers' own section of the document, checked too when given ([`ClientBuilder::section`]);
/// by default it is not read.
#[derive(Debug)]
pub struct ClientBuilder<S = AnySection> {
    pub(crate) origin: Origin,
    service: String,
    source: Option<Source>,
    etcd_prefix: String,
    strategy: Strategy,
    resilience: Resilience,
    per_try_timeout: Option<Duration>,
    timeout: Option<Duration>,
    tls: Option<ClientTlsFiles>,
    live_config: bool,
    metrics_listen: Option<SocketAddr>,
    section: PhantomData<fn() -> S>,
}

impl Client {
    /// A builder for a client of `service`. The defaults: round robin, the breakers of
    /// [`Resilience::default`], no method retried, no default deadline, plaintext.
    pub fn builder(service: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(service)
    }

    /// The channel to give a generated client: `BillingClient::new(client.channel())`.
    /// Keep the `Client` (or a clone) while you call: it runs what follows the
    /// configuration, reloads TLS files and serves metrics, and stops them when the last
    /// clone goes; a channel alone goes on with the settings in force then.
    pub fn channel(&self) -> MeshChannel {
        self.channel.clone()
    }
}

impl<S: ServiceSection> ClientBuilder<S> {
    /// See [`Client::builder`].
    pub fn new(service: impl Into<String>) -> Self {
        ClientBuilder {
            origin: Origin::Code,
            service: service.into(),
            source: None,
            etcd_prefix: mesh_registry::DEFAULT_ROOT.to_string(),
            strategy: Strategy::RoundRobin,
            resilience: Resilience::default(),
            per_try_timeout: None,
            timeout: None,
            tls: None,
            live_config: true,
            metrics_listen: None,
            section: PhantomData,
        }
    }

    /// Check the servers' own section of the document as `T` too, so that a document the
    /// servers refuse is refused here as well. Without it the client checks the `client`
    /// section only: a document with a bad `server` field is refused by the servers and
    /// applied by such a client. Give it whenever the client can name the type.
    pub fn section<T: ServiceSection>(self) -> ClientBuilder<T> {
        ClientBuilder {
            origin: self.origin,
            service: self.service,
            source: self.source,
            etcd_prefix: self.etcd_prefix,
            strategy: self.strategy,
            resilience: self.resilience,
            per_try_timeout: self.per_try_timeout,
            timeout: self.timeout,
            tls: self.tls,
            live_config: self.live_config,
            metrics_listen: self.metrics_listen,
            section: PhantomData,
        }
    }

    /// Discover the servers in this etcd, and follow the document's `client` section there.
    pub fn etcd(mut self, etcd: Etcd) -> Self {
        self.source = Some(Source::Etcd(Ok(etcd)));
        self
    }

    pub(crate) fn etcd_result(mut self, etcd: Result<Etcd, String>) -> Self {
        self.source = Some(Source::Etcd(etcd));
        self
    }

    /// Call these servers (`host:port` or `http://host:port`) instead of discovering them.
    pub fn targets<I: IntoIterator<Item = T>, T: Into<String>>(mut self, targets: I) -> Self {
        let weights = match self.source.take() {
            Some(Source::Targets { weights, .. }) => weights,
            _ => Vec::new(),
        };
        self.source = Some(Source::Targets { targets: targets.into_iter().map(Into::into).collect(), weights });
        self
    }

    /// Weights of the [`targets`](ClientBuilder::targets), one each, for `weighted`.
    pub fn weights<I: IntoIterator<Item = u32>>(mut self, weights: I) -> Self {
        let targets = match self.source.take() {
            Some(Source::Targets { targets, .. }) => targets,
            _ => Vec::new(),
        };
        self.source = Some(Source::Targets { targets, weights: weights.into_iter().collect() });
        self
    }

    /// The root prefix of mesh's keys in etcd (default `/mesh`).
    pub fn etcd_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.etcd_prefix = prefix.into();
        self
    }

    /// How calls are spread (default round robin).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// The methods that are safe to run twice (paths such as `/billing.v1.Billing/Get`, or
    /// `/billing.v1.Billing/*`): only they are retried, on [`RETRY_ON`].
    pub fn idempotent<I: IntoIterator<Item = M>, M: Into<String>>(mut self, methods: I) -> Self {
        self.resilience.retry = self.resilience.retry.with_methods(methods);
        self
    }

    /// Attempts per call of an idempotent method, the first included (default 3).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.resilience.retry.max_attempts = attempts;
        self
    }

    /// A deadline for each attempt of an idempotent call, shorter than the call's.
    pub fn per_try_timeout(mut self, timeout: Duration) -> Self {
        self.per_try_timeout = Some(timeout);
        self
    }

    /// The whole retry policy (its `methods` are the idempotent ones).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.resilience.retry = policy;
        self
    }

    /// Each endpoint's breaker.
    pub fn endpoint_breaker(mut self, config: BreakerConfig) -> Self {
        self.resilience.endpoint_breaker = config;
        self
    }

    /// The service's breaker, around everything.
    pub fn service_breaker(mut self, config: BreakerConfig) -> Self {
        self.resilience.service_breaker = config;
        self
    }

    /// Breakers and retries at once.
    pub fn resilience(mut self, resilience: Resilience) -> Self {
        self.resilience = resilience;
        self
    }

    /// The deadline of calls that have none of their own.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Call over TLS only.
    pub fn tls(mut self, tls: ClientTlsFiles) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Whether to follow the document's `client` section in etcd (default yes, when
    /// discovering through etcd).
    pub fn live_config(mut self, follow: bool) -> Self {
        self.live_config = follow;
        self
    }

    /// Serve Prometheus metrics at `http://addr/metrics` while the client lives.
    pub fn metrics_listen(mut self, addr: SocketAddr) -> Self {
        self.metrics_listen = Some(addr);
        self
    }

    fn name(&self, flag: &str, method: &str) -> String {
        match self.origin {
            Origin::Flags => flag.to_string(),
            Origin::Code => method.to_string(),
        }
    }

    /// Checks every setting, then discovers the servers (waiting for the first listing and
    /// one reachable server) and reads the configuration document (waiting a bounded time
    /// for it, so that it governs the first call); the error names the setting at fault, or
    /// says why no server could be used.
    pub async fn build(self) -> anyhow::Result<Client> {
        let n = |flag: &str, method: &str| self.name(flag, method);
        mesh_registry::check_name(&self.service)
            .map_err(|e| anyhow::anyhow!("invalid {} {:?}: {e}", n("--service", "service name"), self.service))?;
        let source = match &self.source {
            Some(source) => source,
            None => bail!("give the client an etcd to discover {} in, or targets", self.service),
        };
        if let Source::Targets { targets, weights } = source {
            if targets.is_empty() && !weights.is_empty() {
                bail!("{} weigh targets; give the targets too", n("--weights", "weights"));
            }
            if !weights.is_empty() && self.strategy != Strategy::Weighted {
                bail!("{} are used by strategy weighted only, not {}", n("--weights", "weights"), self.strategy);
            }
            if let Some(w) = weights.iter().find(|w| !(1..=crate::server::MAX_WEIGHT).contains(w)) {
                bail!("{} has {w}; give 1 to {}", n("--weights", "weights"), crate::server::MAX_WEIGHT);
            }
        }
        if let Some(t) = self.timeout.filter(|t| t.is_zero()) {
            bail!("{} {t:?}: give a duration above zero", n("--timeout", "timeout"));
        }
        let mut resilience = self.resilience.clone();
        if let Some(per_try) = self.per_try_timeout {
            if let Some(timeout) = self.timeout.filter(|&t| per_try >= t) {
                bail!(
                    "{} {per_try:?} must be shorter than {} {timeout:?}",
                    n("--per-try-timeout", "per_try_timeout"),
                    n("--timeout", "timeout")
                );
            }
            resilience.retry = resilience.retry.with_per_try_timeout(per_try);
        }
        resilience
            .endpoint_breaker
            .validate()
            .with_context(|| n("--breaker-failures, --breaker-open and --breaker-max-open", "endpoint_breaker"))?;
        resilience
            .service_breaker
            .validate()
            .with_context(|| n("--service-breaker-rate and --service-breaker-min-calls", "service_breaker"))?;
        resilience
            .retry
            .validate()
            .with_context(|| n("--max-attempts, --per-try-timeout and --retry-methods", "retry"))?;
        let tls = match &self.tls {
            Some(files) => Some(files.load().with_context(|| n("--tls-ca/--tls-cert/--tls-key", "tls"))?),
            None => None,
        };
        let mut background = stack::Background::default();
        if let Some(addr) = self.metrics_listen {
            let exporter = crate::metrics::exporter().with_context(|| n("--metrics-listen", "metrics_listen"))?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr} ({})", n("--metrics-listen", "metrics_listen")))?;
            tracing::info!("metrics at http://{}/metrics", listener.local_addr().context("the metrics address")?);
            background.tasks.push(tokio_util::task::AbortOnDropHandle::new(exporter.serve(listener)));
        }
        background.reloading = tls.as_ref().map(|tls| tls.watch(Duration::from_secs(1)));
        // Discovery and configuration share one etcd client.
        let (mut client, etcd) = match source {
            Source::Etcd(Err(e)) => bail!("{e}"),
            Source::Etcd(Ok(etcd)) => {
                let client = discovered_through(
                    etcd.clone(),
                    &self.etcd_prefix,
                    &self.service,
                    self.strategy.clone(),
                    &resilience,
                    tls,
                )
                .await?;
                (client, Some(etcd.clone()))
            }
            Source::Targets { targets, weights } => {
                if targets.is_empty() {
                    bail!("{} needs at least one address", n("--target", "targets"));
                }
                (balanced(&self.service, targets, weights, self.strategy.clone(), &resilience, tls).await?, None)
            }
        };
        client.timeout.set(self.timeout);
        if let Some(etcd) = etcd.filter(|_| self.live_config) {
            let base = ClientBase {
                strategy: self.strategy.clone(),
                endpoint_breaker: resilience.endpoint_breaker.clone(),
                retry: resilience.retry.clone(),
                timeout: self.timeout,
            };
            // Checked over this client's settings: a document it would refuse is refused whole.
            let layers = layers::<S>(&base)?;
            let key = mesh_config::config_key(&self.etcd_prefix, &self.service);
            let live = mesh_config::ConfigWatcher::<crate::Config<S>>::new(etcd, key, &layers)?.spawn();
            // The document governs the first call too: wait for it (bounded, as for the
            // first resolution) and apply it before any call is made.
            if !live.wait_listed(CONFIG_TIMEOUT).await {
                tracing::warn!(
                    "the configuration document was not read within {CONFIG_TIMEOUT:?}; calling on the built settings until it is"
                );
            }
            apply(&live.current().client, &client, &base, &client.timeout).await;
            background.tasks.push(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(follow(
                live.subscribe(),
                client.clone(),
                base,
                client.timeout.clone(),
            ))));
            if self.metrics_listen.is_some() {
                background.tasks.push(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
                    crate::etcd::config_metrics(live.status()),
                )));
            }
            background.live = Some(Box::new(live));
        }
        if self.metrics_listen.is_some() {
            background.collector = Some(collect_metrics(&client));
        }
        client.background = Arc::new(background);
        Ok(client)
    }
}
