//! The pure part of the balancer: given the endpoints of a snapshot and the inputs of one
//! call (a ticket, a random number, a key, a load function), which endpoint comes first and
//! in which order the others are tried when it is not usable. Synchronous, no clock, no
//! I/O; the service in `crate::balanced` supplies the inputs.
//!
//! Algorithms: round robin and random (first choice, then the next ones in order);
//! consistent hashing on a ring of virtual nodes ([`ring`], Karger et al. 1997, as in
//! Envoy's ring hash) walking the ring to the next distinct endpoint; weighted round robin
//! from a precomputed earliest-deadline-first schedule ([`wrr`], as grpc-go's); power of two
//! choices (Mitzenmacher 2001) on a load the caller measures. Every pick is O(1) but the
//! ring's, which is a binary search; fallbacks allocate nothing, but for the ring walk.

pub mod ewma;
pub mod ring;
pub mod wrr;

use crate::strategy::Strategy;

/// What a picker needs to know of each endpoint.
#[derive(Debug, Clone, Copy)]
pub struct PickEndpoint<'a> {
    /// Stable id: the ring places an endpoint by it, so its keys do not depend on order.
    pub id: &'a str,
    /// Weight for weighted round robin; 0 counts as 1.
    pub weight: u32,
}

/// The per-call inputs of a pick.
#[derive(Debug, Clone, Copy)]
pub struct PickInput {
    /// A number that increases by one per call (round robin's turn).
    pub ticket: usize,
    /// A uniformly random number (random, p2c, and hashing without a key).
    pub random: u64,
    /// The hashed key of the call, for consistent hashing; see [`ring::hash_key`].
    pub key: Option<u64>,
}

/// A picker for one endpoint set and strategy. Built when either changes, read by every call.
#[derive(Debug)]
pub struct Picker {
    n: usize,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    RoundRobin,
    Random,
    Hash(ring::Ring),
    Weighted(wrr::Schedule),
    P2c,
}

impl Picker {
    /// Builds the picker of `strategy` over `endpoints`.
    pub fn new(strategy: &Strategy, endpoints: &[PickEndpoint<'_>]) -> Self {
        let kind = match strategy {
            Strategy::RoundRobin => Kind::RoundRobin,
            Strategy::Random => Kind::Random,
            Strategy::ConsistentHash(cfg) => Kind::Hash(ring::Ring::new(endpoints, cfg.virtual_nodes)),
            Strategy::Weighted => Kind::Weighted(wrr::Schedule::new(endpoints.iter().map(|e| e.weight))),
            Strategy::P2c(_) => Kind::P2c,
        };
        Picker { n: endpoints.len(), kind }
    }

    /// The number of endpoints it picks from.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether it has no endpoint to pick.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// After how many tickets the picks repeat (at least 1): a caller may keep its ticket
    /// below this, and picks then need no division.
    pub fn period(&self) -> usize {
        match &self.kind {
            Kind::Weighted(schedule) => schedule.cycle().max(1),
            _ => self.n.max(1),
        }
    }

    /// The first choice for a call, or `None` when there is no endpoint. `load(i)` is only
    /// called by p2c.
    pub fn first(&self, input: &PickInput, load: impl Fn(usize) -> u64) -> Option<usize> {
        let n = self.n;
        if n == 0 {
            return None;
        }
        Some(match &self.kind {
            Kind::RoundRobin => below(input.ticket, n),
            Kind::Random => uniform(input.random, n),
            Kind::Hash(ring) => match input.key {
                Some(key) => ring.get(key),
                None => uniform(input.random, n),
            },
            Kind::Weighted(schedule) => schedule.get(input.ticket),
            Kind::P2c => {
                if n == 1 {
                    return Some(0);
                }
                let a = uniform(input.random, n);
                // A second, distinct index from the other half of the random bits.
                let mut b = uniform(input.random.rotate_left(32).wrapping_mul(0x9E37_79B9_7F4A_7C15), n - 1);
                if b >= a {
                    b += 1;
                }
                if load(b) < load(a) { b } else { a }
            }
        })
    }

    /// Every endpoint other than `first`, once each, in the order to try them when `first`
    /// is not usable: the ring order for consistent hashing, the next ones otherwise (so
    /// that round robin, advancing past what it skipped, stays even over the rest).
    pub fn fallbacks(&self, first: usize, input: &PickInput) -> Fallbacks<'_> {
        let kind = match (&self.kind, input.key) {
            (Kind::Hash(ring), Some(key)) => FallbackKind::Ring(Box::new(ring.walk(key))),
            _ => FallbackKind::Next { step: 1 },
        };
        Fallbacks { first, n: self.n, kind }
    }
}

/// The endpoints to try after the first choice; see [`Picker::fallbacks`].
#[derive(Debug)]
pub struct Fallbacks<'a> {
    first: usize,
    n: usize,
    kind: FallbackKind<'a>,
}

#[derive(Debug)]
enum FallbackKind<'a> {
    Next { step: usize },
    Ring(Box<ring::Walk<'a>>),
}

impl Iterator for Fallbacks<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        match &mut self.kind {
            FallbackKind::Next { step } => {
                if *step >= self.n {
                    return None;
                }
                let i = (self.first + *step) % self.n;
                *step += 1;
                Some(i)
            }
            FallbackKind::Ring(walk) => walk.find(|&i| i != self.first),
        }
    }
}

/// `t % n`, without the division when `t` is already below `n` (a caller that keeps its
/// ticket below [`Picker::period`]).
fn below(t: usize, n: usize) -> usize {
    if t < n { t } else { t % n }
}

/// Maps a uniform u64 onto `0..n` without the bias of `%` (Lemire's multiply-shift).
fn uniform(random: u64, n: usize) -> usize {
    ((u128::from(random) * n as u128) >> 64) as usize
}

#[cfg(test)]
mod tests;
