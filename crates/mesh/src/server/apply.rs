//! What a running server applies of its configuration, and the limiter's metrics.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};

use super::LogFilter;
use crate::config::{Config, ServiceSection};

/// How many method limits a log line spells out.
const DESCRIBED_METHODS: usize = 5;

/// The limits in a log line: "200/s, burst 20, reject; /a.B/C 5/s, burst 1, reject".
pub(super) fn describe(config: &mesh_limiter::LimiterConfig) -> String {
    let one = |l: &mesh_limiter::Limit| {
        let mode = match l.mode {
            mesh_limiter::Mode::Reject => "reject".to_string(),
            mesh_limiter::Mode::Wait { max_wait } => format!("wait up to {max_wait:?}"),
        };
        let admits = l.effective_rate_per_sec();
        let rounded = if (admits - l.rate_per_sec).abs() > l.rate_per_sec * 0.005 {
            format!(
                " (admits {admits}/s: tokens come in whole milliseconds; a burst of {} gives the full rate)",
                l.burst_for_full_rate()
            )
        } else {
            String::new()
        };
        format!("{}/s, burst {}{rounded}, {mode}", l.rate_per_sec, l.burst)
    };
    let mut out = one(&config.default);
    // A document may set thousands of method limits: a log line names a few and counts
    // the rest.
    for (path, limit) in config.methods.iter().take(DESCRIBED_METHODS) {
        out.push_str(&format!("; {path} {}", one(limit)));
    }
    if config.methods.len() > DESCRIBED_METHODS {
        out.push_str(&format!("; and {} more method limits", config.methods.len() - DESCRIBED_METHODS));
    }
    if let Some(p) = &config.per_caller {
        let each = p.limit.as_ref().map_or_else(|| "the same".to_string(), one);
        out.push_str(&format!("; and per caller by {:?} ({each} each), at most {} callers", p.key, p.max_callers));
    }
    out
}

/// Applies each new configuration's governance settings: the limits (kept buckets where
/// unchanged) and the log level, each only when it changed. The service's own section is
/// the service's to follow ([`super::Server::config`]).
pub(super) async fn apply_changes<S: ServiceSection>(
    mut config: watch::Receiver<Arc<Config<S>>>,
    limits: mesh_limiter::LimiterHandle,
    log_filter: Option<LogFilter>,
    mut previous: Arc<Config<S>>,
) {
    while config.changed().await.is_ok() {
        let next = config.borrow_and_update().clone();
        let (old, new) = (&previous.server, &next.server);
        if old.limiter != new.limiter {
            match &new.limiter {
                // The document was checked before it was published.
                Some(section) => match section.limiter_config() {
                    Ok(c) => match limits.update(c.clone()) {
                        Ok(()) => info!("rate limit now: {}", describe(&c)),
                        Err(e) => warn!("rate limit not applied: {e}"),
                    },
                    Err(e) => warn!("rate limit not applied: {e}"),
                },
                None => {
                    limits.turn_off();
                    info!("rate limit now off");
                }
            }
        }
        if old.log_level != new.log_level
            && let Some(set) = &log_filter
        {
            match set(new.log_level.as_deref()) {
                Ok(()) => info!(level = ?new.log_level, "log level now"),
                Err(e) => warn!("log level {:?} not applied: {e}", new.log_level),
            }
        }
        previous = next;
    }
}

/// The limiter's counts as metrics, read at each scrape while the collector lives: admitted
/// and rejected calls by the scope whose budget decided them, and the callers told apart.
pub(super) fn limiter_metrics(limits: mesh_limiter::LimiterHandle) -> mesh_metrics::Collector {
    mesh_metrics::collector(move |out| {
        for scope in mesh_limiter::Scope::ALL {
            let labels = [("scope", scope.as_str())];
            out.counter(
                "mesh_limiter_admitted_total",
                "Calls the rate limiter admitted, by the budget that decided: server, method or caller.",
                &labels,
                limits.admitted_in(scope),
            );
            out.counter(
                "mesh_limiter_rejected_total",
                "Calls the rate limiter rejected with RESOURCE_EXHAUSTED, by the budget that decided.",
                &labels,
                limits.rejected_in(scope),
            );
        }
        out.gauge(
            "mesh_limiter_callers",
            "Callers with a budget of their own (per-caller limits).",
            &[],
            limits.callers() as f64,
        );
    })
}

#[cfg(test)]
mod tests;
