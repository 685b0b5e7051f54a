//! The circuit itself: a pure, synchronous state machine that is told the time.
//!
//! Closed → Open after `failure_threshold` consecutive failures (unless it is 0), or when
//! the failure rate over a sliding window passes its threshold. Open → HalfOpen once the open time has
//! passed (checked when a call asks to be let through). HalfOpen lets `half_open_probes`
//! calls through; `success_threshold` successes close the circuit, any failure opens it
//! again. The open time doubles on each trip that follows another without a long enough
//! closed spell between them (as Envoy's outlier detection multiplies its ejection time),
//! capped at `max_open_time`, and a random share of up to `jitter` is taken off it.
//!
//! Outcomes of calls let through while closed but ending after the circuit opened are
//! dropped: the circuit has already acted on that endpoint's trouble, and late successes
//! must not close it without a probe.

use std::time::{Duration, Instant};

use crate::config::BreakerConfig;

/// Where a circuit stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Calls go through; failures are counted.
    Closed,
    /// Calls are refused until the open time has passed.
    Open,
    /// A few probe calls go through; their outcome decides.
    HalfOpen,
}

impl State {
    /// `closed`, `open` or `half-open`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half-open",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a call ended, as a classifier judged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint served it.
    Success,
    /// The endpoint failed it (a status that counts, a broken connection).
    Failure,
    /// Neither: the caller cancelled, or a status that says nothing of the endpoint's health
    /// (RESOURCE_EXHAUSTED is pushback, not failure). A probe that ends so frees its place.
    Ignored,
}

/// What [`Circuit::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: go ahead.
    Allowed,
    /// Half-open: go ahead as a probe of this half-open spell; report its outcome with it.
    Probe(u64),
    /// Open (or half-open with every probe out): refused, until the given time at the
    /// earliest.
    Refused {
        /// When the circuit lets a probe through, if it is open; `None` while probes are out.
        until: Option<Instant>,
    },
}

/// A circuit breaker's state machine. Pure: every method takes the time, nothing sleeps.
#[derive(Debug, Clone)]
pub struct Circuit {
    config: BreakerConfig,
    state: State,
    /// Consecutive failures while closed.
    consecutive: u32,
    window: Option<Window>,
    /// When the open spell ends.
    open_until: Option<Instant>,
    /// Trips in a row: the open time is `open_time * 2^streak`.
    streak: u32,
    /// When the circuit last closed, to tell a repeated trip from a fresh one.
    closed_at: Option<Instant>,
    /// Which half-open spell probes belong to.
    spell: u64,
    probes_out: u32,
    probe_successes: u32,
    /// Changes of state so far.
    transitions: u64,
    rng: u64,
    /// When an outcome was last recorded: a batch of successes came in since.
    last_recorded: Option<Instant>,
}

impl Circuit {
    /// A closed circuit. `config` must be valid ([`BreakerConfig::validate`]); `seed` feeds
    /// the jitter, so that tests can fix it.
    pub fn new(config: BreakerConfig, seed: u64) -> Self {
        let window = config.failure_rate.map(|r| Window::new(r.window));
        Circuit {
            config,
            state: State::Closed,
            consecutive: 0,
            window,
            open_until: None,
            streak: 0,
            closed_at: None,
            spell: 0,
            probes_out: 0,
            probe_successes: 0,
            transitions: 0,
            rng: seed | 1,
            last_recorded: None,
        }
    }

    /// The settings.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// New settings from now on (`config` must be valid). The state stays: failures counted
    /// so far count toward the new threshold (the next failure trips if they reach it), an
    /// open spell ends when it was due to, and the next trip takes the new times. A new
    /// failure-rate window (another length, or none before) starts empty.
    pub fn reconfigure(&mut self, config: BreakerConfig) {
        let window_of = |c: &BreakerConfig| c.failure_rate.map(|r| r.window);
        if window_of(&config) != window_of(&self.config) {
            self.window = config.failure_rate.map(|r| Window::new(r.window));
        }
        self.config = config;
    }

    /// The state, as last moved by [`Circuit::admit`] or [`Circuit::record`]: an open
    /// circuit whose time has passed reads Open until a call asks to go through.
    pub fn state(&self) -> State {
        self.state
    }

    /// Changes of state so far.
    pub fn transitions(&self) -> u64 {
        self.transitions
    }

    /// Consecutive failures counted while closed.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }

