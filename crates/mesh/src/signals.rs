//! The signals a mesh process answers: SIGHUP (held off, then logged with what it
//! reloads), and SIGINT and SIGTERM (the first starts a graceful shutdown, the next cuts
//! it short).

use std::future::Future;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// SIGHUP handling: once installed, SIGHUP no longer ends the process (its default, which
/// a `systemctl reload` would turn into an exit); each one is logged with what it reloads.
/// The TLS files are reloaded by their own watcher (mesh-tls's `watch`), which logs
/// the outcome; everything else a mesh process reads at start (flags, `--config`) is
/// not reread, and the configuration in etcd is followed live anyway. Stops when dropped;
/// SIGHUP stays ignored after that.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let _hangups = mesh::signals::Hangups::install(None);
/// # }
/// ```
#[derive(Debug)]
pub struct Hangups {
    task: Option<JoinHandle<()>>,
}

impl Hangups {
    /// Holds SIGHUP off from the first line of `main`, before any runtime exists: until
    /// [`Hangups::install`] takes over, a SIGHUP (a `systemctl reload` right after a start)
    /// is dropped rather than ending the process, as its default would.
    pub fn hold_off() {
        #[cfg(unix)]
        if let Err(e) = signal_hook::flag::register(
            signal_hook::consts::SIGHUP,
            std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        ) {
            eprintln!("cannot hold SIGHUP off during the start ({e}): a SIGHUP now ends this process");
        }
    }

    /// Installs the handler now (call it first thing, so that no SIGHUP in the start-up
    /// ends the process): `reloads` names what a SIGHUP reloads, `None` for nothing.
    pub fn install(reloads: Option<&'static str>) -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::hangup()) {
                Ok(mut hup) => {
                    tracing::debug!("SIGHUP handled: it reloads {}", reloads.unwrap_or("nothing"));
                    let task = tokio::spawn(async move {
                        while hup.recv().await.is_some() {
                            match reloads {
                                Some(what) => tracing::info!("SIGHUP received: reloading {what}"),
                                None => tracing::info!(
                                    "SIGHUP received: nothing to reload (no TLS files; flags and --config are read at start, the configuration in etcd is followed live)"
                                ),
                            }
                        }
                    });
                    Hangups { task: Some(task) }
                }
                Err(e) => {
                    tracing::warn!("cannot handle SIGHUP ({e}): a SIGHUP ends this process");
                    Hangups { task: None }
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = reloads;
            Hangups { task: None }
        }
    }
}

impl Drop for Hangups {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// SIGINT and SIGTERM, handled from now on: the first future completes on the first of
/// them (the shutdown), the second on the next (cutting the shutdown short). Each is logged.
pub fn stop_signals() -> (impl Future<Output = ()>, impl Future<Output = ()> + Send + 'static) {
    let (first, first_came) = oneshot::channel::<()>();
    let (second, second_came) = oneshot::channel::<()>();
    let mut next = signal_names();
    tokio::spawn(async move {
        let Some(name) = next.recv().await else { return };
        info!("{name} received");
        let _ = first.send(());
        let Some(name) = next.recv().await else { return };
        warn!("{name} received during the shutdown: cutting it short");
        let _ = second.send(());
    });
    // A sender gone without a signal (no handler could be installed) stops nothing.
    let wait = |came: oneshot::Receiver<()>| async move {
        if came.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    (wait(first_came), wait(second_came))
}

/// The names of SIGINT and SIGTERM as they come; the handlers are installed before this
/// returns.
fn signal_names() -> tokio::sync::mpsc::UnboundedReceiver<&'static str> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    #[cfg(unix)]
    for (kind, name) in [
        (tokio::signal::unix::SignalKind::interrupt(), "SIGINT"),
        (tokio::signal::unix::SignalKind::terminate(), "SIGTERM"),
    ] {
        match tokio::signal::unix::signal(kind) {
            Ok(mut signal) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while signal.recv().await.is_some() {
                        if tx.send(name).is_err() {
                            return;
                        }
                    }
                });
            }
            Err(e) => warn!("cannot listen for {name}: {e}"),
        }
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            if tx.send("Ctrl-C").is_err() {
                return;
            }
        }
    });
    rx
}
