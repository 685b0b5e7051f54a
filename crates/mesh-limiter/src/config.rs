//! The settings of a limiter, checked once when they are built.

use std::collections::BTreeMap;
use std::time::Duration;

/// What a limit does with a call over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answer RESOURCE_EXHAUSTED at once.
    Reject,
    /// Queue the call until a permit comes, at most this long; then reject it.
    Wait {
        /// The longest a call waits.
        max_wait: Duration,
    },
}

/// One limit: a rate, a burst, and what happens over it.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Limit {
    /// Calls admitted per second, on average.
    pub rate_per_sec: f64,
    /// Calls admitted at once after a quiet spell: the bucket's size.
    pub burst: u32,
    /// Reject or wait.
    pub mode: Mode,
}

/// Whose calls share a bucket, when limits are per caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerKey {
    /// The peer's IP address.
    PeerIp,
    /// The value of a metadata key (a tenant or API key header); calls without it (or with
    /// an empty or non-ASCII value) share one bucket.
    Metadata(String),
}

/// Limits per caller: each caller its own buckets, at most `max_callers` of them.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PerCaller {
    /// What tells callers apart.
    pub key: CallerKey,
    /// The most callers with buckets of their own; callers beyond it share one overflow
    /// bucket per limit until idle callers' buckets expire.
    pub max_callers: usize,
    /// A caller's buckets are dropped after this long without a call.
    pub idle: Duration,
    /// Each caller's limit; `None` for the server's (or the method's) limit per caller as
    /// well. Either way the server's and the methods' limits still apply to all callers
    /// together, so callers that make up keys cannot multiply the server's budget.
    pub limit: Option<Limit>,
}

/// The longest metadata value that names a caller, in bytes: longer values count as calls
/// without the key (one shared budget), so made-up keys cannot fill memory.
pub const MAX_CALLER_KEY_BYTES: usize = 128;

impl PerCaller {
    /// Per caller by `key`: at most 10 000 callers, idle after 60 s, each with the server's
    /// (or method's) limit.
    pub fn new(key: CallerKey) -> Self {
        PerCaller { key, max_callers: 10_000, idle: Duration::from_secs(60), limit: None }
    }

    /// Each caller gets `limit` (the server's and methods' limits still apply to them all).
    pub fn with_limit(mut self, limit: Limit) -> Self {
        self.limit = Some(limit);
        self
    }
}

/// Everything a limiter is told: the server's limit, overrides per method, and whether
/// limits apply per caller.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LimiterConfig {
    /// The limit of every method without an override.
    pub default: Limit,
    /// Limits of single methods, by path (`/greeter.v1.Greeter/SayHello`).
    pub methods: BTreeMap<String, Limit>,
    /// Per caller, or (when `None`) one budget for the whole server.
    pub per_caller: Option<PerCaller>,
}

/// What is wrong with a limiter's settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid rate limit {setting}: {reason}")]
#[non_exhaustive]
pub struct InvalidLimit {
    /// The setting (`rate_per_sec`, `burst`, `methods[/a.B/C].rate_per_sec`, …).
    pub setting: String,
    /// Why it is refused.
    pub reason: String,
}

/// The highest rate a limit takes: a million calls per second.
pub const MAX_RATE: f64 = 1_000_000.0;

impl Limit {
    /// A limit of `rate_per_sec` with `burst`, rejecting over it; the error names what is
    /// wrong (rate 0, negative, NaN or infinite; burst 0).
    pub fn try_new(rate_per_sec: f64, burst: u32) -> Result<Self, InvalidLimit> {
        let limit = Limit { rate_per_sec, burst, mode: Mode::Reject };
        limit.validate("")?;
        Ok(limit)
    }

    /// Waits up to `max_wait` for a permit instead of rejecting at once.
    pub fn waiting(mut self, max_wait: Duration) -> Self {
        self.mode = Mode::Wait { max_wait };
        self
    }

