use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;

use crate::bench::{self, BenchConfig};
use crate::connect;

/// `greeter-client`: greet, or `bench` to drive load.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "greeter-client",
    version,
    about = "The reference greeter.v1 client of mesh"
)]
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
    Bench(BenchArgs),
}

/// Flags of the default mode.
#[derive(Debug, Clone, clap::Args)]
pub struct GreetArgs {
    /// The server to call, e.g. http://127.0.0.1:50051.
    #[arg(long, env = "MESH_TARGET", default_value = "http://127.0.0.1:50051")]
    pub target: String,
    /// The name to greet.
    #[arg(long, default_value = "world")]
    pub name: String,
    /// How many calls to make.
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Deadline of each call, e.g. `1s`, `500ms`.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Flags of `bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The server to load, e.g. http://127.0.0.1:50051.
    #[arg(long, env = "MESH_TARGET", default_value = "http://127.0.0.1:50051")]
    pub target: String,
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
    /// Print one JSON object instead of text (for `cargo xtask bench`).
    #[arg(long)]
    pub json: bool,
}

/// Runs the client; the error says what failed and where.
pub async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Some(Command::Bench(b)) => run_bench(b).await,
        None => greet(args.greet).await,
    }
}

async fn greet(args: GreetArgs) -> anyhow::Result<()> {
    let channel = connect(&args.target).await?;
    let mut client = GreeterClient::new(channel);
    let mut failed = 0u64;
    for _ in 0..args.count {
        let mut request = tonic::Request::new(HelloRequest {
            name: args.name.clone(),
        });
        request.set_timeout(args.timeout);
        match client.say_hello(request).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                println!("{} (served by {})", reply.message, reply.served_by);
            }
            Err(status) => {
                failed += 1;
                println!("error: {:?}: {}", status.code(), status.message());
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} calls to {} failed", args.count, args.target);
    }
    Ok(())
}

async fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    let channel = connect(&args.target).await?;
    let config = BenchConfig {
        concurrency: args.concurrency as usize,
        duration: args.duration,
        warmup: args.warmup,
        name: args.name,
    };
    let report = bench::run(channel, &config).await;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).context("encoding the report")?
        );
    } else {
        println!("{}", report.summary());
    }
    Ok(())
}
