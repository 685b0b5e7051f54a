use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_balancer::{EndpointState, Strategy};
use mesh_breaker::{BreakerConfig, FailureRate};
use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;
use mesh_retry::RetryPolicy;

use crate::bench::{self, BenchConfig};
use crate::connect::{balanced, connect, discovered_through};
use crate::stack::{GREETER_IDEMPOTENT, Mesh, Resilience};

/// `greeter-client`: greet, or `bench` to drive load.
#[derive(Debug, Clone, Parser)]
#[command(name = "greeter-client", version, about = "The reference greeter.v1 client of mesh")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    /// What to do; without a subcommand, greet.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Greeting options, used when no subcommand is given.
    #[command(flatten)]
    pub greet: GreetArgs,
}

/// Subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Drive load and print throughput and latency percentiles.
    Bench(Box<BenchArgs>),
    /// Check a server's health (grpc.health.v1) repeatedly and count the answers.
    Health(HealthArgs),
}

/// Flags of `health`.
#[derive(Debug, Clone, clap::Args)]
pub struct HealthArgs {
    /// The server to check, host:port or http://host:port (https://host:port with --tls-ca).
    #[arg(long)]
    pub target: String,
    /// Keep checking for this long; without it, check once.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Pause between checks.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub every: Duration,
    /// Print one JSON object: checks, serving, and the other answers by name.
    #[arg(long)]
    pub json: bool,
    /// TLS towards the server.
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// What `health` reports.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HealthReport {
    /// Checks made.
    pub checks: u64,
    /// Of those, answered SERVING.
    pub serving: u64,
    /// The other answers (a status name, or the error), counted.
    pub other: BTreeMap<String, u64>,
}

/// Where calls go and how they are spread.
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
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
    /// The service to discover (not empty, no `/`).
    #[arg(long, env = "MESH_SERVICE", default_value = "greeter", value_parser = checked_service)]
    pub service: String,
    /// How calls are spread: round_robin, random, consistent_hash, weighted, p2c, p2c_ewma.
    #[arg(long, env = "MESH_STRATEGY", default_value = "round_robin", value_parser = parse_strategy)]
    pub strategy: Strategy,
    /// Weights of the targets for `weighted`, comma-separated, one per --target, each at
    /// least 1 (discovered servers carry their own).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..))]
    pub weights: Vec<u32>,
    /// The consistent-hash key sent as `x-mesh-hash-key`; `{i}` becomes the call's number.
    #[arg(long)]
    pub hash_key: Option<String>,
    /// Circuit breakers and retries.
    #[command(flatten)]
    pub resilience: ResilienceArgs,
    /// Do not follow the `client` section of `{etcd-prefix}/config/{service}` (it is
    /// followed only when discovering through etcd).
    #[arg(long, env = "MESH_NO_CONFIG")]
    pub no_config: bool,
    /// TLS and auth towards etcd.
    #[command(flatten)]
    pub etcd_access: greeter_config::EtcdAccess,
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
    /// The client's TLS settings, or `None` without --tls-ca; errors name the file.
    pub fn client_tls(&self) -> anyhow::Result<Option<mesh_tls::ClientTls>> {
        let Some(ca) = &self.tls_ca else { return Ok(None) };
        let identity = self.tls_cert.as_ref().zip(self.tls_key.as_ref()).map(|(c, k)| mesh_tls::Identity::new(c, k));
        let mut tls = mesh_tls::ClientTls::load(ca, identity).context("--tls-ca/--tls-cert/--tls-key")?;
        if let Some(name) = &self.tls_server_name {
            tls = tls.with_server_name(name).context("--tls-server-name")?;
        }
        Ok(Some(tls))
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
    /// breaker, which then fails calls at once with UNAVAILABLE "circuit open for greeter".
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
    /// or /package.Service/*. Default: SayHello and SayHelloStream.
    #[arg(long, env = "MESH_RETRY_METHODS", value_delimiter = ',')]
    pub retry_methods: Vec<String>,
}

