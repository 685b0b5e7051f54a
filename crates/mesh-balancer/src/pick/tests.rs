use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;
use rand::{Rng, SeedableRng};

use super::*;
use crate::strategy::{HashConfig, MissingKey, P2cLoad, Strategy};

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("10.0.0.{i}:50051")).collect()
}

fn endpoints(ids: &[String]) -> Vec<PickEndpoint<'_>> {
    ids.iter().map(|id| PickEndpoint { id, weight: 1 }).collect()
}

fn input(ticket: usize, random: u64, key: Option<u64>) -> PickInput {
    PickInput { ticket, random, key }
}

fn hash_picker(ids: &[String]) -> Picker {
    Picker::new(&Strategy::consistent_hash(), &endpoints(ids))
}

fn owner(p: &Picker, key: &str) -> usize {
    p.first(&input(0, 0, Some(ring::hash_key(key.as_bytes()))), |_| 0).expect("non-empty")
}

#[test]
fn nothing_to_pick_from_an_empty_set() {
    for s in [Strategy::RoundRobin, Strategy::Random, Strategy::consistent_hash(), Strategy::Weighted] {
        assert_eq!(Picker::new(&s, &[]).first(&input(0, 0, Some(1)), |_| 0), None, "{s}");
    }
}

proptest! {
    #[test]
    fn round_robin_visits_each_endpoint_once_per_cycle(n in 1usize..64, start in any::<usize>()) {
        let ids = ids(n);
        let p = Picker::new(&Strategy::RoundRobin, &endpoints(&ids));
        let start = start % (usize::MAX / 2);
        let seen: HashSet<usize> = (start..start + n).filter_map(|t| p.first(&input(t, 0, None), |_| 0)).collect();
        prop_assert_eq!(seen.len(), n);
    }

    #[test]
    fn fallbacks_name_every_other_endpoint_once(n in 1usize..40, random in any::<u64>(), key in any::<u64>()) {
        let ids = ids(n);
        for s in [Strategy::RoundRobin, Strategy::Random, Strategy::consistent_hash(), Strategy::Weighted, Strategy::P2c(P2cLoad::InFlight)] {
            let p = Picker::new(&s, &endpoints(&ids));
            let inp = input(random as usize, random, Some(key));
            let first = p.first(&inp, |_| 0).expect("non-empty");
            let mut all: Vec<usize> = p.fallbacks(first, &inp).collect();
            all.push(first);
            all.sort_unstable();
            prop_assert_eq!(all, (0..n).collect::<Vec<_>>(), "{}", s);
        }
    }

    #[test]
    fn consistent_hash_is_stable_for_a_key_and_independent_of_order(keys in prop::collection::vec(".{1,40}", 1..50)) {
        let ids = ids(7);
        let mut reversed = ids.clone();
        reversed.reverse();
        let a = hash_picker(&ids);
        let b = hash_picker(&reversed);
        for key in &keys {
            let first = owner(&a, key);
            prop_assert_eq!(owner(&a, key), first);
            prop_assert_eq!(&reversed[owner(&b, key)], &ids[first]);
        }
    }

    #[test]
    fn p2c_never_picks_the_single_most_loaded_endpoint(loads in prop::collection::vec(0u64..100, 2..20), random in any::<u64>()) {
        let ids = ids(loads.len());
        let p = Picker::new(&Strategy::P2c(P2cLoad::InFlight), &endpoints(&ids));
        let chosen = p.first(&input(0, random, None), |i| loads[i]).expect("non-empty");
        let max = *loads.iter().max().expect("non-empty");
        let maxes = loads.iter().filter(|&&l| l == max).count();
        prop_assert!(!(loads[chosen] == max && maxes == 1), "chose the unique max {max} of {loads:?}");
    }
}

