//! mesh for any tonic service: a server builder and a client builder that give your own
//! service etcd registration and discovery, client-side balancing, circuit breakers,
//! retries, rate limits, TLS, metrics and live configuration, in a few lines.
//!
//! A server: [`Server::builder`] → [`ServerBuilder::build`] (checks every setting, binds,
//! starts following the configuration) → [`Server::add_service`] for each tonic service →
//! [`Server::serve`] (registers once it listens and reports SERVING; on SIGINT/SIGTERM
//! reports NOT_SERVING, deregisters, serves out a grace period and drains).
//!
//! ```no_run
//! use mesh_proto::pb::greeter_server::{Greeter, GreeterServer};
//! # #[derive(Default)] struct MyGreeter;
//! # #[tonic::async_trait] impl Greeter for MyGreeter {
//! #     async fn say_hello(&self, _: tonic::Request<mesh_proto::pb::HelloRequest>) -> Result<tonic::Response<mesh_proto::pb::HelloReply>, tonic::Status> { Ok(tonic::Response::new(Default::default())) }
//! #     type SayHelloStreamStream = tokio_stream::Empty<Result<mesh_proto::pb::HelloReply, tonic::Status>>;
//! #     async fn say_hello_stream(&self, _: tonic::Request<mesh_proto::pb::HelloStreamRequest>) -> Result<tonic::Response<Self::SayHelloStreamStream>, tonic::Status> { Ok(tonic::Response::new(tokio_stream::empty())) }
//! # }
//! # async fn run() -> anyhow::Result<()> {
//! mesh::Server::builder("greeter")
//!     .listen("127.0.0.1:50051".parse()?)
//!     .etcd(mesh::etcd("http://127.0.0.1:2379")?)
//!     .build()
//!     .await?
//!     .add_service(GreeterServer::new(MyGreeter::default()))
//!     .serve()
//!     .await
//! # }
//! ```
//!
//! A client: [`Client::builder`] → [`ClientBuilder::build`] → [`Client::channel`], which any
//! generated client takes; only the methods declared idempotent are retried.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let client = mesh::Client::builder("greeter")
//!     .etcd(mesh::etcd("http://127.0.0.1:2379")?)
//!     .idempotent(["/greeter.v1.Greeter/SayHello"])
//!     .build()
//!     .await?;
//! let mut greeter = mesh_proto::pb::greeter_client::GreeterClient::new(client.channel());
//! # drop(greeter);
//! # Ok(())
//! # }
//! ```
//!
//! A binary gets every flag (each with its `MESH_*` variable) by flattening
//! [`cli::ServerArgs`] or [`cli::ClientArgs`]; the configuration document is
//! [`config::Config`], with the service's own settings as a [`config::ServiceSection`].

pub mod cli;
pub mod client;
pub mod config;
mod etcd;
pub mod logging;
mod metrics;
pub mod server;
pub mod signals;

pub use client::{Client, ClientBuilder};
pub use config::{Config, ServiceSection};
pub use etcd::{EtcdAccess, config_metrics};
pub use mesh_etcd::Etcd;
pub use server::{Server, ServerBuilder};

/// A handle to the etcd at `endpoints` (comma-separated URLs or `host:port`s), plaintext
/// and without auth ([`EtcdAccess`] adds TLS and a user); connects lazily.
pub fn etcd(endpoints: &str) -> anyhow::Result<Etcd> {
    EtcdAccess::default().etcd(endpoints).map_err(anyhow::Error::msg)
}

/// The README's example, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