impl ResilienceArgs {
    /// The settings the flags ask for; the error names the bad one.
    pub fn resilience(&self) -> anyhow::Result<Resilience> {
        let endpoint_breaker = BreakerConfig::default()
            .with_failure_threshold(self.breaker_failures)
            .with_open_time(self.breaker_open, self.breaker_max_open);
        endpoint_breaker.validate().context("--breaker-failures, --breaker-open and --breaker-max-open")?;
        let rate = FailureRate::new(self.service_breaker_rate, Duration::from_secs(10), self.service_breaker_min_calls);
        let service_breaker = crate::default_service_breaker()
            .with_failure_rate(rate)
            .with_open_time(self.breaker_open, self.breaker_max_open);
        service_breaker.validate().context("--service-breaker-rate and --service-breaker-min-calls")?;
        let methods: Vec<String> = if self.retry_methods.is_empty() {
            GREETER_IDEMPOTENT.iter().map(|m| m.to_string()).collect()
        } else {
            self.retry_methods.clone()
        };
        let mut retry = RetryPolicy::default()
            .with_max_attempts(self.max_attempts)
            .with_methods(methods)
            .with_retry_on(&crate::GREETER_RETRY_ON);
        if let Some(t) = self.per_try_timeout {
            retry = retry.with_per_try_timeout(t);
        }
        retry.validate().context("--max-attempts, --per-try-timeout and --retry-methods")?;
        Ok(Resilience { endpoint_breaker, service_breaker, retry })
    }
}

/// Flags of the default mode.
#[derive(Debug, Clone, clap::Args)]
pub struct GreetArgs {
    /// Targets and strategy.
    #[command(flatten)]
    pub targets: TargetArgs,
    /// The name to greet.
    #[arg(long, default_value = "world")]
    pub name: String,
    /// How many calls to make.
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Deadline of each call, e.g. `1s`, `500ms`.
    #[arg(long, default_value = "1s", value_parser = positive_duration)]
    pub timeout: Duration,
    /// Print only the table at the end, not each reply.
    #[arg(long)]
    pub quiet: bool,
    /// Keep calling for this long instead of --count calls, e.g. `30s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Pause between calls, e.g. `100ms`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub interval: Option<Duration>,
    /// Also print the table this often while calling, e.g. `2s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub table_every: Option<Duration>,
    /// End with one line of JSON instead of the table: calls, failures, replies per
    /// `served_by`, who served each call in order, and the endpoints with their counters.
    #[arg(long)]
    pub json: bool,
}

/// What the default mode reports at the end (`--json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct GreetReport {
    /// The strategy in use at the end.
    pub strategy: String,
    /// Calls made.
    pub calls: u64,
    /// Calls that failed.
    pub failed: u64,
    /// Replies per `served_by`.
    pub served_by: BTreeMap<String, u64>,
    /// Who served each call, in call order; `null` for a call that failed.
    pub order: Vec<Option<String>>,
    /// The endpoints the balancer holds at the end.
    pub endpoints: Vec<EndpointReport>,
    /// Retries made.
    pub retries: u64,
    /// Retries not made because the retry budget was spent.
    pub budget_exhausted: u64,
    /// The per-service circuit breaker's state at the end.
    pub service_breaker: String,
}

/// One endpoint in a [`GreetReport`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointReport {
    /// Its id.
    pub id: String,
    /// Its address.
    pub address: String,
    /// `connecting`, `ready` or `unreachable`.
    pub state: String,
    /// Its circuit breaker: `closed`, `open` or `half-open`.
    pub breaker: String,
    /// Changes of state of its breaker so far.
    pub breaker_transitions: u64,
    /// Calls sent there.
    pub requests: u64,
    /// Of those, calls that failed there.
    pub failures: u64,
    /// Why it is unreachable, while it is: refused, timed out, or a TLS handshake that
    /// failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Flags of `bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Targets and strategy.
    #[command(flatten)]
    pub targets: TargetArgs,
    /// Call through a plain tonic `Channel` instead of the balancer (one target only): the
    /// baseline the balancer is measured against.
    #[arg(long)]
    pub plain: bool,
    /// Parallel workers, each one call at a time.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
    /// How long to measure, e.g. `10s`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// How long to run before measuring.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// The name sent in each request.
    #[arg(long, default_value = "bench")]
    pub name: String,
    /// Deadline of each call, e.g. `1s`, `200ms`; calls that miss it count as failed, with
    /// their latency.
    #[arg(long, default_value = "1s", value_parser = positive_duration)]
    pub timeout: Duration,
    /// Print one JSON object instead of text (for `cargo xtask bench`).
    #[arg(long)]
    pub json: bool,
}

