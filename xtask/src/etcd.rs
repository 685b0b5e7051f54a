//! The detached local etcd of `cargo xtask etcd-up`: one member on 127.0.0.1:2379, or three
//! on 2379, 22379 and 32379 (etcd's own Procfile ports), under `target/etcd/cluster-N/` with
//! a data dir, a log and a pid file per member. Launching is mesh-etcd-local's, shared with
//! mesh-testkit.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use mesh_etcd_local::{ClusterSpec, Signal};

use crate::util;

const PORTS: [(u16, u16); 3] = [(2379, 2380), (22379, 22380), (32379, 32380)];

/// The outcome of [`up`].
#[derive(Debug)]
pub(crate) struct Up {
    pub(crate) endpoints: Vec<String>,
    /// The processes this call started (none if it was running already), so that a demo
    /// that stops them again can reap them.
    pub(crate) started: Vec<std::process::Child>,
}

pub(crate) fn parse_cluster(rest: &[String]) -> anyhow::Result<usize> {
    match rest {
        [] => Ok(1),
        [flag, n] if flag == "--cluster" => match n.as_str() {
            "1" => Ok(1),
            "3" => Ok(3),
            _ => bail!("--cluster takes 1 or 3, not {n:?}"),
        },
        _ => bail!("usage: cargo xtask etcd-up [--cluster 1|3]"),
    }
}

fn base() -> PathBuf {
    util::root().join("target").join("etcd")
}

fn spec(size: usize) -> ClusterSpec {
    ClusterSpec::on_ports(&base().join(format!("cluster-{size}")), &PORTS[..size])
}

fn pid_file(spec: &ClusterSpec, i: usize) -> PathBuf {
    spec.members[i].data_dir.with_extension("pid")
}

