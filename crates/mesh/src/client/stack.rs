//! The client's whole stack, outermost first: a per-service circuit breaker that fails
//! fast, retries of idempotent methods under a budget, the balancer, and a per-endpoint
//! circuit breaker under it that ejects an endpoint while it is open.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use mesh_balancer::{BalancedChannel, Balancer, BalancerConfig, Endpoint, EndpointSet};
use mesh_metrics::{CallMetrics, CallMetricsLayer, Side, WeakCallCounts};
use std::time::Duration;

use mesh_breaker::{
    Breaker, BreakerConfig, BreakerHandle, BreakerLayer, FailureRate, GrpcClassifier, InvalidBreakerConfig,
    WeakBreakerHandle,
};
use mesh_retry::{InvalidRetryPolicy, Retry, RetryHandle, RetryLayer, RetryPolicy, RetryStats};
use tonic::transport::Channel;
use tower_layer::Layer as _;

use super::deadline::{DefaultDeadline, LiveTimeout};

/// Each endpoint's stack under the balancer: its channel, counted, behind its own breaker.
pub type EndpointStack = Breaker<CallMetrics<Channel>, GrpcClassifier>;

/// What generated clients call: the default deadline, then service breaker → retries →
/// balancer → endpoint breakers.
pub type MeshChannel = DefaultDeadline<CallMetrics<Breaker<Retry<BalancedChannel<EndpointStack>>, GrpcClassifier>>>;

/// The codes a client retries by default, for the methods declared idempotent only:
/// UNAVAILABLE (the endpoint could not take the call) and RESOURCE_EXHAUSTED (a rate
/// limit's answer, retried after the pause its `grpc-retry-pushback-ms` asks for, as a
/// pushback only times the retry of a code that is retried anyway).
pub const RETRY_ON: [tonic::Code; 2] = [tonic::Code::Unavailable, tonic::Code::ResourceExhausted];

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
    /// Which calls are retried, and how: by default none, as no method is known to be
    /// idempotent ([`Resilience::idempotent`]).
    pub retry: RetryPolicy,
}

