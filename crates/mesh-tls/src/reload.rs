//! A configuration built from files, swapped for a new one when the files change or the
//! process gets SIGHUP; a bad new file is refused with a warning and the old one stays.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::TlsError;

/// What identifies a version of a file: a rename over it changes the inode, a rewrite in
/// place the length or the modification time.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &PathBuf) -> Stamp {
    #[cfg(unix)]
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = meta.ino();
    #[cfg(not(unix))]
    let inode = 0;
    Some((meta.modified().ok()?, meta.len(), inode))
}

type Loader<T> = Box<dyn Fn() -> Result<T, TlsError> + Send + Sync>;

pub(crate) struct Reloadable<T> {
    /// For log lines: "server certificate", "client TLS".
    what: &'static str,
    current: ArcSwap<T>,
    files: Vec<PathBuf>,
    load: Loader<T>,
    /// The files as they were at the last load or refusal, so that one bad file is
    /// reported once, not at every poll.
    seen: Mutex<Vec<Stamp>>,
    reloads: AtomicU64,
    refusals: AtomicU64,
}

impl<T> std::fmt::Debug for Reloadable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloadable")
            .field("what", &self.what)
            .field("files", &self.files)
            .field("reloads", &self.reloads.load(Ordering::Relaxed))
            .field("refusals", &self.refusals.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<T: Send + Sync + 'static> Reloadable<T> {
    /// Loads once; an error here is the caller's to report (a bad flag at start-up).
    pub(crate) fn new(what: &'static str, files: Vec<PathBuf>, load: Loader<T>) -> Result<Self, TlsError> {
        let seen = files.iter().map(stamp).collect();
        let first = load()?;
        Ok(Reloadable {
            what,
            current: ArcSwap::from_pointee(first),
            files,
            load,
            seen: Mutex::new(seen),
            reloads: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
        })
    }

    pub(crate) fn current(&self) -> Arc<T> {
        self.current.load_full()
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Vec<Stamp>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads the files again: the new configuration is used from the next handshake on.
    /// On error the one in use stays.
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        let stamps: Vec<Stamp> = self.files.iter().map(stamp).collect();
        let result = (self.load)();
        *self.seen() = stamps;
        match result {
            Ok(next) => {
                self.current.store(Arc::new(next));
                self.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.refusals.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    fn changed(&self) -> bool {
        let now: Vec<Stamp> = self.files.iter().map(stamp).collect();
        *self.seen() != now
    }

    pub(crate) fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    pub(crate) fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }

    /// Reloads on SIGHUP, and when a file changes (looked at every `poll`), until the
    /// returned [`Reloader`] is dropped or the configuration is.
    pub(crate) fn watch(self: &Arc<Self>, poll: Duration) -> Reloader {
        let weak = Arc::downgrade(self);
        let files = self.files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        Reloader { task: tokio::spawn(watch_loop(weak, poll, files)) }
    }
}

async fn watch_loop<T: Send + Sync + 'static>(weak: Weak<Reloadable<T>>, poll: Duration, files: String) {
    #[cfg(unix)]
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!("cannot listen for SIGHUP ({e}); certificates reload when their files change");
            None
        }
    };
    let mut tick = tokio::time::interval(poll.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hup.as_mut() {
                Some(s) => s.recv().await.is_some(),
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<bool>();
        let by_signal = tokio::select! {
            got = signalled => got,
            _ = tick.tick() => false,
        };
        let Some(this) = weak.upgrade() else { return };
        if !by_signal && !this.changed() {
            continue;
        }
        let why = if by_signal { "SIGHUP" } else { "the files changed" };
        match this.reload() {
            Ok(()) => info!("{}: reloaded {files} ({why}); new handshakes use it", this.what),
            Err(e) => warn!("{}: refused the new files ({why}): {e}; the one in use stays", this.what),
        }
    }
}

/// Keeps certificates reloading; stops when dropped.
#[derive(Debug)]
pub struct Reloader {
    task: JoinHandle<()>,
}

impl Drop for Reloader {
    fn drop(&mut self) {
        self.task.abort();
    }
}