    /// The rate this limit really admits under a flood. Tokens come in whole milliseconds,
    /// at most a burst at a time, so a rate no such refill matches within 0.5% is rounded
    /// down: 300/s with a burst of 1 admits 250/s (one token every 4 ms).
    pub fn effective_rate_per_sec(&self) -> f64 {
        let (tokens, interval) = crate::bucket::refill_of(self.rate_per_sec, self.burst);
        tokens as f64 / interval.as_secs_f64()
    }

    /// The smallest burst with which this limit admits its full rate (within 0.5%).
    pub fn burst_for_full_rate(&self) -> u32 {
        u32::try_from(crate::bucket::fewest_tokens_for(self.rate_per_sec)).unwrap_or(u32::MAX).max(1)
    }

    fn validate(&self, prefix: &str) -> Result<(), InvalidLimit> {
        let bad = |setting: &str, reason: String| Err(InvalidLimit { setting: format!("{prefix}{setting}"), reason });
        let rate = self.rate_per_sec;
        if rate.is_nan() {
            return bad("rate_per_sec", "is not a number".into());
        }
        if rate.is_infinite() {
            return bad("rate_per_sec", "is infinite; give calls per second, e.g. 200".into());
        }
        if rate <= 0.0 {
            return bad(
                "rate_per_sec",
                format!("is {rate}; it must be above 0 (to refuse every call, stop the server)"),
            );
        }
        if rate > MAX_RATE {
            return bad("rate_per_sec", format!("is {rate}; at most {MAX_RATE} per second"));
        }
        if self.burst == 0 {
            return bad("burst", "is 0; at least 1 call must get through".into());
        }
        if rate > f64::from(self.burst) * 1000.0 {
            // Tokens come at most once a millisecond, and a refill cannot exceed the bucket.
            return bad(
                "burst",
                format!(
                    "is {}; at {rate}/s it must be at least {} (the bucket refills at most once a millisecond)",
                    self.burst,
                    (rate / 1000.0).ceil()
                ),
            );
        }
        if let Mode::Wait { max_wait } = self.mode
            && max_wait > Duration::from_secs(3600)
        {
            return bad("max_wait", "is over an hour".into());
        }
        Ok(())
    }
}

impl LimiterConfig {
    /// One limit for the whole server, no overrides, not per caller; checked.
    pub fn try_new(default: Limit) -> Result<Self, InvalidLimit> {
        let config = LimiterConfig { default, methods: BTreeMap::new(), per_caller: None };
        config.validate()?;
        Ok(config)
    }

    /// Overrides the limit of one method (`/package.Service/Method`).
    pub fn with_method(mut self, path: impl Into<String>, limit: Limit) -> Self {
        self.methods.insert(path.into(), limit);
        self
    }

    /// Limits per caller.
    pub fn with_per_caller(mut self, per_caller: PerCaller) -> Self {
        self.per_caller = Some(per_caller);
        self
    }

    /// Checks every setting; the error names the first bad one.
    pub fn validate(&self) -> Result<(), InvalidLimit> {
        self.default.validate("")?;
        for (path, limit) in &self.methods {
            if !path.starts_with('/') || path[1..].split('/').count() != 2 {
                return Err(InvalidLimit {
                    setting: format!("methods[{path}]"),
                    reason: "is not a method path such as /greeter.v1.Greeter/SayHello".into(),
                });
            }
            limit.validate(&format!("methods[{path}]."))?;
        }
        if let Some(p) = &self.per_caller {
            if p.max_callers == 0 {
                return Err(InvalidLimit { setting: "per_caller.max_callers".into(), reason: "is 0".into() });
            }
            if let Some(limit) = &p.limit {
                limit.validate("per_caller.")?;
            }
            if let CallerKey::Metadata(key) = &p.key
                && http::HeaderName::from_bytes(key.as_bytes()).is_err()
            {
                return Err(InvalidLimit {
                    setting: "per_caller.key".into(),
                    reason: format!("{key:?} is not a metadata key"),
                });
            }
        }
        Ok(())
    }

    /// The limit of the method at `path`.
    pub fn limit_of(&self, path: &str) -> &Limit {
        self.methods.get(path).unwrap_or(&self.default)
    }
}

#[cfg(test)]
mod tests;
