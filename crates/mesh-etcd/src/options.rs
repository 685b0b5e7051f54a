use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::EtcdError;

/// Keys per page of a listing by default: 500 registrations of the few kilobytes a Go
/// service may write stay a few megabytes per answer.
pub const DEFAULT_LIST_PAGE_SIZE: i64 = 500;

/// The largest message read from etcd: what etcd's gRPC server may send (its
/// `MaxSendMsgSize`, 2 GiB - 1), where a gRPC client's default of 4 MiB would refuse a large
/// listing or a watch answer carrying many big values, and with it every later listing.
pub const MAX_MESSAGE_BYTES: usize = i32::MAX as usize;

/// The environment variable the etcd password is read from when no file is given.
pub const PASSWORD_ENV: &str = "MESH_ETCD_PASSWORD";

/// TLS to etcd: the CA its certificate chains to and, when etcd requires client
/// certificates, ours. Read when set, so a missing file is a start-up error.
#[derive(Clone)]
pub struct EtcdTls {
    ca: PathBuf,
    identity: Option<PathBuf>,
    options: etcd_client::TlsOptions,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Paths only: never the key.
        f.debug_struct("EtcdTls").field("ca", &self.ca).field("cert", &self.identity).finish_non_exhaustive()
    }
}

fn read_file(what: &str, path: &Path) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|e| EtcdError::invalid(format!("{what} {}: cannot be read: {e}", path.display())))
}

/// The etcd password: the first line of `file` when given, else the value of
/// `MESH_ETCD_PASSWORD`; `None` when neither is set. Never taken from a command line, where
/// any user of the machine could read it.
pub fn read_password(file: Option<&Path>) -> Result<Option<String>, EtcdError> {
    let raw = match file {
        Some(path) => String::from_utf8(read_file("etcd password file", path)?)
            .map_err(|_| EtcdError::invalid(format!("etcd password file {}: not UTF-8", path.display())))?,
        None => match std::env::var(PASSWORD_ENV) {
            Ok(p) => p,
            Err(_) => return Ok(None),
        },
    };
    let password = raw.lines().next().unwrap_or_default().to_string();
    if password.is_empty() {
        let from = file.map_or_else(|| PASSWORD_ENV.to_string(), |p| p.display().to_string());
        return Err(EtcdError::invalid(format!("the etcd password in {from} is empty")));
    }
    Ok(Some(password))
}

/// How to reach etcd. Built with [`EtcdOptions::new`] or [`EtcdOptions::parse_endpoints`];
/// nothing here touches the network.
#[derive(Clone)]
pub struct EtcdOptions {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// How long opening a connection may take.
    pub connect_timeout: Duration,
    /// How long one request may take, including waiting for a connection.
    pub request_timeout: Duration,
    /// HTTP/2 keepalive ping interval (also while idle), so a dead member is noticed.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered.
    pub keepalive_timeout: Duration,
    /// Ask etcd to refuse requests when the member has no leader (a partitioned member),
    /// so that watches move to a member that can serve them.
    pub require_leader: bool,
    /// User name and password, for an etcd with auth enabled.
    pub user: Option<(String, String)>,
    /// TLS, for an etcd whose client URLs are `https://`.
    pub tls: Option<EtcdTls>,
    /// How often a quiet watch asks etcd for a progress notification, to prove it is alive.
    pub watch_progress_interval: Duration,
    /// The longest pause between attempts to reach etcd again (watches; the registry also
    /// keeps it under a third of its lease TTL). Short enough that everything recovers
    /// within seconds of etcd's return.
    pub retry_backoff_max: Duration,
    /// How many keys one page of a listing holds: a prefix with more is listed in pages,
    /// all at the revision of the first, so a large fleet is read whole and consistent.
    pub list_page_size: i64,
}

impl std::fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("keepalive_timeout", &self.keepalive_timeout)
            .field("require_leader", &self.require_leader)
            // Never print the password.
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("tls", &self.tls)
            .field("watch_progress_interval", &self.watch_progress_interval)
            .field("retry_backoff_max", &self.retry_backoff_max)
            .field("list_page_size", &self.list_page_size)
            .finish()
    }
}

