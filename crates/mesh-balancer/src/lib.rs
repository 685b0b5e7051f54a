//! Client-side load balancing for tonic over a live set of endpoints.
//!
//! [`Balancer::spawn`] turns a stream of [`EndpointSet`]s (a static list, or a resolver such
//! as mesh-discovery's) into a [`BalancedChannel`]: a `tower::Service` + `Clone` that
//! generated clients take as they take a tonic `Channel`. Each endpoint gets one lazily
//! connected tonic `Channel` (connect timeout, HTTP/2 keepalive), kept across updates that
//! do not remove it; a removed endpoint's in-flight calls finish on its old connection.
//!
//! Strategies ([`Strategy`], switchable at runtime with [`BalancedChannel::set_strategy`]):
//! round robin (default), random, consistent hash (a ring of virtual nodes on the `hashring`
//! crate, keyed by a header or a [`HashKey`] extension), smooth weighted round robin (nginx),
//! and power of two choices on calls in flight or peak EWMA latency. The pickers are pure
//! functions in [`pick`].
//!
//! An endpoint is skipped when it is not usable: its connection failed or died (it is probed
//! in the background and comes back when it accepts connections), or the per-endpoint stack
//! a caller supplies with [`Balancer::spawn_with_layer`] (say, a circuit breaker) is not
//! ready. Consistent hashing then walks the ring to the next endpoint; the others try the
//! next ones in order. With no endpoint at all a call fails at once with UNAVAILABLE "no
//! endpoints for service greeter"; with none usable, UNAVAILABLE saying how many were tried.
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
//! What it does not do: retries (a call goes to one endpoint; retrying is a layer above),
//! health checking over gRPC (liveness is the TCP connection's), or discovery itself.

mod balanced;
mod connector;
mod endpoint;
pub mod pick;
mod strategy;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tower_layer::{Identity, Layer};

pub use balanced::{BalancedChannel, CallGuard, EndpointStatus, NotReady, ResponseFuture};
pub use endpoint::{Endpoint, EndpointSet};
pub use strategy::{
    DEFAULT_HASH_HEADER, DEFAULT_VIRTUAL_NODES, HashConfig, HashKey, InvalidStrategy, MissingKey, P2cLoad, Strategy,
};

/// Settings of a balancer.
#[derive(Debug, Clone)]
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
}

impl BalancerConfig {
    /// Defaults for `service`: round robin, 1 s connect timeout, keepalive every 10 s with a
    /// 5 s timeout, probes from 100 ms to 5 s apart.
    pub fn new(service: impl Into<String>) -> Self {
        BalancerConfig {
            service: service.into(),
            strategy: Strategy::RoundRobin,
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            probe_backoff_min: Duration::from_millis(100),
            probe_backoff_max: Duration::from_secs(5),
        }
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

    /// Like [`Balancer::spawn`], with `layer` wrapped around each endpoint's channel: an
    /// endpoint whose stack is not ready (`poll_ready` pending or failing) is skipped.
    pub fn spawn_with_layer<L, U>(config: BalancerConfig, layer: L, updates: U) -> BalancedChannel<L::Service>
    where
        L: Layer<tonic::transport::Channel> + Send + Sync + 'static,
        L::Service: Clone + Send + Sync + 'static,
        U: Stream<Item = EndpointSet> + Send + 'static,
    {
        let backoff = worker::ProbeBackoff {
            min: config.probe_backoff_min,
            max: config.probe_backoff_max,
            timeout: config.connect_timeout,
        };
        let shared = Arc::new(balanced::Shared::new(config, balanced::make_with(layer)));
        let task = tokio::spawn(worker::run(Arc::downgrade(&shared), updates, backoff));
        let _ = shared.task.set(task.abort_handle());
        BalancedChannel::from_shared(shared)
    }
}
