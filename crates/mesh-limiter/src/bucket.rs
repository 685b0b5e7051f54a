//! One token bucket on leaky-bucket's `RateLimiter`, sized from a [`Limit`].
//!
//! leaky-bucket adds `refill` tokens every `interval`, up to `max`. A rate of r per second
//! becomes one token every 1/r s up to 1000 per second, and above that the fewest tokens
//! per interval that keep the interval at 1 ms or more (tokio's timers tick in
//! milliseconds), with the interval computed to the nanosecond so that the average is r.
//! The burst is the bucket's size, and a new bucket starts full.

use std::time::Duration;

use leaky_bucket::RateLimiter;

use crate::config::Limit;

pub(crate) struct Bucket {
    limiter: RateLimiter,
    pub(crate) limit: Limit,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket").field("limit", &self.limit).field("balance", &self.limiter.balance()).finish()
    }
}

/// Tokens per refill, and the interval between refills, for `rate` per second.
pub(crate) fn refill_of(rate: f64) -> (usize, Duration) {
    if rate <= 1000.0 {
        (1, Duration::from_secs_f64(1.0 / rate))
    } else {
        let per = (rate / 1000.0).ceil();
        (per as usize, Duration::from_secs_f64(per / rate))
    }
}

impl Bucket {
    /// A bucket for `limit` holding `initial` tokens (at most its burst).
    pub(crate) fn new(limit: Limit, initial: usize) -> Self {
        let (refill, interval) = refill_of(limit.rate_per_sec);
        let max = limit.burst as usize;
        let limiter = RateLimiter::builder()
            .max(max)
            .initial(initial.min(max))
            .refill(refill)
            .interval(interval)
            .fair(true)
            .build();
        Bucket { limiter, limit }
    }

    /// A bucket for `limit`, full.
    pub(crate) fn full(limit: Limit) -> Self {
        Bucket::new(limit, limit.burst as usize)
    }

    /// The same bucket for a new limit: what it holds carries over, up to the new burst,
    /// so that a change is not a free burst.
    pub(crate) fn renewed(&self, limit: Limit) -> Self {
        Bucket::new(limit, self.limiter.balance())
    }

    /// Takes a token if one is there now.
    pub(crate) fn try_admit(&self) -> bool {
        self.limiter.try_acquire(1)
    }

    /// Waits for a token, at most `max_wait`; whether one came.
    pub(crate) async fn admit_within(&self, max_wait: Duration) -> bool {
        tokio::time::timeout(max_wait, self.limiter.acquire_one()).await.is_ok()
    }

    /// How long a caller should wait before trying again: one refill interval, in whole
    /// milliseconds (at least 1).
    pub(crate) fn pushback_ms(&self) -> u64 {
        let (_, interval) = refill_of(self.limit.rate_per_sec);
        u64::try_from(interval.as_millis()).unwrap_or(u64::MAX).max(1)
    }
}

#[cfg(test)]
mod tests;
