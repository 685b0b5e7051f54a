//! Client-side load balancing for tonic over a live set of endpoints.
//!
//! [`Balancer::spawn`] turns a stream of [`EndpointSet`]s (a static list, or a resolver such
//! as mesh-discovery's) into a [`BalancedChannel`]: a `tower::Service` + `Clone` that
//! generated clients take as they take a tonic `Channel`. Each endpoint gets one tonic
//! `Channel` (connect timeout, HTTP/2 keepalive), kept across updates that do not remove it;
//! a removed endpoint's in-flight calls finish on its old connection. Updates are applied by
//! a background task whether or not calls flow.
//!
//! Strategies ([`Strategy`], switchable at runtime with [`BalancedChannel::set_strategy`]):
//! round robin (default), random, consistent hash (a ring of virtual nodes on the `hashring`
//! crate, keyed by a header or a [`HashKey`] extension), weighted round robin from a
//! precomputed earliest-deadline-first schedule, and power of two choices on calls in
//! flight or peak EWMA latency. The pickers are pure functions in [`pick`].
//!
//! A call goes to an endpoint whose connection is up. A new endpoint, or one whose server
//! closed the connection (as servers with a maximum connection age do), is connected again
//! in the background and gets calls once it is up; only an endpoint whose connect fails is
//! unreachable, logged once with its address and probed with backoff until it answers.
//! Consistent hashing walks the ring past endpoints that cannot take the call; the other
//! strategies try the next ones.
//!
//! The per-endpoint stack (say, a circuit breaker, given to [`Balancer::spawn_with_layer`])
//! is used as tower means: each clone of the channel polls its own instance with the
//! caller's waker and calls the instance it polled. An endpoint whose stack refuses
//! (`poll_ready` fails) is skipped for the call; one that pushes back (`poll_ready` pending)
//! makes the call wait for it or for another.
//!
//! A call that no endpoint can take at once waits, bounded by its deadline: for the first
//! endpoint set (at most [`BalancerConfig::first_resolution_timeout`], as gRPC waits for its
//! first resolver result, so that a call made right after [`Balancer::spawn`] is not failed),
//! for a connection, or for backpressure to ease. It fails at once with UNAVAILABLE when
//! every endpoint is unreachable or refuses, and with "no endpoints for service greeter"
//! once a set has been applied and is empty. Errors keep their meaning: an endpoint's own
//! status passes through, a deadline that passed is DEADLINE_EXCEEDED, a connection that broke
//! under a call is UNAVAILABLE, and other transport errors are mapped as tonic maps them.
//!
//! For a retry layer above (mesh-retry): a failed response carries [`FailedAt`], the id of the
//! endpoint it failed at, and a request carrying [`AvoidEndpoints`] goes to those endpoints
//! only when no other can take it.
//!
//! ```no_run
//! use mesh_balancer::{Balancer, BalancerConfig, EndpointSet, Strategy};
//! use mesh_proto::pb::{greeter_client::GreeterClient, HelloRequest};
//!
//! # async fn run() -> Result<(), tonic::Status> {
//! let set = EndpointSet::from_addresses(["127.0.0.1:50051", "127.0.0.1:50052"]);
//! let config = BalancerConfig::new("greeter").with_strategy(Strategy::RoundRobin);
//! let channel = Balancer::spawn(config, tokio_stream::once(set));
//! let mut client = GreeterClient::new(channel.clone());
//! let reply = client.say_hello(HelloRequest { name: "world".into() }).await?;
//! println!("{}", reply.get_ref().served_by);
//! # Ok(())
//! # }
//! ```
//!
//! What it does not do: retries (a call goes to one endpoint; mesh-retry is the layer above),
//! health checking over gRPC (readiness is the TCP connection's), or discovery itself.

mod balanced;
mod conn;
mod counted;
mod endpoint;
pub mod pick;
mod snapshot;
mod status;
mod strategy;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tower_layer::{Identity, Layer};

pub use balanced::{AvoidEndpoints, BalancedChannel, EndpointStatus, FailedAt, NotReady, ResponseFuture};
pub use conn::EndpointState;
pub use endpoint::{Endpoint, EndpointSet};
pub use strategy::{
    DEFAULT_HASH_HEADER, DEFAULT_VIRTUAL_NODES, HashConfig, HashKey, InvalidStrategy, MissingKey, P2cLoad, Strategy,
};

