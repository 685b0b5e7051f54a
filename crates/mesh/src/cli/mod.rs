//! clap argument groups for a binary to flatten: every flag of a mesh server
//! ([`ServerArgs`]) and client ([`ClientArgs`]), each with its `MESH_*` environment
//! variable, and the `config validate|apply|show` subcommand ([`ConfigCommand`]).
//!
//! ```
//! use clap::Parser;
//!
//! #[derive(Parser)]
//! struct Args {
//!     #[command(subcommand)]
//!     command: Option<mesh::cli::Command>,
//!     #[command(flatten)]
//!     mesh: mesh::cli::ServerArgs,
//! }
//!
//! let args = Args::parse_from(["billing-server", "--listen", "127.0.0.1:0", "--rate", "100"]);
//! let builder = args.mesh.builder::<mesh::config::NoSection>("billing");
//! # drop(builder);
//! ```

mod client;
mod config_cmd;
mod server;

pub use client::{ClientArgs, ResilienceArgs, TlsArgs};
pub use server::{Command, ConfigCommand, ServerArgs};

/// `command` with `service` as the default of `--service`, in its subcommands too, so that
/// `--help` shows it; the flags' `service_or` gives the same value without it.
///
/// ```
/// use clap::{CommandFactory, FromArgMatches, Parser};
///
/// #[derive(Parser)]
/// struct Args {
///     #[command(flatten)]
///     mesh: mesh::cli::ServerArgs,
/// }
///
/// let command = mesh::cli::with_service_default(Args::command(), "billing");
/// let args = Args::from_arg_matches(&command.get_matches_from(["billing-server"])).expect("parses");
/// assert_eq!(args.mesh.service.as_deref(), Some("billing"));
/// ```
pub fn with_service_default(command: clap::Command, service: &'static str) -> clap::Command {
    let mut command = command;
    if command.get_arguments().any(|a| a.get_id() == "service") {
        command = command.mut_arg("service", |a| a.default_value(service));
    }
    let names: Vec<String> = command.get_subcommands().map(|c| c.get_name().to_string()).collect();
    for name in names {
        command = command.mut_subcommand(name, |sub| with_service_default(sub, service));
    }
    command
}
