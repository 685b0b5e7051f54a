//! List-then-watch with resume: the primitive that discovery, the registry's self-watch and
//! config share. It lists a prefix (revision R; in pages at one revision when large),
//! watches from R+1 with progress notifications, and on anything that makes its view
//! doubtful (a watch error or a stream that ends, as etcd-client's does when etcd dies; a
//! compaction; a different cluster id; no answer to a progress request) it backs off and
//! lists again, handing the consumer the full set (a [`WatchEvent::Reset`]) to diff
//! against. A listing that keeps failing is warned about once, and its recovery said.
//!
//! Only a listing decides that etcd was restored or rebuilt (another cluster id, or a
//! revision behind the view's): listings are linearizable, while a watch may be served by a
//! follower that lags behind the member that answered the listing, whose answers then carry
//! an older revision. Such a watch is waited on as it catches up (its events already in the
//! view are skipped); one that stays behind for several progress intervals is dropped and
//! the prefix listed again, which is no rebuild. A restore restarts etcd, which ends every
//! watch, so the listing after it sees the older revision.
//!
//! It is pull-based: the consumer's own task calls [`ListWatch::next`], which returns only
//! events and retries everything else forever, with jittered backoff. How stale the view
//! is can be read at any time from [`ListWatch::status`].
//!
//! Every event of a watch response is delivered, in order: the events of one transaction
//! (several puts, a `del --prefix`, a lease revoke that takes several keys) share one
//! revision, so the view's revision moves once per response, after all of them. A progress
//! notification only confirms that the view is alive; it never moves the revision, because
//! some etcd releases answer a progress request with a revision ahead of the events still
//! on their way, and skipping those would lose them.
//!
//! [`ListWatch::next`] is cancel-safe: a backoff is a deadline kept in `self`, so a consumer
//! that polls `next` in a `select!` beside a faster timer still lists once the deadline
//! passes, instead of restarting the wait on every call.

use std::collections::VecDeque;
use std::time::Duration;

use etcd_client::EventType;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::client::WatchStart;
use crate::{Backoff, ErrorKind, Etcd, EtcdError, KeyValue};

/// A change under the watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The whole set under the prefix at `revision`, after a (re)list: replace the view
    /// with it. An empty `kvs` means etcd holds nothing there.
    Reset {
        /// The keys, in key order.
        kvs: Vec<KeyValue>,
        /// The revision of the listing.
        revision: i64,
        /// Whether etcd was restored or rebuilt since the last listing (another cluster id,
        /// or a revision behind the view's): what it holds may still be filling up again,
        /// as servers re-register.
        rebuilt: bool,
        /// The id of the cluster that answered the listing: a rebuilt etcd may have a new
        /// one, a restored or restarted one keeps its own.
        cluster_id: u64,
    },
    /// A key was created or changed.
    Put(KeyValue),
    /// A key was deleted (or its lease expired).
    Delete {
        /// The key.
        key: String,
        /// The revision of the deletion.
        revision: i64,
    },
}

/// How fresh a [`ListWatch`]'s view is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewStatus {
    /// Whether the watch is established and etcd answered recently.
    pub in_sync: bool,
    /// The revision the view is at.
    pub revision: i64,
    /// When etcd last confirmed the view (an event, a progress notification, a listing);
    /// `None` before the first listing.
    pub confirmed_at: Option<Instant>,
    /// How many times the set was listed (the first listing counts).
    pub resets: u64,
    /// How many of those listings found etcd restored or rebuilt (another cluster id, or a
    /// revision behind the view's).
    pub rebuilds: u64,
    /// The last error, while out of sync.
    pub last_error: Option<String>,
}

impl ViewStatus {
    /// How long since etcd last confirmed the view; `None` if it never did.
    pub fn staleness(&self) -> Option<Duration> {
        self.confirmed_at.map(|t| t.elapsed())
    }
}

/// List-then-watch of one prefix (or one key). See the module docs.
#[derive(Debug)]
pub struct ListWatch {
    etcd: Etcd,
    prefix: String,
    /// Whether `prefix` is a prefix, or one exact key.
    is_prefix: bool,
    state: State,
    revision: i64,
    cluster_id: Option<u64>,
    /// A watch saw signs of a rebuilt etcd; the next listing reports it.
    rebuild_seen: bool,
    /// The last listing failed (warned once; the next success says so).
    list_failing: bool,
    pending: VecDeque<WatchEvent>,
    backoff: Backoff,
    status: watch::Sender<ViewStatus>,
}