impl EtcdOptions {
    /// Options for `endpoints` (client URLs or `host:port`s) with the defaults: 2 s to
    /// connect, 3 s per request, keepalive every 5 s with a 3 s timeout, leader required,
    /// a progress check of quiet watches every 5 s, retries at most 3 s apart, listings in
    /// pages of 500 keys.
    pub fn new<I, S>(endpoints: I) -> Result<Self, EtcdError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut urls = Vec::new();
        for e in endpoints {
            let e = e.as_ref().trim();
            if e.is_empty() {
                continue;
            }
            urls.push(normalize(e)?);
        }
        if urls.is_empty() {
            return Err(EtcdError::invalid("no etcd endpoints given; e.g. --etcd http://127.0.0.1:2379"));
        }
        Ok(EtcdOptions {
            endpoints: urls,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(3),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(3),
            require_leader: true,
            user: None,
            tls: None,
            watch_progress_interval: Duration::from_secs(5),
            retry_backoff_max: Duration::from_secs(3),
            list_page_size: DEFAULT_LIST_PAGE_SIZE,
        })
    }

    /// Options from a comma-separated list, as `--etcd` and `MESH_ETCD` take it.
    pub fn parse_endpoints(list: &str) -> Result<Self, EtcdError> {
        Self::new(list.split(','))
    }

    /// Sets user and password.
    pub fn with_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((user.into(), password.into()));
        self
    }

    /// Speaks TLS to etcd: trusts the CA certificates in `ca` (PEM) and, when etcd requires
    /// client certificates, presents `identity` (certificate and key, PEM). Endpoints given
    /// as `http://` or `host:port` become `https://`.
    pub fn with_tls(mut self, ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, EtcdError> {
        let mut options = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read_file("etcd CA file", ca)?));
        if let Some((cert, key)) = identity {
            let cert_pem = read_file("etcd client certificate", cert)?;
            let key_pem = read_file("etcd client key", key)?;
            options = options.identity(etcd_client::Identity::from_pem(cert_pem, key_pem));
        }
        for e in &mut self.endpoints {
            if let Some(rest) = e.strip_prefix("http://") {
                *e = format!("https://{rest}");
            }
        }
        self.tls = Some(EtcdTls { ca: ca.to_path_buf(), identity: identity.map(|(c, _)| c.to_path_buf()), options });
        Ok(self)
    }

    /// Sets the per-request timeout.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets how many keys one page of a listing holds (at least 1).
    pub fn with_list_page_size(mut self, keys: i64) -> Self {
        self.list_page_size = keys.max(1);
        self
    }

    /// Sets how often a quiet watch checks that etcd is still there.
    pub fn with_watch_progress_interval(mut self, interval: Duration) -> Self {
        self.watch_progress_interval = interval;
        self
    }

    pub(crate) fn client_options(&self) -> etcd_client::ConnectOptions {
        let mut o = etcd_client::ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_timeout(self.request_timeout)
            .with_keep_alive(self.keepalive_interval, self.keepalive_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(self.require_leader);
        if let Some((user, password)) = &self.user {
            // An expired or lost token (etcd restarted: simple tokens live in memory) is
            // renewed by logging in again, and the request retried once.
            o = o.with_user(user.clone(), password.clone()).with_auto_token_refresh(true);
        }
        if let Some(tls) = &self.tls {
            o = o.with_tls(tls.options.clone());
        }
        o
    }

    /// Refuses `https://` endpoints without TLS settings, which would fail obscurely. The
    /// first request checks this too; call it to report a bad flag at start-up.
    pub fn check(&self) -> Result<(), EtcdError> {
        if self.tls.is_none()
            && let Some(e) = self.endpoints.iter().find(|e| e.starts_with("https://"))
        {
            return Err(EtcdError::invalid(format!(
                "etcd endpoint {e} uses https; give the CA that signed its certificate (--etcd-ca)"
            )));
        }
        Ok(())
    }
}

/// `http://host:port` for `host:port` or a URL; a readable error for anything else.
fn normalize(endpoint: &str) -> Result<String, EtcdError> {
    let url = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
    let bad = |why: &str| {
        EtcdError::invalid(format!("etcd endpoint {endpoint:?} {why}; expected http://host:port or https://host:port"))
    };
    let uri: tonic::codegen::http::Uri = url.parse().map_err(|_| bad("is not a URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(bad("has an unknown scheme")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    if uri.port_u16().is_none() {
        return Err(bad("has no port"));
    }
    Ok(url.trim_end_matches('/').to_string())
}
