//! Peak EWMA latency, as in Finagle and tower's `PeakEwma`: a moving average of response
//! times that jumps up to any slower sample at once (so a slowing endpoint is avoided
//! quickly) and decays towards faster samples with time constant `decay`. The cost of an
//! endpoint is its estimate times (calls in flight + 1).

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
            let w = (-elapsed / decay_ns.max(1) as f64).exp();
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
