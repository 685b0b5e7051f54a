//! Which bucket a call draws from: the method's (or the server's), and, per caller, the
//! caller's own, in a table with a cap and idle expiry.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::Scope;
use crate::bucket::Bucket;
use crate::config::{CallerKey, Limit, LimiterConfig, PerCaller};

/// Who a call comes from, borrowed from the request: looking a caller up allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Caller<'a> {
    /// The peer's address (none over a transport without one).
    Ip(Option<IpAddr>),
    /// The metadata key's value (none when the call does not carry it).
    Key(Option<&'a str>),
}

impl std::fmt::Display for Caller<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Ip(Some(ip)) => ip.fmt(f),
            Caller::Ip(None) => f.write_str("an unknown address"),
            Caller::Key(None) => f.write_str("callers without the key"),
            Caller::Key(Some(key)) => f.write_str(key),
        }
    }
}

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

/// Per-caller buckets, at most `max_callers` callers, by the kind of key that tells them
/// apart.
#[derive(Debug)]
struct Callers {
    settings: PerCaller,
    map: CallerMap,
}

#[derive(Debug)]
enum CallerMap {
    Ips(Mutex<Entries<IpAddr>>),
    /// By the value of the metadata key `header` (parsed once, not per call).
    Keys(Mutex<Entries<Box<str>>>, Option<http::HeaderName>),
}

/// Scoped buckets: each scope (a method path with a limit of its own, or `None` for the
/// default limit) its bucket. A caller calls in one or a few scopes, so a list is searched.
type Scoped = Vec<(Option<Box<str>>, Arc<Bucket>)>;

#[derive(Debug)]
struct Entries<K> {
    /// Each caller's buckets, and when it last called.
    callers: HashMap<K, (Scoped, Instant)>,
    /// The buckets of calls that do not say who they are from (not counted as a caller).
    unknown: Scoped,
    /// Callers beyond the cap share these.
    overflow: Scoped,
    /// When idle callers were last swept.
    swept: Option<Instant>,
}

impl<K> Default for Entries<K> {
    fn default() -> Self {
        Entries { callers: HashMap::new(), unknown: Vec::new(), overflow: Vec::new(), swept: None }
    }
}

/// The scope a call is counted in: a method with its own limit, or `None` for the default.
fn scope_of<'a>(config: &LimiterConfig, path: &'a str) -> Option<&'a str> {
    config.methods.contains_key(path).then_some(path)
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
            // Callers' buckets carry over when callers are told apart the same way: a
            // bucket is renewed when first used under the new limits (see `scoped`).
            let old = previous.and_then(|p| p.callers.as_ref()).map(|c| &c.map);
            let map = match (&settings.key, old) {
                (CallerKey::PeerIp, Some(CallerMap::Ips(old))) => CallerMap::Ips(Mutex::new(take(old))),
                (CallerKey::PeerIp, _) => CallerMap::Ips(Mutex::default()),
                (CallerKey::Metadata(key), old) => {
                    let entries = match old {
                        Some(CallerMap::Keys(old, _)) if old_key_is(previous, &settings.key) => take(old),
                        _ => Entries::default(),
                    };
                    // `validate` has checked that the key is a header name.
                    CallerMap::Keys(Mutex::new(entries), http::HeaderName::from_bytes(key.as_bytes()).ok())
                }
            };
            Callers { settings, map }
        });
        Table { config, default, methods, callers }
    }

    /// Who `request` comes from, when limits are per caller.
    pub(crate) fn caller<'r, B>(&self, request: &'r http::Request<B>) -> Option<Caller<'r>> {
        match &self.callers.as_ref()?.map {
            CallerMap::Ips(_) => Some(Caller::Ip(
                request
                    .extensions()
                    .get::<tonic::transport::server::TcpConnectInfo>()
                    .and_then(|info| info.remote_addr())
                    .map(|addr| caller_ip(addr.ip())),
            )),
            CallerMap::Keys(_, header) => {
                let value = header.as_ref().and_then(|h| request.headers().get(h));
                Some(Caller::Key(
                    value
                        .and_then(|v| v.to_str().ok())
                        .filter(|v| !v.is_empty() && v.len() <= crate::config::MAX_CALLER_KEY_BYTES),
                ))
            }
        }
    }

    /// The bucket every call to `path` draws from, whoever it comes from: the method's, or
    /// the server's.
    pub(crate) fn shared_bucket(&self, path: &str) -> (&Arc<Bucket>, Scope) {
        match self.methods.get(path) {
            Some(bucket) => (bucket, Scope::Method),
            None => (&self.default, Scope::Server),
        }
    }

    /// What tells callers apart, in words for a rejection (never the caller's key itself,
    /// which may be a credential).
    pub(crate) fn caller_kind(&self) -> Option<String> {
        self.callers.as_ref().map(|c| match &c.settings.key {
            CallerKey::PeerIp => "its address".to_string(),
            CallerKey::Metadata(key) => format!("its {key}"),
        })
    }

    /// Runs `then` on the bucket of a call to `path` from `caller` (when limits are per
    /// caller), while the bucket is found: a caller's bucket under the table's lock, the
    /// server's and methods' buckets as they are. Nothing is cloned unless `then` clones
    /// it: a shared reference count would be one more cache line that every core writes on
    /// every call.
    pub(crate) fn with_bucket<R>(
        &self,
        path: &str,
        caller: Option<Caller<'_>>,
        then: impl FnOnce(&Arc<Bucket>, Scope) -> R,
    ) -> R {
        let Some(callers) = &self.callers else {
            let (bucket, scope) = self.shared_bucket(path);
            return then(bucket, scope);
        };
        let then = |bucket: &Arc<Bucket>| then(bucket, Scope::Caller);
        let lookup = Lookup {
            config: &self.config,
            settings: &callers.settings,
            scope: scope_of(&self.config, path),
            limit: callers.settings.limit.unwrap_or(*self.config.limit_of(path)),
        };
        match (&callers.map, caller) {
            (CallerMap::Ips(entries), Some(Caller::Ip(Some(ip)))) => {
                lookup.in_entries(&mut lock(entries), &ip, || ip, then)
            }
            (CallerMap::Keys(entries, _), Some(Caller::Key(Some(key)))) => {
                lookup.in_entries(&mut lock(entries), key, || key.into(), then)
            }
            (CallerMap::Ips(entries), _) => then(lookup.scoped(&mut lock(entries).unknown)),
            (CallerMap::Keys(entries, _), _) => then(lookup.scoped(&mut lock(entries).unknown)),
        }
    }

    /// How many callers have buckets of their own now.
    pub(crate) fn callers(&self) -> usize {
        match self.callers.as_ref().map(|c| &c.map) {
            Some(CallerMap::Ips(entries)) => lock(entries).callers.len(),
            Some(CallerMap::Keys(entries, _)) => lock(entries).callers.len(),
            None => 0,
        }
    }
}

