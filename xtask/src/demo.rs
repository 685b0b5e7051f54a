//! `cargo xtask demo`: the five-minute tour, told as chapters. Each chapter starts what it
//! needs, says what to look for, checks that it happened (a demo that lies is worse than
//! none), and leaves no process behind, also when it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead as _, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use mesh_etcd_local::Signal;
use serde_json::Value;

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
    util::run(util::cargo().args(["build", "-q", "-p", "greeter-server", "-p", "greeter-client"]))?;
    let up = etcd::up(1)?;
    let logs = util::root().join("target").join("demo");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut demo =
        Demo { bin: util::root().join("target").join("debug"), logs, etcd: up.endpoints.clone(), servers: Vec::new() };
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
    chapter_balancing(demo)?;
    chapter_registry(demo)?;
    chapter_failover(demo)?;
    chapter_limiter(demo)?;
    chapter_config(demo)?;
    Ok(())
}

/// Chapter 1: three plain greeter-servers, each greeted directly.
fn chapter_three_greeters(demo: &mut Demo) -> anyhow::Result<()> {
    println!("\n-- 1. three greeter-servers, one greeting each --");
    println!("etcd runs at {}; each server registers itself there once it serves", demo.etcd.join(","));
    for i in 1..=3 {
        demo.start_server(&format!("greeter-{i}"))?;
    }
    let mut answered = BTreeSet::new();
    let targets: Vec<String> = demo.servers.iter().map(|s| format!("http://{}", s.addr)).collect();
    for target in &targets {
        let out = util::output(demo.client().args(["--target", target, "--name", "demo", "--json"]))?;
        println!("  {target} → {}", out.lines().next().unwrap_or_default());
        let served_by = per_call_owners(&report(&out)?).pop().flatten().context("the reply names no instance")?;
        answered.insert(served_by);
    }
    ensure!(answered.len() == 3, "expected three different instances, got {answered:?}");
    println!("three greetings from three different instances: {answered:?}");
    Ok(())
}

/// Chapter 2: the client spreads 300 calls over the three servers with each strategy.
fn chapter_balancing(demo: &mut Demo) -> anyhow::Result<()> {
    println!("\n-- 2. client-side balancing: 300 calls per strategy over three servers --");
    let targets: Vec<String> = demo.servers.iter().map(|s| s.addr.clone()).collect();
    let all = targets.join(",");
    let runs: [(&str, &[&str]); 5] = [
        ("round_robin", &[]),
        ("random", &[]),
        ("consistent_hash", &["--hash-key", "user-{i}"]),
        ("weighted", &["--weights", "1,2,3"]),
        ("p2c", &[]),
    ];
    for (strategy, extra) in runs {
        let by = served_by_counts(&demo.greet(&all, strategy, 300, extra)?);
        let line: Vec<String> = by.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("  {strategy:<16} {}", line.join(", "));
        ensure!(by.values().sum::<u64>() == 300, "{strategy}: not all 300 calls were answered: {by:?}");
        if strategy == "round_robin" {
            ensure!(by.values().all(|&n| n == 100), "round robin must give 100 each: {by:?}");
        }
        if strategy == "weighted" {
            let counts: Vec<u64> = demo.servers.iter().map(|s| by.get(&s.name).copied().unwrap_or(0)).collect();
            ensure!(counts == [50, 100, 150], "weights 1:2:3 must give 50/100/150: {counts:?}");
            println!("  {:<16} (weights 1:2:3 → exactly 50/100/150: a weighted round-robin schedule)", "");
        }
    }

    let by = served_by_counts(&demo.greet(&all, "consistent_hash", 20, &["--hash-key", "user-42"])?);
    ensure!(by.len() == 1, "one key must always land on one server: {by:?}");
    println!("  20 calls with hash key user-42 all went to {}", by.keys().next().map_or("?", String::as_str));

    let before = per_call_owners(&demo.greet(&all, "consistent_hash", 300, &["--hash-key", "user-{i}"])?);
    let removed = &demo.servers[2];
    let two = targets[..2].join(",");
    let after = per_call_owners(&demo.greet(&two, "consistent_hash", 300, &["--hash-key", "user-{i}"])?);
    ensure!(
        before.len() == 300 && after.len() == 300 && before.iter().chain(&after).all(Option::is_some),
        "expected 300 replies each time"
    );
    let on_removed = before.iter().filter(|o| o.as_deref() == Some(removed.name.as_str())).count();
    let moved: Vec<usize> = (0..300).filter(|&i| before[i] != after[i]).collect();
    let moved_elsewhere = moved.iter().filter(|&&i| before[i].as_deref() != Some(removed.name.as_str())).count();
    println!(
        "  removing {} from the set: {on_removed} of 300 keys were on it and moved; {moved_elsewhere} other keys moved",
        removed.name
    );
    ensure!(moved_elsewhere == 0 && moved.len() == on_removed, "only the removed server's keys may move");
    Ok(())
}

