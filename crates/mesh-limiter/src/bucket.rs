//! One token bucket on leaky-bucket's `RateLimiter`, sized from a [`Limit`].
//!
//! leaky-bucket adds `refill` tokens every `interval`, up to `max`, and counts intervals in
//! whole milliseconds (an interval of 3.33 ms refills every 3 ms). So a rate of r per second
//! becomes a whole-millisecond interval, with a whole number of tokens no more than the
//! burst (a refill beyond the bucket's size would spill), whose average is r exactly or,
//! failing that, within 0.5% of it, preferably 20 ms apart or more (leaky-bucket loses a
//! fraction of a millisecond on every refill): 200/s is 4 tokens every 20 ms, 300/s 6 every
//! 20 ms, 0.5/s 1 every 2 s, and 200/s with a burst of 2 is 1 every 5 ms. When no such
//! interval exists (300/s with a burst of 1 needs a token every 3.33 ms), the closest rate
//! below r is taken (250/s). The burst
//! is the bucket's size, and a new bucket starts full. Every bucket is fair: waiters are
//! served first come, first served, and each call takes the bucket's lock (uncontended,
//! tens of nanoseconds); see `Bucket::new` for why not the lock-free path.

use std::time::Duration;

use leaky_bucket::RateLimiter;

use crate::config::Limit;

pub(crate) struct Bucket {
    limiter: RateLimiter,
    pub(crate) limit: Limit,
    /// The refill interval, in whole milliseconds: the pushback a rejection asks for.
    pushback_ms: u64,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket").field("limit", &self.limit).field("balance", &self.limiter.balance()).finish()
    }
}

/// Refill intervals shorter than this are used only when the burst cannot hold this long's
/// tokens. leaky-bucket schedules the next refill from the moment a caller takes the due
/// one, less the whole milliseconds it was late: the fraction of a millisecond is lost on
/// every refill. Under a flood that is about 0.1–0.3 ms, which costs 2–6% of the rate with
/// a 5 ms interval and under 1.5% with 20 ms.
const PREFERRED_INTERVAL_MS: u64 = 20;

/// Tokens per refill (at most `burst`), and the interval between refills (whole
/// milliseconds), for `rate` per second: the first of an exact match or one within 0.5% of
/// the rate, among intervals of at least 20 ms (see [`PREFERRED_INTERVAL_MS`]) and then
/// shorter ones; else the closest rate below it. A rate slower than one call a minute is
/// one token per interval. `Limit::validate` has made sure the burst can hold a
/// millisecond's refill.
pub(crate) fn refill_of(rate: f64, burst: u32) -> (usize, Duration) {
    let burst = f64::from(burst.max(1));
    // One token at the rate, in whole milliseconds: below one a minute, that is the answer
    // (within a millisecond in a minute).
    let slowest = (1000.0 / rate).ceil().clamp(1.0, u64::MAX as f64) as u64;
    if slowest > 60_000 {
        return (1, Duration::from_millis(slowest));
    }
    let long = search(rate, burst, PREFERRED_INTERVAL_MS);
    if let Found::Match(tokens, ms) = long {
        return (tokens, Duration::from_millis(ms));
    }
    let (tokens, ms) = match (long, search(rate, burst, 1)) {
        (_, Found::Match(tokens, ms)) => (tokens, ms),
        (Found::Best(a, ms_a, err_a), Found::Best(b, ms_b, err_b)) => {
            if err_a <= err_b {
                (a, ms_a)
            } else {
                (b, ms_b)
            }
        }
        (Found::Best(t, ms, _), Found::Nothing) | (Found::Nothing, Found::Best(t, ms, _)) => (t, ms),
        _ => (1, slowest),
    };
    (tokens, Duration::from_millis(ms))
}

/// The fewest tokens per refill that give `rate` exactly or within 0.5%: the smallest burst
/// for the full rate.
pub(crate) fn fewest_tokens_for(rate: f64) -> usize {
    match search(rate, f64::from(u32::MAX), 1) {
        Found::Match(tokens, _) | Found::Best(tokens, _, _) => tokens,
        Found::Nothing => 1,
    }
}

/// What a search of refill intervals found.
#[derive(Debug, Clone, Copy)]
enum Found {
    /// An exact match, or the first interval within 0.5%: (tokens, ms).
    Match(usize, u64),
    /// The closest rate not above it: (tokens, ms, relative error).
    Best(usize, u64, f64),
    Nothing,
}

/// Searches intervals from `from_ms` up: an exact match if one comes within ten times the
/// first interval within 0.5%, else that one, else the closest.
fn search(rate: f64, burst: f64, from_ms: u64) -> Found {
    let mut within: Option<(usize, u64)> = None;
    let mut best: Option<(usize, u64, f64)> = None;
    for ms in from_ms..=60_000u64 {
        let exact = rate * ms as f64 / 1000.0;
        if exact.floor() > burst || within.is_some_and(|(_, first)| ms > first * 10) {
            // Longer intervals need more tokens than the bucket holds, or are too coarse.
            break;
        }
        for tokens in [exact.round(), exact.floor()] {
            if tokens < 1.0 || tokens > burst {
                continue;
            }
            let got = tokens * 1000.0 / ms as f64;
            if got > rate * 1.005 {
                continue;
            }
            let error = (got - rate).abs() / rate;
            if error <= 1e-9 {
                return Found::Match(tokens as usize, ms);
            }
            if error <= 0.005 && within.is_none() {
                within = Some((tokens as usize, ms));
            }
            if best.is_none_or(|b| error < b.2) {
                best = Some((tokens as usize, ms, error));
            }
        }
    }
    match (within, best) {
        (Some((tokens, ms)), _) => Found::Match(tokens, ms),
        (None, Some((tokens, ms, error))) => Found::Best(tokens, ms, error),
        (None, None) => Found::Nothing,
    }
}

impl Bucket {
    /// A bucket for `limit` holding `initial` tokens (at most its burst).
    pub(crate) fn new(limit: Limit, initial: usize) -> Self {
        let (refill, interval) = refill_of(limit.rate_per_sec, limit.burst);
        let max = limit.burst as usize;
        let limiter = RateLimiter::builder()
            .max(max)
            .initial(initial.min(max))
            .refill(refill)
            .interval(interval)
            // Fair, even for limits that never wait: leaky-bucket 1.1's lock-free path
            // (`fair(false)`) writes back a stale balance when it fails, which loses tokens
            // and can stop refills for good under contention (udoprog/leaky-bucket#39).
            .fair(true)
            .build();
        let pushback_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX).max(1);
        Bucket { limiter, limit, pushback_ms }
    }

    /// A bucket for `limit`, full.
    pub(crate) fn full(limit: Limit) -> Self {
        Bucket::new(limit, limit.burst as usize)
    }

    /// The same bucket for a new limit: what it holds carries over, up to the new burst,
    /// so that a change is not a free burst.
    pub(crate) fn renewed(&self, limit: Limit) -> Self {
        // What it holds now, the refills that fell due since it was last asked included
        // (`balance` leaves those out, and a live update lost them): asking for more than
        // it can ever hold brings its balance up to date and takes nothing, so calls still
        // drawing on this bucket while the new one takes over lose nothing either.
        let _ = self.limiter.try_acquire(self.limiter.max() + 1);
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
        self.pushback_ms
    }
}

#[cfg(test)]
mod tests;
