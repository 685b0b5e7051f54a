//! `greeter-server`: see `greeter-server --help`.

use clap::Parser;
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
    let args = greeter_server::Args::parse();
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
