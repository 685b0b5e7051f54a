use std::sync::Arc;

use tower::retry::budget::TpsBudget;
use tower_layer::Layer;

use crate::policy::{InvalidRetryPolicy, RetryPolicy};
use crate::service::{Retry, RetryStats};

/// Wraps a service in [`Retry`]. The services it makes share one retry budget and one set
/// of counters, so that the budget is the client's, not one per clone.
#[derive(Debug, Clone)]
pub struct RetryLayer {
    policy: RetryPolicy,
    budget: Arc<TpsBudget>,
    stats: Arc<RetryStats>,
}

impl RetryLayer {
    /// A layer that retries as `policy` says; the error names a bad setting.
    pub fn try_new(policy: RetryPolicy) -> Result<Self, InvalidRetryPolicy> {
        policy.validate()?;
        // tower turns the ratio into "one retry per 1/ratio calls", truncating: 0.2 in f32 is
        // a hair over 0.2, so 1/0.2 truncates to 4 and the budget would be 25%. A hair less
        // gives the share asked for.
        let ratio = policy.budget_ratio * (1.0 - 1e-6);
        let budget = TpsBudget::new(policy.budget_window, policy.budget_min_per_sec, ratio);
        Ok(RetryLayer { policy, budget: Arc::new(budget), stats: Arc::new(RetryStats::default()) })
    }

    /// The counters of every service this layer made.
    pub fn stats(&self) -> Arc<RetryStats> {
        self.stats.clone()
    }

    /// The policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

impl<S: Clone> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::new(inner, self.policy.clone(), self.budget.clone(), self.stats.clone())
    }
}
