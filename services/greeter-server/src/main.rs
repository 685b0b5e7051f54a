//! `greeter-server`: see `greeter-server --help`.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let args = greeter_server::Args::parse();
    let (filter, bad_filter) = match EnvFilter::try_from_default_env() {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), std::env::var("RUST_LOG").ok().map(|v| (v, e))),
    };
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    if let Some((value, e)) = bad_filter.filter(|(value, _)| !value.is_empty()) {
        tracing::warn!("ignoring RUST_LOG={value:?}: {e}; logging at info");
    }
    match greeter_server::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("greeter-server: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