#[derive(Debug)]
enum State {
    /// List once `at` has passed.
    List {
        at: Instant,
    },
    /// Watch from `from` once `at` has passed.
    Watch {
        from: i64,
        at: Instant,
    },
    Watching(Box<Watching>),
}

#[derive(Debug)]
struct Watching {
    stream: etcd_client::WatchStream,
    /// When the last message arrived, to decide when to ask for progress.
    last_message: Instant,
    /// A progress request is outstanding since then.
    asked_at: Option<Instant>,
    /// Since when the member serving the watch reports a revision behind the view's.
    lagging: Option<Instant>,
}

/// How many progress intervals a member serving a watch may stay behind the view before
/// the view is listed again from another answer.
const LAG_PATIENCE: u32 = 6;

impl ListWatch {
    /// Lists every key under `prefix` and then watches them.
    pub fn new(etcd: Etcd, prefix: impl Into<String>) -> Self {
        Self::start(etcd, prefix.into(), true, State::List { at: Instant::now() }, 0)
    }

    /// Lists one exact key (a Reset with zero or one key) and then watches it; a prefix
    /// watch of `/s/10.0.0.5:5005` would also see `/s/10.0.0.5:50051`.
    pub fn key(etcd: Etcd, key: impl Into<String>) -> Self {
        Self::start(etcd, key.into(), false, State::List { at: Instant::now() }, 0)
    }

    /// Watches every key under `prefix` from `revision` (inclusive) without listing first,
    /// for a consumer that already holds the view up to `revision - 1`. If that revision
    /// has been compacted, it lists again (one Reset) and goes on from there.
    pub fn resume(etcd: Etcd, prefix: impl Into<String>, revision: i64) -> Self {
        let from = revision.max(1);
        Self::start(etcd, prefix.into(), true, State::Watch { from, at: Instant::now() }, from - 1)
    }

    /// Caps the pause between attempts at `max` (default: the options'
    /// `retry_backoff_max`), for a consumer that must notice changes sooner, such as a
    /// registration with a short lease.
    pub fn with_backoff_max(mut self, max: Duration) -> Self {
        self.backoff = Backoff::new(Duration::from_millis(100), max);
        self
    }

    fn start(etcd: Etcd, prefix: String, is_prefix: bool, state: State, revision: i64) -> Self {
        let status = watch::Sender::new(ViewStatus {
            in_sync: false,
            revision,
            confirmed_at: None,
            resets: 0,
            rebuilds: 0,
            last_error: None,
        });
        let backoff = Backoff::new(Duration::from_millis(100), etcd.options().retry_backoff_max);
        ListWatch {
            etcd,
            prefix,
            is_prefix,
            state,
            revision,
            cluster_id: None,
            rebuild_seen: false,
            list_failing: false,
            pending: VecDeque::new(),
            backoff,
            status,
        }
    }

    /// The freshness of the view, updated as it changes.
    pub fn status(&self) -> watch::Receiver<ViewStatus> {
        self.status.subscribe()
    }

    /// The prefix watched.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The id of the etcd cluster the view comes from; `None` before the first answer. A
    /// consumer that sees it change after a Reset knows etcd was restored or rebuilt.
    pub fn cluster_id(&self) -> Option<u64> {
        self.cluster_id
    }

