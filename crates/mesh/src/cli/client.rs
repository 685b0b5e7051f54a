//! The flags of a mesh client.

use std::time::Duration;

use anyhow::Context as _;
use mesh_balancer::Strategy;
use mesh_breaker::{BreakerConfig, FailureRate};
use mesh_retry::RetryPolicy;

use crate::client::{ClientBuilder, ClientTlsFiles, Resilience};
use crate::config::ServiceSection;
use crate::server::Origin;

/// Every flag of a mesh client, each with a `MESH_*` environment variable: flatten it into
/// a binary's arguments (`#[command(flatten)]`) and call [`ClientArgs::builder`].
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Servers to call, comma-separated: host:port or http://host:port. Without it, the
    /// servers of --service are discovered in etcd.
    #[arg(long, env = "MESH_TARGET", value_delimiter = ',')]
    pub target: Vec<String>,
    /// etcd endpoints to discover servers in, comma-separated (when no --target is given).
    #[arg(long, env = "MESH_ETCD", default_value = "http://127.0.0.1:2379")]
    pub etcd: String,
    /// Root prefix of mesh's keys in etcd.
    #[arg(long, env = "MESH_ETCD_PREFIX", default_value = "/mesh")]
    pub etcd_prefix: String,
    /// The service to discover (not empty, no `/`); default the binary's.
    #[arg(long, env = "MESH_SERVICE", value_parser = checked_service)]
    pub service: Option<String>,
    /// How calls are spread: round_robin, random, consistent_hash, weighted, p2c, p2c_ewma.
    #[arg(long, env = "MESH_STRATEGY", default_value = "round_robin", value_parser = parse_strategy)]
    pub strategy: Strategy,
    /// Weights of the targets for `weighted`, comma-separated, one per --target, each at
    /// least 1 (discovered servers carry their own).
    #[arg(long, env = "MESH_WEIGHTS", value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..))]
    pub weights: Vec<u32>,
    /// Circuit breakers and retries.
    #[command(flatten)]
    pub resilience: ResilienceArgs,
    /// Do not follow the `client` section of `{etcd-prefix}/config/{service}` (it is
    /// followed only when discovering through etcd).
    #[arg(long, env = "MESH_NO_CONFIG")]
    pub no_config: bool,
    /// TLS and auth towards etcd.
    #[command(flatten)]
    pub etcd_access: crate::etcd::EtcdAccess,
    /// TLS towards the servers.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Serve Prometheus metrics at http://ADDR/metrics while the client runs: calls by
    /// method and code with latency histograms, per endpoint calls, failures, connection and
    /// breaker, retries, discovery and the configuration followed.
    #[arg(long, env = "MESH_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// TLS towards the servers: with --tls-ca, calls go over TLS only, to servers registered
/// as speaking it; never in plaintext.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// The CA that signed the servers' certificates (PEM): call over TLS.
    #[arg(long, env = "MESH_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// This client's certificate (PEM), for servers that require one (mTLS); with
    /// --tls-key. Reloaded on SIGHUP or when the file changes.
    #[arg(long, env = "MESH_TLS_CERT", requires = "tls_key", requires = "tls_ca")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "MESH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// The name the servers' certificates carry, when it is not the host dialled (e.g.
    /// `greeter` for certificates issued to the service).
    #[arg(long, env = "MESH_TLS_SERVER_NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,
}

impl TlsArgs {
    /// The client's TLS files, or `None` without --tls-ca.
    pub fn files(&self) -> Option<ClientTlsFiles> {
        let ca = self.tls_ca.clone()?;
        Some(ClientTlsFiles {
            ca,
            identity: self.tls_cert.clone().zip(self.tls_key.clone()),
            server_name: self.tls_server_name.clone(),
        })
    }

    /// The client's TLS settings, or `None` without --tls-ca; errors name the file.
    pub fn client_tls(&self) -> anyhow::Result<Option<mesh_tls::ClientTls>> {
        self.files().map(|f| f.load().context("--tls-ca/--tls-cert/--tls-key/--tls-server-name")).transpose()
    }
}

