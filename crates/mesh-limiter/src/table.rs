//! Which bucket a call draws from: the method's (or the server's), and, per caller, the
//! caller's own, in a table with a cap and idle expiry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::bucket::Bucket;
use crate::config::{Limit, LimiterConfig, PerCaller};

/// The buckets of one configuration. A new configuration builds a new table from the old,
/// keeping each bucket whose limit did not change and carrying over what the others held.
#[derive(Debug)]
pub(crate) struct Table {
    pub(crate) config: LimiterConfig,
    /// The server's bucket, shared by every method without an override (not per caller).
    default: Arc<Bucket>,
    methods: HashMap<String, Arc<Bucket>>,
    callers: Option<Callers>,
}

/// Per-caller buckets: one per caller and limit scope, at most `max_callers` callers.
#[derive(Debug)]
struct Callers {
    settings: PerCaller,
    entries: Mutex<CallerMap>,
}

/// A caller and the scope it calls in: a method path, or "" for the default limit.
type CallerScope = (Arc<str>, Arc<str>);

#[derive(Debug, Default)]
struct CallerMap {
    /// Each caller's bucket per scope, and when it was last used.
    buckets: HashMap<CallerScope, (Arc<Bucket>, Instant)>,
    /// Callers beyond the cap share these, one per scope.
    overflow: HashMap<Arc<str>, Arc<Bucket>>,
    /// When idle entries were last swept.
    swept: Option<Instant>,
}

/// The scope a call is counted in: a method with its own limit, or "" for the default.
fn scope_of<'a>(config: &LimiterConfig, path: &'a str) -> &'a str {
    if config.methods.contains_key(path) { path } else { "" }
}

impl Table {
    pub(crate) fn new(config: LimiterConfig, previous: Option<&Table>) -> Self {
        let keep = |old: Option<&Arc<Bucket>>, limit: Limit| match old {
            Some(b) if b.limit == limit => b.clone(),
            Some(b) => Arc::new(b.renewed(limit)),
            None => Arc::new(Bucket::full(limit)),
        };
        let default = keep(previous.map(|p| &p.default), config.default);
        let methods = config
            .methods
            .iter()
            .map(|(path, limit)| (path.clone(), keep(previous.and_then(|p| p.methods.get(path)), *limit)))
            .collect();
        let callers = config.per_caller.clone().map(|settings| {
            // Callers' buckets carry over too: an entry is renewed when first used under
            // the new limits (see `caller_bucket`).
            let entries = previous
                .and_then(|p| p.callers.as_ref())
                .map(|c| std::mem::take(&mut *lock(&c.entries)))
                .unwrap_or_default();
            Callers { settings, entries: Mutex::new(entries) }
        });
        Table { config, default, methods, callers }
    }

    /// The bucket of a call to `path` from `caller` (when limits are per caller).
    pub(crate) fn bucket(&self, path: &str, caller: Option<&str>) -> Arc<Bucket> {
        match (&self.callers, caller) {
            (Some(callers), Some(caller)) => self.caller_bucket(callers, path, caller),
            (Some(callers), None) => self.caller_bucket(callers, path, ""),
            (None, _) => self.methods.get(path).unwrap_or(&self.default).clone(),
        }
    }

    fn caller_bucket(&self, callers: &Callers, path: &str, caller: &str) -> Arc<Bucket> {
        let limit = *self.config.limit_of(path);
        let scope = scope_of(&self.config, path);
        let now = Instant::now();
        let mut map = lock(&callers.entries);
        let key: CallerScope = (caller.into(), scope.into());
        if let Some((bucket, used)) = map.buckets.get_mut(&key) {
            *used = now;
            if bucket.limit != limit {
                *bucket = Arc::new(bucket.renewed(limit));
            }
            return bucket.clone();
        }
        let settings = &callers.settings;
        if map.buckets.len() >= settings.max_callers {
            sweep(&mut map, now, settings.idle);
        }
        if map.buckets.len() >= settings.max_callers {
            let overflow = map.overflow.entry(key.1).or_insert_with(|| Arc::new(Bucket::full(limit)));
            if overflow.limit != limit {
                *overflow = Arc::new(overflow.renewed(limit));
            }
            return overflow.clone();
        }
        let bucket = Arc::new(Bucket::full(limit));
        map.buckets.insert(key, (bucket.clone(), now));
        bucket
    }

    /// How many callers have buckets of their own now.
    pub(crate) fn callers(&self) -> usize {
        self.callers.as_ref().map_or(0, |c| lock(&c.entries).buckets.len())
    }
}

/// Drops the entries idle for `idle`, at most once per tenth of it (a full table would
/// otherwise be walked on every new caller).
fn sweep(map: &mut CallerMap, now: Instant, idle: Duration) {
    if map.swept.is_some_and(|at| now.saturating_duration_since(at) < idle / 10) {
        return;
    }
    map.swept = Some(now);
    map.buckets.retain(|_, (_, used)| now.saturating_duration_since(*used) < idle);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves a map behind; it is still valid.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests;
