//! `greeter-server`: see `greeter-server --help`.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

fn main() -> ExitCode {
    // Before anything else: a SIGHUP during the start must not end the process.
    greeter_config::Hangups::hold_off();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("greeter-server: error: starting the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    let args = greeter_server::Args::parse();
    let (startup, bad_filter) = match EnvFilter::try_from_default_env() {
        Ok(_) => (std::env::var("RUST_LOG").unwrap_or_default(), None),
        Err(e) => ("info".to_string(), std::env::var("RUST_LOG").ok().map(|v| (v, e))),
    };
    // The filter can be reloaded: the configuration's server.log_level sets it live.
    let (filter, reload) = tracing_subscriber::reload::Layer::new(EnvFilter::new(&startup));
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    if let Some((value, e)) = bad_filter.filter(|(value, _)| !value.is_empty()) {
        tracing::warn!("ignoring RUST_LOG={value:?}: {e}; logging at info");
    }
    let log_filter: greeter_server::LogFilter = Arc::new(move |level: Option<&str>| {
        let filter = match level {
            Some(level) => EnvFilter::try_new(level).map_err(|e| e.to_string())?,
            None => EnvFilter::new(&startup),
        };
        reload.reload(filter).map_err(|e| e.to_string())
    });
    match greeter_server::run(args, Some(log_filter)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("greeter-server: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