/// Flags of the circuit breakers (one per endpoint, one for the service) and the retries.
#[derive(Debug, Clone, clap::Args)]
pub struct ResilienceArgs {
    /// Consecutive failures (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, UNKNOWN, DATA_LOSS)
    /// that open an endpoint's circuit breaker, which ejects it.
    #[arg(long, env = "MESH_BREAKER_FAILURES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_failures: u32,
    /// How long an opened breaker stays open before a probe; doubles on each repeated trip.
    #[arg(long, env = "MESH_BREAKER_OPEN", default_value = "1s", value_parser = humantime::parse_duration)]
    pub breaker_open: Duration,
    /// The longest a breaker stays open.
    #[arg(long, env = "MESH_BREAKER_MAX_OPEN", default_value = "30s", value_parser = humantime::parse_duration)]
    pub breaker_max_open: Duration,
    /// The share of failed calls (after retries) over 10 s that opens the service's circuit
    /// breaker, which then fails calls at once with UNAVAILABLE "circuit open for SERVICE".
    #[arg(long, env = "MESH_SERVICE_BREAKER_RATE", default_value_t = 0.5, value_parser = parse_share)]
    pub service_breaker_rate: f64,
    /// The calls in those 10 s before the rate counts.
    #[arg(long, env = "MESH_SERVICE_BREAKER_MIN_CALLS", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub service_breaker_min_calls: u32,
    /// Attempts per call of an idempotent method, the first included; 1 turns retries off.
    #[arg(long, env = "MESH_MAX_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub max_attempts: u32,
    /// A deadline for each attempt of an idempotent call, shorter than --timeout: an
    /// attempt that runs out of it (at a hung server, say) is retried on another server with
    /// the time left. Default: none, an attempt may take the call's whole deadline.
    #[arg(long, env = "MESH_PER_TRY_TIMEOUT", value_parser = humantime::parse_duration)]
    pub per_try_timeout: Option<Duration>,
    /// The idempotent methods that may be retried, comma-separated: /package.Service/Method
    /// or /package.Service/*. Default: those the binary declares idempotent.
    #[arg(long, env = "MESH_RETRY_METHODS", value_delimiter = ',')]
    pub retry_methods: Vec<String>,
}

impl ResilienceArgs {
    /// The settings the flags ask for, with `idempotent` retried unless --retry-methods
    /// names others; the error names the bad one.
    pub fn resilience(&self, idempotent: &[&str]) -> anyhow::Result<Resilience> {
        let endpoint_breaker = BreakerConfig::default()
            .with_failure_threshold(self.breaker_failures)
            .with_open_time(self.breaker_open, self.breaker_max_open);
        endpoint_breaker.validate().context("--breaker-failures, --breaker-open and --breaker-max-open")?;
        let rate = FailureRate::new(self.service_breaker_rate, Duration::from_secs(10), self.service_breaker_min_calls);
        let service_breaker = crate::client::default_service_breaker()
            .with_failure_rate(rate)
            .with_open_time(self.breaker_open, self.breaker_max_open);
        service_breaker.validate().context("--service-breaker-rate and --service-breaker-min-calls")?;
        let methods: Vec<String> = if self.retry_methods.is_empty() {
            idempotent.iter().map(|m| m.to_string()).collect()
        } else {
            self.retry_methods.clone()
        };
        let mut retry = RetryPolicy::default()
            .with_max_attempts(self.max_attempts)
            .with_methods(methods)
            .with_retry_on(&crate::client::RETRY_ON);
        if let Some(t) = self.per_try_timeout {
            retry = retry.with_per_try_timeout(t);
        }
        retry.validate().context("--max-attempts, --per-try-timeout and --retry-methods")?;
        Ok(Resilience { endpoint_breaker, service_breaker, retry })
    }
}

impl ClientArgs {
    /// The service name: `--service`, or `default`.
    pub fn service_or<'a>(&'a self, default: &'a str) -> &'a str {
        self.service.as_deref().unwrap_or(default)
    }

    /// A client builder with every setting these flags make, for the service `service`
    /// unless `--service` names another, retrying `idempotent` unless --retry-methods names
    /// other methods; errors (here and from `build`) name the flag.
    pub fn builder<S: ServiceSection>(&self, service: &str, idempotent: &[&str]) -> anyhow::Result<ClientBuilder<S>> {
        let mut resilience = self.resilience.resilience(idempotent)?;
        let per_try = resilience.retry.per_try_timeout.take();
        let mut b = ClientBuilder::<S>::new(self.service_or(service))
            .etcd_prefix(self.etcd_prefix.clone())
            .strategy(self.strategy.clone())
            .resilience(resilience)
            .live_config(!self.no_config);
        b.origin = Origin::Flags;
        if let Some(per_try) = per_try {
            b = b.per_try_timeout(per_try);
        }
        b = if self.target.is_empty() {
            if !self.weights.is_empty() {
                anyhow::bail!(
                    "--weights weighs --target addresses; servers discovered through etcd carry their own weight"
                );
            }
            b.etcd_result(self.etcd_access.etcd(&self.etcd))
        } else {
            b.targets(self.target.clone()).weights(self.weights.clone())
        };
        if !self.weights.is_empty() && self.strategy != Strategy::Weighted {
            anyhow::bail!("--weights are used by --strategy weighted only, not {}", self.strategy);
        }
        if let Some(files) = self.tls.files() {
            b = b.tls(files);
        }
        if let Some(addr) = self.metrics_listen {
            b = b.metrics_listen(addr);
        }
        Ok(b)
    }
}

fn checked_service(s: &str) -> Result<String, String> {
    mesh_registry::check_name(s).map(|()| s.to_string())
}

pub(crate) fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 1.0 => Ok(r),
        _ => Err(format!("{s:?}: give a share above 0 and at most 1, e.g. 0.5")),
    }
}

fn parse_strategy(s: &str) -> Result<Strategy, String> {
    s.parse().map_err(|e: mesh_balancer::InvalidStrategy| e.to_string())
}
