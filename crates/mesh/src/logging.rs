//! Logging for a mesh process: a `tracing` subscriber on stderr whose filter the
//! configuration's `server.log_level` can change live.

use std::sync::Arc;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::server::LogFilter;

/// Installs the process's subscriber: the filter `RUST_LOG` gives, or `default` (`info`)
/// without one (a bad `RUST_LOG` is said in a warning, and `default` used). Returns what
/// [`ServerBuilder::log_filter`](crate::ServerBuilder::log_filter) takes, so that the
/// document's `server.log_level` sets the filter live (and its absence goes back to this
/// one). Call it once, first thing in `main`.
///
/// ```no_run
/// let log_filter = mesh::logging::init("info");
/// # drop(log_filter);
/// ```
pub fn init(default: &str) -> LogFilter {
    let (startup, bad_filter) = match EnvFilter::try_from_default_env() {
        Ok(_) => (std::env::var("RUST_LOG").unwrap_or_default(), None),
        Err(e) => (default.to_string(), std::env::var("RUST_LOG").ok().map(|v| (v, e))),
    };
    let (filter, reload) = tracing_subscriber::reload::Layer::new(EnvFilter::new(&startup));
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .try_init();
    if let Err(e) = installed {
        eprintln!("logging was set up already ({e}); the log level cannot be changed live");
    }
    if let Some((value, e)) = bad_filter.filter(|(value, _)| !value.is_empty()) {
        tracing::warn!("ignoring RUST_LOG={value:?}: {e}; logging at {default}");
    }
    Arc::new(move |level: Option<&str>| {
        let filter = match level {
            Some(level) => EnvFilter::try_new(level).map_err(|e| e.to_string())?,
            None => EnvFilter::new(&startup),
        };
        reload.reload(filter).map_err(|e| e.to_string())
    })
}
