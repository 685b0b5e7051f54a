use std::fmt;
use std::path::PathBuf;

/// Why a local etcd could not be found, installed, started or reached.
#[derive(Debug)]
pub enum Error {
    /// No etcd binary on `ETCD_BIN` or `PATH`, and none could be installed.
    NotFound {
        /// What was tried, and how to get etcd.
        detail: String,
    },
    /// Installing etcd with the system package manager failed.
    Install {
        /// The command that failed.
        command: String,
        /// Its exit status and output.
        detail: String,
    },
    /// Spawning the etcd process failed.
    Spawn {
        /// The binary that was run.
        binary: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// etcd did not report healthy in time.
    Unhealthy {
        /// The client URLs that were polled.
        urls: Vec<String>,
        /// How long was waited, and the last thing seen.
        detail: String,
    },
    /// A file or socket operation failed.
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotFound { detail } => write!(f, "etcd not found: {detail}"),
            Error::Install { command, detail } => {
                write!(f, "installing etcd with `{command}` failed: {detail}")
            }
            Error::Spawn { binary, .. } => write!(f, "starting {}", binary.display()),
            Error::Unhealthy { urls, detail } => {
                write!(f, "etcd at {} is not healthy: {detail}", urls.join(","))
            }
            Error::Io { context, .. } => f.write_str(context),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Spawn { source, .. } | Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
