use std::time::{Duration, Instant};

use super::*;
use crate::config::FailureRate;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn circuit(config: BreakerConfig) -> Circuit {
    config.validate().expect("valid config");
    Circuit::new(config, 7)
}

/// Lets a call through at `now` and records `outcome` for it.
fn call(c: &mut Circuit, now: Instant, outcome: Outcome) -> Admission {
    let a = c.admit(now);
    c.record(now, a, outcome);
    a
}

#[test]
fn consecutive_failures_open_it_and_a_success_in_between_starts_the_count_again() {
    let t0 = Instant::now();
    let mut c = circuit(BreakerConfig::default().with_failure_threshold(3).with_jitter(0.0));
    for _ in 0..2 {
        call(&mut c, t0, Outcome::Failure);
    }
    call(&mut c, t0, Outcome::Success);
    for _ in 0..2 {
        call(&mut c, t0, Outcome::Failure);
    }
    assert_eq!(c.state(), State::Closed, "2 failures after a success do not reach 3");
    call(&mut c, t0, Outcome::Failure);
    assert_eq!(c.state(), State::Open);
    assert_eq!(c.admit(t0 + ms(999)), Admission::Refused { until: Some(t0 + ms(1000)) });
    assert_eq!(c.transitions(), 1);
}

#[test]
fn every_transition_closed_open_half_open_closed_and_half_open_open() {
    let t0 = Instant::now();
    let mut c = circuit(BreakerConfig::default().with_failure_threshold(1).with_jitter(0.0));
    call(&mut c, t0, Outcome::Failure);
    assert_eq!(c.state(), State::Open);
    // The open time passes: the next call is a probe, and its failure opens it again, for
    // twice as long.
    let t1 = t0 + ms(1000);
    let probe = c.admit(t1);
    assert!(matches!(probe, Admission::Probe(_)));
    assert_eq!(c.state(), State::HalfOpen);
    c.record(t1, probe, Outcome::Failure);
    assert_eq!(c.state(), State::Open);
    assert_eq!(c.open_until(), Some(t1 + ms(2000)));
    // Then a successful probe closes it.
    let t2 = t1 + ms(2000);
    let probe = c.admit(t2);
    c.record(t2, probe, Outcome::Success);
    assert_eq!(c.state(), State::Closed);
    assert_eq!(c.admit(t2), Admission::Allowed);
    // Closed → Open → HalfOpen → Open → HalfOpen → Closed.
    assert_eq!(c.transitions(), 5);
}

#[test]
fn half_open_admits_exactly_the_configured_probes_of_100_concurrent_attempts() {
    for probes in [1u32, 3, 10] {
        let t0 = Instant::now();
        let mut c = circuit(BreakerConfig::default().with_failure_threshold(1).with_half_open(probes, probes));
        call(&mut c, t0, Outcome::Failure);
        let later = t0 + ms(1000);
        let admitted: Vec<Admission> = (0..100).map(|_| c.admit(later)).collect();
        let let_through = admitted.iter().filter(|a| matches!(a, Admission::Probe(_))).count();
        assert_eq!(let_through, probes as usize, "{probes} probes configured");
        assert!(admitted.iter().skip(probes as usize).all(|a| *a == Admission::Refused { until: None }));
        // All but the last succeed: still half-open, and no further probe goes out.
        for a in admitted.iter().take(probes as usize - 1) {
            c.record(later, *a, Outcome::Success);
        }
        assert_eq!(c.state(), State::HalfOpen);
        assert_eq!(c.admit(later), Admission::Refused { until: None });
        c.record(later, admitted[probes as usize - 1], Outcome::Success);
        assert_eq!(c.state(), State::Closed);
    }
}

#[test]
fn a_probe_that_ends_ignored_frees_its_place_for_another() {
    let t0 = Instant::now();
    let mut c = circuit(BreakerConfig::default().with_failure_threshold(1));
    call(&mut c, t0, Outcome::Failure);
    let later = t0 + ms(1000);
    let probe = c.admit(later);
    assert_eq!(c.admit(later), Admission::Refused { until: None });
    c.record(later, probe, Outcome::Ignored);
    assert_eq!(c.state(), State::HalfOpen);
    assert!(matches!(c.admit(later), Admission::Probe(_)));
}

