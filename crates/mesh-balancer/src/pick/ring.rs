//! Consistent hashing on the `hashring` crate: each endpoint owns `virtual_nodes` points,
//! placed by SipHash-1-3 of its id and the point's number (fixed keys, so every client
//! process maps keys alike), and a key belongs to the first point at or after its own hash.
//! Removing an endpoint moves only its keys; adding one takes about 1/(n+1) of them.
//!
//! The ring hashes with an identity hasher over precomputed points, which lets
//! [`Ring::walk`] step from one point to the next (`get(point + 1)`) to find fallbacks.

use std::hash::{BuildHasher, Hash, Hasher};

use hashring::HashRing;
use siphasher::sip::SipHasher13;

use super::PickEndpoint;

/// A ring of virtual nodes for one endpoint set.
#[derive(Debug)]
pub struct Ring {
    ring: HashRing<VNode, PreHashed>,
    endpoints: usize,
}

#[derive(Debug, Clone)]
struct VNode {
    point: u64,
    endpoint: usize,
}

impl Hash for VNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.point);
    }
}

/// Hashes a `u64` to itself: ring points and keys are hashed before they reach the ring.
#[derive(Debug, Clone, Copy, Default)]
struct PreHashed;

#[derive(Debug, Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64s reach this hasher; fold anything else in rather than lose it.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl BuildHasher for PreHashed {
    type Hasher = Identity;

    fn build_hasher(&self) -> Identity {
        Identity(0)
    }
}

/// The hash of a call's key, as the ring compares it.
pub fn hash_key(key: &[u8]) -> u64 {
    let mut h = SipHasher13::new_with_keys(0x6d65_7368, 0x7269_6e67);
    h.write(key);
    h.finish()
}

fn point(id: &str, replica: u32) -> u64 {
    let mut h = SipHasher13::new_with_keys(0x6d65_7368, 0x7269_6e67);
    h.write(id.as_bytes());
    h.write_u8(0xff);
    h.write_u32(replica);
    h.finish()
}

impl Ring {
    /// A ring over `endpoints` with `virtual_nodes` points each.
    pub fn new(endpoints: &[PickEndpoint<'_>], virtual_nodes: u32) -> Self {
        let mut ring = HashRing::with_hasher(PreHashed);
        let nodes = endpoints
            .iter()
            .enumerate()
            .flat_map(|(endpoint, e)| (0..virtual_nodes.max(1)).map(move |r| VNode { point: point(e.id, r), endpoint }))
            .collect();
        ring.batch_add(nodes);
        Ring { ring, endpoints: endpoints.len() }
    }

    /// The endpoint that owns `key` (a [`hash_key`]). The ring must not be empty.
    pub fn get(&self, key: u64) -> usize {
        self.ring.get(&key).map_or(0, |v| v.endpoint)
    }

    /// Endpoints in ring order from `key`'s owner on, each once.
    pub fn walk(&self, key: u64) -> Walk<'_> {
        Walk {
            ring: self,
            seen: vec![false; self.endpoints],
            at: self.ring.get(&key).map(|v| v.point),
            left: self.endpoints,
            steps: self.ring.len(),
        }
    }
}

/// The endpoints of a [`Ring`] in ring order from a key's owner on, each once.
#[derive(Debug)]
pub struct Walk<'a> {
    ring: &'a Ring,
    seen: Vec<bool>,
    at: Option<u64>,
    left: usize,
    steps: usize,
}

impl Iterator for Walk<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        while self.left > 0 && self.steps > 0 {
            let v = self.ring.ring.get(&self.at?)?;
            self.steps -= 1;
            self.at = Some(v.point.wrapping_add(1));
            if !self.seen[v.endpoint] {
                self.seen[v.endpoint] = true;
                self.left -= 1;
                return Some(v.endpoint);
            }
        }
        None
    }
}
