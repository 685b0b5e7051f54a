//! The client's whole stack, outermost first: a per-service circuit breaker that fails
//! fast, retries of idempotent methods under a budget, the balancer, and a per-endpoint
//! circuit breaker under it that ejects an endpoint while it is open.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use mesh_balancer::{BalancedChannel, Balancer, BalancerConfig, Endpoint, EndpointSet};
use mesh_breaker::{Breaker, BreakerConfig, BreakerHandle, BreakerLayer, GrpcClassifier, InvalidBreakerConfig};
use mesh_retry::{InvalidRetryPolicy, Retry, RetryLayer, RetryPolicy, RetryStats};
use tonic::transport::Channel;
use tower_layer::Layer as _;

/// Each endpoint's stack under the balancer: its channel behind its own breaker.
pub type EndpointStack = Breaker<Channel, GrpcClassifier>;

/// What generated clients call: service breaker → retries → balancer → endpoint breakers.
pub type MeshChannel = Breaker<Retry<BalancedChannel<EndpointStack>>, GrpcClassifier>;

/// The idempotent methods of greeter.v1, retried by default.
pub const GREETER_IDEMPOTENT: [&str; 2] = ["/greeter.v1.Greeter/SayHello", "/greeter.v1.Greeter/SayHelloStream"];

/// How the breakers and retries are set.
#[derive(Debug, Clone)]
pub struct Resilience {
    /// Settings of every breaker, per endpoint and per service.
    pub breaker: BreakerConfig,
    /// Which calls are retried, and how.
    pub retry: RetryPolicy,
}

impl Default for Resilience {
    fn default() -> Self {
        Resilience { breaker: BreakerConfig::default(), retry: RetryPolicy::default().with_methods(GREETER_IDEMPOTENT) }
    }
}

/// Why a [`Resilience`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum InvalidResilience {
    /// A breaker setting.
    #[error(transparent)]
    Breaker(#[from] InvalidBreakerConfig),
    /// A retry setting.
    #[error(transparent)]
    Retry(#[from] InvalidRetryPolicy),
}

/// The client stack, and handles on its parts for tables and tests.
#[derive(Debug, Clone)]
pub struct Mesh {
    /// What generated clients take: `GreeterClient::new(mesh.channel.clone())`.
    pub channel: MeshChannel,
    /// The balancer inside, for its endpoints and strategy.
    pub balanced: BalancedChannel<EndpointStack>,
    /// The per-service breaker.
    pub service_breaker: BreakerHandle,
    /// Retries made and refused.
    pub retries: Arc<RetryStats>,
    endpoint_breakers: Arc<Mutex<HashMap<String, BreakerHandle>>>,
}

impl Mesh {
    /// Spawns the balancer over `updates` and builds the stack around it.
    pub fn spawn<U>(config: BalancerConfig, resilience: &Resilience, updates: U) -> Result<Mesh, InvalidResilience>
    where
        U: Stream<Item = EndpointSet> + Send + 'static,
    {
        let service = config.service.clone();
        let endpoint_layer = BreakerLayer::try_new(service.clone(), resilience.breaker.clone())?;
        let service_layer = BreakerLayer::try_new(service, resilience.breaker.clone())?.fail_fast();
        let retry_layer = RetryLayer::try_new(resilience.retry.clone())?;
        let endpoint_breakers: Arc<Mutex<HashMap<String, BreakerHandle>>> = Arc::default();
        let handles = endpoint_breakers.clone();
        let balanced = Balancer::spawn_with(
            config,
            move |endpoint: &Endpoint, channel| {
                let breaker = endpoint_layer.clone().with_name(endpoint.address.clone()).layer(channel);
                lock(&handles).insert(endpoint.id.clone(), breaker.handle());
                breaker
            },
            updates,
        );
        let channel = service_layer.layer(retry_layer.layer(balanced.clone()));
        Ok(Mesh {
            service_breaker: channel.handle(),
            retries: retry_layer.stats(),
            channel,
            balanced,
            endpoint_breakers,
        })
    }

    /// The breaker of the endpoint with `id`, once the balancer has built its stack.
    pub fn endpoint_breaker(&self, id: &str) -> Option<BreakerHandle> {
        lock(&self.endpoint_breakers).get(id).cloned()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves a map behind; it is still valid.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
