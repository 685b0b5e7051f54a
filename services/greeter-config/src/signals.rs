//! The signals both greeter binaries answer beside SIGINT and SIGTERM.

use tokio::task::JoinHandle;

/// SIGHUP handling: once installed, SIGHUP no longer ends the process (its default, which
/// a `systemctl reload` would turn into an exit); each one is logged with what it reloads.
/// The TLS files are reloaded by their own watcher (mesh-tls's `watch`), which logs
/// the outcome; everything else a greeter process reads at start (flags, `--config`) is
/// not reread, and the configuration in etcd is followed live anyway. Stops when dropped;
/// SIGHUP stays ignored after that.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let _hangups = greeter_config::Hangups::install(None);
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
