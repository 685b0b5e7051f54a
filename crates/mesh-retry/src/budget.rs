//! The retry budget: retries may add `ratio` of the calls made over a window, plus a
//! standing reserve of `min_per_sec` per second of it.
//!
//! Counted in ten buckets over the window, as tower's `TpsBudget` counts, with two
//! differences its reference model found. Buckets are numbered from a fixed origin: tower
//! starts the next bucket at the moment it notices time passed, so buckets drift and one
//! holding earlier retries was forgotten before the window had passed it, which let more
//! retries through than the window's calls allowed. And counts are in thousandths of a
//! retry: tower makes the ratio "one retry per ⌊1/ratio⌋ calls", so that 0.3 let 33% of
//! calls be retried and 0.03 one in 33.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// One retry, in the budget's units.
const RETRY: i64 = 1000;
const BUCKETS: usize = 10;

#[derive(Debug)]
pub(crate) struct Budget {
    /// What a call adds: the ratio, in thousandths of a retry (rounded down).
    deposit: i64,
    /// The standing reserve, in thousandths.
    reserve: i64,
    bucket: Duration,
    origin: Instant,
    /// Each slot's bucket number and net count.
    slots: Mutex<[(u64, i64); BUCKETS]>,
}

impl Budget {
    /// A budget over `window` (1 to 60 s): `ratio` of calls (0 to 10) plus `min_per_sec`.
    pub(crate) fn new(window: Duration, min_per_sec: u32, ratio: f32) -> Self {
        let deposit = (f64::from(ratio) * RETRY as f64).floor() as i64;
        let reserve = i64::from(min_per_sec).saturating_mul(window.as_secs() as i64).saturating_mul(RETRY);
        Budget {
            deposit,
            reserve,
            bucket: (window / BUCKETS as u32).max(Duration::from_millis(1)),
            origin: Instant::now(),
            slots: Mutex::new([(0, 0); BUCKETS]),
        }
    }

    /// A call was made.
    pub(crate) fn deposit(&self) {
        let now = self.number();
        let mut slots = self.lock();
        *Self::slot(&mut slots, now) += self.deposit;
    }

    /// Takes one retry from the budget, if it holds one.
    pub(crate) fn withdraw(&self) -> bool {
        let now = self.number();
        let mut slots = self.lock();
        let held: i64 = slots.iter().filter(|(n, _)| *n <= now && now - *n < BUCKETS as u64).map(|(_, c)| c).sum();
        if held + self.reserve < RETRY {
            return false;
        }
        *Self::slot(&mut slots, now) -= RETRY;
        true
    }

    /// The number of the bucket holding now.
    fn number(&self) -> u64 {
        let n = Instant::now().saturating_duration_since(self.origin).as_nanos() / self.bucket.as_nanos();
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    /// The count of bucket `number`, emptied if its slot held an older bucket.
    fn slot(slots: &mut [(u64, i64); BUCKETS], number: u64) -> &mut i64 {
        let slot = &mut slots[(number % BUCKETS as u64) as usize];
        if slot.0 != number {
            *slot = (number, 0);
        }
        &mut slot.1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [(u64, i64); BUCKETS]> {
        // A panic while holding the lock leaves counts behind; they are still valid.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}
