//! The service's configuration document applied to a running client: its `client` section
//! (strategy, endpoint breakers, retries, the call timeout) over what the flags set.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use greeter_config::{ClientSection, GreeterConfig};
use mesh_balancer::Strategy;
use mesh_breaker::BreakerConfig;
use mesh_retry::RetryPolicy;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::Mesh;

/// What the client's flags set; each setting the document leaves out stays as here.
#[derive(Debug, Clone)]
pub struct ClientBase {
    /// The balancing strategy.
    pub strategy: Strategy,
    /// Each endpoint's breaker.
    pub endpoint_breaker: BreakerConfig,
    /// Retries.
    pub retry: RetryPolicy,
    /// The deadline of each call.
    pub timeout: Duration,
}

/// The call timeout in force, shared by the calls and the configuration that sets it.
#[derive(Debug, Clone)]
pub struct LiveTimeout(Arc<AtomicU64>);

impl LiveTimeout {
    /// Starts at `timeout`.
    pub fn new(timeout: Duration) -> Self {
        LiveTimeout(Arc::new(AtomicU64::new(millis(timeout))))
    }

    /// The timeout in force.
    pub fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed))
    }

    fn set(&self, timeout: Duration) {
        self.0.store(millis(timeout), Ordering::Relaxed);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Applies the `client` section of each configuration `config` publishes to `mesh`, over
/// `base`, starting with the one in force; returns when the publisher is gone. Each
/// setting is applied only when it changed, and logged.
pub async fn follow(
    mut config: watch::Receiver<Arc<GreeterConfig>>,
    mesh: Mesh,
    base: ClientBase,
    timeout: LiveTimeout,
) {
    loop {
        let current = config.borrow_and_update().clone();
        apply(&current.client, &mesh, &base, &timeout).await;
        if config.changed().await.is_err() {
            return;
        }
    }
}

/// Applies `section` over `base`. The document was checked before it was published, so
/// the errors below are not expected; they are logged, and the setting is left as it was.
async fn apply(section: &ClientSection, mesh: &Mesh, base: &ClientBase, timeout: &LiveTimeout) {
    match section.strategy() {
        Ok(strategy) => {
            let strategy = strategy.unwrap_or_else(|| base.strategy.clone());
            if mesh.balanced.strategy() != strategy {
                mesh.balanced.set_strategy(strategy.clone()).await;
                info!(%strategy, "balancing strategy now");
            }
        }
        Err(e) => warn!("strategy not applied: {e}"),
    }
    match section.breaker(&base.endpoint_breaker) {
        Ok(breaker) if breaker != mesh.endpoint_breaker_config() => match mesh.set_endpoint_breaker(breaker.clone()) {
            Ok(()) => info!(
                failure_threshold = breaker.failure_threshold,
                open = ?breaker.open_time,
                max_open = ?breaker.max_open_time,
                "endpoint breakers now"
            ),
            Err(e) => warn!("endpoint breakers not changed: {e}"),
        },
        Ok(_) => {}
        Err(e) => warn!("endpoint breakers not changed: {e}"),
    }
    match section.retry(&base.retry) {
        Ok(retry) if retry != mesh.retry_policy() => match mesh.set_retry(retry.clone()) {
            Ok(()) => info!(max_attempts = retry.max_attempts, on = ?retry.retry_on, "retries now"),
            Err(e) => warn!("retries not changed: {e}"),
        },
        Ok(_) => {}
        Err(e) => warn!("retries not changed: {e}"),
    }
    match section.timeout() {
        Ok(t) => {
            let t = t.unwrap_or(base.timeout);
            if t != timeout.get() {
                timeout.set(t);
                info!(timeout = ?t, "call timeout now");
            }
        }
        Err(e) => warn!("call timeout not changed: {e}"),
    }
}
