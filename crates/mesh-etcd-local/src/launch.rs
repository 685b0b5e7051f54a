use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Error, is_healthy, wait_until};

/// One etcd member: its name, loopback ports and data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberSpec {
    /// The member name (`--name`).
    pub name: String,
    /// The port clients use, on 127.0.0.1.
    pub client_port: u16,
    /// The port peers use, on 127.0.0.1.
    pub peer_port: u16,
    /// The data directory (`--data-dir`).
    pub data_dir: PathBuf,
    /// A plaintext port for `/health` and `/metrics` (`--listen-metrics-urls`), set when
    /// the client port speaks TLS.
    pub metrics_port: Option<u16>,
    /// Whether the client port speaks TLS.
    pub tls: bool,
}

impl MemberSpec {
    /// The client URL, `http://127.0.0.1:PORT` (`https://` under TLS).
    pub fn client_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Where `/health` answers in plaintext: the metrics port if set, else the client URL.
    pub fn health_url(&self) -> String {
        match self.metrics_port {
            Some(port) => format!("http://127.0.0.1:{port}"),
            None => self.client_url(),
        }
    }

    /// The peer URL, `http://127.0.0.1:PORT`.
    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// A local cluster of one or more members on loopback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// `--initial-cluster-token`, unique per cluster so that members of two local clusters
    /// never join each other.
    pub token: String,
    /// The members, in order.
    pub members: Vec<MemberSpec>,
    /// TLS and auth, when set.
    pub security: Option<crate::Security>,
}

/// A signal to send to an etcd process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: a clean stop.
    Term,
    /// SIGKILL: `kill -9`, no chance to clean up.
    Kill,
    /// SIGSTOP: freeze, as a hung process.
    Stop,
    /// SIGCONT: resume after SIGSTOP.
    Cont,
    /// SIGHUP: reload (certificates, for mesh's servers and clients).
    Hup,
    /// SIGINT: Ctrl-C.
    Int,
}

impl ClusterSpec {
    /// A cluster of `size` members whose data directories live under `dir`, on the given
    /// `(client, peer)` ports.
    pub fn on_ports(dir: &Path, ports: &[(u16, u16)]) -> Self {
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, &(client_port, peer_port))| MemberSpec {
                name: format!("m{i}"),
                client_port,
                peer_port,
                data_dir: dir.join(format!("m{i}.etcd")),
                metrics_port: None,
                tls: false,
            })
            .collect();
        let token = format!("mesh-{}-{}", std::process::id(), ports.first().map_or(0, |p| p.0));
        ClusterSpec { token, members, security: None }
    }

    /// The same cluster with TLS on its client ports and `/health` on a plaintext metrics
    /// port per member (`metrics_ports`, one per member; free ones when empty).
    pub fn with_security(mut self, security: crate::Security, metrics_ports: &[u16]) -> Result<Self, Error> {
        for (i, m) in self.members.iter_mut().enumerate() {
            m.metrics_port = Some(match metrics_ports.get(i) {
                Some(&p) => p,
                None => free_port()?,
            });
            m.tls = true;
        }
        self.security = Some(security);
        Ok(self)
    }

    /// A cluster of `size` members under `dir` on ports that were free a moment ago.
    pub fn on_free_ports(dir: &Path, size: usize) -> Result<Self, Error> {
        let mut ports = Vec::with_capacity(size);
        for _ in 0..size {
            ports.push((free_port()?, free_port()?));
        }
        Ok(Self::on_ports(dir, &ports))
    }

    /// The client URLs of every member.
    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(MemberSpec::client_url).collect()
    }

    /// `--initial-cluster`: `m0=http://127.0.0.1:P0,m1=…`.
    pub fn initial_cluster(&self) -> String {
        self.members.iter().map(|m| format!("{}={}", m.name, m.peer_url())).collect::<Vec<_>>().join(",")
    }

    /// Waits until every member reports healthy.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<(), Error> {
        let urls: Vec<String> = self.members.iter().map(MemberSpec::health_url).collect();
        let probe = Duration::from_millis(500);
        if wait_until(timeout, || urls.iter().all(|u| is_healthy(u, probe))) {
            return Ok(());
        }
        let sick: Vec<&str> = urls.iter().filter(|u| !is_healthy(u, probe)).map(String::as_str).collect();
        Err(Error::Unhealthy {
            urls: urls.clone(),
            detail: format!("after {timeout:?}, still unhealthy: {}", sick.join(",")),
        })
    }
}

/// The command that starts member `index` of `cluster`; the caller chooses its stdio and
/// process group and spawns it.
///
/// A member started on an existing data directory rejoins with the state it holds; on an
/// empty one it bootstraps (for a one-member cluster, a new cluster with a new id).
pub fn start_member(etcd: &Path, cluster: &ClusterSpec, index: usize) -> Command {
    let mut cmd = Command::new(etcd);
    if let Some(m) = cluster.members.get(index) {
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url()])
            .args(["--advertise-client-urls", &m.client_url()])
            .args(["--listen-peer-urls", &m.peer_url()])
            .args(["--initial-advertise-peer-urls", &m.peer_url()])
            .args(["--initial-cluster", &cluster.initial_cluster()])
            .args(["--initial-cluster-token", &cluster.token])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        if let Some(s) = &cluster.security {
            cmd.arg("--cert-file").arg(&s.cert).arg("--key-file").arg(&s.key).arg("--trusted-ca-file").arg(&s.ca);
            if s.client_cert_auth {
                cmd.arg("--client-cert-auth");
            }
            if let Some(ttl) = s.auth_token_ttl {
                cmd.args(["--auth-token", "simple", "--auth-token-ttl", &ttl.to_string()]);
            }
        }
        if let Some(port) = m.metrics_port {
            cmd.args(["--listen-metrics-urls", &format!("http://127.0.0.1:{port}")]);
        }
    }
    cmd
}

/// A TCP port on 127.0.0.1 that was free when asked.
pub fn free_port() -> Result<u16, Error> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::io("finding a free port on 127.0.0.1", e))
}

/// Sends `sig` to process `pid`.
pub fn signal(pid: u32, sig: Signal) -> Result<(), Error> {
    use nix::sys::signal::{Signal as S, kill};
    let s = match sig {
        Signal::Term => S::SIGTERM,
        Signal::Kill => S::SIGKILL,
        Signal::Stop => S::SIGSTOP,
        Signal::Cont => S::SIGCONT,
        Signal::Hup => S::SIGHUP,
        Signal::Int => S::SIGINT,
    };
    let raw =
        i32::try_from(pid).map_err(|_| Error::io(format!("pid {pid}"), std::io::ErrorKind::InvalidInput.into()))?;
    kill(nix::unistd::Pid::from_raw(raw), s)
        .map_err(|e| Error::io(format!("sending {sig:?} to pid {pid}"), std::io::Error::from(e)))
}

/// Whether `pid` is alive and, where `/proc` tells, an etcd using `data_dir` (so that a pid
/// file left behind never leads us to signal an unrelated process that reused the pid).
pub fn process_is_etcd(pid: u32, data_dir: &Path) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None).is_err() {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("etcd") && cmdline.contains(&*data_dir.to_string_lossy())
        }
        // No /proc (macOS): alive is all we can tell.
        Err(_) => !Path::new("/proc/self").exists(),
    }
}
