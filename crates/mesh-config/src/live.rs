//! The document in etcd, watched and applied over the layers below it.

use std::sync::Arc;

use mesh_etcd::{Etcd, KeyValue, ListWatch, ViewStatus, WatchEvent};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn};

use crate::{ConfigError, Document, Layers};

/// Watches one etcd key holding a JSON document, merged over [`Layers`] into a `T`.
#[derive(Debug)]
pub struct ConfigWatcher<T> {
    etcd: Etcd,
    key: String,
    base: Value,
    base_config: Arc<T>,
}

/// A running watch: the configuration in force, and how it got there. The task behind it
/// stops when this and its clones are dropped (receivers already handed out then see no
/// more changes).
#[derive(Debug)]
pub struct LiveConfig<T> {
    value: watch::Receiver<Arc<T>>,
    status: watch::Receiver<ConfigStatus>,
    view: watch::Receiver<ViewStatus>,
    _task: Arc<AbortOnDropHandle<()>>,
}

impl<T> Clone for LiveConfig<T> {
    fn clone(&self) -> Self {
        LiveConfig {
            value: self.value.clone(),
            status: self.status.clone(),
            view: self.view.clone(),
            _task: self._task.clone(),
        }
    }
}

/// Where the configuration in force comes from, and the last document refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ConfigStatus {
    /// The revision of the etcd document applied; `None` while the file and flag settings
    /// (and defaults) alone are in force.
    pub revision: Option<i64>,
    /// The last document refused, and why; it stays until a later one is applied.
    pub last_rejection: Option<Rejection>,
    /// Documents applied since the start.
    pub applied: u64,
    /// Whether etcd was read once (its document, or its absence, taken into account).
    pub listed: bool,
}

/// A document refused: its revision and the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct Rejection {
    /// The revision of the refused document.
    pub revision: i64,
    /// Why, in words, naming the field.
    pub reason: String,
}

/// The key of `service`'s configuration under `root`: `{root}/config/{service}`.
pub fn config_key(root: &str, service: &str) -> String {
    format!("{}/config/{service}", root.trim_end_matches('/'))
}

impl<T: Document> ConfigWatcher<T> {
    /// Watches `key` over `layers`; the error says what is wrong with the layers alone (a
    /// bad file or flag), which a process should refuse to start with.
    pub fn new(etcd: Etcd, key: impl Into<String>, layers: &Layers) -> Result<Self, ConfigError> {
        let base_config = Arc::new(layers.build::<T>()?);
        Ok(ConfigWatcher { etcd, key: key.into(), base: layers.document().clone(), base_config })
    }

    /// Spawns the task that lists and watches the key. The file and flag settings are in
    /// force at once, whether or not etcd answers; the document in etcd is applied when it
    /// is read. Must be called within a tokio runtime.
    pub fn spawn(self) -> LiveConfig<T> {
        let (value_tx, value) = watch::channel(self.base_config.clone());
        let (status_tx, status) = watch::channel(ConfigStatus::default());
        let list_watch = ListWatch::key(self.etcd.clone(), self.key.clone());
        let view = list_watch.status();
        let task = AbortOnDropHandle::new(tokio::spawn(self.run(list_watch, value_tx, status_tx)));
        LiveConfig { value, status, view, _task: Arc::new(task) }
    }

