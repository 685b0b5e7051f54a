//! What is retried, how often and how fast: checked once when the layer is built.

use std::time::Duration;

use tonic::Code;

/// The retry settings.
///
/// Build it with [`RetryPolicy::default`] and the `with_*` setters; [`crate::RetryLayer::try_new`]
/// checks it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts per call, the first included; 1 turns retries off. Default 3.
    pub max_attempts: u32,
    /// The methods that may be retried: full paths (`/greeter.v1.Greeter/SayHello`), or a
    /// service followed by `/*` (`/greeter.v1.Greeter/*`). Only idempotent methods belong
    /// here, and only unary or server-streaming ones (a retried request is buffered whole).
    /// Default: none.
    pub methods: Vec<String>,
    /// The codes that are retried. Default UNAVAILABLE: the call did not run, or the
    /// endpoint could not run it. A transport error is retried too.
    pub retry_on: Vec<Code>,
    /// The first backoff; each next one doubles up to `max_backoff`, and each is drawn
    /// between half and all of that. Default 20 ms.
    pub backoff: Duration,
    /// The longest backoff. Default 500 ms.
    pub max_backoff: Duration,
    /// The retry budget: retries may add this share of calls. Default 0.2 (20%).
    pub budget_ratio: f32,
    /// … plus this many retries per second, so that a client with few calls can retry at
    /// all. Default 10. Kept as a reserve of this times `budget_window` (100 by default)
    /// that a burst of retries may spend at once.
    pub budget_min_per_sec: u32,
    /// How long a call counts toward the budget (1 to 60 s). Default 10 s.
    pub budget_window: Duration,
    /// Requests larger than this are sent once, not buffered for a retry. Default 64 KiB.
    pub max_buffered: usize,
    /// A deadline for each attempt, shorter than the call's (Envoy's per-try timeout): an
    /// attempt that runs out of it is retried on another endpoint while the call's own
    /// deadline allows, so that a hung endpoint costs a call this much, not the call.
    /// Default none: an attempt may take all the call's time.
    pub per_try_timeout: Option<Duration>,
    /// The longest `grpc-retry-pushback-ms` a retry waits for: a server asking for more
    /// ends the retries (its answer is the call's), so that a call without a deadline is
    /// not held for as long as a server says. Default 1 s.
    pub max_pushback: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            methods: Vec::new(),
            retry_on: vec![Code::Unavailable],
            backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(500),
            budget_ratio: 0.2,
            budget_min_per_sec: 10,
            budget_window: Duration::from_secs(10),
            max_buffered: 64 * 1024,
            per_try_timeout: None,
            max_pushback: Duration::from_secs(1),
        }
    }
}

/// What is wrong with a [`RetryPolicy`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid retry setting {setting}: {reason}")]
#[non_exhaustive]
pub struct InvalidRetryPolicy {
    /// The setting, as its field is named.
    pub setting: &'static str,
    /// Why it is refused.
    pub reason: String,
}

impl RetryPolicy {
    /// Sets the attempts per call, the first included.
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Adds methods that may be retried (see [`RetryPolicy::methods`]).
    pub fn with_methods<I: IntoIterator<Item = S>, S: Into<String>>(mut self, methods: I) -> Self {
        self.methods.extend(methods.into_iter().map(Into::into));
        self
    }

    /// Sets the codes that are retried.
    pub fn with_retry_on(mut self, codes: &[Code]) -> Self {
        self.retry_on = codes.to_vec();
        self
    }

    /// Sets the first and the longest backoff.
    pub fn with_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = first;
        self.max_backoff = max;
        self
    }

    /// Sets the retry budget: `ratio` of calls plus `min_per_sec`, counted over `window`.
    pub fn with_budget(mut self, ratio: f32, min_per_sec: u32, window: Duration) -> Self {
        self.budget_ratio = ratio;
        self.budget_min_per_sec = min_per_sec;
        self.budget_window = window;
        self
    }

    /// Sets a deadline for each attempt (see [`RetryPolicy::per_try_timeout`]).
    pub fn with_per_try_timeout(mut self, timeout: Duration) -> Self {
        self.per_try_timeout = Some(timeout);
        self
    }

    /// Sets the longest pushback a retry waits for (see [`RetryPolicy::max_pushback`]).
    pub fn with_max_pushback(mut self, max: Duration) -> Self {
        self.max_pushback = max;
        self
    }

    /// Whether calls to `path` may be retried.
    pub fn is_retryable(&self, path: &str) -> bool {
        self.max_attempts > 1
            && self.methods.iter().any(|m| match m.strip_suffix('*') {
                Some(service) => path.starts_with(service),
                None => m == path,
            })
    }

    /// Checks every setting; the error names the first bad one.
    pub fn validate(&self) -> Result<(), InvalidRetryPolicy> {
        let bad = |setting, reason: &str| Err(InvalidRetryPolicy { setting, reason: reason.to_string() });
        if self.max_attempts == 0 || self.max_attempts > 10 {
            return bad("max_attempts", "must be from 1 to 10");
        }
        for m in &self.methods {
            let shaped = m.starts_with('/') && (m.ends_with("/*") || m[1..].contains('/')) && !m.contains(' ');
            if !shaped {
                return bad("methods", &format!("{m:?} is not /package.Service/Method or /package.Service/*"));
            }
        }
        if self.retry_on.contains(&Code::Ok) {
            return bad("retry_on", "OK is not a failure");
        }
        if self.backoff.is_zero() || self.max_backoff < self.backoff {
            return bad("backoff", "must be more than zero, and at most max_backoff");
        }
        if !(self.budget_ratio.is_finite() && (0.0..=10.0).contains(&self.budget_ratio)) {
            return bad("budget_ratio", "must be a share from 0 to 10");
        }
        if self.budget_min_per_sec > 1_000_000 {
            return bad("budget_min_per_sec", "must be at most 1000000");
        }
        if self.per_try_timeout.is_some_and(|t| t < Duration::from_millis(1)) {
            return bad("per_try_timeout", "must be at least 1ms");
        }
        if self.max_pushback > Duration::from_secs(60) {
            return bad("max_pushback", "must be at most 60 s");
        }
        if self.budget_window < Duration::from_secs(1) || self.budget_window > Duration::from_secs(60) {
            return bad("budget_window", "must be from 1 s to 60 s");
        }
        Ok(())
    }
}