#[test]
fn random_over_100k_picks_is_within_3_percent_of_uniform() {
    let ids = ids(5);
    let p = Picker::new(&Strategy::Random, &endpoints(&ids));
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut counts = [0u32; 5];
    for _ in 0..100_000 {
        counts[p.first(&input(0, rng.random(), None), |_| 0).expect("non-empty")] += 1;
    }
    for c in counts {
        assert!((19_400..=20_600).contains(&c), "{counts:?} not within ±3% of 20000");
    }
}

#[test]
fn hashing_without_a_key_spreads_like_random() {
    let ids = ids(4);
    let p = hash_picker(&ids);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut counts = [0u32; 4];
    for _ in 0..40_000 {
        counts[p.first(&input(0, rng.random(), None), |_| 0).expect("non-empty")] += 1;
    }
    assert!(counts.iter().all(|&c| (9_400..=10_600).contains(&c)), "{counts:?}");
}

#[test]
fn weighted_1_2_3_is_within_2_percent() {
    let ids = ids(3);
    let eps: Vec<PickEndpoint<'_>> =
        ids.iter().zip([1, 2, 3]).map(|(id, weight)| PickEndpoint { id, weight }).collect();
    let p = Picker::new(&Strategy::Weighted, &eps);
    let mut counts = [0u32; 3];
    for t in 0..60_000 {
        counts[p.first(&input(t, 0, None), |_| 0).expect("non-empty")] += 1;
    }
    for (c, expect) in counts.iter().zip([10_000u32, 20_000, 30_000]) {
        let tolerance = expect / 50;
        assert!(c.abs_diff(expect) <= tolerance, "{counts:?} not within ±2% of 1:2:3");
    }
}

#[test]
fn weighted_spreads_a_light_endpoint_inside_the_cycle() {
    let ids = ids(3);
    let eps: Vec<PickEndpoint<'_>> =
        ids.iter().zip([5, 1, 1]).map(|(id, weight)| PickEndpoint { id, weight }).collect();
    let p = Picker::new(&Strategy::Weighted, &eps);
    let seq: Vec<usize> = (0..7).map(|t| p.first(&input(t, 0, None), |_| 0).expect("non-empty")).collect();
    assert_eq!(seq, [0, 0, 0, 1, 2, 0, 0], "a a a b c a a, not a a a a a b c");
}

proptest! {
    #[test]
    fn every_weighted_cycle_gives_exactly_the_weights_and_no_long_gaps(weights in prop::collection::vec(1u32..40, 1..12), start in 0usize..1000) {
        let schedule = wrr::Schedule::new(weights.iter().copied());
        let g = weights.iter().copied().reduce(|a, b| { let (mut a, mut b) = (a, b); while b != 0 { (a, b) = (b, a % b); } a }).unwrap_or(1);
        let cycle: usize = weights.iter().map(|w| (w / g) as usize).sum();
        prop_assert_eq!(schedule.cycle(), cycle);
        let picks: Vec<usize> = (start..start + 2 * cycle).map(|t| schedule.get(t)).collect();
        for (i, w) in weights.iter().enumerate() {
            let share = (w / g) as usize;
            prop_assert_eq!(picks[..cycle].iter().filter(|&&p| p == i).count(), share);
            // Earliest-deadline-first keeps each endpoint's picks about cycle/share apart: at
            // most twice that, plus one pick of each other endpoint whose deadline fell in
            // the same place (weights 3:1:7:1:1:13 give the 13 a gap of 6 where four 1s and
            // the 3 are due together). A schedule in blocks (a a a … b b b …) is far worse.
            let at: Vec<usize> = picks.iter().enumerate().filter(|(_, p)| **p == i).map(|(k, _)| k).collect();
            let widest = at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
            let bound = 2 * cycle.div_ceil(share) + weights.len();
            prop_assert!(widest <= bound, "endpoint {} of {:?}: a gap of {}", i, weights, widest);
        }
    }
}