impl Resilience {
    /// The defaults, with `methods` (paths such as `/billing.v1.Billing/Get`, or
    /// `/billing.v1.Billing/*`) retried on [`RETRY_ON`]: only methods that are safe to run
    /// twice.
    pub fn idempotent<I: IntoIterator<Item = M>, M: Into<String>>(methods: I) -> Self {
        Resilience {
            retry: RetryPolicy::default().with_methods(methods).with_retry_on(&RETRY_ON),
            ..Resilience::default()
        }
    }
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
            retry: RetryPolicy::default().with_retry_on(&RETRY_ON),
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
pub struct Client {
    /// What generated clients take: `BillingClient::new(client.channel.clone())`.
    pub channel: MeshChannel,
    /// The balancer inside, for its endpoints and strategy.
    pub balanced: BalancedChannel<EndpointStack>,
    /// The per-service breaker.
    pub service_breaker: BreakerHandle,
    /// Retries made and refused.
    pub retries: Arc<RetryStats>,
    /// Each endpoint's breaker and attempts by method and code (with metrics on), held
    /// weakly: an entry goes with its endpoint's stack, which the balancer drops when the
    /// endpoint leaves (8,420 ids churned through etcd held 1 KB each for good).
    endpoint_breakers: Arc<Mutex<HashMap<String, WeakBreakerHandle>>>,
    endpoint_calls: Arc<Mutex<HashMap<String, WeakCallCounts>>>,
    /// The settings of endpoint breakers, for the endpoints still to come too.
    endpoint_config: Arc<Mutex<BreakerConfig>>,
    retry: RetryHandle,
    /// Discovery's freshness, when the endpoints come from etcd.
    pub discovery: Option<tokio::sync::watch::Receiver<mesh_discovery::ResolverStatus>>,
    /// The deadline of calls that have none of their own.
    pub timeout: LiveTimeout,
    /// What the client runs beside its calls: the configuration it follows, TLS reloading,
    /// metrics; stopped when the last clone of the client is dropped.
    pub(crate) background: Arc<Background>,
}

/// What a [`Client`] runs beside its calls.
#[derive(Default)]
pub(crate) struct Background {
    pub(crate) tasks: Vec<tokio_util::task::AbortOnDropHandle<()>>,
    pub(crate) reloading: Option<mesh_tls::Reloader>,
    pub(crate) collector: Option<mesh_metrics::Collector>,
    pub(crate) live: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for Background {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Background").field("tasks", &self.tasks.len()).finish_non_exhaustive()
    }
}

impl Client {
    /// Spawns the balancer over `updates` and builds the stack around it, with no default
    /// deadline; [`Client::builder`] builds one with everything around it.
    pub fn spawn<U>(config: BalancerConfig, resilience: &Resilience, updates: U) -> Result<Client, InvalidResilience>
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
        let endpoint_breakers: Arc<Mutex<HashMap<String, WeakBreakerHandle>>> = Arc::default();
        let handles = endpoint_breakers.clone();
        let endpoint_calls: Arc<Mutex<HashMap<String, WeakCallCounts>>> = Arc::default();
        let calls = endpoint_calls.clone();
        let balanced = Balancer::spawn_with(
            config,
            move |endpoint: &Endpoint, channel| {
                // A new endpoint takes the settings in force now (checked when they were set).
                let layer = BreakerLayer::try_new(endpoint_service.clone(), lock(&current).clone())
                    .unwrap_or_else(|_| endpoint_layer.clone());
                // Attempts by endpoint, method and code, under the breaker: what was sent.
                // Written by `collect_metrics` for the endpoints the balancer has now.
                let counting = CallMetricsLayer::for_collector(Side::Client);
                if let Some(counts) = counting.counts() {
                    let mut calls = lock(&calls);
                    calls.retain(|_, c| !c.is_gone());
                    calls.insert(endpoint.id.clone(), counts.downgrade());
                }
                let counted = counting.layer(channel);
                let breaker = layer.with_name(endpoint.address.clone()).layer(counted);
                let mut handles = lock(&handles);
                handles.retain(|_, h| !h.is_gone());
                handles.insert(endpoint.id.clone(), breaker.handle().downgrade());
                breaker
            },
            updates,
        );
        let breaker = service_layer.layer(retry_layer.layer(balanced.clone()));
        let service_breaker = breaker.handle();
        // Counted by method and code: into the process's metrics recorder when one is
        // installed (`--metrics-listen`), nowhere otherwise.
        let timeout = LiveTimeout::none();
        let channel = DefaultDeadline::new(CallMetricsLayer::new(Side::Client).layer(breaker), timeout.clone());
        Ok(Client {
            timeout,
            background: Arc::default(),
            service_breaker,
            retries: retry_layer.stats(),
            retry: retry_layer.handle(),
            channel,
            balanced,
            endpoint_breakers,
            endpoint_calls,
            endpoint_config,
            discovery: None,
        })
    }