#[test]
fn the_open_time_doubles_on_repeated_trips_and_is_capped() {
    let t0 = Instant::now();
    let config = BreakerConfig::default().with_failure_threshold(1).with_open_time(ms(100), ms(1000)).with_jitter(0.0);
    let mut c = circuit(config);
    let mut now = t0;
    call(&mut c, now, Outcome::Failure);
    let mut seen = Vec::new();
    for _ in 0..8 {
        let until = c.open_until().expect("open");
        seen.push(until - now);
        now = until;
        call(&mut c, now, Outcome::Failure);
    }
    let expected: Vec<Duration> = [100, 200, 400, 800, 1000, 1000, 1000, 1000].into_iter().map(ms).collect();
    assert_eq!(seen, expected);
}

#[test]
fn jitter_shortens_the_open_time_by_at_most_its_share_and_never_passes_the_cap() {
    let t0 = Instant::now();
    let config = BreakerConfig::default().with_failure_threshold(1).with_open_time(ms(100), ms(800)).with_jitter(0.5);
    let mut spread = std::collections::BTreeSet::new();
    for seed in 0..50 {
        let mut c = Circuit::new(config.clone(), seed);
        let mut now = t0;
        call(&mut c, now, Outcome::Failure);
        for trip in 0..6u32 {
            let until = c.open_until().expect("open");
            let open = until - now;
            let nominal = ms(100 * (1u64 << trip)).min(ms(800));
            assert!(open <= nominal && open >= nominal / 2, "trip {trip}: {open:?} for {nominal:?}");
            spread.insert(open);
            now = until;
            call(&mut c, now, Outcome::Failure);
        }
    }
    assert!(spread.len() > 50, "jitter spreads the open times: {} distinct", spread.len());
}

#[test]
fn a_trip_after_a_long_closed_spell_starts_the_doubling_over() {
    let t0 = Instant::now();
    let config = BreakerConfig::default().with_failure_threshold(1).with_open_time(ms(100), ms(1000)).with_jitter(0.0);
    let mut c = circuit(config);
    call(&mut c, t0, Outcome::Failure);
    let t1 = t0 + ms(100);
    call(&mut c, t1, Outcome::Failure); // probe fails: 200 ms
    let t2 = t1 + ms(200);
    call(&mut c, t2, Outcome::Success); // closes
    // Tripping again soon after closing is a repeat: 400 ms.
    call(&mut c, t2 + ms(10), Outcome::Failure);
    assert_eq!(c.open_until(), Some(t2 + ms(410)));
    let t3 = t2 + ms(410);
    call(&mut c, t3, Outcome::Success);
    // Closed for max_open_time: a fresh trip, 100 ms again.
    let t4 = t3 + ms(1000);
    call(&mut c, t4, Outcome::Failure);
    assert_eq!(c.open_until(), Some(t4 + ms(100)));
}

#[test]
fn outcomes_that_do_not_count_never_trip_it() {
    let t0 = Instant::now();
    let config = BreakerConfig::default().with_failure_threshold(2).with_failure_rate(FailureRate::new(
        0.5,
        Duration::from_secs(10),
        4,
    ));
    let mut c = circuit(config);
    for i in 0..1000 {
        call(&mut c, t0 + ms(i), Outcome::Ignored);
    }
    assert_eq!(c.state(), State::Closed);
    assert_eq!(c.transitions(), 0);
}

#[test]
fn late_outcomes_of_calls_let_through_while_closed_change_nothing_once_open() {
    let t0 = Instant::now();
    let mut c = circuit(BreakerConfig::default().with_failure_threshold(1));
    let early = c.admit(t0);
    call(&mut c, t0, Outcome::Failure);
    c.record(t0, early, Outcome::Success);
    assert_eq!(c.state(), State::Open, "a late success does not close an open circuit");
    let later = t0 + ms(1000);
    let probe = c.admit(later);
    c.record(later, early, Outcome::Failure);
    assert_eq!(c.state(), State::HalfOpen, "a late failure does not reopen it either");
    c.record(later, probe, Outcome::Success);
    assert_eq!(c.state(), State::Closed);
}

