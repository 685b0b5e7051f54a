//! Smooth weighted round robin, as nginx does it (`ngx_http_upstream_get_peer`): every pick
//! adds each endpoint's weight to its current weight, takes the largest, and subtracts the
//! total from the winner. Weights 5:1:1 give `a a b a c a a`, not `a a a a a b c`, and every
//! window of `total` picks matches the weights exactly. O(n) per pick, under a short lock.

use std::sync::Mutex;

/// The state of smooth weighted round robin over a fixed set of weights.
#[derive(Debug)]
pub struct SmoothWeighted {
    weights: Vec<i64>,
    total: i64,
    current: Mutex<Vec<i64>>,
}

impl SmoothWeighted {
    /// Over these weights, in endpoint order; 0 counts as 1.
    pub fn new(weights: impl IntoIterator<Item = u32>) -> Self {
        let weights: Vec<i64> = weights.into_iter().map(|w| i64::from(w.max(1))).collect();
        let total = weights.iter().sum();
        let current = Mutex::new(vec![0; weights.len()]);
        SmoothWeighted { weights, total, current }
    }

    /// The next endpoint. There must be at least one.
    pub fn next(&self) -> usize {
        // A poisoned lock only means another pick panicked mid-update; the weights are
        // still numbers, so carry on with them.
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut best: Option<(usize, i64)> = None;
        for (i, (c, w)) in current.iter_mut().zip(&self.weights).enumerate() {
            *c += w;
            // Strictly greater: the first endpoint wins ties, as in nginx.
            if best.is_none_or(|(_, b)| *c > b) {
                best = Some((i, *c));
            }
        }
        let winner = best.map_or(0, |(i, _)| i);
        if let Some(c) = current.get_mut(winner) {
            *c -= self.total;
        }
        winner
    }
}