#[test]
fn a_huge_weight_sum_is_scaled_to_the_cycle_cap_and_keeps_its_proportions() {
    let schedule = wrr::Schedule::new([1_000_000, 3_000_000, 1]);
    assert!(schedule.cycle() as u64 <= wrr::MAX_CYCLE + 3, "{}", schedule.cycle());
    let mut counts = [0usize; 3];
    for t in 0..schedule.cycle() {
        counts[schedule.get(t)] += 1;
    }
    assert_eq!(counts[2], 1, "a tiny weight still gets a pick per cycle");
    let ratio = counts[1] as f64 / counts[0] as f64;
    assert!((ratio - 3.0).abs() < 0.01, "{counts:?}");
}

#[test]
fn weight_zero_counts_as_one() {
    let ids = ids(2);
    let eps: Vec<PickEndpoint<'_>> = ids.iter().map(|id| PickEndpoint { id, weight: 0 }).collect();
    let p = Picker::new(&Strategy::Weighted, &eps);
    let seq: Vec<usize> = (0..4).map(|t| p.first(&input(t, 0, None), |_| 0).expect("non-empty")).collect();
    assert_eq!(seq, [0, 1, 0, 1]);
}

fn key_owners(ids: &[String], keys: &[String]) -> Vec<String> {
    let p = hash_picker(ids);
    keys.iter().map(|k| ids[owner(&p, k)].clone()).collect()
}

#[test]
fn removing_1_of_10_moves_at_most_15_percent_of_10k_keys_and_only_its_own() {
    let ten = ids(10);
    let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
    let before = key_owners(&ten, &keys);
    let removed = ten[3].clone();
    let nine: Vec<String> = ten.iter().filter(|id| **id != removed).cloned().collect();
    let after = key_owners(&nine, &keys);
    let moved: Vec<usize> = (0..keys.len()).filter(|&i| before[i] != after[i]).collect();
    assert!(moved.len() <= 1_500, "{} of 10000 keys moved", moved.len());
    assert!(moved.iter().all(|&i| before[i] == removed), "a key not on the removed node moved");
    assert_eq!(moved.len(), before.iter().filter(|o| **o == removed).count(), "all of its keys moved");
}

#[test]
fn adding_an_11th_moves_at_most_15_percent_and_only_to_it() {
    let ten = ids(10);
    let eleven = ids(11);
    let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
    let before = key_owners(&ten, &keys);
    let after = key_owners(&eleven, &keys);
    let moved: Vec<usize> = (0..keys.len()).filter(|&i| before[i] != after[i]).collect();
    assert!(moved.len() <= 1_500, "{} of 10000 keys moved", moved.len());
    assert!(moved.iter().all(|&i| after[i] == eleven[10]), "keys moved between old nodes");
}

#[test]
fn virtual_nodes_spread_keys_evenly() {
    let ids = ids(10);
    let keys: Vec<String> = (0..100_000).map(|i| format!("k{i}")).collect();
    let mut per: BTreeMap<String, u32> = BTreeMap::new();
    for o in key_owners(&ids, &keys) {
        *per.entry(o).or_default() += 1;
    }
    // 160 points each: every node within ±35% of its fair 10%.
    assert!(per.values().all(|&c| (6_500..=13_500).contains(&c)), "{per:?}");
}

#[test]
fn ring_walk_after_the_owner_follows_the_ring() {
    let ids = ids(5);
    let cfg = HashConfig::try_new("x-k", 1, MissingKey::Random).expect("valid");
    let p = Picker::new(&Strategy::ConsistentHash(cfg), &endpoints(&ids));
    let key = ring::hash_key(b"walk");
    let inp = input(0, 0, Some(key));
    let first = p.first(&inp, |_| 0).expect("non-empty");
    let fallbacks: Vec<usize> = p.fallbacks(first, &inp).collect();
    // With one point each, the walk visits points in increasing order (wrapping).
    let points: Vec<u64> = std::iter::once(first).chain(fallbacks).map(|i| ring_point(&ids[i])).collect();
    let rotation = points.iter().position(|&p| p == *points.iter().min().expect("some")).expect("some");
    let mut sorted = points.clone();
    sorted.rotate_left(rotation);
    assert!(sorted.windows(2).all(|w| w[0] < w[1]), "walk is not ring order: {points:?}");
}