    async fn run(
        self,
        mut list_watch: ListWatch,
        value_tx: watch::Sender<Arc<T>>,
        status_tx: watch::Sender<ConfigStatus>,
    ) {
        let mut applier = Applier { watcher: &self, value_tx, status_tx, floor: 0, considered: None };
        let mut cluster: Option<u64> = None;
        loop {
            match list_watch.next().await {
                WatchEvent::Reset { kvs, rebuilt, revision, cluster_id } => {
                    // Whatever comes after a listing is newer than it, even from an etcd
                    // whose revisions started over.
                    applier.floor = revision;
                    let new_cluster = cluster.is_some_and(|c| c != cluster_id);
                    cluster = Some(cluster_id);
                    match kvs.into_iter().find(|kv| kv.key == self.key) {
                        // A listing is the truth: a document other than the one last
                        // considered is considered, even at an older revision (an etcd
                        // restored from a snapshot holds an older document), or at the
                        // same revision with another value (a document written to the
                        // restored etcd got the revision the lost one had).
                        Some(kv) if !applier.is_considered(&kv) => applier.consider(kv),
                        Some(_) => {}
                        // Only a new cluster (another cluster id) is an etcd rebuilt from
                        // nothing, whose missing document says nothing yet; the same
                        // cluster without the document (restored from a snapshot taken
                        // before it) no longer holds it, as an instance started now sees.
                        None if rebuilt && new_cluster => info!(
                            key = %self.key,
                            "etcd was rebuilt (a new cluster) and holds no document; the configuration in force stays"
                        ),
                        None => applier.removed(revision),
                    }
                    applier.status_tx.send_if_modified(|s| !std::mem::replace(&mut s.listed, true));
                }
                WatchEvent::Put(kv) if kv.mod_revision > applier.floor => {
                    applier.floor = kv.mod_revision;
                    applier.consider(kv);
                }
                WatchEvent::Delete { revision, .. } if revision > applier.floor => {
                    applier.floor = revision;
                    applier.removed(revision);
                }
                // Already seen: a watch resumed at an older revision.
                WatchEvent::Put(_) | WatchEvent::Delete { .. } => {}
            }
            if applier.value_tx.is_closed() {
                return;
            }
        }
    }
}

struct Applier<'a, T> {
    watcher: &'a ConfigWatcher<T>,
    value_tx: watch::Sender<Arc<T>>,
    status_tx: watch::Sender<ConfigStatus>,
    /// Events at or below this revision are already in the view.
    floor: i64,
    /// The revision and value of the document last considered (applied or refused),
    /// `None` after a deletion: a listing showing it again changes nothing.
    considered: Option<(i64, Vec<u8>)>,
}

impl<T: Document> Applier<'_, T> {
    fn is_considered(&self, kv: &KeyValue) -> bool {
        self.considered.as_ref().is_some_and(|(revision, value)| *revision == kv.mod_revision && *value == kv.value)
    }

    fn consider(&mut self, kv: KeyValue) {
        let key = &self.watcher.key;
        let revision = kv.mod_revision;
        self.considered = Some((revision, kv.value.clone()));
        let origin = format!("{key} at revision {revision}");
        match crate::parse::<T>(&self.watcher.base, &kv.value, &origin) {
            Ok(config) => {
                // Said before it takes effect, so that the log never shows its effects first.
                info!(key = %key, revision, "configuration applied");
                self.value_tx.send_replace(Arc::new(config));
                self.status_tx.send_modify(|s| {
                    s.revision = Some(revision);
                    s.applied += 1;
                });
            }
            Err(e) => {
                warn!(key = %key, revision, "configuration refused, the last good one stays: {}", e.reason);
                self.status_tx.send_modify(|s| s.last_rejection = Some(Rejection { revision, reason: e.reason }));
            }
        }
    }

    /// The key is gone from a live etcd: back to the file and flag settings.
    fn removed(&mut self, revision: i64) {
        self.considered = None;
        if self.status_tx.borrow().revision.is_none() {
            return;
        }
        info!(key = %self.watcher.key, revision, "configuration deleted; back to the file and flag settings");
        self.value_tx.send_replace(self.watcher.base_config.clone());
        self.status_tx.send_modify(|s| s.revision = None);
    }
}

impl<T> LiveConfig<T> {
    /// The configuration in force now.
    pub fn current(&self) -> Arc<T> {
        self.value.borrow().clone()
    }

    /// A receiver of every configuration put in force from now on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<T>> {
        self.value.clone()
    }

    /// Waits until etcd was read once (the document applied or refused, or found
    /// absent), at most `timeout`; returns whether it was. A client calls this before its
    /// first call, so that the document's settings govern every call, the first included.
    pub async fn wait_listed(&self, timeout: std::time::Duration) -> bool {
        let mut status = self.status.clone();
        tokio::time::timeout(timeout, status.wait_for(|s| s.listed)).await.is_ok_and(|r| r.is_ok())
    }

    /// Where the configuration in force comes from, and the last refusal.
    pub fn status(&self) -> watch::Receiver<ConfigStatus> {
        self.status.clone()
    }

    /// How fresh the watch of the key is: in sync or not, when etcd last answered, how many
    /// times it listed.
    pub fn view(&self) -> watch::Receiver<ViewStatus> {
        self.view.clone()
    }
}
