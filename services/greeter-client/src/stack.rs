//! The client's whole stack, outermost first: a per-service circuit breaker that fails
//! fast, retries of idempotent methods under a budget, the balancer, and a per-endpoint
//! circuit breaker under it that ejects an endpoint while it is open.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use mesh_balancer::{BalancedChannel, Balancer, BalancerConfig, Endpoint, EndpointSet};
use mesh_metrics::{CallMetrics, CallMetricsLayer, Side};
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
pub type MeshChannel = CallMetrics<Breaker<Retry<BalancedChannel<EndpointStack>>, GrpcClassifier>>;

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
    /// Discovery's freshness, when the endpoints come from etcd.
    pub discovery: Option<tokio::sync::watch::Receiver<mesh_discovery::ResolverStatus>>,
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
        let breaker = service_layer.layer(retry_layer.layer(balanced.clone()));
        let service_breaker = breaker.handle();
        // Counted by method and code: into the process's metrics recorder when one is
        // installed (`--metrics-listen`), nowhere otherwise.
        let channel = CallMetricsLayer::new(Side::Client).layer(breaker);
        Ok(Mesh {
            service_breaker,
            retries: retry_layer.stats(),
            retry: retry_layer.handle(),
            channel,
            balanced,
            endpoint_breakers,
            endpoint_config,
            discovery: None,
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

/// What the stack counts, as metrics, once a second until dropped: per endpoint its calls,
/// failures, connection and breaker; the service's breaker; retries and the budget; and
/// discovery's endpoints and staleness.
pub fn sample_metrics(mesh: &Mesh) -> tokio_util::task::AbortOnDropHandle<()> {
    let mesh = mesh.clone();
    tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        let retries = metrics::counter!("mesh_retries_total");
        let exhausted = metrics::counter!("mesh_retry_budget_exhausted_total");
        let service = mesh.balanced.service().to_string();
        loop {
            for e in mesh.balanced.endpoints() {
                let labels = [("endpoint", e.address.clone())];
                metrics::counter!("mesh_endpoint_calls_total", &labels).absolute(e.requests);
                metrics::counter!("mesh_endpoint_failures_total", &labels).absolute(e.failures);
                let up = e.state == mesh_balancer::EndpointState::Ready;
                metrics::gauge!("mesh_endpoint_up", &labels).set(if up { 1.0 } else { 0.0 });
                if let Some(breaker) = mesh.endpoint_breaker(&e.id) {
                    metrics::gauge!("mesh_breaker_state", &labels).set(state_number(breaker.state()));
                    metrics::counter!("mesh_breaker_transitions_total", &labels).absolute(breaker.transitions());
                }
            }
            let labels = [("service", service.clone())];
            metrics::gauge!("mesh_service_breaker_state", &labels).set(state_number(mesh.service_breaker.state()));
            metrics::counter!("mesh_service_breaker_transitions_total", &labels)
                .absolute(mesh.service_breaker.transitions());
            retries.absolute(mesh.retries.retries());
            exhausted.absolute(mesh.retries.budget_exhausted());
            if let Some(discovery) = &mesh.discovery {
                let status = discovery.borrow().clone();
                metrics::gauge!("mesh_discovery_endpoints", &labels).set(status.endpoints as f64);
                metrics::counter!("mesh_discovery_malformed_total", &labels).absolute(status.malformed);
                let stale = status.view.as_ref().and_then(|v| v.staleness()).map_or(f64::NAN, |d| d.as_secs_f64());
                metrics::gauge!("mesh_discovery_staleness_seconds", &labels).set(stale);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }))
}

/// A breaker's state as a number: 0 closed, 1 half-open, 2 open.
fn state_number(state: mesh_breaker::State) -> f64 {
    match state {
        mesh_breaker::State::Closed => 0.0,
        mesh_breaker::State::HalfOpen => 1.0,
        mesh_breaker::State::Open => 2.0,
    }
}
