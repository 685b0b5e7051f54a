//! The reference greeter.v1 server of mesh, as a library so that tests serve it in-process.
//!
//! [`Greeter`] implements the service; [`run`] is the whole server process: listen, serve
//! greeter, health and reflection, and on SIGINT/SIGTERM report NOT_SERVING and drain.
//!
//! ```no_run
//! use greeter_server::Greeter;
//! use mesh_proto::pb::greeter_server::GreeterServer;
//!
//! # async fn run() -> Result<(), tonic::transport::Error> {
//! tonic::transport::Server::builder()
//!     .add_service(GreeterServer::new(Greeter::new("127.0.0.1:50051")))
//!     .serve("127.0.0.1:50051".parse().expect("literal address"))
//!     .await
//! # }
//! ```

mod answer;
mod cli;
mod config_cmd;
mod greeter;
mod server;

pub use cli::{Args, Command, ConfigCommand};
pub use greeter::{Fault, Greeter, MAX_NAME_BYTES, MAX_STREAM_COUNT};
pub use greeter_config::{code_name, parse_code};
pub use server::{ConnectionLimits, LogFilter, ServeOptions, run, serve, serve_until};