fn ring_point(id: &str) -> u64 {
    use std::hash::Hasher;
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0x6d65_7368, 0x7269_6e67);
    h.write(id.as_bytes());
    h.write_u8(0xff);
    h.write_u32(0);
    h.finish()
}

#[test]
fn p2c_over_two_picks_the_idle_one_and_both_when_equal() {
    let ids = ids(2);
    let p = Picker::new(&Strategy::P2c(P2cLoad::InFlight), &endpoints(&ids));
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for _ in 0..100 {
        assert_eq!(p.first(&input(0, rng.random(), None), |i| [5, 0][i]), Some(1));
    }
    let both: HashSet<usize> = (0..100).filter_map(|_| p.first(&input(0, rng.random(), None), |_| 0)).collect();
    assert_eq!(both.len(), 2);
}

#[test]
fn peak_ewma_jumps_to_peaks_and_decays() {
    let mut e = ewma::PeakEwma::default();
    let decay = 1_000_000_000;
    e.observe(0, 1_000_000, decay);
    assert_eq!(e.estimate(0, decay) as u64, 1_000_000);
    e.observe(10, 5_000_000, decay);
    assert_eq!(e.estimate(10, decay) as u64, 5_000_000, "a slower sample is taken at once");
    e.observe(decay, 1_000_000, decay);
    let after = e.estimate(decay, decay);
    assert!(after < 5_000_000.0 && after > 1_000_000.0, "{after}");
    assert!(e.cost(decay, decay, 3) > e.cost(decay, decay, 0));
}

#[test]
fn a_slow_first_answer_is_forgotten_after_a_few_fast_ones() {
    // 1 ms, then 0.2 ms every millisecond under a 10 s decay: the time constant alone kept
    // the estimate at ~1 ms for seconds, and p2c kept the endpoint out of every pair.
    let decay = 10_000_000_000;
    let mut e = ewma::PeakEwma::default();
    e.observe(1_000_000, 1_000_000, decay);
    for i in 2..=20u64 {
        e.observe(i * 1_000_000, 200_000, decay);
    }
    let estimate = e.estimate(20_000_000, decay);
    assert!(estimate < 300_000.0, "{estimate}");
}

#[test]
fn an_estimate_no_call_samples_decays_with_the_calls_sent_elsewhere() {
    let decay = 10_000_000_000;
    let mut e = ewma::PeakEwma::default();
    e.observe(0, 1_000_000, decay);
    let at = |calls: u64| e.estimate(calls * (decay / 32), decay);
    // After 32 calls elsewhere (no time passing) it has decayed as after 10 s: to 1/e.
    assert!((at(32) - 1_000_000.0 / std::f64::consts::E).abs() < 1.0, "{}", at(32));
    // So an endpoint 1.7 times slower than the others is tried again after ~17 calls.
    assert!(at(17) < 1_000_000.0 / 1.7);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn adding_or_removing_a_node_moves_only_that_nodes_keys(
        names in prop::collection::btree_set("[a-z]{1,6}:[0-9]{2,5}", 2..16),
        pick in any::<prop::sample::Index>(),
        keys in prop::collection::vec("[a-z0-9-]{1,12}", 1..300),
    ) {
        // The naive reference: a key's owner changes only if the changed node owned it
        // (removed) or owns it now (added); every other key stays where it was.
        let all: Vec<String> = names.into_iter().collect();
        let changed = all[pick.index(all.len())].clone();
        let without: Vec<String> = all.iter().filter(|n| **n != changed).cloned().collect();
        let with_it = key_owners(&all, &keys);
        let without_it = key_owners(&without, &keys);
        for (i, key) in keys.iter().enumerate() {
            if with_it[i] != changed {
                prop_assert_eq!(&with_it[i], &without_it[i], "{} moved between nodes that stayed", key);
            }
        }
    }
}
