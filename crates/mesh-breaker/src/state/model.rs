//! The circuit against a deliberately naive reference model: every outcome kept in a plain
//! list of (time, outcome) pairs and the window counted from it afresh, and the state chart
//! of the module docs written out as it reads, with the trips of the current run of trips
//! kept as a list. Random time steps, random outcomes, calls held open across other calls.

use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::config::FailureRate;

/// The reference: what the module docs say, as plainly as it can be said.
struct Model {
    config: BreakerConfig,
    state: State,
    /// Outcomes recorded while closed since the last trip: (time, failed).
    events: Vec<(Instant, bool)>,
    /// The first time anything was recorded in the window: buckets count from here.
    origin: Option<Instant>,
    open_until: Option<Instant>,
    /// Trip times of the current run of trips (a trip after a long enough closed spell
    /// starts a new run).
    run: Vec<Instant>,
    closed_at: Option<Instant>,
    spell: u64,
    probes_out: u32,
    probe_successes: u32,
}

impl Model {
    fn new(config: BreakerConfig) -> Self {
        Model {
            config,
            state: State::Closed,
            events: Vec::new(),
            origin: None,
            open_until: None,
            run: Vec::new(),
            closed_at: None,
            spell: 0,
            probes_out: 0,
            probe_successes: 0,
        }
    }

    fn bucket_of(&self, t: Instant) -> u128 {
        let window = self.config.failure_rate.map_or(Duration::from_secs(1), |r| r.window);
        let bucket = (window / 10).max(Duration::from_millis(1));
        t.saturating_duration_since(self.origin.unwrap_or(t)).as_nanos() / bucket.as_nanos()
    }

    /// Consecutive failures: the failures at the end of the list of closed outcomes since the
    /// last success, counted afresh (Ignored outcomes are not in the list and break nothing).
    fn consecutive(&self, tail: &[(Instant, Option<bool>)]) -> u32 {
        tail.iter().rev().filter_map(|(_, o)| *o).take_while(|failed| *failed).count() as u32
    }

    fn admit(&mut self, now: Instant) -> Admission {
        if self.state == State::Open {
            let until = self.open_until.expect("open has an end");
            if now < until {
                return Admission::Refused { until: Some(until) };
            }
            self.state = State::HalfOpen;
            self.spell += 1;
            self.probes_out = 0;
            self.probe_successes = 0;
        }
        match self.state {
            State::Closed => Admission::Allowed,
            State::HalfOpen if self.probes_out + self.probe_successes < self.config.half_open_probes => {
                self.probes_out += 1;
                Admission::Probe(self.spell)
            }
            _ => Admission::Refused { until: None },
        }
    }

    fn record(
        &mut self,
        now: Instant,
        admitted: Admission,
        outcome: Outcome,
        closed_log: &mut Vec<(Instant, Option<bool>)>,
    ) {
        match admitted {
            Admission::Refused { .. } => {}
            Admission::Allowed if self.state == State::Closed => {
                let failed = match outcome {
                    Outcome::Success => Some(false),
                    Outcome::Failure => Some(true),
                    Outcome::Ignored => None,
                };
                closed_log.push((now, failed));
                if let Some(failed) = failed
                    && self.config.failure_rate.is_some()
                {
                    self.origin.get_or_insert(now);
                    self.events.push((now, failed));
                }
                if outcome != Outcome::Failure {
                    return;
                }
                let threshold = self.config.failure_threshold;
                let by_count = threshold > 0 && self.consecutive(closed_log) >= threshold;
                let by_rate = self.config.failure_rate.is_some_and(|rate| {
                    let current = self.bucket_of(now);
                    let within: Vec<bool> = self
                        .events
                        .iter()
                        .filter(|(t, _)| {
                            let b = self.bucket_of(*t);
                            b <= current && current - b < 10
                        })
                        .map(|(_, failed)| *failed)
                        .collect();
                    let failures = within.iter().filter(|f| **f).count();
                    within.len() >= rate.min_requests as usize
                        && failures as f64 >= rate.threshold * within.len() as f64
                });
                if by_count || by_rate {
                    self.trip(now, closed_log);
                }
            }
            Admission::Allowed => {}
            Admission::Probe(spell) if self.state == State::HalfOpen && spell == self.spell => {
                self.probes_out -= 1;
                match outcome {
                    Outcome::Success => {
                        self.probe_successes += 1;
                        if self.probe_successes >= self.config.success_threshold {
                            self.state = State::Closed;
                            self.closed_at = Some(now);
                            self.open_until = None;
                            closed_log.clear();
                        }
                    }
                    Outcome::Failure => self.trip(now, closed_log),
                    Outcome::Ignored => {}
                }
            }
            Admission::Probe(_) => {}
        }
    }

