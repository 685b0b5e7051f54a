//! A circuit shared by every clone of a breaker, cheap on the closed path.
//!
//! The circuit lives behind a mutex; atomics mirror what the closed path needs to know, so
//! that admitting a call to a closed circuit and recording its success take no lock and read
//! no clock: `closed` (calls go through), `clean` (closed with no failure counted and no
//! window to keep, so a success changes nothing) and `batch` (the same, but with a failure
//! rate window: successes wait in a counter and go into the window 64 at a time, or when the
//! next failure takes the lock, stamped with that moment). Failures, and everything while
//! open or half-open, take the lock; they are rare when all is well.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::config::BreakerConfig;
use crate::state::{Admission, Circuit, Outcome, State};

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) name: Arc<str>,
    closed: AtomicBool,
    clean: AtomicBool,
    batch: AtomicBool,
    /// Successes of calls let through while `batch` held, not yet in the window.
    batched: AtomicU64,
    circuit: Mutex<Circuit>,
}

/// How many successes wait before they go into the window.
const BATCH: u64 = 64;

impl Shared {
    pub(crate) fn new(name: Arc<str>, config: BreakerConfig) -> Self {
        let circuit = Circuit::new(config, rand::random());
        Shared {
            name,
            closed: AtomicBool::new(true),
            clean: AtomicBool::new(circuit.is_clean()),
            batch: AtomicBool::new(circuit.is_batchable()),
            batched: AtomicU64::new(0),
            circuit: Mutex::new(circuit),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Circuit> {
        // A panic while holding the lock leaves a circuit in a valid state.
        self.circuit.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks to let a call through now.
    pub(crate) fn admit(&self) -> Admission {
        if self.closed.load(Ordering::Relaxed) {
            return Admission::Allowed;
        }
        let now = now();
        let mut circuit = self.lock();
        let before = circuit.state();
        let admission = circuit.admit(now);
        self.after(before, &circuit, now);
        admission
    }

    /// Records how a call let through by [`Shared::admit`] ended.
    pub(crate) fn record(&self, admitted: Admission, outcome: Outcome) {
        let mut batched_here = false;
        if admitted == Admission::Allowed {
            match outcome {
                // Changes nothing for a call let through while closed.
                Outcome::Ignored => return,
                Outcome::Success if self.clean.load(Ordering::Relaxed) => return,
                Outcome::Success if self.batch.load(Ordering::Relaxed) => {
                    if self.batched.fetch_add(1, Ordering::Relaxed) + 1 < BATCH {
                        return;
                    }
                    batched_here = true;
                }
                _ => {}
            }
        }
        let now = now();
        let mut circuit = self.lock();
        let before = circuit.state();
        let waiting = self.batched.swap(0, Ordering::Relaxed);
        if waiting > 0 {
            circuit.record_successes(now, waiting);
        }
        if !batched_here {
            circuit.record(now, admitted, outcome);
        }
        self.after(before, &circuit, now);
    }

    pub(crate) fn state(&self) -> State {
        self.lock().state()
    }

    /// New settings (valid ones) for the circuit, from the next call on.
    pub(crate) fn reconfigure(&self, config: BreakerConfig) {
        let now = now();
        let mut circuit = self.lock();
        let before = circuit.state();
        // Successes waiting for the old window go in first.
        let waiting = self.batched.swap(0, Ordering::Relaxed);
        circuit.record_successes(now, waiting);
        circuit.reconfigure(config);
        self.after(before, &circuit, now);
    }

    pub(crate) fn config(&self) -> BreakerConfig {
        self.lock().config().clone()
    }

    pub(crate) fn transitions(&self) -> u64 {
        self.lock().transitions()
    }

    /// How long until an open circuit lets a probe through.
    pub(crate) fn retry_in(&self) -> Option<Duration> {
        self.lock().open_until().map(|until| until.saturating_duration_since(now()))
    }

    /// Mirrors the circuit into the atomics, and logs a change of state.
    fn after(&self, before: State, circuit: &Circuit, now: Instant) {
        self.closed.store(circuit.state() == State::Closed, Ordering::Relaxed);
        self.clean.store(circuit.is_clean(), Ordering::Relaxed);
        self.batch.store(circuit.is_batchable(), Ordering::Relaxed);
        match (before, circuit.state()) {
            (State::Closed, State::Open) => warn!(
                "circuit of {} opened: its calls failed; first probe in {}ms",
                self.name,
                circuit.open_until().map_or(0, |u| u.saturating_duration_since(now).as_millis())
            ),
            (State::HalfOpen, State::Open) => warn!(
                "circuit of {} opened again: a probe failed; next probe in {}ms",
                self.name,
                circuit.open_until().map_or(0, |u| u.saturating_duration_since(now).as_millis())
            ),
            (State::HalfOpen, State::Closed) => info!("circuit of {} closed: probes succeeded", self.name),
            _ => {}
        }
    }
}

/// The time, from tokio's clock so that tests with paused time drive the circuit.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::FailureRate;

    #[tokio::test(start_paused = true)]
    async fn successes_batched_over_seconds_count_when_they_came() {
        // The service breaker's defaults: 50% of at least 20 calls in 10 s. At 3 calls/s,
        // 64 batched successes span 21 s: stamped all at the next failure, they outweighed
        // the failures of the real 10 s window, and it opened after 26 failures, not ~15.
        let rate = FailureRate::new(0.5, Duration::from_secs(10), 20);
        let shared =
            Shared::new("service".into(), BreakerConfig::default().with_failure_threshold(0).with_failure_rate(rate));
        let tick = Duration::from_millis(333);
        for _ in 0..90 {
            let admitted = shared.admit();
            shared.record(admitted, Outcome::Success);
            tokio::time::advance(tick).await;
        }
        let mut failures = 0;
        while shared.state() == State::Closed && failures < 60 {
            let admitted = shared.admit();
            shared.record(admitted, Outcome::Failure);
            failures += 1;
            tokio::time::advance(tick).await;
        }
        assert_eq!(shared.state(), State::Open);
        assert!(failures <= 18, "opened after {failures} failures: half of the 30 calls a window holds is 15");
    }
}
