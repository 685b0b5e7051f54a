//! `cargo xtask demo`: the five-minute tour, told as chapters. Each chapter starts what it
//! needs, says what to look for, checks that it happened (a demo that lies is worse than
//! none), and leaves no process behind, also when it fails.

use std::collections::BTreeSet;
use std::fs;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use mesh_etcd_local::Signal;

use crate::{etcd, util};

/// What every chapter shares: the binaries, etcd, and the servers it started.
struct Demo {
    bin: PathBuf,
    logs: PathBuf,
    etcd: Vec<String>,
    servers: Vec<Server>,
}

struct Server {
    name: String,
    addr: String,
    child: Child,
}

pub(crate) fn run() -> anyhow::Result<()> {
    println!("== mesh demo ==\nbuilding greeter-server and greeter-client …");
    util::run(util::cargo().args([
        "build",
        "-q",
        "-p",
        "greeter-server",
        "-p",
        "greeter-client",
    ]))?;
    let up = etcd::up(1)?;
    let logs = util::root().join("target").join("demo");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut demo = Demo {
        bin: util::root().join("target").join("debug"),
        logs,
        etcd: up.endpoints.clone(),
        servers: Vec::new(),
    };
    let result = chapters(&mut demo);
    demo.stop_all();
    if !up.started.is_empty() {
        etcd::down()?;
        for mut child in up.started {
            let _ = child.wait();
        }
    }
    result?;
    println!("\n== demo done: every chapter checked out; nothing left running ==");
    Ok(())
}

fn chapters(demo: &mut Demo) -> anyhow::Result<()> {
    chapter_three_greeters(demo)?;
    Ok(())
}

/// Chapter 1: three plain greeter-servers, each greeted directly.
fn chapter_three_greeters(demo: &mut Demo) -> anyhow::Result<()> {
    println!("\n-- 1. three greeter-servers, one greeting each --");
    println!(
        "etcd runs at {} (used from the registry chapter on)",
        demo.etcd.join(",")
    );
    for i in 1..=3 {
        demo.start_server(&format!("greeter-{i}"))?;
    }
    let mut answered = BTreeSet::new();
    let targets: Vec<String> = demo
        .servers
        .iter()
        .map(|s| format!("http://{}", s.addr))
        .collect();
    for target in &targets {
        let out = util::output(demo.client().args(["--target", target, "--name", "demo"]))?;
        print!("  {target} → {out}");
        let served_by = out
            .rsplit_once("(served by ")
            .and_then(|(_, rest)| rest.split(')').next())
            .context("the reply names no instance")?;
        answered.insert(served_by.to_string());
    }
    ensure!(
        answered.len() == 3,
        "expected three different instances, got {answered:?}"
    );
    println!("three greetings from three different instances: {answered:?}");
    Ok(())
}

// === impl Demo ===

impl Demo {
    fn client(&self) -> Command {
        Command::new(self.bin.join("greeter-client"))
    }

    /// Starts a greeter-server on a free port and waits until it accepts connections.
    fn start_server(&mut self, name: &str) -> anyhow::Result<()> {
        let port = mesh_etcd_local::free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let log_path = self.logs.join(format!("{name}.log"));
        let log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(self.bin.join("greeter-server"))
            .args(["--listen", &addr, "--instance-id", name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting greeter-server")?;
        self.servers.push(Server {
            name: name.to_string(),
            addr: addr.clone(),
            child,
        });
        let up = mesh_etcd_local::wait_until(Duration::from_secs(15), || {
            TcpStream::connect(&addr).is_ok()
        });
        if !up {
            bail!(
                "{name} did not listen on {addr} within 15 s; see {}",
                log_path.display()
            );
        }
        println!("  started {name} on {addr} (log: {})", log_path.display());
        Ok(())
    }

    /// SIGTERM every server (a graceful stop), then SIGKILL any that linger.
    fn stop_all(&mut self) {
        for s in &self.servers {
            let _ = mesh_etcd_local::signal(s.child.id(), Signal::Term);
        }
        for mut s in self.servers.drain(..) {
            let exited = mesh_etcd_local::wait_until(Duration::from_secs(15), || {
                matches!(s.child.try_wait(), Ok(Some(_)))
            });
            if !exited {
                eprintln!("  {} did not stop within 15 s; killing it", s.name);
                let _ = s.child.kill();
                let _ = s.child.wait();
            }
        }
    }
}
