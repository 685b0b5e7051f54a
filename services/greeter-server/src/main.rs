//! `greeter-server`: see `greeter-server --help`.

use clap::{CommandFactory as _, FromArgMatches as _};
use std::process::ExitCode;

fn main() -> ExitCode {
    // Before anything else: a SIGHUP during the start must not end the process.
    mesh::signals::Hangups::hold_off();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("greeter-server: error: starting the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    // `--help` shows the service's name as the default of --service.
    let command = mesh::cli::with_service_default(greeter_server::Args::command(), greeter_server::SERVICE);
    let args = match greeter_server::Args::from_arg_matches(&command.get_matches()) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    // The configuration's server.log_level sets the filter live.
    let log_filter = mesh::logging::init("info");
    match greeter_server::run(args, Some(log_filter)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("greeter-server: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