#[test]
fn a_probe_of_an_earlier_half_open_spell_does_not_count_in_the_next() {
    let t0 = Instant::now();
    let mut c = circuit(BreakerConfig::default().with_failure_threshold(1).with_half_open(2, 1).with_jitter(0.0));
    call(&mut c, t0, Outcome::Failure);
    let t1 = t0 + ms(1000);
    let slow = c.admit(t1);
    call(&mut c, t1, Outcome::Failure); // the second probe fails: open again
    let t2 = t1 + ms(2000);
    let fresh = c.admit(t2);
    c.record(t2, slow, Outcome::Success);
    assert_eq!(c.state(), State::HalfOpen, "the first spell's probe ends in the second");
    c.record(t2, fresh, Outcome::Success);
    assert_eq!(c.state(), State::Closed);
}

#[test]
fn the_failure_rate_opens_it_only_with_enough_calls_in_the_window() {
    let t0 = Instant::now();
    let rate = FailureRate::new(0.5, Duration::from_secs(10), 10);
    let mut c = circuit(BreakerConfig::default().with_failure_threshold(100).with_failure_rate(rate));
    // Alternate: never two failures in a row, 50% failures.
    for i in 0..9 {
        let outcome = if i % 2 == 0 { Outcome::Failure } else { Outcome::Success };
        call(&mut c, t0 + ms(i), outcome);
    }
    assert_eq!(c.state(), State::Closed, "9 calls are below the minimum of 10");
    call(&mut c, t0 + ms(9), Outcome::Success);
    call(&mut c, t0 + ms(10), Outcome::Failure);
    assert_eq!(c.state(), State::Open, "6 failures of 11 calls is over 50%");
}

#[test]
fn failures_that_left_the_window_no_longer_count() {
    let t0 = Instant::now();
    let rate = FailureRate::new(0.5, Duration::from_secs(1), 4);
    let mut c = circuit(BreakerConfig::default().with_failure_threshold(100).with_failure_rate(rate));
    for i in 0..3 {
        call(&mut c, t0 + ms(i), Outcome::Failure);
        call(&mut c, t0 + ms(i), Outcome::Success);
    }
    // Two seconds later the window holds only what follows: 1 failure in 4.
    let later = t0 + ms(2000);
    for outcome in [Outcome::Success, Outcome::Success, Outcome::Success, Outcome::Failure] {
        call(&mut c, later, outcome);
    }
    assert_eq!(c.state(), State::Closed);
}

#[test]
fn with_no_consecutive_threshold_only_the_rate_trips_it() {
    let t0 = Instant::now();
    let rate = FailureRate::new(0.5, Duration::from_secs(10), 20);
    let mut c = circuit(BreakerConfig::default().with_failure_threshold(0).with_failure_rate(rate));
    for i in 0..19 {
        call(&mut c, t0 + ms(i), Outcome::Failure);
    }
    assert_eq!(c.state(), State::Closed, "19 failures in a row, below the 20 calls the rate needs");
    call(&mut c, t0 + ms(19), Outcome::Failure);
    assert_eq!(c.state(), State::Open);
}

#[test]
fn bad_settings_are_refused_by_name() {
    let cases = [
        (BreakerConfig::default().with_failure_threshold(0), "failure_threshold"),
        (BreakerConfig::default().with_open_time(Duration::ZERO, ms(1)), "open_time"),
        (BreakerConfig::default().with_open_time(ms(10), ms(5)), "max_open_time"),
        (BreakerConfig::default().with_jitter(1.0), "jitter"),
        (BreakerConfig::default().with_jitter(f64::NAN), "jitter"),
        (BreakerConfig::default().with_half_open(0, 0), "half_open_probes"),
        (BreakerConfig::default().with_half_open(1, 2), "success_threshold"),
        (BreakerConfig::default().with_failure_rate(FailureRate::new(0.0, ms(1000), 1)), "failure_rate.threshold"),
        (BreakerConfig::default().with_failure_rate(FailureRate::new(f64::NAN, ms(1000), 1)), "failure_rate.threshold"),
        (BreakerConfig::default().with_failure_rate(FailureRate::new(0.5, ms(1), 1)), "failure_rate.window"),
        (BreakerConfig::default().with_failure_rate(FailureRate::new(0.5, ms(1000), 0)), "failure_rate.min_requests"),
    ];
    for (config, setting) in cases {
        let err = config.validate().expect_err(setting);
        assert_eq!(err.setting, setting);
        assert!(err.to_string().starts_with(&format!("invalid breaker setting {setting}: ")), "{err}");
    }
    BreakerConfig::default().validate().expect("the defaults are valid");
}