/// A duration above zero: a call with no time to run cannot succeed.
fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err(format!("{s:?}: give a duration above zero, e.g. 500ms")),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

fn checked_service(s: &str) -> Result<String, String> {
    mesh_registry::check_name(s).map(|()| s.to_string())
}

fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 1.0 => Ok(r),
        _ => Err(format!("{s:?}: give a share above 0 and at most 1, e.g. 0.5")),
    }
}

fn parse_strategy(s: &str) -> Result<Strategy, String> {
    s.parse().map_err(|e: mesh_balancer::InvalidStrategy| e.to_string())
}

/// Runs the client; the error says what failed and where.
pub async fn run(args: Args) -> anyhow::Result<()> {
    // First, so that a SIGHUP during the start (a `systemctl reload`) cannot end the client.
    let reloads = match &args.command {
        Some(Command::Bench(b)) => b.targets.tls.tls_ca.is_some(),
        Some(Command::Health(_)) => false,
        None => args.greet.targets.tls.tls_ca.is_some(),
    };
    let _hangups = greeter_config::Hangups::install(reloads.then_some("the TLS files"));
    match args.command {
        Some(Command::Bench(b)) => run_bench(*b).await,
        Some(Command::Health(h)) => health(h).await,
        None => greet(args.greet).await,
    }
}

/// The client stack, and, when it discovers through etcd, the service's configuration
/// document followed: its `client` section over the flags (and `timeout` as the start of
/// the call timeout).
struct Client {
    mesh: Mesh,
    timeout: crate::LiveTimeout,
    _following:
        Option<(mesh_config::LiveConfig<greeter_config::GreeterConfig>, tokio_util::task::AbortOnDropHandle<()>)>,
    /// Reloads the TLS files while the client runs.
    _reloading: Option<mesh_tls::Reloader>,
    /// Serves and samples the metrics while the client runs.
    _metrics: Vec<tokio_util::task::AbortOnDropHandle<()>>,
    _collector: Option<mesh_metrics::Collector>,
}

async fn client(t: &TargetArgs, timeout: Duration) -> anyhow::Result<Client> {
    if t.target.is_empty() && !t.weights.is_empty() {
        anyhow::bail!("--weights weighs --target addresses; servers discovered through etcd carry their own weight");
    }
    if !t.weights.is_empty() && t.strategy != Strategy::Weighted {
        anyhow::bail!("--weights are used by --strategy weighted only, not {}", t.strategy);
    }
    if let Some(per_try) = t.resilience.per_try_timeout.filter(|&p| p >= timeout) {
        anyhow::bail!("--per-try-timeout {per_try:?} must be shorter than --timeout {timeout:?}");
    }
    let resilience = t.resilience.resilience()?;
    let tls = t.tls.client_tls()?;
    let mut metrics = Vec::new();
    if let Some(addr) = t.metrics_listen {
        let exporter = mesh_metrics::install().context("--metrics-listen")?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr} (--metrics-listen)"))?;
        tracing::info!("metrics at http://{}/metrics", listener.local_addr().context("the metrics address")?);
        metrics.push(tokio_util::task::AbortOnDropHandle::new(exporter.serve(listener)));
    }
    let reloading = tls.as_ref().map(|tls| tls.watch(Duration::from_secs(1)));
    // Discovery and configuration share one etcd client.
    let etcd = if t.target.is_empty() { Some(t.etcd_access.etcd(&t.etcd).map_err(anyhow::Error::msg)?) } else { None };
    let mesh = match &etcd {
        Some(etcd) => {
            discovered_through(etcd.clone(), &t.etcd_prefix, &t.service, t.strategy.clone(), &resilience, tls).await?
        }
        None => balanced(&t.target, &t.weights, t.strategy.clone(), &resilience, tls).await?,
    };
    let live_timeout = crate::LiveTimeout::new(timeout);
    let following = match etcd.filter(|_| !t.no_config) {
        Some(etcd) => {
            let base = crate::ClientBase {
                strategy: t.strategy.clone(),
                endpoint_breaker: resilience.endpoint_breaker.clone(),
                retry: resilience.retry.clone(),
                timeout,
            };
            // Checked over this client's flags: a document it would refuse is refused whole.
            let layers = crate::layers(&base)?;
            let key = mesh_config::config_key(&t.etcd_prefix, &t.service);
            let live = mesh_config::ConfigWatcher::<greeter_config::GreeterConfig>::new(etcd, key, &layers)?.spawn();
            // The document governs the first call too: wait for it (bounded, as for the
            // first resolution) and apply it before any call is made.
            if !live.wait_listed(CONFIG_TIMEOUT).await {
                tracing::warn!(
                    "the configuration document was not read within {CONFIG_TIMEOUT:?}; calling on the flags' settings until it is"
                );
            }
            crate::apply(&live.current().client, &mesh, &base, &live_timeout).await;
            let task = tokio::spawn(crate::follow(live.subscribe(), mesh.clone(), base, live_timeout.clone()));
            if !metrics.is_empty() {
                metrics.push(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(greeter_config::config_metrics(
                    live.status(),
                ))));
            }
            Some((live, tokio_util::task::AbortOnDropHandle::new(task)))
        }
        None => None,
    };
    let collector = (!metrics.is_empty()).then(|| crate::stack::collect_metrics(&mesh));
    Ok(Client {
        mesh,
        timeout: live_timeout,
        _following: following,
        _reloading: reloading,
        _metrics: metrics,
        _collector: collector,
    })
}