/// The address that names a caller: an IPv4 address (also when mapped into IPv6), or the
/// /64 an IPv6 address is in, since one host commonly holds a whole /64 and could otherwise
/// be as many callers as it has addresses.
fn caller_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// Whether the previous table told callers apart by the same key.
fn old_key_is(previous: Option<&Table>, key: &CallerKey) -> bool {
    previous.and_then(|p| p.config.per_caller.as_ref()).is_some_and(|p| &p.key == key)
}

fn take<K>(entries: &Mutex<Entries<K>>) -> Entries<K> {
    std::mem::take(&mut *lock(entries))
}

/// One call's lookup in the per-caller table.
struct Lookup<'a> {
    config: &'a LimiterConfig,
    settings: &'a PerCaller,
    scope: Option<&'a str>,
    limit: Limit,
}

impl Lookup<'_> {
    /// Runs `then` on the bucket of `who`, created (as `owned()`) when it has none and the
    /// cap allows.
    fn in_entries<K, Q, R>(
        &self,
        map: &mut Entries<K>,
        who: &Q,
        owned: impl FnOnce() -> K,
        then: impl FnOnce(&Arc<Bucket>) -> R,
    ) -> R
    where
        K: Borrow<Q> + Hash + Eq,
        Q: Hash + Eq + ?Sized,
    {
        let now = Instant::now();
        if let Some((buckets, used)) = map.callers.get_mut(who) {
            *used = now;
            return then(self.scoped(buckets));
        }
        if map.callers.len() >= self.settings.max_callers {
            sweep(map, now, self.settings.idle);
        }
        if map.callers.len() >= self.settings.max_callers {
            return then(self.scoped(&mut map.overflow));
        }
        let (buckets, _) = map.callers.entry(owned()).or_insert_with(|| (Vec::new(), now));
        then(self.scoped(buckets))
    }

    /// The bucket of this lookup's scope in `buckets`, renewed if its limit changed. A new
    /// scope drops those no longer configured, so a caller's list stays as short as the
    /// configuration.
    fn scoped<'b>(&self, buckets: &'b mut Scoped) -> &'b Arc<Bucket> {
        let found = buckets.iter().position(|(scope, _)| scope.as_deref() == self.scope);
        let at = match found {
            Some(at) => at,
            None => {
                buckets.retain(|(scope, _)| scope.as_deref().is_none_or(|path| self.config.methods.contains_key(path)));
                buckets.push((self.scope.map(Box::from), Arc::new(Bucket::full(self.limit))));
                buckets.len() - 1
            }
        };
        let bucket = &mut buckets[at].1;
        if bucket.limit != self.limit {
            *bucket = Arc::new(bucket.renewed(self.limit));
        }
        bucket
    }
}

/// Drops the callers idle for `idle`, at most once per tenth of it (a full table would
/// otherwise be walked on every new caller).
fn sweep<K>(map: &mut Entries<K>, now: Instant, idle: Duration) {
    if map.swept.is_some_and(|at| now.saturating_duration_since(at) < idle / 10) {
        return;
    }
    map.swept = Some(now);
    map.callers.retain(|_, (_, used)| now.saturating_duration_since(*used) < idle);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves a map behind; it is still valid.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests;
