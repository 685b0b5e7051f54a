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
