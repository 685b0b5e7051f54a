//! The reference greeter.v1 server of mesh, as a library so that tests serve it in-process.
//!
//! [`Greeter`] implements the service; [`run`] is the whole server process, built on
//! `mesh::Server`: listen, serve greeter, health and reflection, register, follow the
//! configuration, and on SIGINT/SIGTERM report NOT_SERVING, deregister and drain. What is
//! the greeter's own here is the service, its greeting and its fault injection.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let server = greeter_server::build(mesh::Server::builder("greeter").section()).await?;
//! server.serve().await
//! # }
//! ```

mod cli;
mod greeter;
mod server;

pub use cli::Args;
pub use greeter::{Fault, Greeter, MAX_NAME_BYTES, MAX_STREAM_COUNT};
pub use mesh::config::{code_name, parse_code};
pub use server::{SERVICE, build, greeter_service, run};
