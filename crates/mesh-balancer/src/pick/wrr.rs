//! Weighted round robin from a precomputed schedule, so that a pick is one array read.
//!
//! The schedule is one cycle of earliest-deadline-first picks (the scheduler grpc-go's
//! weighted round robin used, and the proportional-share scheduling of Stoica et al.):
//! the k-th pick of an endpoint of weight w is due at (k + ½) / w, and the cycle takes
//! the endpoint whose next pick is due first, ties going to the lower index. Each cycle
//! of `sum(weights)` picks (weights divided by their greatest common divisor) gives every
//! endpoint exactly its weight, spread out: weights 5:1:1 give `a a a b c a a`, not
//! `a a a a a b c`. Building it takes O(L log n) for a cycle of L picks over n endpoints;
//! L is capped at [`MAX_CYCLE`] by scaling the weights down, keeping each at least 1.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// The longest cycle a schedule holds; larger weight sums are scaled down to fit.
pub const MAX_CYCLE: u64 = 1 << 16;

/// One cycle of weighted round robin over a fixed set of weights.
#[derive(Debug, Clone)]
pub struct Schedule {
    order: Box<[u32]>,
}

impl Schedule {
    /// A schedule over these weights, in endpoint order; 0 counts as 1.
    pub fn new(weights: impl IntoIterator<Item = u32>) -> Self {
        let mut weights: Vec<u64> = weights.into_iter().map(|w| u64::from(w.max(1))).collect();
        let gcd = weights.iter().copied().reduce(gcd).unwrap_or(1);
        weights.iter_mut().for_each(|w| *w /= gcd);
        let sum: u64 = weights.iter().sum();
        if sum > MAX_CYCLE {
            // Keep the proportions as closely as whole numbers allow.
            weights
                .iter_mut()
                .for_each(|w| *w = (u128::from(*w) * u128::from(MAX_CYCLE) / u128::from(sum)).max(1) as u64);
        }
        let cycle: u64 = weights.iter().sum();
        let mut heap: BinaryHeap<Due> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Due { twice_picks_plus_one: 1, twice_weight: 2 * w, index: i as u32 })
            .collect();
        let mut order = Vec::with_capacity(cycle as usize);
        while let Some(mut next) = heap.pop() {
            order.push(next.index);
            if order.len() as u64 == cycle {
                break;
            }
            next.twice_picks_plus_one += 2;
            heap.push(next);
        }
        Schedule { order: order.into_boxed_slice() }
    }

    /// The endpoint of pick number `ticket`. The schedule must not be empty.
    pub fn get(&self, ticket: usize) -> usize {
        let len = self.order.len().max(1);
        let slot = if ticket < len { ticket } else { ticket % len };
        self.order.get(slot).map_or(0, |&i| i as usize)
    }

    /// How many picks one cycle holds.
    pub fn cycle(&self) -> usize {
        self.order.len()
    }
}

/// When an endpoint's next pick is due: (2k + 1) / 2w after its k-th pick.
#[derive(Debug, PartialEq, Eq)]
struct Due {
    twice_picks_plus_one: u64,
    twice_weight: u64,
    index: u32,
}

impl Ord for Due {
    /// The heap is a max-heap: "greater" is due sooner, then the lower index.
    fn cmp(&self, other: &Self) -> Ordering {
        let mine = u128::from(self.twice_picks_plus_one) * u128::from(other.twice_weight);
        let theirs = u128::from(other.twice_picks_plus_one) * u128::from(self.twice_weight);
        theirs.cmp(&mine).then_with(|| other.index.cmp(&self.index))
    }
}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}