fn log_file(spec: &ClusterSpec, i: usize) -> PathBuf {
    spec.members[i].data_dir.with_extension("log")
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The members started by xtask that still run, per cluster size.
fn running() -> Vec<(ClusterSpec, Vec<(usize, u32)>)> {
    [spec(1), spec(3), secure_spec()]
        .into_iter()
        .filter_map(|spec| {
            let alive: Vec<(usize, u32)> = (0..spec.members.len())
                .filter_map(|i| {
                    let pid = read_pid(&pid_file(&spec, i))?;
                    mesh_etcd_local::process_is_etcd(pid, &spec.members[i].data_dir).then_some((i, pid))
                })
                .collect();
            (!alive.is_empty()).then_some((spec, alive))
        })
        .collect()
}

/// Starts a local etcd of `size` members unless one runs already; waits until healthy.
pub(crate) fn up(size: usize) -> anyhow::Result<Up> {
    for (spec, alive) in running().into_iter().filter(|(spec, _)| spec.security.is_none()) {
        if spec.members.len() != size {
            bail!(
                "an etcd of {} members started by xtask already runs; `cargo xtask etcd-down` first",
                spec.members.len()
            );
        }
        if alive.len() == size {
            spec.wait_healthy(Duration::from_secs(10))?;
            let pids: Vec<String> = alive.iter().map(|(_, p)| p.to_string()).collect();
            println!("etcd already running (pid {}): {}", pids.join(","), spec.client_urls().join(","));
            return Ok(Up { endpoints: spec.client_urls(), started: Vec::new() });
        }
        // Some members died: stop the rest and start the whole cluster again.
        down()?;
    }

    let spec = spec(size);
    for m in &spec.members {
        if mesh_etcd_local::is_healthy(&m.client_url(), Duration::from_millis(300)) {
            if size == 1 {
                // Debian's etcd-server package starts a system etcd on 2379; use it as is.
                println!(
                    "an etcd not started by xtask already answers on {} (a system service?); using it",
                    m.client_url()
                );
                return Ok(Up { endpoints: vec![m.client_url()], started: Vec::new() });
            }
            bail!(
                "an etcd not started by xtask already answers on {}; stop it to start a cluster of {size} on these ports",
                m.client_url()
            );
        }
        for port in [m.client_port, m.peer_port] {
            TcpListener::bind(("127.0.0.1", port))
                .with_context(|| format!("port {port} on 127.0.0.1 is taken; etcd-up needs it"))?;
        }
    }
    let (dir, pids, children) = launch(&spec)?;
    println!(
        "etcd is up (pid {}): {}\n  data and logs under {}",
        pids.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
        spec.client_urls().join(","),
        dir.display()
    );
    Ok(Up { endpoints: spec.client_urls(), started: children })
}

/// Starts every member of `spec` detached, with pid and log files, and waits until healthy.
fn launch(spec: &ClusterSpec) -> anyhow::Result<(PathBuf, Vec<u32>, Vec<std::process::Child>)> {
    let etcd = mesh_etcd_local::ensure_etcd()?;
    let dir = spec.members[0].data_dir.parent().map(Path::to_path_buf).unwrap_or_else(base);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut pids = Vec::new();
    let mut children = Vec::new();
    for i in 0..spec.members.len() {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_file(spec, i))
            .with_context(|| format!("opening {}", log_file(spec, i).display()))?;
        let log2 = log.try_clone().context("duplicating the log handle")?;
        let child = {
            use std::os::unix::process::CommandExt as _;
            mesh_etcd_local::start_member(&etcd, spec, i)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                // Its own process group: Ctrl-C in this terminal must not stop a detached etcd.
                .process_group(0)
                .spawn()
                .with_context(|| format!("starting {}", etcd.display()))?
        };
        fs::write(pid_file(spec, i), child.id().to_string()).context("writing the pid file")?;
        pids.push(child.id());
        children.push(child);
    }
    if let Err(e) = spec.wait_healthy(Duration::from_secs(30)) {
        let _ = down();
        let tail = fs::read_to_string(log_file(spec, 0)).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(5).collect();
        bail!(
            "{e}; last lines of {}:\n{}",
            log_file(spec, 0).display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok((dir, pids, children))
}

/// Stops every etcd started by xtask; their data stays.
pub(crate) fn down() -> anyhow::Result<()> {
    let all = running();
    if all.is_empty() {
        println!("no etcd started by xtask is running");
    }
    for (spec, alive) in all {
        for &(_, pid) in &alive {
            mesh_etcd_local::signal(pid, Signal::Term)?;
        }
        for &(i, pid) in &alive {
            let data = &spec.members[i].data_dir;
            if !mesh_etcd_local::wait_until(Duration::from_secs(10), || !mesh_etcd_local::process_is_etcd(pid, data)) {
                mesh_etcd_local::signal(pid, Signal::Kill)?;
            }
            println!("stopped etcd member {} (pid {pid})", spec.members[i].name);
        }
        for i in 0..spec.members.len() {
            let _ = fs::remove_file(pid_file(&spec, i));
        }
    }
    Ok(())
}

pub(crate) fn status() -> anyhow::Result<()> {
    let all = running();
    if all.is_empty() {
        println!("no etcd started by xtask is running; `cargo xtask etcd-up` starts one");
        return Ok(());
    }
    for (spec, alive) in all {
        let kind = if spec.security.is_some() { " with TLS and auth" } else { "" };
        let dir = spec.members[0].data_dir.parent().map(Path::to_path_buf).unwrap_or_else(base);
        println!("etcd cluster of {}{kind} under {}", spec.members.len(), dir.display());
        for (i, m) in spec.members.iter().enumerate() {
            let pid = alive.iter().find(|(j, _)| *j == i).map(|(_, p)| *p);
            let health = if pid.is_none() {
                "not running"
            } else if mesh_etcd_local::is_healthy(&m.health_url(), Duration::from_secs(1)) {
                "healthy"
            } else {
                "UNHEALTHY"
            };
            let pid = pid.map_or("-".to_string(), |p| p.to_string());
            println!("  {}  {}  pid {pid}  {health}", m.name, m.client_url());
        }
    }
    Ok(())
}

// === the secure etcd of `etcd-up --secure` ===

/// Client, peer and plaintext health ports of the secure etcd: beside, not on, the plain one.
const SECURE_PORTS: (u16, u16) = (23790, 23800);
const SECURE_HEALTH_PORT: u16 = 23810;
/// The service the printed server flags are for.
const SECURE_SERVICE: &str = "greeter";

fn secure_dir() -> PathBuf {
    base().join("secure")
}

fn pki_dir() -> PathBuf {
    secure_dir().join("pki")
}

fn secure_spec() -> ClusterSpec {
    let pki = pki_dir();
    let security = mesh_etcd_local::Security {
        ca: pki.join("mesh-ca.pem"),
        cert: pki.join("etcd.pem"),
        key: pki.join("etcd.key"),
        client_cert_auth: true,
        auth_token_ttl: None,
    };
    let spec = ClusterSpec::on_ports(&secure_dir(), &[SECURE_PORTS]);
    // Fixed ports: with_security allocates nothing, so it cannot fail.
    spec.clone().with_security(security, &[SECURE_HEALTH_PORT]).unwrap_or(spec)
}

/// The users of the secure etcd and their roles.
fn secure_users() -> Vec<(&'static str, Vec<String>)> {
    vec![
        ("root", vec!["root".to_string()]),
        ("greeter-server", vec![mesh_etcd_local::server_role("/mesh", SECURE_SERVICE).name]),
        ("greeter-client", vec![mesh_etcd_local::client_role("/mesh").name]),
        ("mesh-admin", vec![mesh_etcd_local::admin_role("/mesh").name]),
    ]
}

fn password_file(user: &str) -> PathBuf {
    pki_dir().join(format!("{user}.password"))
}

/// `cargo xtask etcd-up --secure`: a local etcd with TLS (client certificates required),
/// auth on and mesh's least-privilege roles; the first run makes the certificates and
/// users under target/etcd/secure/, later runs start it again on the same data.
pub(crate) fn up_secure() -> anyhow::Result<()> {
    let spec = secure_spec();
    let member = &spec.members[0];
    let running = running().into_iter().any(|(s, _)| s.security.is_some());
    if running {
        spec.wait_healthy(Duration::from_secs(10))?;
        println!("the secure etcd already runs: {}", member.client_url());
    } else {
        for port in [member.client_port, member.peer_port, SECURE_HEALTH_PORT] {
            TcpListener::bind(("127.0.0.1", port))
                .with_context(|| format!("port {port} on 127.0.0.1 is taken; etcd-up --secure needs it"))?;
        }
        match provisioning(&secure_dir(), &member.data_dir) {
            Provisioning::Done => {}
            Provisioning::Fresh => provision(&spec)?,
            Provisioning::Unfinished => {
                // An earlier run stopped between making etcd's data and finishing its users:
                // that etcd would start without auth while the flags below named users.
                println!("an earlier etcd-up --secure did not finish setting up; starting over");
                for dir in [&member.data_dir, &pki_dir()] {
                    if dir.exists() {
                        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
                    }
                }
                provision(&spec)?;
            }
        }
        let (dir, pids, _children) = launch(&spec)?;
        println!(
            "etcd with TLS and auth is up (pid {}): {}\n  data, logs, certificates and passwords under {}",
            pids.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
            member.client_url(),
            dir.display()
        );
    }
    print_flags(&member.client_url());
    Ok(())
}

/// Where the secure etcd stands before a start.
#[derive(Debug, PartialEq, Eq)]
enum Provisioning {
    /// Nothing made yet.
    Fresh,
    /// Certificates, users and roles all made.
    Done,
    /// Something made, not all of it: a run failed half way.
    Unfinished,
}

/// The file written once provisioning finished.
fn provisioned_marker(dir: &Path) -> PathBuf {
    dir.join("provisioned")
}

fn provisioning(dir: &Path, data_dir: &Path) -> Provisioning {
    if provisioned_marker(dir).exists() {
        Provisioning::Done
    } else if data_dir.exists() || dir.join("pki").exists() {
        Provisioning::Unfinished
    } else {
        Provisioning::Fresh
    }
}

/// Makes the certificates, then starts etcd once in plaintext to create the roles and users
/// through its gateway (no password on any command line), and stops it.
fn provision(spec: &ClusterSpec) -> anyhow::Result<()> {
    use mesh_etcd_local::pki::{Pki, Validity};
    let pki = Pki::create(&pki_dir(), "mesh")?;
    let etcd_cert = pki.issue("etcd", "etcd", &["127.0.0.1", "localhost"], Validity::Current)?;
    let security = spec.security.as_ref().context("the secure spec has security")?;
    anyhow::ensure!(etcd_cert.cert == security.cert, "certificate paths disagree");
    pki.issue("etcd-client", "mesh-etcd-client", &[], Validity::Current)?;
    pki.issue("greeter-server", "greeter", &["127.0.0.1", "localhost", "greeter"], Validity::Current)?;
    pki.issue("greeter-client", "greeter-client", &[], Validity::Current)?;
    let mut users = Vec::new();
    for (name, roles) in secure_users() {
        let password = mesh_etcd_local::random_password()?;
        mesh_etcd_local::pki::write(&password_file(name), password.as_bytes(), true)?;
        users.push(mesh_etcd_local::User { name: name.to_string(), password, roles });
    }
    let roles = vec![
        mesh_etcd_local::server_role("/mesh", SECURE_SERVICE),
        mesh_etcd_local::client_role("/mesh"),
        mesh_etcd_local::admin_role("/mesh"),
    ];
    let mut plain = spec.clone();
    plain.security = None;
    for m in &mut plain.members {
        m.tls = false;
        m.metrics_port = None;
    }
    let (_, _, mut children) = launch(&plain)?;
    let result = mesh_etcd_local::setup_auth(&plain.members[0].client_url(), &roles, &users);
    for child in &mut children {
        mesh_etcd_local::signal(child.id(), Signal::Term)?;
        let _ = child.wait();
    }
    let _ = fs::remove_file(pid_file(&plain, 0));
    result.context("creating the roles and users")?;
    // Last: only a run that got here has an etcd with auth on and every user it prints.
    fs::write(provisioned_marker(&secure_dir()), "certificates, roles and users made\n")
        .context("marking the secure etcd as provisioned")?;
    println!("made a CA, certificates and the users root, greeter-server, greeter-client and mesh-admin");
    Ok(())
}

fn print_flags(url: &str) {
    let p = |f: &str| pki_dir().join(f).display().to_string();
    let etcd = format!(
        "--etcd {url} --etcd-ca {} --etcd-cert {} --etcd-key {}",
        p("mesh-ca.pem"),
        p("etcd-client.pem"),
        p("etcd-client.key")
    );
    let user = |u: &str| format!("--etcd-user {u} --etcd-password-file {}", password_file(u).display());
    println!(
        "\nA greeter-server (writes only /mesh/services/greeter/ and /mesh/status/greeter/, reads /mesh/config/greeter), with TLS to its clients:"
    );
    println!(
        "  cargo run -p greeter-server -- {etcd} {} --tls-cert {} --tls-key {}",
        user("greeter-server"),
        p("greeter-server.pem"),
        p("greeter-server.key")
    );
    println!("A greeter-client (reads only):");
    println!("  cargo run -p greeter-client -- {etcd} {} --tls-ca {}", user("greeter-client"), p("mesh-ca.pem"));
    println!("An operator (writes configuration):");
    println!("  cargo run -p greeter-server -- config show {etcd} {}", user("mesh-admin"));
    println!(
        "etcdctl as root (the password through the environment, not argv):\n  ETCDCTL_API=3 ETCDCTL_PASSWORD=\"$(cat {})\" etcdctl --endpoints {url} --cacert {} --cert {} --key {} --user root role list",
        password_file("root").display(),
        p("mesh-ca.pem"),
        p("etcd-client.pem"),
        p("etcd-client.key")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secure_etcd_whose_provisioning_stopped_half_way_is_provisioned_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("m0.etcd");
        assert_eq!(provisioning(dir.path(), &data), Provisioning::Fresh);
        // etcd made its data directory, then creating the users failed.
        fs::create_dir_all(&data).expect("data dir");
        assert_eq!(provisioning(dir.path(), &data), Provisioning::Unfinished);
        fs::remove_dir_all(&data).expect("remove");
        fs::create_dir_all(dir.path().join("pki")).expect("pki");
        assert_eq!(provisioning(dir.path(), &data), Provisioning::Unfinished);
        fs::write(provisioned_marker(dir.path()), "").expect("marker");
        assert_eq!(provisioning(dir.path(), &data), Provisioning::Done);
    }
}