    /// When the open spell ends, while open.
    pub fn open_until(&self) -> Option<Instant> {
        self.open_until.filter(|_| self.state == State::Open)
    }

    /// Whether a success recorded now would change nothing: closed, no failure counted and
    /// no window to keep. The shared breaker skips its lock on this path.
    pub fn is_clean(&self) -> bool {
        self.state == State::Closed && self.consecutive == 0 && self.window.is_none()
    }

    /// Whether successes may be counted later, in a batch: closed, no failure counted, and a
    /// window kept (where a success only adds to a count).
    pub fn is_batchable(&self) -> bool {
        self.state == State::Closed && self.consecutive == 0 && self.window.is_some()
    }

    /// Records `n` successes of calls let through while closed since the circuit last
    /// recorded anything, up to `now` (a batch of [`Circuit::record`] with
    /// [`Admission::Allowed`] and [`Outcome::Success`]): spread evenly over that time, so
    /// that successes batched over seconds count in the buckets they came in, not all in the
    /// newest (where they outweighed the failures that followed them).
    pub fn record_successes(&mut self, now: Instant, n: u64) {
        let since = self.last_recorded.replace(now);
        if self.state != State::Closed || n == 0 {
            return;
        }
        self.consecutive = 0;
        if let Some(window) = &mut self.window {
            window.add_spread(since.unwrap_or(now), now, n);
        }
    }

    /// Asks to let a call through at `now`.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            State::Closed => Admission::Allowed,
            State::Open => match self.open_until {
                Some(until) if now < until => Admission::Refused { until: Some(until) },
                _ => {
                    self.move_to(State::HalfOpen);
                    self.spell += 1;
                    self.probes_out = 0;
                    self.probe_successes = 0;
                    self.admit(now)
                }
            },
            State::HalfOpen => {
                if self.probes_out + self.probe_successes < self.config.half_open_probes {
                    self.probes_out += 1;
                    Admission::Probe(self.spell)
                } else {
                    Admission::Refused { until: None }
                }
            }
        }
    }

    /// Records how a call that [`Circuit::admit`] let through ended. `admitted` is what
    /// `admit` returned for it.
    pub fn record(&mut self, now: Instant, admitted: Admission, outcome: Outcome) {
        self.last_recorded = Some(now);
        match admitted {
            Admission::Refused { .. } => {}
            Admission::Allowed => {
                if self.state != State::Closed {
                    return;
                }
                if let Some(window) = &mut self.window {
                    window.add(now, outcome);
                }
                match outcome {
                    Outcome::Success => self.consecutive = 0,
                    Outcome::Failure => {
                        self.consecutive += 1;
                        let threshold = self.config.failure_threshold;
                        if (threshold > 0 && self.consecutive >= threshold) || self.rate_exceeded(now) {
                            self.trip(now);
                        }
                    }
                    Outcome::Ignored => {}
                }
            }
            Admission::Probe(spell) => {
                if self.state != State::HalfOpen || spell != self.spell {
                    return;
                }
                self.probes_out = self.probes_out.saturating_sub(1);
                match outcome {
                    Outcome::Success => {
                        self.probe_successes += 1;
                        if self.probe_successes >= self.config.success_threshold {
                            self.close(now);
                        }
                    }
                    Outcome::Failure => self.trip(now),
                    Outcome::Ignored => {}
                }
            }
        }
    }

    /// The open time of the trip that comes next, before jitter.
    pub fn next_open_time(&self, now: Instant) -> Duration {
        let streak = if self.state == State::Closed && self.is_fresh_trip(now) { 0 } else { self.streak };
        self.config.open_time.saturating_mul(1u32 << streak.min(20)).min(self.config.max_open_time)
    }

    fn rate_exceeded(&mut self, now: Instant) -> bool {
        let (Some(window), Some(rate)) = (&mut self.window, &self.config.failure_rate) else { return false };
        let (calls, failures) = window.totals(now);
        calls >= u64::from(rate.min_requests) && failures as f64 >= rate.threshold * calls as f64
    }

    /// A trip from closed after a closed spell of at least `max_open_time` starts the
    /// doubling over.
    fn is_fresh_trip(&self, now: Instant) -> bool {
        self.closed_at.is_none_or(|at| now.saturating_duration_since(at) >= self.config.max_open_time)
    }

    fn trip(&mut self, now: Instant) {
        let base = self.next_open_time(now);
        if self.state == State::Closed && self.is_fresh_trip(now) {
            self.streak = 0;
        }
        self.streak = self.streak.saturating_add(1);
        let cut = base.mul_f64(self.config.jitter * self.next_unit());
        self.open_until = Some(now + base.saturating_sub(cut));
        self.consecutive = 0;
        if let Some(window) = &mut self.window {
            window.clear();
        }
        self.move_to(State::Open);
    }

    fn close(&mut self, now: Instant) {
        self.closed_at = Some(now);
        self.open_until = None;
        self.consecutive = 0;
        self.move_to(State::Closed);
    }

    fn move_to(&mut self, state: State) {
        if self.state != state {
            self.state = state;
            self.transitions += 1;
        }
    }

    /// A number in [0, 1) from xorshift64*.
    fn next_unit(&mut self) -> f64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Calls and failures over a sliding window, in ten buckets.
