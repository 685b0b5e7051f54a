//! The client's whole stack, outermost first: a per-service circuit breaker that fails
//! fast, retries of idempotent methods under a budget, the balancer, and a per-endpoint
//! circuit breaker under it that ejects an endpoint while it is open.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use mesh_balancer::{BalancedChannel, Balancer, BalancerConfig, Endpoint, EndpointSet};
use std::time::Duration;

use mesh_breaker::{
    Breaker, BreakerConfig, BreakerHandle, BreakerLayer, FailureRate, GrpcClassifier, InvalidBreakerConfig,
};
use mesh_retry::{InvalidRetryPolicy, Retry, RetryHandle, RetryLayer, RetryPolicy, RetryStats};
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
    /// Each endpoint's breaker: by default 5 consecutive failures eject it for 1 s, doubling
    /// up to 30 s.
    pub endpoint_breaker: BreakerConfig,
    /// The service's breaker, around everything: by default it opens when half of at least
    /// 20 calls in 10 s failed (after retries), never on failures in a row alone, which
    /// concurrent calls to one bad endpoint produce while the service is fine.
    pub service_breaker: BreakerConfig,
    /// Which calls are retried, and how.
    pub retry: RetryPolicy,
}

/// The default service breaker: see [`Resilience::service_breaker`].
pub fn default_service_breaker() -> BreakerConfig {
    BreakerConfig::default().with_failure_threshold(0).with_failure_rate(FailureRate::new(
        0.5,
        Duration::from_secs(10),
        20,
    ))
}

impl Default for Resilience {
    fn default() -> Self {
        Resilience {
            endpoint_breaker: BreakerConfig::default(),
            service_breaker: default_service_breaker(),
            retry: RetryPolicy::default().with_methods(GREETER_IDEMPOTENT),
        }
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
    /// The settings of endpoint breakers, for the endpoints still to come too.
    endpoint_config: Arc<Mutex<BreakerConfig>>,
    retry: RetryHandle,
}

impl Mesh {
    /// Spawns the balancer over `updates` and builds the stack around it.
    pub fn spawn<U>(config: BalancerConfig, resilience: &Resilience, updates: U) -> Result<Mesh, InvalidResilience>
    where
        U: Stream<Item = EndpointSet> + Send + 'static,
    {
        let service = config.service.clone();
        let endpoint_layer = BreakerLayer::try_new(service.clone(), resilience.endpoint_breaker.clone())?;
        let endpoint_config = Arc::new(Mutex::new(resilience.endpoint_breaker.clone()));
        let current = endpoint_config.clone();
        let endpoint_service = service.clone();
        let service_layer = BreakerLayer::try_new(service, resilience.service_breaker.clone())?.fail_fast();
        let retry_layer = RetryLayer::try_new(resilience.retry.clone())?;
        let endpoint_breakers: Arc<Mutex<HashMap<String, BreakerHandle>>> = Arc::default();
        let handles = endpoint_breakers.clone();
        let balanced = Balancer::spawn_with(
            config,
            move |endpoint: &Endpoint, channel| {
                // A new endpoint takes the settings in force now (checked when they were set).
                let layer = BreakerLayer::try_new(endpoint_service.clone(), lock(&current).clone())
                    .unwrap_or_else(|_| endpoint_layer.clone());
                let breaker = layer.with_name(endpoint.address.clone()).layer(channel);
                lock(&handles).insert(endpoint.id.clone(), breaker.handle());
                breaker
            },
            updates,
        );
        let channel = service_layer.layer(retry_layer.layer(balanced.clone()));
        Ok(Mesh {
            service_breaker: channel.handle(),
            retries: retry_layer.stats(),
            retry: retry_layer.handle(),
            channel,
            balanced,
            endpoint_breakers,
            endpoint_config,
        })
    }

    /// New settings for every endpoint's breaker, those to come included; the error names a
    /// bad setting and changes nothing.
    pub fn set_endpoint_breaker(&self, config: BreakerConfig) -> Result<(), InvalidBreakerConfig> {
        config.validate()?;
        *lock(&self.endpoint_config) = config.clone();
        for handle in lock(&self.endpoint_breakers).values() {
            handle.reconfigure(config.clone())?;
        }
        Ok(())
    }

    /// The settings of endpoint breakers in force.
    pub fn endpoint_breaker_config(&self) -> BreakerConfig {
        lock(&self.endpoint_config).clone()
    }

    /// A new retry policy, from the next call on; the error names a bad setting.
    pub fn set_retry(&self, policy: RetryPolicy) -> Result<(), InvalidRetryPolicy> {
        self.retry.update(policy)
    }

    /// The retry policy in force.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry.policy()
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