/// Chapter 3: the client finds servers in etcd, and follows them as they join and leave.
fn chapter_registry(demo: &mut Demo) -> anyhow::Result<()> {
    println!("\n-- 3. registry and discovery: servers join and leave while the client runs --");
    println!("  the registrations, as `etcdctl get --prefix /mesh/services/` shows them:");
    demo.show_keys()?;
    println!("  a client with no --target discovers greeter in etcd and calls every 20 ms for 10 s:");
    let log_path = demo.logs.join("client.log");
    let (mut client, echo) = demo.discovering_client(&["--duration", "10s", "--interval", "20ms"], &log_path)?;
    std::thread::sleep(Duration::from_secs(2));
    println!("  → greeter-4 joins");
    demo.start_server("greeter-4")?;
    std::thread::sleep(Duration::from_secs(3));
    println!("  → greeter-1 leaves gracefully (SIGTERM: NOT_SERVING, deregister, 1 s grace, drain)");
    let left = demo.servers.iter().find(|s| s.name == "greeter-1").map(|s| s.addr.clone()).context("greeter-1")?;
    demo.stop_server("greeter-1")?;
    let status = client.wait().context("waiting for the client")?;
    let lines = echo.join().map_err(|_| anyhow::anyhow!("client output reader panicked"))?;
    ensure!(status.success(), "the client failed calls while servers came and went; see {}", log_path.display());
    let report = report(&lines.join("\n"))?;
    let by = served_by_counts(&report);
    ensure!(by.get("greeter-4").is_some_and(|&n| n > 0), "greeter-4 got no calls: {by:?}");
    let endpoints: Vec<&str> = report["endpoints"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["address"].as_str()).collect())
        .unwrap_or_default();
    ensure!(!endpoints.contains(&left.as_str()), "the client still lists greeter-1 ({left}): {endpoints:?}");
    println!(
        "  the client lost no call; greeter-4 answered {} calls and greeter-1 left its table, with no restart",
        by.get("greeter-4").copied().unwrap_or(0)
    );
    println!("  the registrations now:");
    demo.show_keys()?;
    Ok(())
}

/// Chapter 4: under load, one server is killed and another hung; no call is lost, and both
/// come back.
fn chapter_failover(demo: &mut Demo) -> anyhow::Result<()> {
    println!("\n-- 4. failover: a server killed, another hung, no call lost --");
    println!("  watch the table: the killed server turns unreachable at once (its connection fails),");
    println!("  the hung one keeps its connection but its breaker opens after a few 200 ms timeouts,");
    println!("  and once it answers again a half-open probe closes it and calls return");
    let [killed, hung] = [&demo.servers[0], &demo.servers[1]].map(|s| (s.name.clone(), s.addr.clone()));
    let log_path = demo.logs.join("client-failover.log");
    let args = ["--duration", "16s", "--interval", "2ms", "--timeout", "1s", "--per-try-timeout", "200ms"];
    let (mut client, echo) = demo.discovering_client(&args, &log_path)?;
    std::thread::sleep(Duration::from_secs(2));
    println!("  → kill -9 {} ({})", killed.0, killed.1);
    demo.signal_server(&killed.0, Signal::Kill)?;
    std::thread::sleep(Duration::from_secs(2));
    println!("  → SIGSTOP {} ({}): it hangs, its connection stays open", hung.0, hung.1);
    demo.signal_server(&hung.0, Signal::Stop)?;
    std::thread::sleep(Duration::from_secs(4));
    println!("  → SIGCONT {}, and {} restarts at its address", hung.0, killed.0);
    demo.signal_server(&hung.0, Signal::Cont)?;
    demo.restart_server(&killed.0)?;
    let status = client.wait().context("waiting for the client")?;
    let lines = echo.join().map_err(|_| anyhow::anyhow!("client output reader panicked"))?;
    ensure!(status.success(), "the client failed calls; see {}", log_path.display());
    let report = report(&lines.join("\n"))?;
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
    println!(
        "  {} calls, 0 failed ({} retried); {}'s breaker changed state {transitions} times and is closed; both serve again",
        report["calls"], report["retries"], hung.0
    );
    Ok(())
}