///
/// Bucket `n` covers `[origin + n·bucket, origin + (n+1)·bucket)` from a fixed origin (the
/// first time ever recorded), and lives in slot `n % 10`: the window at `now` is the bucket
/// holding `now` and the nine before it. The origin never moves, so overwriting the oldest
/// bucket shifts nothing else.
#[derive(Debug, Clone)]
struct Window {
    bucket: Duration,
    origin: Option<Instant>,
    /// (number of the bucket, calls, failures)
    buckets: [(Option<u64>, u64, u64); 10],
}

impl Window {
    fn new(window: Duration) -> Self {
        Window { bucket: (window / 10).max(Duration::from_millis(1)), origin: None, buckets: [(None, 0, 0); 10] }
    }

    fn add(&mut self, now: Instant, outcome: Outcome) {
        if outcome == Outcome::Ignored {
            return;
        }
        let slot = self.slot_for(now);
        slot.1 += 1;
        if outcome == Outcome::Failure {
            slot.2 += 1;
        }
    }

    /// Adds `n` successes that came evenly over `[from, to]`: to each bucket of the window
    /// its share of that time (what fell before the window's oldest bucket is gone already).
    fn add_spread(&mut self, from: Instant, to: Instant, n: u64) {
        let (first, last) = (self.number(from.min(to)), self.number(to));
        if first == last {
            self.slot_for(to).1 += n;
            return;
        }
        let origin = self.origin.unwrap_or(to);
        let bucket = self.bucket.as_nanos();
        let at = |t: Instant| t.saturating_duration_since(origin).as_nanos();
        let (start, end) = (at(from.min(to)), at(to));
        let total = (end - start).max(1);
        let oldest = first.max(last.saturating_sub(9));
        let share_of = |lo: u128, hi: u128| u64::try_from(u128::from(n) * hi.saturating_sub(lo) / total).unwrap_or(n);
        // What came within the window's buckets; the rest came before and is gone.
        let within = share_of(start.max(u128::from(oldest) * bucket), end);
        let mut given = 0u64;
        for number in oldest..=last {
            let share = if number == last {
                // What rounding left.
                within.saturating_sub(given)
            } else {
                share_of((u128::from(number) * bucket).max(start), ((u128::from(number) + 1) * bucket).min(end))
            };
            given += share;
            let slot = &mut self.buckets[(number % 10) as usize];
            if slot.0 != Some(number) {
                *slot = (Some(number), 0, 0);
            }
            slot.1 += share;
        }
    }

    /// The number of the bucket holding `now` (a time before the origin counts in bucket 0).
    fn number(&mut self, now: Instant) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        let n = now.saturating_duration_since(origin).as_nanos() / self.bucket.as_nanos();
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    fn slot_for(&mut self, now: Instant) -> &mut (Option<u64>, u64, u64) {
        let number = self.number(now);
        let slot = &mut self.buckets[(number % 10) as usize];
        if slot.0 != Some(number) {
            *slot = (Some(number), 0, 0);
        }
        slot
    }

    fn totals(&mut self, now: Instant) -> (u64, u64) {
        let current = self.number(now);
        self.buckets
            .iter()
            .filter(|b| b.0.is_some_and(|n| n <= current && current - n < 10))
            .fold((0, 0), |(c, f), b| (c + b.1, f + b.2))
    }

    fn clear(&mut self) {
        self.buckets = [(None, 0, 0); 10];
    }
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