/// How long a client waits for its configuration document before its first call.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(3);

async fn greet(args: GreetArgs) -> anyhow::Result<()> {
    let client_stack = client(&args.targets, args.timeout).await?;
    let mesh = &client_stack.mesh;
    let mut client = GreeterClient::new(mesh.channel.clone());
    let mut replies: BTreeMap<String, u64> = BTreeMap::new();
    let mut order = Vec::new();
    let mut failed = 0u64;
    let mut made = 0u64;
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut next_table = args.table_every.map(|every| tokio::time::Instant::now() + every);
    for i in 0.. {
        let more = match deadline {
            Some(deadline) => tokio::time::Instant::now() < deadline,
            None => i < args.count,
        };
        if !more {
            break;
        }
        if let Some(pause) = args.interval.filter(|_| i > 0) {
            tokio::time::sleep(pause).await;
        }
        if let (Some(at), Some(every), false) = (next_table, args.table_every, args.json)
            && tokio::time::Instant::now() >= at
        {
            print!("{}", table(mesh, &replies));
            next_table = Some(at + every);
        }
        made += 1;
        let mut request = tonic::Request::new(HelloRequest { name: args.name.clone() });
        request.set_timeout(client_stack.timeout.get());
        if let Some(key) = &args.targets.hash_key {
            let key = key.replace("{i}", &i.to_string());
            let value = key.parse().with_context(|| format!("--hash-key {key:?} is not a valid header value"))?;
            request.metadata_mut().insert("x-mesh-hash-key", value);
        }
        match client.say_hello(request).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                if !args.quiet && !args.json {
                    println!("{} (served by {})", reply.message, reply.served_by);
                }
                *replies.entry(reply.served_by.clone()).or_default() += 1;
                order.push(Some(reply.served_by));
            }
            Err(status) => {
                failed += 1;
                order.push(None);
                // On stderr: stdout holds the replies, or the one JSON document.
                if !args.quiet {
                    eprintln!("error: {:?}: {}", status.code(), status.message());
                }
            }
        }
    }
    if args.json {
        let report = GreetReport {
            strategy: mesh.balanced.strategy().to_string(),
            calls: made,
            failed,
            served_by: replies,
            order,
            endpoints: mesh
                .balanced
                .endpoints()
                .into_iter()
                .map(|e| EndpointReport {
                    state: state_name(e.state).into(),
                    breaker: breaker_state(mesh, &e.id),
                    breaker_transitions: mesh.endpoint_breaker(&e.id).map_or(0, |b| b.transitions()),
                    id: e.id,
                    address: e.address,
                    requests: e.requests,
                    failures: e.failures,
                    last_error: e.last_error,
                })
                .collect(),
            retries: mesh.retries.retries(),
            budget_exhausted: mesh.retries.budget_exhausted(),
            service_breaker: mesh.service_breaker.state().to_string(),
        };
        println!("{}", serde_json::to_string(&report).context("encoding the report")?);
    } else {
        print!("{}", table(mesh, &replies));
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {made} calls failed");
    }
    Ok(())
}