    fn trip(&mut self, now: Instant, closed_log: &mut Vec<(Instant, Option<bool>)>) {
        let fresh = self.state == State::Closed
            && self.closed_at.is_none_or(|at| now.saturating_duration_since(at) >= self.config.max_open_time);
        if fresh {
            self.run.clear();
        }
        let mut open = self.config.open_time;
        for _ in 0..self.run.len() {
            open = (open * 2).min(self.config.max_open_time);
        }
        self.run.push(now);
        self.open_until = Some(now + open.min(self.config.max_open_time));
        self.events.clear();
        closed_log.clear();
        self.state = State::Open;
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Time passes.
    Wait(u64),
    /// A call is let through (or not) and ends at once.
    Call(Outcome),
    /// A call is let through (or not) and held.
    Start,
    /// The held call at this position (mod the number held) ends.
    End(usize, Outcome),
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![3 => Just(Outcome::Success), 3 => Just(Outcome::Failure), 1 => Just(Outcome::Ignored)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u64..3000).prop_map(Op::Wait),
        1 => (0u64..40_000).prop_map(Op::Wait),
        8 => outcome().prop_map(Op::Call),
        2 => Just(Op::Start),
        2 => (any::<usize>(), outcome()).prop_map(|(i, o)| Op::End(i, o)),
    ]
}

fn config() -> impl Strategy<Value = BreakerConfig> {
    (0u32..6, prop::option::of((1u32..=10, 100u64..20_000, 1u32..30)), 100u64..5000, 0u32..6, 1u32..4, 1u32..4)
        .prop_filter_map("a valid config", |(threshold, rate, open_ms, doublings, probes, successes)| {
            let open = Duration::from_millis(open_ms);
            let mut c = BreakerConfig::default()
                .with_failure_threshold(threshold)
                .with_open_time(open, open * (1 << doublings))
                .with_jitter(0.0)
                .with_half_open(probes.max(successes), successes);
            if let Some((tenths, window_ms, min)) = rate {
                c = c.with_failure_rate(FailureRate::new(
                    f64::from(tenths) / 10.0,
                    Duration::from_millis(window_ms),
                    min,
                ));
            }
            c.validate().is_ok().then_some(c)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn the_circuit_does_what_the_reference_model_does(config in config(), ops in prop::collection::vec(op(), 1..300)) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut circuit = Circuit::new(config.clone(), 7);
        let mut model = Model::new(config);
        let mut log = Vec::new();
        let mut held: Vec<(Admission, Admission)> = Vec::new();
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Wait(ms) => now += Duration::from_millis(ms),
                Op::Call(outcome) => {
                    let (a, b) = (circuit.admit(now), model.admit(now));
                    prop_assert_eq!(a, b, "admission at step {}", step);
                    circuit.record(now, a, outcome);
                    model.record(now, b, outcome, &mut log);
                }
                Op::Start => {
                    let (a, b) = (circuit.admit(now), model.admit(now));
                    prop_assert_eq!(a, b, "admission at step {}", step);
                    held.push((a, b));
                }
                Op::End(i, outcome) => {
                    if held.is_empty() {
                        continue;
                    }
                    let (a, b) = held.remove(i % held.len());
                    circuit.record(now, a, outcome);
                    model.record(now, b, outcome, &mut log);
                }
            }
            prop_assert_eq!(circuit.state(), model.state, "state after step {}", step);
            prop_assert_eq!(circuit.open_until(), model.open_until.filter(|_| model.state == State::Open), "open until, step {}", step);
        }
    }
}
