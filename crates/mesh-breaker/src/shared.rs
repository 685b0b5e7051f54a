//! A circuit shared by every clone of a breaker, cheap on the closed path.
//!
//! The circuit lives behind a mutex; two atomics mirror what the closed path needs to
//! know, so that admitting a call to a closed circuit and recording its success take no
//! lock and read no clock: `closed` (calls go through) and `clean` (closed with no failure
//! counted and no window to keep, so a success changes nothing). Failures, and everything
//! while open or half-open, take the lock; they are rare when all is well.

use std::sync::atomic::{AtomicBool, Ordering};
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
    circuit: Mutex<Circuit>,
}

impl Shared {
    pub(crate) fn new(name: Arc<str>, config: BreakerConfig) -> Self {
        let circuit = Circuit::new(config, rand::random());
        Shared {
            name,
            closed: AtomicBool::new(true),
            clean: AtomicBool::new(circuit.is_clean()),
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
        if admitted == Admission::Allowed && outcome != Outcome::Failure && self.clean.load(Ordering::Relaxed) {
            return;
        }
        let now = now();
        let mut circuit = self.lock();
        let before = circuit.state();
        circuit.record(now, admitted, outcome);
        self.after(before, &circuit, now);
    }

    pub(crate) fn state(&self) -> State {
        self.lock().state()
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
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
