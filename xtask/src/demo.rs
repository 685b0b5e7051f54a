//! `cargo xtask demo [--quick]`: the tour, told as chapters. Each chapter starts what it
//! needs, says in one line what to watch, shows the evidence (the client's table, the
//! registrations, the counts), checks that it happened (a demo that lies is worse than none),
//! and leaves no process behind, also when it fails or is interrupted with Ctrl-C.
//!
//! `--quick` tells the same story with shorter runs and smaller counts, on an etcd of its own
//! on free ports; `cargo xtask test` runs it so that the main job cannot break unnoticed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::{BufRead as _, BufReader, IsTerminal as _, Write as _};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use mesh_etcd_local::{ClusterSpec, Signal};
use serde_json::Value;

use crate::{etcd, util};

/// Narration: a line (or lines) printed once. A live table above stays as it last was.
macro_rules! say {
    ($($arg:tt)*) => { say_line(&format!($($arg)*)) };
}

/// What `cargo xtask demo` was asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Options {
    /// The same story in seconds, on a private etcd.
    pub(crate) quick: bool,
}

pub(crate) fn parse(rest: &[String]) -> anyhow::Result<Options> {
    match rest {
        [] => Ok(Options { quick: false }),
        [flag] if flag == "--quick" => Ok(Options { quick: true }),
        _ => bail!("usage: cargo xtask demo [--quick]"),
    }
}

/// How long each step lasts and how many calls it makes: the full tour, or `--quick`.
#[derive(Debug, Clone, Copy)]
struct Pace {
    quick: bool,
}

impl Pace {
    fn pick<T>(self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }

    fn ms(self, full: u64, quick: u64) -> Duration {
        Duration::from_millis(self.pick(full, quick))
    }
}

