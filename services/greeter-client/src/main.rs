//! `greeter-client`: see `greeter-client --help`.

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Before anything else: a SIGHUP during the start must not end the process.
    mesh::signals::Hangups::hold_off();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("greeter-client: error: starting the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    // `--help` shows the service's name as the default of --service.
    let command = mesh::cli::with_service_default(greeter_client::Args::command(), greeter_client::SERVICE);
    let args = match greeter_client::Args::from_arg_matches(&command.get_matches()) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    // Colours only for a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    match greeter_client::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("greeter-client: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