    /// The next change. Never fails: errors are logged, retried with backoff and reflected
    /// in [`ListWatch::status`]. Cancel-safe: all state lives in `self`.
    pub async fn next(&mut self) -> WatchEvent {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return event;
            }
            match &mut self.state {
                State::List { at } => {
                    sleep_until(*at).await;
                    if let Some(reset) = self.list().await {
                        return reset;
                    }
                }
                State::Watch { from, at } => {
                    let from = *from;
                    sleep_until(*at).await;
                    self.open_watch(from).await;
                }
                State::Watching(w) => {
                    let progress_every = self.etcd.options().watch_progress_interval;
                    let answer_within = self.etcd.options().request_timeout;
                    let deadline = match w.asked_at {
                        Some(asked) => asked + answer_within,
                        None => w.last_message + progress_every,
                    };
                    tokio::select! {
                        message = w.stream.message() => self.on_message(message),
                        () = tokio::time::sleep_until(deadline) => {
                            if w.asked_at.is_some() {
                                self.doubt(format!("no answer to a progress request within {answer_within:?}"));
                            } else if let Err(e) = w.stream.request_progress().await {
                                self.doubt(format!("asking for progress: {e}"));
                            } else {
                                w.asked_at = Some(Instant::now());
                            }
                        }
                    }
                }
            }
        }
    }

    /// Lists the prefix; on success switches to watching and returns the Reset.
    async fn list(&mut self) -> Option<WatchEvent> {
        let listed =
            if self.is_prefix { self.etcd.list(&self.prefix).await } else { self.etcd.list_key(&self.prefix).await };
        match listed {
            Ok(listing) => {
                let other_cluster = self.cluster_id.is_some_and(|old| old != listing.cluster_id);
                let behind = listing.revision < self.revision;
                let rebuilt = std::mem::take(&mut self.rebuild_seen) || other_cluster || behind;
                if rebuilt {
                    warn!(
                        prefix = %self.prefix,
                        cluster = %format!("{:x}", listing.cluster_id),
                        revision = listing.revision,
                        "etcd was restored or rebuilt (another cluster id, or an older revision); using what it holds now"
                    );
                }
                if std::mem::take(&mut self.list_failing) {
                    // As loud as the warning it ends: a client logging warnings only sees both.
                    warn!(prefix = %self.prefix, keys = listing.kvs.len(), "listing works again");
                }
                self.cluster_id = Some(listing.cluster_id);
                self.revision = listing.revision;
                self.backoff.reset();
                self.state = State::Watch { from: listing.revision + 1, at: Instant::now() };
                self.status.send_modify(|s| {
                    s.revision = listing.revision;
                    s.confirmed_at = Some(Instant::now());
                    s.resets += 1;
                    s.rebuilds += u64::from(rebuilt);
                });
                debug!(prefix = %self.prefix, keys = listing.kvs.len(), revision = listing.revision, "listed");
                let cluster_id = listing.cluster_id;
                Some(WatchEvent::Reset { kvs: listing.kvs, revision: listing.revision, rebuilt, cluster_id })
            }
            Err(e) => {
                if self.list_failing {
                    debug!(prefix = %self.prefix, "{e}");
                } else {
                    warn!(prefix = %self.prefix, "listing failed, keeping the last view and retrying: {e}");
                    self.list_failing = true;
                }
                self.lost_sync(e.to_string());
                self.list_after_backoff();
                None
            }
        }
    }

    async fn open_watch(&mut self, from: i64) {
        match self.etcd.watch(&self.prefix, self.is_prefix, from).await {
            Ok(WatchStart { stream, cluster_id, revision }) => {
                if self.cluster_id.is_some_and(|id| id != cluster_id) {
                    self.rebuild_seen = true;
                    self.relist(format!("etcd changed under us (cluster {cluster_id:x}, ours {:x?})", self.cluster_id));
                    return;
                }
                // The watch may be served by a member behind the one that answered the
                // (linearizable) listing: a follower that lags. That is no rebuild; its
                // events come as it catches up, and those already in the view are skipped.
                // Only a listing tells a restored etcd (see `list`).
                let lagging = (revision < self.revision).then(Instant::now);
                if lagging.is_some() {
                    debug!(
                        prefix = %self.prefix,
                        "the member serving the watch is at revision {revision}, behind our {}; waiting for it to catch up",
                        self.revision
                    );
                }
                self.cluster_id = Some(cluster_id);
                self.backoff.reset();
                let now = Instant::now();
                self.state = State::Watching(Box::new(Watching { stream, last_message: now, asked_at: None, lagging }));
                self.status.send_modify(|s| {
                    s.in_sync = true;
                    s.confirmed_at = Some(now);
                    s.last_error = None;
                });
            }
            Err(e) if matches!(e.kind(), ErrorKind::Compacted(_)) => {
                self.relist(format!("revision {from} has been compacted"));
            }
            Err(e) => {
                self.out_of_sync(&e);
                // A watch that cannot be opened may have missed changes: list again.
                self.list_after_backoff();
            }
        }
    }

    fn on_message(&mut self, message: Result<Option<etcd_client::WatchResponse>, etcd_client::Error>) {
        let resp = match message {
            Ok(Some(resp)) => resp,
            Ok(None) => return self.doubt("the watch stream ended".into()),
            Err(e) => return self.doubt(format!("the watch failed: {e}")),
        };
        if let State::Watching(w) = &mut self.state {
            w.last_message = Instant::now();
            w.asked_at = None;
        }
        if resp.compact_revision() > 0 {
            return self.relist(format!("revision {} has been compacted", self.revision + 1));
        }
        if resp.canceled() {
            return self.doubt(format!("etcd canceled the watch: {}", resp.cancel_reason()));
        }
        let (cluster_id, header_revision) = resp.header().map_or((None, 0), |h| (Some(h.cluster_id()), h.revision()));
        if let (Some(ours), Some(theirs)) = (self.cluster_id, cluster_id)
            && ours != theirs
        {
            self.rebuild_seen = true;
            return self.relist(format!("the cluster id changed to {theirs:x}"));
        }
        if let State::Watching(w) = &mut self.state {
            if header_revision > 0 && header_revision < self.revision {
                // A lagging member (see `open_watch`), not a rebuild: a restored etcd
                // restarts, which ends the stream, and the listing after it tells.
                let since = *w.lagging.get_or_insert_with(Instant::now);
                let patience = self.etcd.options().watch_progress_interval * LAG_PATIENCE;
                if since.elapsed() > patience {
                    return self.doubt(format!(
                        "the member serving the watch stayed behind our revision {} (at {header_revision}) for {patience:?}",
                        self.revision
                    ));
                }
            } else {
                w.lagging = None;
            }
        }
        // The events of one response may share a revision (one transaction), so they are
        // compared with the revision the view had before this response, and the view moves
        // once, after all of them. A progress notification (no events) moves nothing.
        let seen = self.revision;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let kv = KeyValue::from_client(kv);
            if kv.mod_revision <= seen {
                continue; // already in the view (a watch resumed at an older revision)
            }
            self.revision = self.revision.max(kv.mod_revision);
            self.pending.push_back(match event.event_type() {
                EventType::Put => WatchEvent::Put(kv),
                EventType::Delete => WatchEvent::Delete { key: kv.key, revision: kv.mod_revision },
            });
        }
        let revision = self.revision;
        self.status.send_modify(|s| {
            s.in_sync = true;
            s.revision = revision;
            s.confirmed_at = Some(Instant::now());
            s.last_error = None;
        });
    }

    /// The view may be out of date: back off, then list again.
    fn doubt(&mut self, why: String) {
        warn!(prefix = %self.prefix, "{why}; listing again after a backoff");
        self.lost_sync(why);
        self.list_after_backoff();
    }

    /// The view is known to be wrong (compaction, another cluster): list again at once.
    fn relist(&mut self, why: String) {
        info!(prefix = %self.prefix, "{why}; listing again");
        self.lost_sync(why);
        self.state = State::List { at: Instant::now() };
    }

    /// Lists again once the next backoff has passed: a deadline, so that a `next` that is
    /// cancelled and called again waits out the rest of it, not all of it anew.
    fn list_after_backoff(&mut self) {
        self.state = State::List { at: Instant::now() + self.backoff.next_delay() };
    }

    fn out_of_sync(&self, e: &EtcdError) {
        debug!(prefix = %self.prefix, "{e}");
        self.lost_sync(e.to_string());
    }

    fn lost_sync(&self, why: String) {
        self.status.send_modify(|s| {
            s.in_sync = false;
            s.last_error = Some(why);
        });
    }
}

/// Sleeps until `at`, unless it has passed: tokio's timer fires on its next millisecond
/// tick, which would delay every listing that is due at once.
async fn sleep_until(at: Instant) {
    if at > Instant::now() {
        tokio::time::sleep_until(at).await;
    }
}
