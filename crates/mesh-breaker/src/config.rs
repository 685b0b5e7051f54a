//! The settings of a breaker, checked once when it is built.

use std::time::Duration;

/// How a breaker trips, how long it stays open and how it closes again.
///
/// Build it with [`BreakerConfig::default`] and the `with_*` setters; the breaker checks it
/// ([`BreakerConfig::validate`]) when it is built, so a bad value is an error then, never a
/// panic later.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit. Default 5. 0 leaves it to the failure
    /// rate alone (which must then be set): the shape for a breaker around a whole service,
    /// where calls run concurrently and the failures of one bad endpoint's calls in flight
    /// arrive in a row though the service is fine.
    pub failure_threshold: u32,
    /// Optionally, also open when the share of failures in a sliding window passes a rate.
    pub failure_rate: Option<FailureRate>,
    /// How long the circuit stays open after its first trip. Default 1 s.
    pub open_time: Duration,
    /// The open time doubles on each repeated trip, up to this. Default 30 s.
    pub max_open_time: Duration,
    /// Up to this share of the open time is taken off at random, so that clients that
    /// tripped together do not probe together. Default 0.2; 0 turns jitter off.
    pub jitter: f64,
    /// Calls let through as probes while half-open. Default 1.
    pub half_open_probes: u32,
    /// Successful probes that close the circuit; at most `half_open_probes`. Default 1.
    pub success_threshold: u32,
}

/// Open the circuit when at least `min_requests` calls ended in the last `window` and at
/// least `threshold` of them failed.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct FailureRate {
    /// The share of failures that opens the circuit, in (0, 1].
    pub threshold: f64,
    /// The sliding window the share is taken over (kept in ten buckets).
    pub window: Duration,
    /// Calls the window must hold before the rate counts.
    pub min_requests: u32,
}

impl FailureRate {
    /// A failure rate of `threshold` over `window`, with at least `min_requests` calls.
    pub fn new(threshold: f64, window: Duration, min_requests: u32) -> Self {
        FailureRate { threshold, window, min_requests }
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            failure_rate: None,
            open_time: Duration::from_secs(1),
            max_open_time: Duration::from_secs(30),
            jitter: 0.2,
            half_open_probes: 1,
            success_threshold: 1,
        }
    }
}

/// What is wrong with a [`BreakerConfig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid breaker setting {setting}: {reason}")]
#[non_exhaustive]
pub struct InvalidBreakerConfig {
    /// The setting, as its field is named.
    pub setting: &'static str,
    /// Why it is refused.
    pub reason: String,
}

impl BreakerConfig {
    /// Sets the consecutive failures that open the circuit.
    pub fn with_failure_threshold(mut self, n: u32) -> Self {
        self.failure_threshold = n;
        self
    }

    /// Also opens on a failure rate over a window.
    pub fn with_failure_rate(mut self, rate: FailureRate) -> Self {
        self.failure_rate = Some(rate);
        self
    }

    /// Sets the first open time and its cap.
    pub fn with_open_time(mut self, open: Duration, max: Duration) -> Self {
        self.open_time = open;
        self.max_open_time = max;
        self
    }

    /// Sets the share of the open time taken off at random.
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Sets the probes let through while half-open, and the successes that close.
    pub fn with_half_open(mut self, probes: u32, successes: u32) -> Self {
        self.half_open_probes = probes;
        self.success_threshold = successes;
        self
    }

    /// Checks every setting; the error names the first bad one.
    pub fn validate(&self) -> Result<(), InvalidBreakerConfig> {
        let bad = |setting, reason: &str| Err(InvalidBreakerConfig { setting, reason: reason.to_string() });
        if self.failure_threshold == 0 && self.failure_rate.is_none() {
            return bad("failure_threshold", "must be at least 1 when no failure rate is set");
        }
        if self.open_time.is_zero() {
            return bad("open_time", "must be more than zero");
        }
        if self.max_open_time < self.open_time {
            return bad("max_open_time", "must be at least open_time");
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return bad("jitter", "must be a share in [0, 1)");
        }
        if self.half_open_probes == 0 {
            return bad("half_open_probes", "must be at least 1");
        }
        if self.success_threshold == 0 || self.success_threshold > self.half_open_probes {
            return bad("success_threshold", "must be from 1 to half_open_probes");
        }
        if let Some(rate) = &self.failure_rate {
            if !(rate.threshold > 0.0 && rate.threshold <= 1.0) {
                return bad("failure_rate.threshold", "must be a share in (0, 1]");
            }
            if rate.window < Duration::from_millis(10) {
                return bad("failure_rate.window", "must be at least 10ms");
            }
            if rate.min_requests == 0 {
                return bad("failure_rate.min_requests", "must be at least 1");
            }
        }
        Ok(())
    }
}
