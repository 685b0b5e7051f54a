use std::sync::Arc;

use arc_swap::ArcSwap;
use tower::retry::budget::TpsBudget;
use tower_layer::Layer;

use crate::policy::{InvalidRetryPolicy, RetryPolicy};
use crate::service::{Retry, RetryStats};

/// Wraps a service in [`Retry`]. The services it makes share one retry budget and one set
/// of counters, so that the budget is the client's, not one per clone, and one policy,
/// which [`RetryHandle::update`] changes for all of them.
#[derive(Debug, Clone)]
pub struct RetryLayer {
    live: Arc<ArcSwap<Live>>,
    stats: Arc<RetryStats>,
}

/// Changes the policy of every service a [`RetryLayer`] made, from their next call on.
#[derive(Debug, Clone)]
pub struct RetryHandle {
    live: Arc<ArcSwap<Live>>,
}

/// The policy in force and its budget.
#[derive(Debug)]
pub(crate) struct Live {
    pub(crate) policy: RetryPolicy,
    pub(crate) budget: Arc<TpsBudget>,
}

impl Live {
    /// `policy` checked, with the budget of `previous` if its settings are the same (what
    /// was deposited stays), else a new one.
    fn new(policy: RetryPolicy, previous: Option<&Live>) -> Result<Self, InvalidRetryPolicy> {
        policy.validate()?;
        let same_budget = |p: &RetryPolicy| (p.budget_ratio, p.budget_min_per_sec, p.budget_window);
        let budget = match previous {
            Some(old) if same_budget(&old.policy) == same_budget(&policy) => old.budget.clone(),
            // tower turns the ratio into "one retry per 1/ratio calls", truncating: 0.2 in
            // f32 is a hair over 0.2, so 1/0.2 truncates to 4 and the budget would be 25%.
            // A hair less gives the share asked for.
            _ => Arc::new(TpsBudget::new(
                policy.budget_window,
                policy.budget_min_per_sec,
                policy.budget_ratio * (1.0 - 1e-6),
            )),
        };
        Ok(Live { policy, budget })
    }
}

impl RetryLayer {
    /// A layer that retries as `policy` says; the error names a bad setting.
    pub fn try_new(policy: RetryPolicy) -> Result<Self, InvalidRetryPolicy> {
        let live = Live::new(policy, None)?;
        Ok(RetryLayer { live: Arc::new(ArcSwap::from_pointee(live)), stats: Arc::new(RetryStats::default()) })
    }

    /// The counters of every service this layer made.
    pub fn stats(&self) -> Arc<RetryStats> {
        self.stats.clone()
    }

    /// The policy in force.
    pub fn policy(&self) -> RetryPolicy {
        self.live.load().policy.clone()
    }

    /// A handle to change the policy live.
    pub fn handle(&self) -> RetryHandle {
        RetryHandle { live: self.live.clone() }
    }
}

impl RetryHandle {
    /// Applies `policy` from the next call on (a call under way may see the old policy or
    /// the new one at each retry). The budget is kept if its settings are unchanged. The
    /// error names a bad setting, and changes nothing.
    pub fn update(&self, policy: RetryPolicy) -> Result<(), InvalidRetryPolicy> {
        let live = Live::new(policy, Some(&self.live.load()))?;
        self.live.store(Arc::new(live));
        Ok(())
    }

    /// The policy in force.
    pub fn policy(&self) -> RetryPolicy {
        self.live.load().policy.clone()
    }
}

impl<S: Clone> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::new(inner, self.live.clone(), self.stats.clone())
    }
}