/// Chapter 5: a server limited to 100 calls per second, flooded at several times that, while
/// its health is checked.
fn chapter_limiter(demo: &mut Demo) -> anyhow::Result<()> {
    println!("\n-- 5. the rate limiter: a flood of several times the rate --");
    println!("  watch the counts: rate × 3 s + burst admitted, the rest rejected with RESOURCE_EXHAUSTED,");
    println!("  and health checks answered SERVING throughout");
    let (rate, burst, secs) = (100.0, 10.0, 3.0);
    let name = "greeter-limited";
    let port = mesh_etcd_local::free_port()?;
    let addr = format!("127.0.0.1:{port}");
    demo.spawn_server_with(name, &addr, &["--rate", "100", "--burst", "10", "--no-register"])?;
    let health = demo
        .client()
        .args(["health", "--target", &addr, "--duration", "3s", "--every", "20ms", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the health checker")?;
    let report = flood_report(demo, &addr, 3)?;
    let admitted = report["ok"].as_u64().unwrap_or(0);
    let failed = report["errors"].as_u64().unwrap_or(0);
    let exhausted = report["errors_by_code"]["ResourceExhausted"].as_u64().unwrap_or(0);
    let health = health.wait_with_output().context("waiting for the health checker")?;
    let health = serde_json::from_str::<Value>(String::from_utf8_lossy(&health.stdout).trim())
        .context("reading the health checker's report")?;
    let calls = admitted + failed;
    let expected = rate * secs + burst;
    println!(
        "  {calls} calls in 3 s, {:.0}× the rate: {admitted} admitted (rate × 3 s + burst = {expected:.0}), {exhausted} rejected with RESOURCE_EXHAUSTED",
        calls as f64 / (rate * secs)
    );
    println!("  the server's log: {}", demo.log_line(name, "rate limit")?);
    println!("  health: {} of {} checks SERVING during the flood", health["serving"], health["checks"]);
    ensure!(calls as f64 >= 5.0 * rate * secs, "the flood was too thin to show the limit: {calls} calls");
    ensure!((admitted as f64 - expected).abs() <= expected * 0.05, "{admitted} admitted, expected {expected} ± 5%");
    ensure!(exhausted == failed, "every failure is the limit's: {report}");
    ensure!(health["serving"] == health["checks"], "health checks failed during the flood: {health}");
    demo.stop_server(name)
}

/// The service of chapter 6: its own configuration key, so that nothing of a user's is
/// touched.
const CONFIG_SERVICE: &str = "greeter-demo-config";

fn chapter_config(demo: &mut Demo) -> anyhow::Result<()> {
    println!("\n-- 6. live configuration from etcd --");
    println!("  watch: a new greeting and a new rate in force with no restart, and a bad document");
    println!("  refused with its reason while the server goes on as it was");
    let dir = util::root().join("target").join("demo");
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
    println!("  before: {}", demo.hello(&addr)?);

    let first = r#"{"server": {"greeting": "Good day, {name}!", "limiter": {"rate_per_sec": 50, "burst": 5}}}"#;
    println!("  config apply {first}");
    let put = Instant::now();
    println!("    {}", demo.config(&["apply", &write("config-1.json", first)?])?);
    demo.until_greeting(&addr, "Good day, demo!", Duration::from_secs(1))?;
    println!("  the client sees \"Good day, demo!\" {} ms after `config apply` started", put.elapsed().as_millis());
    let (admitted, calls) = flood(demo, &addr, 3)?;
    println!("  a 3 s flood of {calls} calls: {admitted} admitted (50/s × 3 s + burst 5 = 155)");
    ensure!((admitted as f64 - 155.0).abs() <= 155.0 * 0.05, "{admitted} admitted at 50/s, expected 155 ± 5%");

    let second = r#"{"server": {"greeting": "Good evening, {name}!", "limiter": {"rate_per_sec": 200, "burst": 20}}}"#;
    println!("  config apply {second}");
    demo.config(&["apply", &write("config-2.json", second)?])?;
    demo.until_greeting(&addr, "Good evening, demo!", Duration::from_secs(1))?;
    let (admitted, calls) = flood(demo, &addr, 3)?;
    println!("  a 3 s flood of {calls} calls: {admitted} admitted (200/s × 3 s + burst 20 = 620)");
    ensure!((admitted as f64 - 620.0).abs() <= 620.0 * 0.05, "{admitted} admitted at 200/s, expected 620 ± 5%");

    let bad = r#"{"server": {"limiter": {"rate_per_sec": 0}}}"#;
    println!("  config apply {bad}");
    let refused = demo.config(&["apply", &write("config-bad.json", bad)?]);
    let reason = refused.as_ref().err().map(|e| format!("{e:#}")).context("config apply took a rate of 0")?;
    let reason = reason.rsplit_once("error: ").map_or(reason.as_str(), |(_, r)| r).trim();
    println!("    refused, nothing written: {reason}");
    // Put past the check, as `etcdctl put` would: the server refuses it and says why.
    if let Some(etcdctl) = mesh_etcd_local::find_etcdctl() {
        let key = format!("/mesh/config/{CONFIG_SERVICE}");
        util::output(Command::new(etcdctl).env("ETCDCTL_API", "3").args([
            "--endpoints",
            &demo.etcd.join(","),
            "put",
            &key,
            bad,
        ]))?;
        let shown = demo.until_shown("rate_per_sec: is 0", Duration::from_secs(2))?;
        println!("  etcdctl put it anyway; `greeter-server config show` then says:");
        for line in shown.lines().filter(|l| !l.trim().is_empty()).skip_while(|l| !l.starts_with("instance")) {
            println!("    {line}");
        }
    }
    println!("  and the server goes on as it was: {}", demo.hello(&addr)?);
    ensure!(demo.hello(&addr)?.starts_with("Good evening, demo!"), "the last good greeting stays");
    demo.config(&["apply", &write("config-empty.json", "{}")?])?;
    demo.stop_server(name)
}

/// Four callers as fast as they can (several times a demo's rate) for `secs` seconds: the
/// bench report. Retries off, to count what the server says, not what a retry makes of it.
fn flood_report(demo: &Demo, addr: &str, secs: u64) -> anyhow::Result<Value> {
    let duration = format!("{secs}s");
    let out = util::output(demo.client().args(["bench", "--target", addr, "--concurrency", "4"]).args([
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
    std::thread::sleep(Duration::from_millis(300));
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

// === impl Demo ===

impl Demo {
    fn client(&self) -> Command {
        Command::new(self.bin.join("greeter-client"))
    }

    /// Starts a client that discovers greeter in etcd and runs with `args`, printing its
    /// table every 3 s, its log in `log_path`; its output lines come back when it ends.
    fn discovering_client(
        &self,
        args: &[&str],
        log_path: &std::path::Path,
    ) -> anyhow::Result<(Child, std::thread::JoinHandle<Vec<String>>)> {
        // Its log goes to a file: a pipe read only at the end fills up under RUST_LOG=debug.
        let log = fs::File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut client = self
            .client()
            .args(["--etcd", &self.etcd.join(","), "--service", "greeter", "--name", "demo"])
            .args(args)
            .args(["--quiet", "--table-every", "3s", "--json"])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting greeter-client")?;
        let stdout = client.stdout.take().context("client stdout")?;
        let echo = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !line.is_empty() && !line.starts_with('{') {
                    println!("  │ {line}");
                }
                lines.push(line);
            }
            lines
        });
        Ok((client, echo))
    }

    /// Runs the client over `targets` with `strategy` for `count` calls; its report.
    fn greet(&self, targets: &str, strategy: &str, count: u32, extra: &[&str]) -> anyhow::Result<Value> {
        let mut cmd = self.client();
        cmd.args(["--target", targets, "--strategy", strategy, "--count", &count.to_string(), "--name", "demo"]);
        cmd.args(["--quiet", "--json"]).args(extra);
        report(&util::output(&mut cmd)?)
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

    /// Starts a greeter-server at `addr` with exactly `extra` besides its address, name and
    /// etcd, and waits until it accepts connections.
    fn spawn_server_args(&mut self, name: &str, addr: &str, extra: &[&str]) -> anyhow::Result<()> {
        let addr = addr.to_string();
        let log_path = self.logs.join(format!("{name}.log"));
        let log = fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(self.bin.join("greeter-server"))
            .args(["--listen", &addr, "--instance-id", name, "--etcd", &self.etcd.join(",")])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting greeter-server")?;
        self.servers.push(Server { name: name.to_string(), addr: addr.clone(), child });
        let up = mesh_etcd_local::wait_until(Duration::from_secs(15), || TcpStream::connect(&addr).is_ok());
        if !up {
            bail!("{name} did not listen on {addr} within 15 s; see {}", log_path.display());
        }
        println!("  started {name} on {addr} (log: {})", log_path.display());
        Ok(())
    }

    /// The first line of a server's log that contains `text`, without colours and the
    /// timestamp.
    /// `greeter-server config ARGS` for chapter 6's service: its output, or an error with it.
    fn config(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(self.bin.join("greeter-server"));
        cmd.args(["--etcd", &self.etcd.join(","), "--service", CONFIG_SERVICE, "config"]).args(args);
        Ok(util::output(&mut cmd)?.trim().to_string())
    }

    /// One SayHello to `addr`: the reply line.
    fn hello(&self, addr: &str) -> anyhow::Result<String> {
        let out = util::output(self.client().args(["--target", addr, "--count", "1", "--name", "demo"]))?;
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
            std::thread::sleep(Duration::from_millis(20));
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
            std::thread::sleep(Duration::from_millis(100));
        }
    }

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
        let s = self.servers.iter().find(|s| s.name == name).with_context(|| format!("no server {name}"))?;
        mesh_etcd_local::signal(s.child.id(), signal)?;
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
        let i = self.servers.iter().position(|s| s.name == name).with_context(|| format!("no server {name}"))?;
        let mut s = self.servers.remove(i);
        mesh_etcd_local::signal(s.child.id(), Signal::Term)?;
        let status = s.child.wait().with_context(|| format!("waiting for {name}"))?;
        ensure!(status.success(), "{name} exited with {status} after SIGTERM");
        Ok(())
    }

    /// Prints the registrations as etcdctl shows them.
    fn show_keys(&self) -> anyhow::Result<()> {
        let Some(etcdctl) = mesh_etcd_local::find_etcdctl() else {
            println!("  (no etcdctl found to show them; install etcd-client)");
            return Ok(());
        };
        let out = util::output(Command::new(etcdctl).env("ETCDCTL_API", "3").args([
            "--endpoints",
            &self.etcd.join(","),
            "get",
            "--prefix",
            "/mesh/services/",
        ]))?;
        for line in out.lines() {
            println!("    {line}");
        }
        Ok(())
    }

    /// SIGTERM every server (a graceful stop), then SIGKILL any that linger.
    fn stop_all(&mut self) {
        for s in &self.servers {
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