    /// New settings for every endpoint's breaker, those to come included; the error names a
    /// bad setting and changes nothing.
    pub fn set_endpoint_breaker(&self, config: BreakerConfig) -> Result<(), InvalidBreakerConfig> {
        config.validate()?;
        *lock(&self.endpoint_config) = config.clone();
        for handle in lock(&self.endpoint_breakers).values().filter_map(WeakBreakerHandle::upgrade) {
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
        lock(&self.endpoint_breakers).get(id).and_then(WeakBreakerHandle::upgrade)
    }

    /// How many endpoints' breakers and call counts the stack holds: those of the endpoints
    /// whose stacks live (the balancer's, and idle clones' until their next call).
    pub fn endpoint_state_held(&self) -> (usize, usize) {
        (lock(&self.endpoint_breakers).len(), lock(&self.endpoint_calls).len())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves a map behind; it is still valid.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the stack counts, as metrics read at each scrape while the returned collector
/// lives: per endpoint its connection, attempts, failures and breaker; the service's breaker;
/// retries and the budget; and discovery's endpoints and staleness. An endpoint that leaves
/// the set leaves the scrape with it.
pub fn collect_metrics(mesh: &Client) -> mesh_metrics::Collector {
    let mesh = mesh.clone();
    mesh_metrics::collector(move |out| {
        let service = mesh.balanced.service();
        let endpoints = mesh.balanced.endpoints();
        let mut calls = lock(&mesh.endpoint_calls);
        // Counts of endpoints gone from the set go too (one that comes back starts afresh).
        calls.retain(|id, _| endpoints.iter().any(|e| &e.id == id));
        for e in endpoints {
            // The id tells apart two endpoints at one address (a server restarted under a
            // new id before its old registration expired): one series per endpoint.
            let labels = [("service", service), ("endpoint", e.address.as_str()), ("id", e.id.as_str())];
            if let Some(counts) = calls.get(&e.id).and_then(WeakCallCounts::upgrade) {
                out.calls(
                    "mesh_client_endpoint_calls_total",
                    "Attempts sent to an endpoint, by method and gRPC code.",
                    &labels,
                    &counts,
                );
            }
            let up = e.state == mesh_balancer::EndpointState::Ready;
            out.gauge(
                "mesh_endpoint_up",
                "1 while an endpoint has a connection, else 0.",
                &labels,
                f64::from(u8::from(up)),
            );
            out.counter("mesh_endpoint_requests_total", "Attempts sent to an endpoint.", &labels, e.requests);
            out.counter("mesh_endpoint_failures_total", "Attempts that failed at an endpoint.", &labels, e.failures);
            if let Some(breaker) = mesh.endpoint_breaker(&e.id) {
                out.gauge(
                    "mesh_breaker_state",
                    "An endpoint's circuit breaker: 0 closed, 1 half-open, 2 open.",
                    &labels,
                    state_number(breaker.state()),
                );
                out.counter(
                    "mesh_breaker_transitions_total",
                    "Changes of state of an endpoint's circuit breaker.",
                    &labels,
                    breaker.transitions(),
                );
            }
        }
        let labels = [("service", service)];
        out.gauge(
            "mesh_service_breaker_state",
            "The service's circuit breaker: 0 closed, 1 half-open, 2 open.",
            &labels,
            state_number(mesh.service_breaker.state()),
        );
        out.counter(
            "mesh_service_breaker_transitions_total",
            "Changes of state of the service's circuit breaker.",
            &labels,
            mesh.service_breaker.transitions(),
        );
        out.counter("mesh_retries_total", "Retries made.", &labels, mesh.retries.retries());
        out.counter(
            "mesh_retry_budget_exhausted_total",
            "Retries refused because the retry budget was spent.",
            &labels,
            mesh.retries.budget_exhausted(),
        );
        if let Some(discovery) = &mesh.discovery {
            let status = discovery.borrow().clone();
            out.gauge("mesh_discovery_endpoints", "Endpoints discovery knows of.", &labels, status.endpoints as f64);
            out.counter(
                "mesh_discovery_malformed_total",
                "Registrations skipped because they did not parse.",
                &labels,
                status.malformed,
            );
            let stale = status.view.as_ref().and_then(|v| v.staleness()).map_or(f64::NAN, |d| d.as_secs_f64());
            out.gauge(
                "mesh_discovery_staleness_seconds",
                "Seconds since etcd last confirmed discovery's view; NaN before it first did.",
                &labels,
                stale,
            );
        }
    })
}

/// A breaker's state as a number: 0 closed, 1 half-open, 2 open.
fn state_number(state: mesh_breaker::State) -> f64 {
    match state {
        mesh_breaker::State::Closed => 0.0,
        mesh_breaker::State::HalfOpen => 1.0,
        mesh_breaker::State::Open => 2.0,
    }
}