/// Replies per `served_by`, then what the balancer counted per endpoint with its breaker,
/// then the retries and the service's breaker.
fn table(mesh: &Mesh, replies: &BTreeMap<String, u64>) -> String {
    let mut out = format!("\nstrategy {}\n{:<28} {:>8}\n", mesh.balanced.strategy(), "served_by", "replies");
    for (who, n) in replies {
        out.push_str(&format!("{who:<28} {n:>8}\n"));
    }
    out.push_str(&format!("{:<28} {:>8} {:>8}  {:<12} breaker\n", "endpoint", "requests", "failures", "state"));
    for e in mesh.balanced.endpoints() {
        out.push_str(&format!(
            "{:<28} {:>8} {:>8}  {:<12} {}\n",
            e.address,
            e.requests,
            e.failures,
            state_name(e.state),
            breaker_state(mesh, &e.id)
        ));
        if let Some(why) = &e.last_error {
            out.push_str(&format!("  why: {why}\n"));
        }
    }
    out.push_str(&format!(
        "retries {} (budget exhausted {}); circuit of {} {}\n",
        mesh.retries.retries(),
        mesh.retries.budget_exhausted(),
        mesh.balanced.service(),
        mesh.service_breaker.state()
    ));
    out
}

fn breaker_state(mesh: &Mesh, id: &str) -> String {
    mesh.endpoint_breaker(id).map_or_else(|| "-".to_string(), |b| b.state().to_string())
}

fn state_name(state: EndpointState) -> &'static str {
    match state {
        EndpointState::Ready => "ready",
        EndpointState::Connecting => "connecting",
        _ => "unreachable",
    }
}

async fn health(args: HealthArgs) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut client = HealthClient::new(crate::connect_tls(&args.target, args.tls.client_tls()?).await?);
    let until = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut report = HealthReport::default();
    loop {
        let mut request = tonic::Request::new(HealthCheckRequest { service: String::new() });
        request.set_timeout(Duration::from_secs(1));
        report.checks += 1;
        match client.check(request).await {
            Ok(reply) if reply.get_ref().status == ServingStatus::Serving as i32 => report.serving += 1,
            Ok(reply) => {
                let name =
                    ServingStatus::try_from(reply.get_ref().status).map_or("unknown status", |s| s.as_str_name());
                *report.other.entry(name.to_string()).or_default() += 1;
            }
            Err(status) => {
                // The whole chain: "transport error" alone hides "this server speaks TLS only".
                let why = match std::error::Error::source(&status).map(mesh_util::error_chain) {
                    Some(chain) if !status.message().contains(&chain) => format!("{}: {chain}", status.message()),
                    _ => status.message().to_string(),
                };
                *report.other.entry(format!("{:?}: {why}", status.code())).or_default() += 1
            }
        }
        if until.is_none_or(|u| tokio::time::Instant::now() >= u) {
            break;
        }
        tokio::time::sleep(args.every).await;
    }
    if args.json {
        println!("{}", serde_json::to_string(&report).context("encoding the report")?);
    } else {
        println!("{} checks, {} SERVING, other: {:?}", report.checks, report.serving, report.other);
    }
    anyhow::ensure!(
        report.serving == report.checks,
        "{} of {} checks were not SERVING",
        report.checks - report.serving,
        report.checks
    );
    Ok(())
}

async fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    let config = BenchConfig {
        concurrency: args.concurrency as usize,
        duration: args.duration,
        warmup: args.warmup,
        name: args.name,
        timeout: Some(args.timeout),
    };
    let report = if args.plain {
        let [target] = args.targets.target.as_slice() else {
            anyhow::bail!("--plain takes exactly one --target");
        };
        bench::run(connect(target).await?, &config).await
    } else {
        // The configuration's client section is followed, except the timeout: --timeout.
        let stack = client(&args.targets, args.timeout).await?;
        bench::run(stack.mesh.channel.clone(), &config).await
    };
    if args.json {
        println!("{}", serde_json::to_string(&report).context("encoding the report")?);
    } else {
        println!("{}", report.summary());
    }
    if report.ok == 0 && report.errors > 0 {
        anyhow::bail!("every call failed ({} calls: {:?})", report.errors, report.errors_by_code);
    }
    Ok(())
}