/// Settings of a balancer.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BalancerConfig {
    /// The service name, used in errors and logs ("no endpoints for service greeter").
    pub service: String,
    /// The strategy to start with.
    pub strategy: Strategy,
    /// How long connecting to an endpoint may take.
    pub connect_timeout: Duration,
    /// HTTP/2 keepalive ping interval, also while idle.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is dropped.
    pub keepalive_timeout: Duration,
    /// First delay between probes of an unreachable endpoint; doubles up to the max.
    pub probe_backoff_min: Duration,
    /// Longest delay between probes of an unreachable endpoint.
    pub probe_backoff_max: Duration,
    /// How long a call made before the first endpoint set arrived waits for it (unless its
    /// deadline is sooner) before it fails with UNAVAILABLE.
    pub first_resolution_timeout: Duration,
    /// TLS towards endpoints. With it, only `https://` endpoints are dialled (over TLS);
    /// without it, only `http://` ones. An endpoint of the other kind is never sent a call:
    /// it shows as unreachable, with the reason in [`EndpointStatus::last_error`].
    pub tls: Option<mesh_tls::ClientTls>,
}

impl BalancerConfig {
    /// Defaults for `service`: round robin, 1 s connect timeout, keepalive every 10 s with a
    /// 5 s timeout, probes from 100 ms to 5 s apart, 5 s to wait for the first set.
    pub fn new(service: impl Into<String>) -> Self {
        BalancerConfig {
            service: service.into(),
            strategy: Strategy::RoundRobin,
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            probe_backoff_min: Duration::from_millis(100),
            probe_backoff_max: Duration::from_secs(5),
            first_resolution_timeout: Duration::from_secs(5),
            tls: None,
        }
    }

    /// Speaks TLS to endpoints, with `tls`.
    pub fn with_tls(mut self, tls: mesh_tls::ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets the strategy.
    pub fn with_strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }
}

/// Builds balanced channels.
#[derive(Debug, Clone, Copy)]
pub struct Balancer;

impl Balancer {
    /// Spawns the task that applies `updates` and returns the channel; each endpoint is a
    /// plain tonic `Channel`. Must be called within a tokio runtime.
    pub fn spawn<U>(config: BalancerConfig, updates: U) -> BalancedChannel<tonic::transport::Channel>
    where
        U: Stream<Item = EndpointSet> + Send + 'static,
    {
        Self::spawn_with_layer(config, Identity::new(), updates)
    }

    /// Like [`Balancer::spawn`], with `layer` wrapped around each endpoint's channel (once
    /// per endpoint; each clone of the channel clones that stack). An endpoint whose stack
    /// refuses (`poll_ready` fails) is skipped; one that pushes back makes calls wait.
    pub fn spawn_with_layer<L, U>(config: BalancerConfig, layer: L, updates: U) -> BalancedChannel<L::Service>
    where
        L: Layer<tonic::transport::Channel> + Send + Sync + 'static,
        L::Service: Clone + Send + Sync + 'static,
        U: Stream<Item = EndpointSet> + Send + 'static,
    {
        Self::spawn_with(config, move |_: &Endpoint, channel| layer.layer(channel), updates)
    }

    /// Like [`Balancer::spawn_with_layer`], with the stack of each endpoint built by
    /// `make`, which is told the endpoint: to name a per-endpoint breaker after it, say, or
    /// to keep a handle on it.
    pub fn spawn_with<F, S, U>(config: BalancerConfig, make: F, updates: U) -> BalancedChannel<S>
    where
        F: Fn(&Endpoint, tonic::transport::Channel) -> S + Send + Sync + 'static,
        S: Clone + Send + Sync + 'static,
        U: Stream<Item = EndpointSet> + Send + 'static,
    {
        let (switch_tx, switches) = tokio::sync::mpsc::unbounded_channel();
        let shared = Arc::new(snapshot::Shared::new(&config, switch_tx));
        let builder = Arc::new(snapshot::Builder {
            service: shared.service.clone(),
            config,
            make: Arc::new(make),
            changes: shared.changes.clone(),
        });
        let task = tokio::spawn(worker::run(Arc::downgrade(&shared), updates, switches, builder));
        let _ = shared.task.set(task.abort_handle());
        BalancedChannel::from_shared(shared)
    }
}

/// The README's example, compiled (and run, unless marked `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