/// What every chapter shares: the binaries, etcd, and the servers it started.
struct Demo {
    pace: Pace,
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

/// The etcd the demo runs on: `cargo xtask etcd-up`'s (full tour), or one of its own on free
/// ports under target/demo/ (`--quick`, so that `cargo xtask test` never touches port 2379).
enum DemoEtcd {
    Shared(etcd::Up),
    Private { spec: ClusterSpec, child: Child },
}

pub(crate) fn run(options: Options) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("installing the Ctrl-C handler")?;
    }
    let _ = STOP.set(stop);
    screen().tty = std::io::stdout().is_terminal();
    let pace = Pace { quick: options.quick };

    say!("== mesh demo{} ==", pace.pick("", " (quick)"));
    say!("building greeter-server and greeter-client …");
    util::run(util::cargo().args(["build", "-q", "-p", "greeter-server", "-p", "greeter-client"]))?;
    let logs = util::root().join("target").join("demo");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let started = Instant::now();
    let etcd = if pace.quick { private_etcd(&logs)? } else { DemoEtcd::Shared(etcd::up(1)?) };
    let endpoints = match &etcd {
        DemoEtcd::Shared(up) => up.endpoints.clone(),
        DemoEtcd::Private { spec, .. } => spec.client_urls(),
    };
    let bin = util::target_dir().join("debug");
    let mut demo = Demo { pace, bin, logs, etcd: endpoints, servers: Vec::new() };
    let result = chapters(&mut demo);
    let servers = demo.servers.len();
    demo.stop_all();
    let etcd_stopped = stop_etcd(etcd);
    if interrupted() {
        say!("\n== interrupted: stopped {servers} server(s) and the demo's etcd; nothing left running ==");
        std::process::exit(130);
    }
    result?;
    etcd_stopped?;
    say!(
        "\n== demo done in {:.0} s: every chapter checked out; nothing left running ==",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn chapters(demo: &mut Demo) -> anyhow::Result<()> {
    chapter_three_greeters(demo)?;
    chapter_balancing(demo)?;
    chapter_registry(demo)?;
    chapter_failover(demo)?;
    chapter_limiter(demo)?;
    chapter_config(demo)?;
    chapter_tls(demo)?;
    chapter_shutdown(demo)?;
    Ok(())
}

fn private_etcd(logs: &Path) -> anyhow::Result<DemoEtcd> {
    let bin = mesh_etcd_local::ensure_etcd()?;
    let dir = logs.join("etcd");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let spec = ClusterSpec::on_free_ports(&dir, 1)?;
    let log_path = dir.join("etcd.log");
    let log = fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let child = mesh_etcd_local::start_member(&bin, &spec, 0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let healthy = spec.wait_healthy(Duration::from_secs(30));
    let (pid, urls) = (child.id(), spec.client_urls().join(","));
    let etcd = DemoEtcd::Private { spec, child };
    if let Err(e) = healthy {
        let _ = stop_etcd(etcd);
        bail!("{e}; see {}", log_path.display());
    }
    say!("etcd is up (pid {pid}): {urls} (its own, on free ports)");
    Ok(etcd)
}

fn stop_etcd(etcd: DemoEtcd) -> anyhow::Result<()> {
    match etcd {
        DemoEtcd::Shared(up) => {
            if !up.started.is_empty() {
                etcd::down()?;
                for mut child in up.started {
                    let _ = child.wait();
                }
            }
        }
        DemoEtcd::Private { spec, mut child } => {
            util::terminate(&mut child, Duration::from_secs(10));
            for m in &spec.members {
                let _ = fs::remove_dir_all(&m.data_dir);
            }
        }
    }
    Ok(())
}

/// Chapter 1: etcd up, three greeter-servers register, each greeted directly.
fn chapter_three_greeters(demo: &mut Demo) -> anyhow::Result<()> {
    chapter(
        "1. etcd, and three greeter-servers that register",
        "each server puts its address under /mesh/services/greeter/ once it serves, and answers with its own name",
    );
    for i in 1..=3 {
        demo.start_server(&format!("greeter-{i}"))?;
    }
    demo.until_registered(&["greeter-1", "greeter-2", "greeter-3"])?;
    say!("  the registrations, as `etcdctl get --prefix /mesh/services/` shows them:");
    demo.show_keys("/mesh/services/")?;
    let mut answered = BTreeSet::new();
    let targets: Vec<String> = demo.servers.iter().map(|s| format!("http://{}", s.addr)).collect();
    for target in &targets {
        let out = demo.output(demo.client().args(["--target", target, "--name", "demo", "--json"]))?;
        say!("  {target} → {}", out.lines().next().unwrap_or_default());
        let served_by = per_call_owners(&report(&out)?).pop().flatten().context("the reply names no instance")?;
        answered.insert(served_by);
    }
    ensure!(answered.len() == 3, "expected three different instances, got {answered:?}");
    say!("  three greetings from three different instances: {answered:?}");
    Ok(())
}

/// Chapter 2: the client spreads its calls over the three servers with each strategy.
fn chapter_balancing(demo: &mut Demo) -> anyhow::Result<()> {
    let n: u32 = demo.pace.pick(300, 60);
    chapter(
        &format!("2. client-side balancing: {n} calls per strategy over three servers"),
        "round robin gives each a third, weights 1:2:3 give exactly 1:2:3, and consistent hashing moves only the keys of a removed server",
    );
    let targets: Vec<String> = demo.servers.iter().map(|s| s.addr.clone()).collect();
    let all = targets.join(",");
    let runs: [(&str, &[&str]); 6] = [
        ("round_robin", &[]),
        ("random", &[]),
        ("consistent_hash", &["--hash-key", "user-{i}"]),
        ("weighted", &["--weights", "1,2,3"]),
        ("p2c", &[]),
        ("p2c_ewma", &[]),
    ];
    let total = u64::from(n);
    for (strategy, extra) in runs {
        let by = served_by_counts(&demo.greet(&all, strategy, n, extra)?);
        let line: Vec<String> = by.iter().map(|(k, v)| format!("{k} {v}")).collect();
        say!("  {strategy:<16} {}", line.join(", "));
        ensure!(by.values().sum::<u64>() == total, "{strategy}: not all {n} calls were answered: {by:?}");
        if strategy == "round_robin" {
            ensure!(by.values().all(|&c| c == total / 3), "round robin must give {} each: {by:?}", total / 3);
        }
        if strategy == "weighted" {
            let counts: Vec<u64> = demo.servers.iter().map(|s| by.get(&s.name).copied().unwrap_or(0)).collect();
            let want = [total / 6, total / 3, total / 2];
            ensure!(counts == want, "weights 1:2:3 must give {want:?}: {counts:?}");
            say!("  {:<16} (weights 1:2:3 → exactly {want:?}: a weighted round-robin schedule)", "");
        }
    }

    let same = demo.pace.pick(20, 10);
    let by = served_by_counts(&demo.greet(&all, "consistent_hash", same, &["--hash-key", "user-42"])?);
    ensure!(by.len() == 1, "one key must always land on one server: {by:?}");
    say!("  {same} calls with hash key user-42 all went to {}", by.keys().next().map_or("?", String::as_str));

    let before = per_call_owners(&demo.greet(&all, "consistent_hash", n, &["--hash-key", "user-{i}"])?);
    let removed = &demo.servers[2];
    let two = targets[..2].join(",");
    let after = per_call_owners(&demo.greet(&two, "consistent_hash", n, &["--hash-key", "user-{i}"])?);
    let n = n as usize;
    ensure!(
        before.len() == n && after.len() == n && before.iter().chain(&after).all(Option::is_some),
        "expected {n} replies each time"
    );
    let on_removed = before.iter().filter(|o| o.as_deref() == Some(removed.name.as_str())).count();
    let moved: Vec<usize> = (0..n).filter(|&i| before[i] != after[i]).collect();
    let moved_elsewhere = moved.iter().filter(|&&i| before[i].as_deref() != Some(removed.name.as_str())).count();
    say!(
        "  removing {} from the set: {on_removed} of {n} keys were on it and moved; {moved_elsewhere} other keys moved",
        removed.name
    );
    ensure!(moved_elsewhere == 0 && moved.len() == on_removed, "only the removed server's keys may move");
    Ok(())
}

/// Chapter 3: the client finds servers in etcd, and follows them as they join and leave.
fn chapter_registry(demo: &mut Demo) -> anyhow::Result<()> {
    chapter(
        "3. discovery: servers join and leave while the client runs",
        "greeter-4 appears in the client's table with no restart, and greeter-1 leaves it, with no call lost",
    );
    let pace = demo.pace;
    let run = demo.discovering_client(
        "greeter",
        &["--duration", pace.pick("10s", "3s"), "--interval", "20ms"],
        &[],
        "client-discovery.log",
    )?;
    pause(pace.ms(2000, 700))?;
    say!("  → greeter-4 joins");
    demo.start_server("greeter-4")?;
    pause(pace.ms(3000, 1000))?;
    say!("  → greeter-1 leaves gracefully (SIGTERM: NOT_SERVING, deregister, grace period, drain)");
    let left = demo.server("greeter-1")?.addr.clone();
    demo.stop_server("greeter-1")?;
    let report = run.finish("the client failed calls while servers came and went")?;
    let by = served_by_counts(&report);
    ensure!(by.get("greeter-4").is_some_and(|&n| n > 0), "greeter-4 got no calls: {by:?}");
    let endpoints: Vec<&str> = report["endpoints"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["address"].as_str()).collect())
        .unwrap_or_default();
    ensure!(!endpoints.contains(&left.as_str()), "the client still lists greeter-1 ({left}): {endpoints:?}");
    say!(
        "  {} calls, 0 failed; greeter-4 answered {} of them and greeter-1 left the table, with no restart",
        report["calls"],
        by.get("greeter-4").copied().unwrap_or(0)
    );
    Ok(())
}

/// Chapter 4: under load, one server is killed and another hung; no call is lost, and both
/// come back.
fn chapter_failover(demo: &mut Demo) -> anyhow::Result<()> {
    chapter(
        "4. failover: a server killed, another hung, no call lost",
        "the killed server turns unreachable at once; the hung one's breaker opens after a few timeouts, and a probe closes it once it answers again",
    );
    let pace = demo.pace;
    let [killed, hung] = [&demo.servers[0], &demo.servers[1]].map(|s| (s.name.clone(), s.addr.clone()));
    let per_try = pace.pick("200ms", "100ms");
    let args =
        ["--duration", pace.pick("16s", "7s"), "--interval", "2ms", "--timeout", "1s", "--per-try-timeout", per_try];
    let open: &[&str] = if pace.quick { &["--breaker-open", "300ms"] } else { &[] };
    let run = demo.discovering_client("greeter", &args, open, "client-failover.log")?;
    pause(pace.ms(2000, 1000))?;
    say!("  → kill -9 {} ({})", killed.0, killed.1);
    demo.signal_server(&killed.0, Signal::Kill)?;
    pause(pace.ms(2000, 700))?;
    say!("  → SIGSTOP {} ({}): it hangs, its connection stays open", hung.0, hung.1);
    demo.signal_server(&hung.0, Signal::Stop)?;
    pause(pace.ms(4000, 1500))?;
    say!("  → SIGCONT {}, and {} restarts at its address", hung.0, killed.0);
    demo.signal_server(&hung.0, Signal::Cont)?;
    demo.restart_server(&killed.0)?;
    let report = run.finish("the client failed calls")?;
    let endpoint = |addr: &str| {
        report["endpoints"].as_array().and_then(|a| a.iter().find(|e| e["address"].as_str() == Some(addr)).cloned())
    };
    let hung_end = endpoint(&hung.1).with_context(|| format!("{} is not in the client's table", hung.0))?;
    let transitions = hung_end["breaker_transitions"].as_u64().unwrap_or(0);
    ensure!(transitions >= 3, "{}'s breaker should have opened and closed again: {hung_end}", hung.0);
    ensure!(hung_end["breaker"].as_str() == Some("closed"), "{}'s breaker did not close: {hung_end}", hung.0);
    let order = per_call_owners(&report);
    let tail = &order[order.len() - order.len() / 8..];
    for name in [&killed.0, &hung.0] {
        ensure!(tail.iter().any(|o| o.as_deref() == Some(name.as_str())), "{name} got no calls at the end");
    }
    say!(
        "  {} calls, 0 failed ({} retried); {}'s breaker changed state {transitions} times and is closed; both serve again",
        report["calls"],
        report["retries"],
        hung.0
    );
    Ok(())
}

/// Chapter 5: a server limited to 100 calls per second, flooded at several times that, while
/// its health is checked.
fn chapter_limiter(demo: &mut Demo) -> anyhow::Result<()> {
    chapter(
        "5. the rate limiter under a flood of several times the rate",
        "rate × time + burst admitted, the rest rejected with RESOURCE_EXHAUSTED, and health checks answered SERVING throughout",
    );
    let secs = demo.pace.pick(3, 1);
    let (rate, burst) = (100.0, 10.0);
    let name = "greeter-limited";
    let addr = format!("127.0.0.1:{}", mesh_etcd_local::free_port()?);
    demo.spawn_server_with(name, &addr, &["--rate", "100", "--burst", "10", "--no-register"])?;
    let every = format!("{secs}s");
    let health = demo
        .client()
        .args(["health", "--target", &addr, "--duration", &every, "--every", "20ms", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the health checker")?;
    let report = flood_report(demo, &addr, secs)?;
    let admitted = report["ok"].as_u64().unwrap_or(0);
    let failed = report["errors"].as_u64().unwrap_or(0);
    let exhausted = report["errors_by_code"]["ResourceExhausted"].as_u64().unwrap_or(0);
    let health = health.wait_with_output().context("waiting for the health checker")?;
    let health = serde_json::from_str::<Value>(String::from_utf8_lossy(&health.stdout).trim())
        .context("reading the health checker's report")?;
    let calls = admitted + failed;
    let expected = rate * secs as f64 + burst;
    say!(
        "  {calls} calls in {secs} s, {:.0}× the rate: {admitted} admitted (rate × {secs} s + burst = {expected:.0}), {exhausted} rejected with RESOURCE_EXHAUSTED",
        calls as f64 / (rate * secs as f64)
    );
    say!("  the server's log: {}", demo.log_line(name, "rate limit")?);
    say!("  health: {} of {} checks SERVING during the flood", health["serving"], health["checks"]);
    ensure!(calls as f64 >= 3.0 * rate * secs as f64, "the flood was too thin to show the limit: {calls} calls");
    ensure!(near(admitted, expected), "{admitted} admitted, expected {expected}");
    ensure!(exhausted == failed, "every failure is the limit's: {report}");
    ensure!(health["serving"] == health["checks"], "health checks failed during the flood: {health}");
    demo.stop_server(name)
}

/// Whether an admitted count is what the limit allows: within 5 %, or 10 calls for the short
/// floods of `--quick`, where a call more or less at either end weighs more.
fn near(admitted: u64, expected: f64) -> bool {
    (admitted as f64 - expected).abs() <= (expected * 0.05).max(10.0)
}

/// The service of chapter 6: its own configuration key, so that nothing of a user's is
/// touched.
const CONFIG_SERVICE: &str = "greeter-demo-config";

fn chapter_config(demo: &mut Demo) -> anyhow::Result<()> {
    chapter(
        "6. live configuration from etcd",
        "a new greeting and a new rate in force with no restart, and a bad document refused with its reason while the server goes on as it was",
    );
    let secs = demo.pace.pick(3, 1);
    let dir = demo.logs.clone();
    let write = |name: &str, doc: &str| -> anyhow::Result<String> {
        let path = dir.join(name);
        fs::write(&path, doc).with_context(|| format!("writing {}", path.display()))?;
        Ok(path.display().to_string())
    };
    // Start from no settings in etcd (an empty document: the flags rule).
    demo.config(&["apply", &write("config-empty.json", "{}")?])?;
    let name = "greeter-configured";
    let addr = format!("127.0.0.1:{}", mesh_etcd_local::free_port()?);
    demo.spawn_server_args(name, &addr, &["--service", CONFIG_SERVICE])?;
    say!("  before: {}", demo.hello(&addr)?);

    let first = r#"{"server": {"greeting": "Good day, {name}!", "limiter": {"rate_per_sec": 50, "burst": 5}}}"#;
    say!("  config apply {first}");
    let put = Instant::now();
    say!("    {}", demo.config(&["apply", &write("config-1.json", first)?])?);
    demo.until_greeting(&addr, "Good day, demo!", Duration::from_secs(2))?;
    say!("  the client sees \"Good day, demo!\" {} ms after `config apply` started", put.elapsed().as_millis());
    let (admitted, calls) = flood(demo, &addr, secs)?;
    let expected = 50.0 * secs as f64 + 5.0;
    say!("  a {secs} s flood of {calls} calls: {admitted} admitted (50/s × {secs} s + burst 5 = {expected})");
    ensure!(near(admitted, expected), "{admitted} admitted at 50/s, expected {expected}");

    let second = r#"{"server": {"greeting": "Good evening, {name}!", "limiter": {"rate_per_sec": 200, "burst": 20}}}"#;
    say!("  config apply {second}");
    demo.config(&["apply", &write("config-2.json", second)?])?;
    demo.until_greeting(&addr, "Good evening, demo!", Duration::from_secs(2))?;
    let (admitted, calls) = flood(demo, &addr, secs)?;
    let expected = 200.0 * secs as f64 + 20.0;
    say!("  a {secs} s flood of {calls} calls: {admitted} admitted (200/s × {secs} s + burst 20 = {expected})");
    ensure!(near(admitted, expected), "{admitted} admitted at 200/s, expected {expected}");

    let bad = r#"{"server": {"limiter": {"rate_per_sec": 0}}}"#;
    say!("  config apply {bad}");
    let refused = demo.config(&["apply", &write("config-bad.json", bad)?]);
    let reason = refused.as_ref().err().map(|e| format!("{e:#}")).context("config apply took a rate of 0")?;
    let reason = reason.rsplit_once("error: ").map_or(reason.as_str(), |(_, r)| r).trim();
    say!("    refused, nothing written: {reason}");
    // Put past the check, as `etcdctl put` would: the server refuses it and says why.
    if let Some(etcdctl) = mesh_etcd_local::find_etcdctl() {
        let key = format!("/mesh/config/{CONFIG_SERVICE}");
        demo.output(Command::new(etcdctl).env("ETCDCTL_API", "3").args([
            "--endpoints",
            &demo.etcd.join(","),
            "put",
            &key,
            bad,
        ]))?;
        let shown = demo.until_shown("rate_per_sec: is 0", Duration::from_secs(3))?;
        say!("  etcdctl put it anyway; `greeter-server config show` then says:");
        for line in shown.lines().filter(|l| !l.trim().is_empty()).skip_while(|l| !l.starts_with("instance")) {
            say!("    {line}");
        }
    }
    say!("  and the server goes on as it was: {}", demo.hello(&addr)?);
    ensure!(demo.hello(&addr)?.starts_with("Good evening, demo!"), "the last good greeting stays");
    demo.config(&["apply", &write("config-empty.json", "{}")?])?;
    demo.stop_server(name)
}

/// The service of chapter 7, so that its TLS servers do not mix with the plaintext ones.
const TLS_SERVICE: &str = "greeter-demo-tls";

/// Chapter 7: two servers with TLS and a rogue one whose certificate another CA signed, all
/// registered under one service; the client trusts only the first CA.
fn chapter_tls(demo: &mut Demo) -> anyhow::Result<()> {
    chapter(
        "7. TLS on, and a rogue endpoint refused",
        "every call goes over TLS to the two good servers; the rogue one (valid registration, foreign certificate) gets no call, and the table says why",
    );
    let dir = demo.logs.join("tls");
    let _ = fs::remove_dir_all(&dir);
    let ours = mesh_etcd_local::pki::Pki::create(&dir, "demo")?;
    let names = ["127.0.0.1", "localhost"];
    let good = ours.issue("greeter", "greeter", &names, mesh_etcd_local::pki::Validity::Current)?;
    let rogue_ca = mesh_etcd_local::pki::Pki::create(&dir, "rogue")?;
    let rogue = rogue_ca.issue("rogue", "greeter", &names, mesh_etcd_local::pki::Validity::Current)?;
    say!("  a throwaway CA under {}; the servers' certificates are issued to 127.0.0.1", dir.display());
    let cert_args =
        |files: &mesh_etcd_local::pki::CertFiles| [files.cert.display().to_string(), files.key.display().to_string()];
    let [cert, key] = cert_args(&good);
    for name in ["greeter-tls-1", "greeter-tls-2"] {
        let addr = format!("127.0.0.1:{}", mesh_etcd_local::free_port()?);
        demo.spawn_server_with(name, &addr, &["--service", TLS_SERVICE, "--tls-cert", &cert, "--tls-key", &key])?;
    }
    let [rogue_cert, rogue_key] = cert_args(&rogue);
    let rogue_addr = format!("127.0.0.1:{}", mesh_etcd_local::free_port()?);
    demo.spawn_server_with(
        "greeter-rogue",
        &rogue_addr,
        &["--service", TLS_SERVICE, "--tls-cert", &rogue_cert, "--tls-key", &rogue_key],
    )?;
    demo.until_registered_in(TLS_SERVICE, &["greeter-tls-1", "greeter-tls-2", "greeter-rogue"])?;
    say!("  the registrations (\"tls\": true in Metadata tells clients to dial with TLS):");
    demo.show_keys(&format!("/mesh/services/{TLS_SERVICE}/"))?;

    let good_addr = demo.server("greeter-tls-1")?.addr.clone();
    let plain =
        demo.client().args(["--target", &good_addr, "--name", "demo"]).output().context("running greeter-client")?;
    ensure!(!plain.status.success(), "a plaintext call to a TLS server succeeded");
    let stderr = String::from_utf8_lossy(&plain.stderr);
    let why = stderr.lines().find(|l| l.starts_with("error:")).context("the plaintext client printed no error")?;
    ensure!(why.contains("speaks TLS only"), "the plaintext client's error does not say why: {why}");
    say!("  a plaintext client to greeter-tls-1: {why}");

    let ca = ours.ca_file().display().to_string();
    let pace = demo.pace;
    let run = demo.discovering_client(
        TLS_SERVICE,
        &["--duration", pace.pick("5s", "2s"), "--interval", "5ms"],
        &["--tls-ca", &ca],
        "client-tls.log",
    )?;
    let report = run.finish("the TLS client failed calls")?;
    let by = served_by_counts(&report);
    ensure!(!by.contains_key("greeter-rogue"), "the rogue server got calls: {by:?}");
    ensure!(by.len() == 2, "both good servers should answer: {by:?}");
    let endpoints = report["endpoints"].as_array().cloned().unwrap_or_default();
    let rogue_end = endpoints
        .iter()
        .find(|e| e["address"].as_str().is_some_and(|a| a.ends_with(&rogue_addr)))
        .with_context(|| format!("the rogue endpoint is not in the client's table: {endpoints:?}"))?;
    let reason = rogue_end["last_error"].as_str().unwrap_or_default();
    ensure!(rogue_end["requests"].as_u64() == Some(0), "the rogue endpoint was sent calls: {rogue_end}");
    ensure!(reason.contains("not signed by a CA"), "the client does not say why it refuses the rogue: {rogue_end}");
    say!("  {} calls over TLS, 0 failed, none to the rogue server: {reason}", report["calls"]);
    demo.stop_servers(&["greeter-tls-1", "greeter-tls-2", "greeter-rogue"].map(String::from))
}

/// Chapter 8: a rolling restart under load, then every server stops on SIGTERM.
fn chapter_shutdown(demo: &mut Demo) -> anyhow::Result<()> {
    chapter(
        "8. graceful shutdown: a rolling restart under load, then every server stops",
        "each server on SIGTERM reports NOT_SERVING, deregisters, serves out its grace and drains, so the client loses no call; at the end etcd holds no registration",
    );
    let pace = demo.pace;
    let mut run = demo.discovering_client(
        "greeter",
        &["--duration", pace.pick("14s", "7s"), "--interval", "2ms"],
        &[],
        "client-shutdown.log",
    )?;
    pause(pace.ms(1500, 700))?;
    let names: Vec<String> = demo.servers.iter().map(|s| s.name.clone()).collect();
    for name in &names {
        let addr = demo.server(name)?.addr.clone();
        let stopped = Instant::now();
        demo.stop_server(name)?;
        say!("  → SIGTERM {name}: exit 0 after {} ms; it starts again at {addr}", stopped.elapsed().as_millis());
        demo.spawn_server(name, &addr)?;
        demo.until_registered(&[name.as_str()])?;
    }
    ensure!(run.is_running(), "the client ended before the rolling restart did; nothing to check");
    let report = run.finish("the client failed calls during the rolling restart")?;
    say!("  {} calls during the rolling restart of {}, 0 failed", report["calls"], names.join(", "));
    say!("  → SIGTERM to every server at once");
    let started = Instant::now();
    demo.stop_servers(&names)?;
    say!("  all {} exited 0 within {} ms; the registrations left in etcd:", names.len(), started.elapsed().as_millis());
    let left = demo.show_keys("/mesh/services/greeter/")?;
    ensure!(left == Some(0), "registrations are left behind after every server stopped");
    Ok(())
}

/// Four callers as fast as they can (several times a demo's rate) for `secs` seconds: the
/// bench report. Retries off, to count what the server says, not what a retry makes of it.
fn flood_report(demo: &Demo, addr: &str, secs: u64) -> anyhow::Result<Value> {
    let duration = format!("{secs}s");
    let out = demo.output(demo.client().args(["bench", "--target", addr, "--concurrency", "4"]).args([
        "--duration",
        &duration,
        "--warmup",
        "0s",
        "--max-attempts",
        "1",
        "--json",
    ]))?;
    report(&out)
}

/// [`flood_report`] once the bucket is full: (admitted, calls).
fn flood(demo: &Demo, addr: &str, secs: u64) -> anyhow::Result<(u64, u64)> {
    // A new limit keeps what the bucket held (a change is not a free burst): let it fill to
    // its burst first, so that the count is rate × time + burst.
    pause(Duration::from_millis(300))?;
    let report = flood_report(demo, addr, secs)?;
    let admitted = report["ok"].as_u64().unwrap_or(0);
    Ok((admitted, admitted + report["errors"].as_u64().unwrap_or(0)))
}

/// `line` without ANSI colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// greeter-client's `--json` report: the last line of its output that is a JSON object.
fn report(out: &str) -> anyhow::Result<Value> {
    let line = out.lines().rev().find(|l| l.starts_with('{')).context("greeter-client printed no JSON report")?;
    serde_json::from_str(line).with_context(|| format!("reading greeter-client's report {line:?}"))
}

/// Replies per `served_by` in a report.
fn served_by_counts(report: &Value) -> BTreeMap<String, u64> {
    report["served_by"]
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_u64()?))).collect())
        .unwrap_or_default()
}

