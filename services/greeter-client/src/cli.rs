use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_balancer::EndpointState;
use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;

use crate::Mesh;
use crate::bench::{self, BenchConfig};
use mesh::client::connect;

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
    pub tls: mesh::cli::TlsArgs,
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

/// Where calls go and how they are spread: every flag of a mesh client, and the greeter's
/// hash key.
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// Discovery or targets, strategy, breakers, retries, TLS, metrics, configuration.
    #[command(flatten)]
    pub mesh: mesh::cli::ClientArgs,
    /// The consistent-hash key sent as `x-mesh-hash-key`; `{i}` becomes the call's number.
    #[arg(long)]
    pub hash_key: Option<String>,
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

/// Runs the client; the error says what failed and where.
pub async fn run(args: Args) -> anyhow::Result<()> {
    // First, so that a SIGHUP during the start (a `systemctl reload`) cannot end the client.
    let reloads = match &args.command {
        Some(Command::Bench(b)) => b.targets.mesh.tls.tls_ca.is_some(),
        Some(Command::Health(_)) => false,
        None => args.greet.targets.mesh.tls.tls_ca.is_some(),
    };
    let _hangups = mesh::signals::Hangups::install(reloads.then_some("the TLS files"));
    match args.command {
        Some(Command::Bench(b)) => run_bench(*b).await,
        Some(Command::Health(h)) => health(h).await,
        None => greet(args.greet).await,
    }
}

/// The client stack over the flags, with `timeout` as the deadline of calls (the document's
/// `client.timeout_ms` overrides it live).
async fn client(t: &TargetArgs, timeout: Duration) -> anyhow::Result<Mesh> {
    t.mesh
        .builder::<greeter_config::GreeterSection>(crate::SERVICE, &crate::GREETER_IDEMPOTENT)?
        .timeout(timeout)
        .build()
        .await
}

async fn greet(args: GreetArgs) -> anyhow::Result<()> {
    let client_stack = client(&args.targets, args.timeout).await?;
    let mesh = &client_stack;
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
        if let Some(timeout) = client_stack.timeout.get() {
            request.set_timeout(timeout);
        }
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
        let [target] = args.targets.mesh.target.as_slice() else {
            anyhow::bail!("--plain takes exactly one --target");
        };
        bench::run(connect(target).await?, &config).await
    } else {
        // The configuration's client section is followed, except the timeout: --timeout.
        let stack = client(&args.targets, args.timeout).await?;
        bench::run(stack.channel.clone(), &config).await
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
