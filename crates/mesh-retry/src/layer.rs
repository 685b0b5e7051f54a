use std::sync::Arc;

use arc_swap::ArcSwap;
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
    pub(crate) budget: Arc<crate::budget::Budget>,
}

impl Live {
    /// `policy` checked, with the budget of `previous` if its settings are the same (what
    /// was deposited stays), else a new one.
    fn new(policy: RetryPolicy, previous: Option<&Live>) -> Result<Self, InvalidRetryPolicy> {
        policy.validate()?;
        let same_budget = |p: &RetryPolicy| (p.budget_ratio, p.budget_min_per_sec, p.budget_window);
        let budget = match previous {
            Some(old) if same_budget(&old.policy) == same_budget(&policy) => old.budget.clone(),
            _ => Arc::new(crate::budget::Budget::new(
                policy.budget_window,
                policy.budget_min_per_sec,
                policy.budget_ratio,
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

#[cfg(test)]
mod budget_model {
    //! The budget mesh builds against its documented bound, counted naively from a list of
    //! every call and retry: a retry is let through only if, counting every retry made in
    //! the window before it, at most `budget_ratio` of the calls in that window (widened by
    //! one of its ten buckets, as tower counts in buckets) plus `budget_min_per_sec` times
    //! the window were retried.
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Wait(u64),
        Calls(u16),
        Retries(u16),
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn retries_never_exceed_the_ratio_of_calls_plus_the_reserve(
            ratio_percent in 1u32..100,
            min_per_sec in 0u32..20,
            window_s in 1u64..10,
            ops in prop::collection::vec(
                prop_oneof![
                    2 => (0u64..3000).prop_map(Op::Wait),
                    3 => (0u16..200).prop_map(Op::Calls),
                    3 => (0u16..200).prop_map(Op::Retries),
                ],
                1..80,
            ),
        ) {
            let ratio = ratio_percent as f32 / 100.0;
            let window = Duration::from_secs(window_s);
            let policy = RetryPolicy::default().with_budget(ratio, min_per_sec, window);
            let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("rt");
            runtime.block_on(async {
                let budget = Live::new(policy, None).expect("valid").budget;
                let start = tokio::time::Instant::now();
                let (mut calls, mut retries): (Vec<Duration>, Vec<Duration>) = (Vec::new(), Vec::new());
                for op in ops {
                    let now = start.elapsed();
                    match op {
                        Op::Wait(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
                        Op::Calls(n) => (0..n).for_each(|_| {
                            budget.deposit();
                            calls.push(now);
                        }),
                        Op::Retries(n) => {
                            for _ in 0..n {
                                if !budget.withdraw() {
                                    continue;
                                }
                                retries.push(now);
                                let bucket = window / 10;
                                let since = now.saturating_sub(window - bucket);
                                let wide = now.saturating_sub(window + bucket);
                                let made = retries.iter().filter(|t| **t > since || (since.is_zero() && **t >= since)).count();
                                let called = calls.iter().filter(|t| **t >= wide).count();
                                let allowed = f64::from(ratio) * called as f64 + f64::from(min_per_sec) * window.as_secs_f64();
                                prop_assert!(made as f64 <= allowed + 1e-6,
                                    "{} retries within {:?} of {:?}, for {} calls: at most {:.1}", made, window - bucket, now, called, allowed);
                            }
                        }
                    }
                }
                Ok(())
            })?;
        }
    }
}