#[test]
fn new_settings_keep_the_state_and_apply_from_the_next_call() {
    let t0 = Instant::now();
    let mut c = circuit(BreakerConfig::default().with_failure_threshold(5).with_jitter(0.0));
    for _ in 0..3 {
        call(&mut c, t0, Outcome::Failure);
    }
    // Down to 2: the 3 failures counted stay counted, and the next one trips it.
    c.reconfigure(
        BreakerConfig::default().with_failure_threshold(2).with_jitter(0.0).with_open_time(ms(200), ms(1000)),
    );
    assert_eq!((c.state(), c.consecutive_failures()), (State::Closed, 3));
    call(&mut c, t0, Outcome::Failure);
    assert_eq!(c.state(), State::Open);
    assert_eq!(c.admit(t0 + ms(199)), Admission::Refused { until: Some(t0 + ms(200)) }, "the new open time");

    // A failure-rate window set later starts empty.
    let mut c = circuit(BreakerConfig::default().with_failure_threshold(100).with_jitter(0.0));
    let rate = FailureRate::new(0.5, Duration::from_secs(10), 4);
    c.reconfigure(BreakerConfig::default().with_failure_threshold(100).with_failure_rate(rate).with_jitter(0.0));
    for outcome in [Outcome::Success, Outcome::Failure, Outcome::Success] {
        call(&mut c, t0, outcome);
    }
    assert_eq!(c.state(), State::Closed, "3 calls, below the minimum of 4");
    call(&mut c, t0, Outcome::Failure);
    assert_eq!(c.state(), State::Open, "2 of 4 failed");
}

/// The service breaker's defaults for the rate: 50% of at least 20 calls in 10 s, and no
/// consecutive threshold, so that only the window decides.
fn rate_only() -> Circuit {
    let rate = FailureRate::new(0.5, Duration::from_secs(10), 20);
    circuit(BreakerConfig::default().with_failure_threshold(0).with_failure_rate(rate))
}

#[test]
fn after_30_s_of_successes_it_takes_half_a_window_of_failures_to_open() {
    // 10 calls/s. The window slid from its first bucket 20 s ago: overwriting the oldest
    // bucket once moved every bucket's place, and 21 failures in 2 s opened it.
    let t0 = Instant::now();
    let mut c = rate_only();
    for i in 0..300 {
        call(&mut c, t0 + ms(100 * i), Outcome::Success);
    }
    let mut failures = 0;
    for i in 300..500 {
        call(&mut c, t0 + ms(100 * i), Outcome::Failure);
        failures += 1;
        if c.state() == State::Open {
            break;
        }
    }
    assert_eq!(c.state(), State::Open);
    // The 10 s window holds ~100 calls; half of them failing takes ~50 failures (the
    // bucket being filled counts in full, so 45 to 51).
    assert!((45..=51).contains(&failures), "opened after {failures} failures");
}

#[test]
fn at_3_calls_a_second_after_30_s_of_successes_60_s_of_failures_open_it() {
    // The window holds 30 calls at 3/s; where buckets shifted it held too few to reach 20.
    let t0 = Instant::now();
    let mut c = rate_only();
    for i in 0..90 {
        call(&mut c, t0 + ms(333 * i), Outcome::Success);
    }
    let mut failures = 0;
    for i in 90..270 {
        call(&mut c, t0 + ms(333 * i), Outcome::Failure);
        failures += 1;
        if c.state() == State::Open {
            break;
        }
    }
    assert_eq!(c.state(), State::Open, "60 s of failures at 3/s");
    assert!(failures <= 18, "opened after {failures} failures: half of the 30 calls a window holds is 15");
}

#[test]
fn a_steady_30_percent_failure_rate_never_trips_a_50_percent_breaker() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(30);
    let t0 = Instant::now();
    let mut c = rate_only();
    // Ten minutes at 10 calls/s, each failing with probability 0.3: over a window of 100
    // calls, 50 failures is 4.4 standard deviations above the mean.
    for i in 0..6000u64 {
        let outcome = if rng.random_bool(0.3) { Outcome::Failure } else { Outcome::Success };
        call(&mut c, t0 + ms(100 * i), outcome);
    }
    assert_eq!(c.transitions(), 0, "spurious trips");
}