/// Who served each call, in call order (`None` for a failed call).
fn per_call_owners(report: &Value) -> Vec<Option<String>> {
    report["order"].as_array().map(|a| a.iter().map(|v| v.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

// === Ctrl-C ===

/// Set by SIGINT or SIGTERM. The demo's servers and clients run in their own process group,
/// so a Ctrl-C in the terminal reaches only the demo, which then stops them in order.
static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

fn interrupted() -> bool {
    STOP.get().is_some_and(|s| s.load(Ordering::Relaxed))
}

/// The error a step returns once Ctrl-C is pressed.
#[derive(Debug)]
struct Interrupted;

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Sleeps for `d`, or less if Ctrl-C is pressed.
fn pause(d: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + d;
    loop {
        if interrupted() {
            return Err(Interrupted.into());
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Waits for `child` to exit; on Ctrl-C, kills it instead.
fn wait_child(child: &mut Child) -> anyhow::Result<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait().context("waiting for a child process")? {
            return Ok(status);
        }
        if interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Interrupted.into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// === the screen ===

/// What is on the screen below the last narrated line: on a terminal, the live table that
/// the next one replaces.
struct Screen {
    tty: bool,
    live_lines: usize,
}

static SCREEN: Mutex<Screen> = Mutex::new(Screen { tty: false, live_lines: 0 });

fn screen() -> std::sync::MutexGuard<'static, Screen> {
    SCREEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn say_line(text: &str) {
    let mut screen = screen();
    screen.live_lines = 0;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// A table that updates in place on a terminal: the previous one is overwritten.
fn live_table(lines: &[String]) {
    let mut screen = screen();
    let mut out = std::io::stdout().lock();
    if screen.live_lines > 0 {
        // Up to the first line of the previous table, and clear from there down.
        let _ = write!(out, "\x1b[{}F\x1b[J", screen.live_lines);
    }
    for line in lines {
        let _ = writeln!(out, "  │ {line}");
    }
    let _ = out.flush();
    screen.live_lines = lines.len();
}

fn chapter(title: &str, watch: &str) {
    say!("\n-- {title} --\n  watch: {watch}");
}

/// A client that discovers a service in etcd, running in the background; its table is shown
/// live on a terminal, and once at the end otherwise.
struct Running {
    child: Child,
    echo: Option<std::thread::JoinHandle<Vec<String>>>,
    log: PathBuf,
}

/// A chapter that fails or is interrupted stops its client: it must not call on while the
/// servers stop, nor outlive the demo.
impl Drop for Running {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Running {
    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the client to end; its report, or an error saying `failed` if it failed
    /// calls.
    fn finish(mut self, failed: &str) -> anyhow::Result<Value> {
        let status = wait_child(&mut self.child)?;
        let echo = self.echo.take().context("the client's output was read already")?;
        let lines = echo.join().map_err(|_| anyhow::anyhow!("client output reader panicked"))?;
        ensure!(status.success(), "{failed}; see {}", self.log.display());
        report(&lines.join("\n"))
    }
}

/// Reads a client's stdout: each table (from a `strategy` line to the `retries` line) goes
/// live on a terminal, and only the last is printed otherwise; other lines are narrated.
fn echo_tables(stdout: impl std::io::Read, tty: bool) -> Vec<String> {
    let mut lines = Vec::new();
    let mut table: Option<Vec<String>> = None;
    let mut last_table = Vec::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if line.starts_with("strategy ") {
            table = Some(Vec::new());
        }
        match table.as_mut() {
            Some(rows) => {
                rows.push(line.clone());
                if line.starts_with("retries ") {
                    last_table = std::mem::take(rows);
                    table = None;
                    if tty {
                        live_table(&last_table);
                    }
                }
            }
            None if !line.is_empty() && !line.starts_with('{') => say!("  │ {line}"),
            None => {}
        }
        lines.push(line);
    }
    if !tty && !last_table.is_empty() {
        let shown: Vec<String> = last_table.iter().map(|l| format!("  │ {l}")).collect();
        say!("  the client's table at its last report:\n{}", shown.join("\n"));
    }
    lines
}

// === impl Demo ===

impl Demo {
    fn client(&self) -> Command {
        Command::new(self.bin.join("greeter-client"))
    }

    /// [`util::output`], or [`Interrupted`] if Ctrl-C stopped the command.
    fn output(&self, cmd: &mut Command) -> anyhow::Result<String> {
        let out = util::output(cmd);
        if interrupted() {
            return Err(Interrupted.into());
        }
        out
    }

    fn server(&self, name: &str) -> anyhow::Result<&Server> {
        self.servers.iter().find(|s| s.name == name).with_context(|| format!("no server {name}"))
    }

    /// Starts a client that discovers `service` in etcd and runs with `args` and `extra`,
    /// showing its table each second; its log goes to `log_name` under target/demo/.
    fn discovering_client(
        &self,
        service: &str,
        args: &[&str],
        extra: &[&str],
        log_name: &str,
    ) -> anyhow::Result<Running> {
        // Its log goes to a file: a pipe read only at the end fills up under RUST_LOG=debug.
        let log_path = self.logs.join(log_name);
        let log = fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut child = self
            .client()
            .args(["--etcd", &self.etcd.join(","), "--service", service, "--name", "demo"])
            .args(args)
            .args(extra)
            .args(["--quiet", "--table-every", "1s", "--json"])
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting greeter-client")?;
        let stdout = child.stdout.take().context("client stdout")?;
        let tty = screen().tty;
        let echo = std::thread::spawn(move || echo_tables(stdout, tty));
        Ok(Running { child, echo: Some(echo), log: log_path })
    }

    /// Runs the client over `targets` with `strategy` for `count` calls; its report.
    fn greet(&self, targets: &str, strategy: &str, count: u32, extra: &[&str]) -> anyhow::Result<Value> {
        let mut cmd = self.client();
        cmd.args(["--target", targets, "--strategy", strategy, "--count", &count.to_string(), "--name", "demo"]);
        cmd.args(["--quiet", "--json"]).args(extra);
        report(&self.output(&mut cmd)?)
    }

    /// Starts a greeter-server on a free port and waits until it accepts connections.
    fn start_server(&mut self, name: &str) -> anyhow::Result<()> {
        let port = mesh_etcd_local::free_port()?;
        self.spawn_server(name, &format!("127.0.0.1:{port}"))
    }

    /// Starts a greeter-server at `addr` and waits until it accepts connections.
    fn spawn_server(&mut self, name: &str, addr: &str) -> anyhow::Result<()> {
        self.spawn_server_with(name, addr, &[])
    }

    /// Starts a greeter-server at `addr` with `extra` flags and waits until it accepts
    /// connections.
    fn spawn_server_with(&mut self, name: &str, addr: &str, extra: &[&str]) -> anyhow::Result<()> {
        // These chapters show the flags at work: a configuration document a user left in
        // this etcd must not change them.
        let mut args = vec!["--no-config"];
        args.extend_from_slice(extra);
        self.spawn_server_args(name, addr, &args)
    }

    /// Starts a greeter-server at `addr` with exactly `extra` besides its address, name, etcd
    /// and pace, and waits until it accepts connections.
    fn spawn_server_args(&mut self, name: &str, addr: &str, extra: &[&str]) -> anyhow::Result<()> {
        let addr = addr.to_string();
        let log_path = self.logs.join(format!("{name}.log"));
        let log = fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(self.bin.join("greeter-server"))
            .args(["--listen", &addr, "--instance-id", name, "--etcd", &self.etcd.join(",")])
            // The quick tour's clients drop a leaving server within milliseconds of its
            // deregistration; the default grace (1 s) is for clients further away.
            .args(["--shutdown-grace", self.pace.pick("1s", "300ms")])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting greeter-server")?;
        self.servers.push(Server { name: name.to_string(), addr: addr.clone(), child });
        let up =
            mesh_etcd_local::wait_until(Duration::from_secs(15), || interrupted() || TcpStream::connect(&addr).is_ok());
        if interrupted() {
            return Err(Interrupted.into());
        }
        if !up {
            bail!("{name} did not listen on {addr} within 15 s; see {}", log_path.display());
        }
        say!("  started {name} on {addr} (log: {})", log_path.display());
        Ok(())
    }

    /// Waits until every one of `names` is registered as a greeter.
    fn until_registered(&self, names: &[&str]) -> anyhow::Result<()> {
        self.until_registered_in("greeter", names)
    }

    /// Waits until every one of `names` is registered under `service`, at most 15 s; without
    /// etcdctl to look, a second.
    fn until_registered_in(&self, service: &str, names: &[&str]) -> anyhow::Result<()> {
        let Some(etcdctl) = mesh_etcd_local::find_etcdctl() else {
            return pause(Duration::from_secs(1));
        };
        let prefix = format!("/mesh/services/{service}/");
        let started = Instant::now();
        loop {
            let keys = self.output(Command::new(&etcdctl).env("ETCDCTL_API", "3").args([
                "--endpoints",
                &self.etcd.join(","),
                "get",
                "--prefix",
                "--keys-only",
                &prefix,
            ]))?;
            if names.iter().all(|n| keys.lines().any(|k| k == format!("{prefix}{n}"))) {
                return Ok(());
            }
            ensure!(started.elapsed() < Duration::from_secs(15), "{names:?} did not register under {prefix}: {keys}");
            pause(Duration::from_millis(50))?;
        }
    }

    /// `greeter-server config ARGS` for chapter 6's service: its output, or an error with it.
    fn config(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(self.bin.join("greeter-server"));
        cmd.args(["--etcd", &self.etcd.join(","), "--service", CONFIG_SERVICE, "config"]).args(args);
        Ok(self.output(&mut cmd)?.trim().to_string())
    }

    /// One SayHello to `addr`: the reply line.
    fn hello(&self, addr: &str) -> anyhow::Result<String> {
        let out = self.output(self.client().args(["--target", addr, "--count", "1", "--name", "demo"]))?;
        out.lines().next().map(str::to_string).context("greeter-client printed no reply")
    }

    /// Calls `addr` until it greets with `want`, at most `within`.
    fn until_greeting(&self, addr: &str, want: &str, within: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if self.hello(addr)?.starts_with(want) {
                return Ok(());
            }
            ensure!(started.elapsed() < within, "no {want:?} within {within:?} of the put");
            pause(Duration::from_millis(20))?;
        }
    }

    /// `config show` once it contains `text`, at most `within`.
    fn until_shown(&self, text: &str, within: Duration) -> anyhow::Result<String> {
        let started = Instant::now();
        loop {
            let shown = self.config(&["show"])?;
            if shown.contains(text) {
                return Ok(shown);
            }
            ensure!(started.elapsed() < within, "`config show` did not show {text:?}: {shown}");
            pause(Duration::from_millis(100))?;
        }
    }

    /// The first line of a server's log that contains `text`, without colours and the
    /// timestamp.
    fn log_line(&self, name: &str, text: &str) -> anyhow::Result<String> {
        let path = self.logs.join(format!("{name}.log"));
        let log = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let line =
            log.lines().find(|l| l.contains(text)).with_context(|| format!("no {text:?} in {}", path.display()))?;
        let plain: String = strip_ansi(line);
        Ok(plain.split_once(": ").map_or(plain.clone(), |(_, msg)| msg.to_string()))
    }

    /// Sends `signal` to one server.
    fn signal_server(&self, name: &str, signal: Signal) -> anyhow::Result<()> {
        mesh_etcd_local::signal(self.server(name)?.child.id(), signal)?;
        Ok(())
    }

    /// Starts a server again, at the address it had, after it was killed.
    fn restart_server(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self.servers.iter().position(|s| s.name == name).with_context(|| format!("no server {name}"))?;
        let mut old = self.servers.remove(i);
        let _ = old.child.wait();
        self.spawn_server(name, &old.addr)
    }

    /// Stops one server with SIGTERM and checks that it exits 0.
    fn stop_server(&mut self, name: &str) -> anyhow::Result<()> {
        self.stop_servers(&[name.to_string()])
    }

    /// Sends SIGTERM to every one of `names` at once, then checks that each exits 0.
    fn stop_servers(&mut self, names: &[String]) -> anyhow::Result<()> {
        for name in names {
            mesh_etcd_local::signal(self.server(name)?.child.id(), Signal::Term)?;
        }
        for name in names {
            let i = self.servers.iter().position(|s| &s.name == name).with_context(|| format!("no server {name}"))?;
            let status = wait_child(&mut self.servers[i].child).with_context(|| format!("waiting for {name}"))?;
            self.servers.remove(i);
            ensure!(status.success(), "{name} exited with {status} after SIGTERM");
        }
        Ok(())
    }

    /// Prints the keys under `prefix` and their values as etcdctl shows them; how many there
    /// are (`None` without etcdctl).
    fn show_keys(&self, prefix: &str) -> anyhow::Result<Option<usize>> {
        let Some(etcdctl) = mesh_etcd_local::find_etcdctl() else {
            say!("    (no etcdctl found to show them; install etcd-client)");
            return Ok(None);
        };
        let out = self.output(Command::new(etcdctl).env("ETCDCTL_API", "3").args([
            "--endpoints",
            &self.etcd.join(","),
            "get",
            "--prefix",
            prefix,
        ]))?;
        let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
        if lines.is_empty() {
            say!("    (none)");
        }
        for line in &lines {
            say!("    {line}");
        }
        Ok(Some(lines.len() / 2))
    }

    /// SIGTERM every server (a graceful stop), then SIGKILL any that linger.
    fn stop_all(&mut self) {
        for s in &self.servers {
            // A server left hung (SIGSTOP) by an interrupted chapter 4 must run to stop.
            let _ = mesh_etcd_local::signal(s.child.id(), Signal::Cont);
            let _ = mesh_etcd_local::signal(s.child.id(), Signal::Term);
        }
        for mut s in self.servers.drain(..) {
            let exited =
                mesh_etcd_local::wait_until(Duration::from_secs(15), || matches!(s.child.try_wait(), Ok(Some(_))));
            if !exited {
                eprintln!("  {} did not stop within 15 s; killing it", s.name);
                let _ = s.child.kill();
                let _ = s.child.wait();
            }
        }
    }
}
