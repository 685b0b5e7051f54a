//! Peak EWMA latency, as in Finagle and tower's `PeakEwma`: a moving average of response
//! times that jumps up to any slower sample at once (so a slowing endpoint is avoided
//! quickly) and decays towards faster samples, and towards zero while nothing samples it,
//! with time constant `decay`. The cost of an endpoint is its estimate times (calls in
//! flight + 1).
//!
//! Two departures, because a time constant alone exiles an endpoint: one answer slower than
//! the others' (the first on a connection carries its warm-up) kept it out of every pair
//! p2c drew for most of `decay` (3 of 300 sequential calls over three equal servers).
//! - The clock an estimate decays by runs on wall time plus `decay / 32` for every call the
//!   thread sent (`calls_offset`): an endpoint no call samples is tried again after some
//!   dozens of calls elsewhere however fast they come, and its next answer says how it
//!   does now.
//! - A faster answer moves the estimate by at least an eighth of the way, so that it follows
//!   the last few answers rather than the slowest of the last `decay`.

use std::cell::Cell;

/// How many calls sent elsewhere make an unsampled estimate decay as `decay` of time does.
const CALLS_PER_DECAY: u64 = 32;

thread_local! {
    /// Calls this thread sent with peak EWMA.
    static SENT: Cell<u64> = const { Cell::new(0) };
}

/// What the calls this thread sent add to its peak-EWMA clock, in nanoseconds.
pub(crate) fn calls_offset(decay_ns: u64) -> u64 {
    SENT.with(Cell::get).saturating_mul(decay_ns / CALLS_PER_DECAY)
}

/// Counts a call this thread sends.
pub(crate) fn count_call() {
    SENT.with(|n| n.set(n.get().wrapping_add(1)));
}

/// The estimate of one endpoint. Times are nanoseconds on the caller's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeakEwma {
    estimate_ns: f64,
    stamp_ns: u64,
}

impl PeakEwma {
    /// An estimate of `estimate_ns` observed at `stamp_ns`, as [`PeakEwma::parts`] gave it.
    pub fn from_parts(estimate_ns: f64, stamp_ns: u64) -> Self {
        PeakEwma { estimate_ns, stamp_ns }
    }

    /// The estimate and when it was last updated, for storing it outside a lock.
    pub fn parts(&self) -> (f64, u64) {
        (self.estimate_ns, self.stamp_ns)
    }

    /// Folds in a response that took `rtt_ns`, observed at `now_ns`.
    pub fn observe(&mut self, now_ns: u64, rtt_ns: u64, decay_ns: u64) {
        let rtt = rtt_ns as f64;
        if rtt > self.estimate_ns {
            self.estimate_ns = rtt;
        } else {
            let elapsed = now_ns.saturating_sub(self.stamp_ns) as f64;
            // At least an eighth of the way towards the faster answer.
            let w = (-elapsed / decay_ns.max(1) as f64).exp().min(7.0 / 8.0);
            self.estimate_ns = self.estimate_ns * w + rtt * (1.0 - w);
        }
        self.stamp_ns = now_ns;
    }

    /// The estimate at `now_ns`, decayed since the last sample.
    pub fn estimate(&self, now_ns: u64, decay_ns: u64) -> f64 {
        let elapsed = now_ns.saturating_sub(self.stamp_ns) as f64;
        self.estimate_ns * (-elapsed / decay_ns.max(1) as f64).exp()
    }

    /// The cost p2c compares: the estimate (at least 1 ns) times calls in flight plus one.
    pub fn cost(&self, now_ns: u64, decay_ns: u64, in_flight: usize) -> u64 {
        (self.estimate(now_ns, decay_ns).max(1.0) * (in_flight as f64 + 1.0)) as u64
    }
}
