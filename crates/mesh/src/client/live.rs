//! The service's configuration document applied to a running client: its `client` section
//! (strategy, endpoint breakers, retries, the call timeout) over what the client was built
//! with.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{ClientSection, Config, ServiceSection};
use mesh_balancer::Strategy;
use mesh_breaker::BreakerConfig;
use mesh_config::Layers;
use mesh_retry::RetryPolicy;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Client, LiveTimeout};

/// What the client's flags set; each setting the document leaves out stays as here.
#[derive(Debug, Clone)]
pub struct ClientBase {
    /// The balancing strategy.
    pub strategy: Strategy,
    /// Each endpoint's breaker.
    pub endpoint_breaker: BreakerConfig,
    /// Retries.
    pub retry: RetryPolicy,
    /// The deadline of each call that has none of its own; `None` for none.
    pub timeout: Option<Duration>,
}

/// The layers a client's configuration watch starts from: the defaults, and what this
/// client's flags set of the settings a document is checked against one another
/// (`client.breaker`), so that a document this client would refuse is refused by its
/// watch, whole, and counted so, rather than applied in part.
pub fn layers<S: ServiceSection>(base: &ClientBase) -> Result<Layers, mesh_config::ConfigError> {
    let b = &base.endpoint_breaker;
    let breaker = serde_json::json!({
        "failure_threshold": b.failure_threshold,
        "open_ms": millis_of(b.open_time),
        "max_open_ms": millis_of(b.max_open_time),
        "half_open_max_requests": b.half_open_probes,
    });
    Layers::defaults(&Config::<S>::default())?
        .patch("the breaker flags", serde_json::json!({"client": {"breaker": breaker}}))
}

/// Applies the `client` section of each configuration `config` publishes to `mesh`, over
/// `base`, starting with the one in force; returns when the publisher is gone. Each
/// setting is applied only when it changed, and logged.
pub async fn follow<S: ServiceSection>(
    mut config: watch::Receiver<Arc<Config<S>>>,
    mesh: Client,
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

/// Applies `section` over `base`, whole or not at all. The watch checked the document
/// over this client's flags before publishing it, so a refusal here is not expected; it
/// is logged, and nothing changes.
pub async fn apply(section: &ClientSection, mesh: &Client, base: &ClientBase, timeout: &LiveTimeout) {
    // Each part is validated as it is built, so a plan that is whole applies whole.
    let planned = (|| {
        let strategy = section.strategy()?.unwrap_or_else(|| base.strategy.clone());
        let breaker = section.breaker(&base.endpoint_breaker)?;
        let retry = section.retry(&base.retry)?;
        let call_timeout = section.timeout()?.or(base.timeout);
        Ok::<_, String>((strategy, breaker, retry, call_timeout))
    })();
    let (strategy, breaker, retry, call_timeout) = match planned {
        Ok(plan) => plan,
        Err(e) => {
            warn!("the client section was not applied, nothing changed: {e}");
            return;
        }
    };
    if mesh.balanced.strategy() != strategy {
        mesh.balanced.set_strategy(strategy.clone()).await;
        info!(%strategy, "balancing strategy now");
    }
    if breaker != mesh.endpoint_breaker_config() {
        match mesh.set_endpoint_breaker(breaker.clone()) {
            Ok(()) => info!(
                failure_threshold = breaker.failure_threshold,
                open = ?breaker.open_time,
                max_open = ?breaker.max_open_time,
                "endpoint breakers now"
            ),
            Err(e) => warn!("endpoint breakers not changed: {e}"),
        }
    }
    if retry != mesh.retry_policy() {
        match mesh.set_retry(retry.clone()) {
            Ok(()) => info!(max_attempts = retry.max_attempts, on = ?retry.retry_on, "retries now"),
            Err(e) => warn!("retries not changed: {e}"),
        }
    }
    if call_timeout != timeout.get() {
        timeout.set(call_timeout);
        info!(timeout = ?call_timeout, "call timeout now");
    }
}

fn millis_of(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
