//! `cargo xtask bench`: A/B runs of the greeter through the same load generator
//! (`greeter-client bench`), alternating A and B (ABBA order) several times per concurrency so
//! that drift on a noisy machine hits both alike. Reported: median throughput and p99 of
//! each side, and the median B/A ratio of the paired runs with its spread (min–max).

use std::fmt::Write as _;
use std::fs;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::util;

#[derive(Debug)]
pub(crate) struct Opts {
    runs: usize,
    duration: u64,
    warmup: u64,
    concurrency: Vec<u32>,
    /// The sections to run (`--only`); all when empty.
    only: Vec<String>,
}

/// The sections of `cargo xtask bench`, in the order they run.
const SECTIONS: [&str; 9] =
    ["clients", "servers", "pick", "channel", "breaker", "limiter", "update", "registry", "config"];

impl Opts {
    fn runs(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

pub(crate) fn parse(rest: &[String]) -> anyhow::Result<Opts> {
    let mut opts = Opts { runs: 5, duration: 3, warmup: 1, concurrency: vec![1, 16, 64], only: Vec::new() };
    let mut args = rest.iter();
    while let Some(flag) = args.next() {
        let mut value = |name: &str| -> anyhow::Result<u64> {
            let v = args.next().with_context(|| format!("{name} needs a value"))?;
            v.parse().with_context(|| format!("{name} takes a whole number, not {v:?}"))
        };
        match flag.as_str() {
            "--runs" => opts.runs = value("--runs")?.max(1) as usize,
            "--duration" => opts.duration = value("--duration")?.max(1),
            "--quick" => {
                opts.runs = 2;
                opts.duration = 1;
            }
            "--only" => {
                let list = args.next().context("--only needs a list of sections")?;
                for section in list.split(',') {
                    if !SECTIONS.contains(&section) {
                        bail!("--only: no section {section:?}; the sections are {}", SECTIONS.join(", "));
                    }
                    opts.only.push(section.to_string());
                }
            }
            other => bail!(
                "unknown flag {other:?}; usage: cargo xtask bench [--runs N] [--duration SECS] [--quick] [--only {}]",
                SECTIONS.join(",")
            ),
        }
    }
    Ok(opts)
}

/// One side of a comparison: a server to start and the client flags to load it with.
/// Sides of one comparison that name the same server share one process.
struct Side {
    label: &'static str,
    server: ServerKind,
    client_args: &'static [&'static str],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerKind {
    Bare,
    Greeter,
}

struct Comparison {
    title: &'static str,
    a: Side,
    b: Side,
}

struct Bins {
    dir: PathBuf,
    /// The etcd greeter-server registers in, as it does when deployed.
    etcd: String,
}

fn comparisons() -> Vec<Comparison> {
    vec![
        Comparison {
            title: "greeter-server vs bare tonic (plain client)",
            a: Side { label: "bare tonic", server: ServerKind::Bare, client_args: &["--plain"] },
            b: Side { label: "greeter-server", server: ServerKind::Greeter, client_args: &["--plain"] },
        },
        Comparison {
            title: "the full client stack (service breaker, retries, balancer, endpoint breaker) over one endpoint vs a plain tonic Channel (same greeter-server)",
            a: Side { label: "plain Channel", server: ServerKind::Greeter, client_args: &["--plain"] },
            b: Side {
                label: "full stack",
                server: ServerKind::Greeter,
                client_args: &["--metrics-listen", "127.0.0.1:0"],
            },
        },
    ]
}

/// With two or more CPUs and `taskset`, servers run on CPU 0 and the load generator on
/// CPU 1, so that they do not preempt each other: on a small noisy machine that cuts the
/// run-to-run spread several-fold.
fn pinned(cpu: usize, program: PathBuf) -> Command {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let taskset = std::path::Path::new("/usr/bin/taskset");
    if cpus >= 2 && taskset.exists() {
        let mut cmd = Command::new(taskset);
        cmd.arg("-c").arg(cpu.to_string()).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn pinning() -> &'static str {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus >= 2 && std::path::Path::new("/usr/bin/taskset").exists() {
        "servers pinned to CPU 0 and the load generator to CPU 1 (taskset)"
    } else {
        "no CPU pinning (one CPU, or no taskset)"
    }
}

fn server_command(kind: ServerKind, bins: &Bins, addr: &str) -> Command {
    match kind {
        ServerKind::Bare => {
            let mut cmd = pinned(0, bins.dir.join("examples").join("bare-greeter"));
            cmd.arg(addr);
            cmd
        }
        ServerKind::Greeter => {
            let mut cmd = pinned(0, bins.dir.join("greeter-server"));
            // Metrics on, as deployed: a recorder behind every call, scraped by nobody.
            cmd.args(["--listen", addr, "--etcd", &bins.etcd, "--metrics-listen", "127.0.0.1:0"])
                .env("RUST_LOG", "warn");
            cmd
        }
    }
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(side: &Side, bins: &Bins) -> anyhow::Result<(Running, String)> {
    let port = mesh_etcd_local::free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let child = server_command(side.server, bins, &addr)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting the {} server", side.label))?;
    let running = Running(child);
    if !mesh_etcd_local::wait_until(Duration::from_secs(15), || TcpStream::connect(&addr).is_ok()) {
        bail!("the {} server did not listen on {addr}", side.label);
    }
    Ok((running, format!("http://{addr}")))
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    throughput: f64,
    p99_us: f64,
    errors: f64,
}

fn load(bins: &Bins, side: &Side, target: &str, c: u32, opts: &Opts) -> anyhow::Result<Sample> {
    let mut cmd = pinned(1, bins.dir.join("greeter-client"));
    cmd.args(["bench", "--json", "--target", target])
        .args(["--concurrency", &c.to_string()])
        .args(["--duration", &format!("{}s", opts.duration)])
        .args(["--warmup", &format!("{}s", opts.warmup)])
        .args(side.client_args);
    let out = util::output(&mut cmd)?;
    let v: Value = serde_json::from_str(out.trim()).with_context(|| format!("parsing the bench report {out:?}"))?;
    let num = |k: &str| v[k].as_f64().with_context(|| format!("no {k} in the bench report"));
    Ok(Sample { throughput: num("throughput")?, p99_us: num("p99_us")?, errors: num("errors")? })
}

pub(crate) fn run(opts: Opts) -> anyhow::Result<()> {
    util::run(util::cargo().args([
        "build",
        "--release",
        "-q",
        "-p",
        "greeter-server",
        "-p",
        "greeter-client",
        "--bins",
        "--example",
        "bare-greeter",
    ]))?;
    let up = crate::etcd::up(1)?;
    let bins = Bins { dir: util::target_dir().join("release"), etcd: up.endpoints.join(",") };
    let result = run_all(&opts, &bins);
    if !up.started.is_empty() {
        crate::etcd::down()?;
        for mut child in up.started {
            let _ = child.wait();
        }
    }
    result
}

fn run_all(opts: &Opts, bins: &Bins) -> anyhow::Result<()> {
    let only = if opts.only.is_empty() { String::new() } else { format!(" --only {}", opts.only.join(",")) };
    let command = format!("cargo xtask bench --runs {} --duration {}{only}", opts.runs, opts.duration);
    let mut md = String::new();
    let _ = writeln!(md, "# mesh benchmarks\n");
    let _ = writeln!(
        md,
        "`{command}`: {} paired runs per row, ABBA order, {} s measured after {} s warmup, one load generator (`greeter-client bench`) on the same {}-core machine as the servers, {}. Ratios are B/A per pair: median [min–max].\n",
        opts.runs,
        opts.duration,
        opts.warmup,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        pinning()
    );
    for cmp in comparisons().into_iter().filter(|_| opts.runs("clients")) {
        eprintln!("== {} ==", cmp.title);
        let (_a_proc, a_target) = start(&cmp.a, bins)?;
        let (_b_proc, b_target) = if cmp.b.server == cmp.a.server {
            (None, a_target.clone())
        } else {
            let (p, t) = start(&cmp.b, bins)?;
            (Some(p), t)
        };
        let _ = writeln!(md, "## {} (A = {}, B = {})\n", cmp.title, cmp.a.label, cmp.b.label);
        let _ = writeln!(
            md,
            "| concurrency | A calls/s | B calls/s | throughput B/A | A p99 µs | B p99 µs | p99 B/A | errors |\n|---:|---:|---:|---|---:|---:|---|---:|"
        );
        for &c in &opts.concurrency {
            let mut a = Vec::new();
            let mut b = Vec::new();
            for round in 0..opts.runs {
                let order = if round % 2 == 0 { [true, false] } else { [false, true] };
                for is_a in order {
                    let (side, target, into) =
                        if is_a { (&cmp.a, &a_target, &mut a) } else { (&cmp.b, &b_target, &mut b) };
                    let s = load(bins, side, target, c, opts)?;
                    eprintln!(
                        "  c={c:<3} run {round} {:<16} {:>9.0} calls/s  p99 {:>6.0} µs",
                        side.label, s.throughput, s.p99_us
                    );
                    into.push(s);
                }
            }
            let tput: Vec<f64> = a.iter().zip(&b).map(|(a, b)| b.throughput / a.throughput).collect();
            let p99: Vec<f64> = a.iter().zip(&b).map(|(a, b)| b.p99_us / a.p99_us).collect();
            let errors: f64 = a.iter().chain(&b).map(|s| s.errors).sum();
            let _ = writeln!(
                md,
                "| {c} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {} | {errors:.0} |",
                median(a.iter().map(|s| s.throughput).collect()),
                median(b.iter().map(|s| s.throughput).collect()),
                spread(tput),
                median(a.iter().map(|s| s.p99_us).collect()),
                median(b.iter().map(|s| s.p99_us).collect()),
                spread(p99),
            );
        }
        md.push('\n');
    }
    if opts.runs("servers") {
        md.push_str(&h2load_table(opts, bins)?);
    }
    if opts.runs("pick") {
        md.push_str(&pick_table(opts)?);
    }
    if opts.runs("channel") {
        md.push_str(&channel_table(opts)?);
    }
    if opts.runs("breaker") {
        md.push_str(&breaker_table(opts)?);
    }
    if opts.runs("limiter") {
        md.push_str(&limiter_table(opts)?);
    }
    if opts.runs("update") {
        md.push_str(&update_table()?);
    }
    if opts.runs("registry") {
        md.push_str(&registry_table()?);
    }
    if opts.runs("config") {
        md.push_str(&config_table()?);
    }
    println!("{md}");
    let dir = util::root().join("target").join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    for name in [format!("bench-{stamp}.md"), "latest.md".to_string()] {
        fs::write(dir.join(&name), &md).with_context(|| format!("writing {name}"))?;
    }
    println!("saved to {}", dir.join(format!("bench-{stamp}.md")).display());
    Ok(())
}

/// A server under h2load: its label and what runs it.
struct H2Side {
    label: &'static str,
    server: H2Server,
    /// Whether h2load dials it over TLS.
    tls: bool,
}

enum H2Server {
    /// The bare tonic greeter.
    Bare,
    /// greeter-server with these flags.
    Greeter(Vec<String>),
    /// interop/go's grpc-go greeter-server, not registered.
    GrpcGo(PathBuf),
}

/// One h2load run against one server.
#[derive(Debug, Clone, Copy)]
struct H2Sample {
    throughput: f64,
    p99_us: f64,
    /// Server CPU time per request, in microseconds.
    cpu_us: f64,
    /// The server's write system calls per request (`syscw` of /proc/PID/io).
    writes: f64,
}

/// `SayHello { name: "bench" }` as a gRPC message: no compression, length, protobuf.
const GRPC_REQUEST: [u8; 12] = [0, 0, 0, 0, 7, 0x0a, 5, b'b', b'e', b'n', b'c', b'h'];

/// CPU time (user + system) a process has used, in microseconds, from /proc (USER_HZ is 100).
fn cpu_us(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("a malformed /proc stat line")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        fields.get(i).and_then(|f| f.parse::<f64>().ok()).context("no CPU times in /proc stat")
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
    Ok((ticks(11)? + ticks(12)?) * 10_000.0)
}

/// Write system calls (write, writev) a process has made, from /proc/PID/io.
fn write_calls(pid: u32) -> anyhow::Result<f64> {
    let io = fs::read_to_string(format!("/proc/{pid}/io")).with_context(|| format!("reading /proc/{pid}/io"))?;
    io.lines()
        .find_map(|l| l.strip_prefix("syscw:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no syscw in /proc io")
}

/// One h2load run: `c` connections, `m` streams each, for `secs` seconds.
fn h2load_run(h2load: &std::path::Path, target: &str, c: u32, m: u32, secs: u64, pid: u32) -> anyhow::Result<H2Sample> {
    let dir = util::root().join("target").join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let body = dir.join("say-hello.grpc");
    fs::write(&body, GRPC_REQUEST).with_context(|| format!("writing {}", body.display()))?;
    let log = dir.join("h2load.log");
    // h2load appends to its log file: each run starts from none.
    let _ = fs::remove_file(&log);
    let mut cmd = pinned(1, h2load.to_path_buf());
    cmd.args(["-c", &c.to_string(), "-m", &m.to_string(), "-t", "1", "-D", &secs.to_string()])
        .arg("-d")
        .arg(&body)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg(format!("--log-file={}", log.display()))
        .arg(format!("{target}/greeter.v1.Greeter/SayHello"));
    let (before, writes_before) = (cpu_us(pid)?, write_calls(pid)?);
    let out = util::output(&mut cmd)?;
    let cpu = cpu_us(pid)? - before;
    let writes = write_calls(pid)? - writes_before;
    let number_after = |key: &str| -> anyhow::Result<f64> {
        let at = out.find(key).with_context(|| format!("no {key:?} in h2load's output: {out}"))?;
        let tail = out[at + key.len()..].trim_start();
        let end = tail.find(|ch: char| !(ch.is_ascii_digit() || ch == '.')).unwrap_or(tail.len());
        tail[..end].parse().with_context(|| format!("reading {key:?} in h2load's output"))
    };
    let done = number_after("requests: ")?;
    let succeeded = number_after("done, ")?;
    anyhow::ensure!(succeeded == done && done > 0.0, "h2load: {done} requests done, {succeeded} succeeded:\n{out}");
    let mut latencies: Vec<f64> = fs::read_to_string(&log)
        .with_context(|| format!("reading {}", log.display()))?
        .lines()
        .filter_map(|l| l.split('\t').nth(2).and_then(|d| d.parse().ok()))
        .collect();
    let _ = fs::remove_file(&log);
    latencies.sort_by(f64::total_cmp);
    let p99 = latencies.get(latencies.len().saturating_sub(1) * 99 / 100).copied().unwrap_or(0.0);
    Ok(H2Sample { throughput: done / secs as f64, p99_us: p99, cpu_us: cpu / done, writes: writes / done })
}

/// The server side alone, driven by h2load (which, unlike a tonic client, does not saturate
/// before the server does): a bare tonic greeter, greeter-server with every layer on and the
/// limiter at a rate it never reaches, and greeter-server without the limiter. Rotated
/// order, `opts.runs` rounds per point; throughput, p99 and server CPU per request.
fn h2load_table(opts: &Opts, bins: &Bins) -> anyhow::Result<String> {
    eprintln!("== servers under h2load ==");
    let h2load = mesh_etcd_local::ensure_tool(
        "h2load",
        &["nghttp2-client"],
        "nghttp2",
        "install nghttp2's h2load (Debian/Ubuntu as root: `apt-get install -y nghttp2-client`; macOS: `brew install nghttp2`)",
    )?;
    // A certificate for D, made for this run.
    let pki_dir = util::root().join("target").join("bench").join("tls");
    let pki = mesh_etcd_local::pki::Pki::create(&pki_dir, "bench")?;
    let cert = pki.issue("server", "greeter", &["127.0.0.1"], mesh_etcd_local::pki::Validity::Current)?;
    let limiter = ["--rate", "1000000", "--burst", "4294967295"].map(String::from).to_vec();
    let mut with_tls = limiter.clone();
    with_tls.extend(["--tls-cert".into(), cert.cert.display().to_string()]);
    with_tls.extend(["--tls-key".into(), cert.key.display().to_string()]);
    let mut sides = vec![
        H2Side { label: "bare tonic", server: H2Server::Bare, tls: false },
        H2Side { label: "greeter-server", server: H2Server::Greeter(limiter), tls: false },
        H2Side { label: "greeter-server, no limiter", server: H2Server::Greeter(Vec::new()), tls: false },
        H2Side { label: "greeter-server, TLS", server: H2Server::Greeter(with_tls), tls: true },
    ];
    // E: a current grpc-go greeter (interop/go), when this machine has the Go to build it.
    let grpc_go = util::build_go_interop();
    match &grpc_go {
        Ok(dir) => sides.push(H2Side { label: "grpc-go", server: H2Server::GrpcGo(dir.clone()), tls: false }),
        Err(why) => eprintln!("  no grpc-go column: {why}"),
    }
    let mut running = Vec::new();
    for side in &sides {
        let port = mesh_etcd_local::free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let mut cmd = match &side.server {
            H2Server::Bare => server_command(ServerKind::Bare, bins, &addr),
            H2Server::Greeter(args) => {
                let mut cmd = server_command(ServerKind::Greeter, bins, &addr);
                cmd.args(args);
                cmd
            }
            H2Server::GrpcGo(dir) => {
                let mut cmd = pinned(0, dir.join("go-greeter-server"));
                cmd.args(["-listen", &addr, "-no-register", "-instance", "grpc-go"]);
                cmd
            }
        };
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().with_context(|| format!("starting the {} server", side.label))?;
        let pid = child.id();
        let scheme = if side.tls { "https" } else { "http" };
        running.push((Running(child), format!("{scheme}://{addr}"), pid));
        if !mesh_etcd_local::wait_until(Duration::from_secs(15), || TcpStream::connect(&addr).is_ok()) {
            bail!("the {} server did not listen on {addr}", side.label);
        }
    }
    let secs = opts.duration;
    let mut md = format!(
        "## servers under h2load (load generator on CPU 1, servers on CPU 0; {} rounds of {secs} s per point, rotated order; medians)\n\n\
         A = bare tonic greeter, B = greeter-server with every layer on (metrics included) and the limiter at a rate it never reaches, \
         C = greeter-server without the limiter, D = B with TLS (TLS 1.3, h2load's connections held for the whole run). \
         CPU is the server's user + system time per request, from /proc.\n\n\
         | point | A req/s | B req/s | B/A | C/A | B/C (limiter) | A p99 µs | B p99 µs | A CPU µs/req | B CPU µs/req | B/A CPU | D req/s | D/B (TLS) | D p99 µs |\n\
         |---|---:|---:|---|---|---|---:|---:|---:|---:|---|---:|---|---:|\n",
        opts.runs
    );
    let mut grpc_go_table = String::from(
        "E = a current grpc-go greeter (interop/go, grpc-go as go.mod pins it), same load generator, same rounds. \
         Writes are the server's write system calls per request (/proc/PID/io syscw).\n\n\
         | point | E req/s | A/E | B/E | E p99 µs | E CPU µs/req | A writes/req | B writes/req | E writes/req |\n\
         |---|---:|---|---|---:|---:|---:|---:|---:|\n",
    );
    for (c, m) in [(1u32, 1u32), (1, 16), (4, 16)] {
        let mut samples: Vec<Vec<H2Sample>> = vec![Vec::new(); sides.len()];
        for round in 0..opts.runs {
            for k in 0..sides.len() {
                let i = (round + k) % sides.len();
                let (_, target, pid) = &running[i];
                // A short unmeasured run first: connections, caches, CPU frequency.
                let _ = h2load_run(&h2load, target, c, m, 1, *pid)?;
                let sample = h2load_run(&h2load, target, c, m, secs, *pid)?;
                eprintln!(
                    "  c{c} m{m} run {round} {:<28} {:>9.0} req/s  p99 {:>6.0} µs  cpu {:>5.1} µs/req",
                    sides[i].label, sample.throughput, sample.p99_us, sample.cpu_us
                );
                samples[i].push(sample);
            }
        }
        let med = |i: usize, f: fn(&H2Sample) -> f64| median(samples[i].iter().map(f).collect());
        let ratio = |a: usize, b: usize, f: fn(&H2Sample) -> f64| {
            spread(samples[a].iter().zip(&samples[b]).map(|(x, y)| f(y) / f(x)).collect())
        };
        let _ = writeln!(
            md,
            "| c{c} m{m} | {:.0} | {:.0} | {} | {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {} | {:.0} | {} | {:.0} |",
            med(0, |s| s.throughput),
            med(1, |s| s.throughput),
            ratio(0, 1, |s| s.throughput),
            ratio(0, 2, |s| s.throughput),
            ratio(2, 1, |s| s.throughput),
            med(0, |s| s.p99_us),
            med(1, |s| s.p99_us),
            med(0, |s| s.cpu_us),
            med(1, |s| s.cpu_us),
            ratio(0, 1, |s| s.cpu_us),
            med(3, |s| s.throughput),
            ratio(1, 3, |s| s.throughput),
            med(3, |s| s.p99_us),
        );
        if sides.len() > 4 {
            let _ = writeln!(
                grpc_go_table,
                "| c{c} m{m} | {:.0} | {} | {} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} |",
                med(4, |s| s.throughput),
                ratio(4, 0, |s| s.throughput),
                ratio(4, 1, |s| s.throughput),
                med(4, |s| s.p99_us),
                med(4, |s| s.cpu_us),
                med(0, |s| s.writes),
                med(1, |s| s.writes),
                med(4, |s| s.writes),
            );
        }
    }
    md.push_str("\ntargets: B/A ≥ 0.97 and B/A CPU ≤ 1.05 at every point; B/C ≥ 0.98; D/B (TLS on vs off) ≥ 0.90\n\n");
    if grpc_go.is_ok() {
        md.push_str(&grpc_go_table);
    }
    Ok(md)
}

/// Runs one of a package's criterion benchmarks, shorter under `--quick`.
fn run_criterion(opts: &Opts, package: &str, bench: &str) -> anyhow::Result<()> {
    let (warm, measure) = if opts.duration <= 1 { ("0.5", "1") } else { ("1", "3") };
    util::run(util::cargo().args(["bench", "-q", "-p", package, "--bench", bench, "--"]).args([
        "--warm-up-time",
        warm,
        "--measurement-time",
        measure,
        "--noplot",
    ]))
}

/// Runs mesh-balancer's criterion pick benchmark and tabulates the median ns per pick.
fn pick_table(opts: &Opts) -> anyhow::Result<String> {
    eprintln!("== balancer pick cost (criterion) ==");
    run_criterion(opts, "mesh-balancer", "pick")?;
    let sizes = [3, 100, 1000];
    let mut md = String::from(
        "## balancer pick cost (criterion median, ns per pick; consistent hash includes hashing the key)\n\n\
         | strategy | 3 | 100 | 1000 | target at 1000 |\n|---|---:|---:|---:|---|\n",
    );
    for (strategy, target) in [
        ("round_robin", "< 100 ns"),
        ("random", "< 100 ns"),
        ("consistent_hash", "< 300 ns"),
        ("weighted", "O(1)"),
        ("p2c", "—"),
    ] {
        let mut row = format!("| {strategy} |");
        for n in sizes {
            let _ = write!(row, " {:.1} |", criterion_median("pick", strategy, &n.to_string())?);
        }
        let _ = writeln!(row, " {target} |");
        md.push_str(&row);
    }
    md.push('\n');
    Ok(md)
}

/// The median of a criterion benchmark under `target/criterion/{group}/{name}/{param}` (no
/// `param` directory when it is empty).
fn criterion_median(group: &str, name: &str, param: &str) -> anyhow::Result<f64> {
    let mut path = util::root().join("target").join("criterion").join(group).join(name);
    if !param.is_empty() {
        path = path.join(param);
    }
    let path = path.join("new").join("estimates.json");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    v["median"]["point_estimate"].as_f64().with_context(|| format!("no median in {}", path.display()))
}

/// Runs mesh-balancer's per-call benchmark (a dummy endpoint service behind the balanced
/// channel, 1 and 2 threads) and tabulates it against the direct call.
fn channel_table(opts: &Opts) -> anyhow::Result<String> {
    eprintln!("== balanced channel per-call cost (criterion) ==");
    run_criterion(opts, "mesh-balancer", "channel")?;
    let mut md = String::from(
        "## balanced channel, ns per call over a dummy endpoint service (3 endpoints; criterion median)\n\n\
         `direct` calls the dummy service itself with the same request; the balancer's own share is the \
         difference. Two threads: each its own clone, calling at once.\n\n\
         | strategy | 1 thread | 2 threads | 2 / 1 | balancer's share, 1 thread | target |\n|---|---:|---:|---:|---:|---|\n",
    );
    for (name, baseline, target) in [
        ("direct", "direct", ""),
        ("round_robin", "direct", "< 100 ns, 2 / 1 ≤ 1.5"),
        ("random", "direct", "< 100 ns, 2 / 1 ≤ 1.5"),
        ("p2c", "direct", "< 100 ns, 2 / 1 ≤ 1.5"),
        ("weighted", "direct", ""),
        ("p2c_ewma", "direct", ""),
        ("direct_keyed", "direct_keyed", ""),
        ("consistent_hash", "direct_keyed", ""),
    ] {
        let one = criterion_median("channel", name, "1")?;
        let two = criterion_median("channel", name, "2")?;
        let share = one - criterion_median("channel", baseline, "1")?;
        let share = if name.starts_with("direct") { "—".to_string() } else { format!("{share:.1}") };
        let _ = writeln!(md, "| {name} | {one:.1} | {two:.1} | {:.2} | {share} | {target} |", two / one);
    }
    md.push('\n');
    Ok(md)
}

/// Runs mesh-breaker's criterion benchmark: admitting a call to a closed circuit and
/// recording its success, from one thread and from two sharing the circuit.
fn breaker_table(opts: &Opts) -> anyhow::Result<String> {
    eprintln!("== breaker admit + record, closed (criterion) ==");
    run_criterion(opts, "mesh-breaker", "breaker")?;
    let one = criterion_median("breaker", "admit_record_closed", "1")?;
    let two = criterion_median("breaker", "admit_record_closed", "2")?;
    let mut md = format!(
        "## circuit breaker, admit + record on a closed circuit (criterion median, ns)\n\n| 1 thread | 2 threads sharing one circuit | target |\n|---:|---:|---|\n| {one:.1} | {two:.1} | < 50 ns |\n\n"
    );
    eprintln!("== the client's resilience layers per call (criterion) ==");
    run_criterion(opts, "mesh-retry", "layers")?;
    md.push_str(
        "## the client's resilience layers, per call over a dummy endpoint (criterion median, ns; the body read to its trailers)\n\n\
         `direct` is the dummy alone (with a current-thread runtime's `block_on`); each layer's own cost is the difference.\n\n\
         | layers | ns per call | the layers' share |\n|---|---:|---:|\n",
    );
    let direct = criterion_median("layers", "direct", "")?;
    for name in ["direct", "retry", "endpoint_breaker", "service_breaker", "all_three"] {
        let ns = criterion_median("layers", name, "")?;
        let share = if name == "direct" { "—".to_string() } else { format!("{:.0}", ns - direct) };
        let _ = writeln!(md, "| {name} | {ns:.0} | {share} |");
    }
    md.push('\n');
    Ok(md)
}

/// Runs mesh-limiter's criterion benchmark: admitting a call, per scope, against the same
/// service without the limiter.
fn limiter_table(opts: &Opts) -> anyhow::Result<String> {
    eprintln!("== limiter admit (criterion) ==");
    run_criterion(opts, "mesh-limiter", "admit")?;
    let none = criterion_median("limiter", "admit", "none")?;
    let mut md = String::from(
        "## rate limiter, admitting a call with tokens to spare (criterion median, ns; each iteration builds its request, `none` is the service alone)\n\n\
         | scope | ns per call | the limiter's share | target |\n|---|---:|---:|---|\n",
    );
    let scopes = [
        ("none", ""),
        ("server", "< 100 ns"),
        ("method", "< 100 ns"),
        ("per_caller_key", "< 100 ns"),
        ("per_caller_ip", "< 100 ns"),
    ];
    for (scope, target) in scopes {
        let ns = criterion_median("limiter", "admit", scope)?;
        let share = if scope == "none" { "—".to_string() } else { format!("{:.0}", ns - none) };
        let _ = writeln!(md, "| {scope} | {ns:.0} | {share} | {target} |");
    }
    md.push('\n');
    Ok(md)
}

/// Runs a bench of ours that reports on one JSON line (its last), and reads that line.
fn bench_report(package: &str, bench: &str) -> anyhow::Result<Value> {
    let out = util::output(util::cargo().args(["bench", "-q", "-p", package, "--bench", bench]))?;
    let line = out.lines().rev().find(|l| l.starts_with('{')).with_context(|| format!("no JSON line from {bench}"))?;
    serde_json::from_str(line).with_context(|| format!("parsing {bench}'s report {line:?}"))
}

/// Runs mesh-balancer's update benchmark: 1000-endpoint sets applied under load.
fn update_table() -> anyhow::Result<String> {
    eprintln!("== 1000-endpoint updates under load ==");
    let v = bench_report("mesh-balancer", "update")?;
    let mut md = String::from(
        "## applying 1000-endpoint updates (consistent hash) every 50 ms while calls run, 3 s, 2-worker runtime\n\n\
         | run | calls | call p99.9 | slowest call | latest 1 ms tick | updates applied | update → in use, p50 / max |\n\
         |---|---:|---:|---:|---:|---:|---|\n",
    );
    for (key, label) in [("quiet", "no updates"), ("updating", "updating")] {
        let n = |k: &str| v[key][k].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            md,
            "| {label} | {:.0} | {:.2} µs | {:.2} ms | {:.2} ms | {:.0} | {:.1} / {:.1} ms |",
            n("calls"),
            n("call_p999_ns") / 1e3,
            n("call_max_ns") / 1e6,
            n("tick_late_max_us") / 1e3,
            n("updates_applied"),
            n("apply_p50_ms"),
            n("apply_max_ms"),
        );
    }
    md.push('\n');
    Ok(md)
}

/// Runs mesh-discovery's registry latency benchmark (its own etcd, 200 trials each).
fn registry_table() -> anyhow::Result<String> {
    eprintln!("== registry latency (200 trials each, real etcd on loopback) ==");
    let v = bench_report("mesh-discovery", "registry_latency")?;
    let mut md = String::from(
        "## registry latency (etcd on loopback, 200 trials, ms)\n\n| path | p50 | p99 | max | target p99 |\n|---|---:|---:|---:|---|\n",
    );
    for (key, label) in
        [("put_to_watch_event", "put → watch event"), ("register_to_routable", "register → routable at a client")]
    {
        let ms = |k: &str| v[key][k].as_f64().map_or(f64::NAN, |us| us / 1000.0);
        let _ = writeln!(md, "| {label} | {:.2} | {:.2} | {:.2} | < 50 |", ms("p50_us"), ms("p99_us"), ms("max_us"));
    }
    md.push('\n');
    Ok(md)
}

/// Runs greeter-server's config benchmark: a document put → in force at a running server.
fn config_table() -> anyhow::Result<String> {
    eprintln!("== config put → applied (100 updates, real etcd on loopback) ==");
    let v = bench_report("greeter-server", "config_apply")?;
    let ms = |k: &str| v["put_to_applied"][k].as_f64().map_or(f64::NAN, |us| us / 1000.0);
    Ok(format!(
        "## live configuration (etcd on loopback, 100 updates, ms)\n\n\
         | path | p50 | p99 | max | target p99 |\n|---|---:|---:|---:|---|\n\
         | config put → a server replies with the new greeting | {:.2} | {:.2} | {:.2} | < 50 |\n\n",
        ms("p50_us"),
        ms("p99_us"),
        ms("max_us")
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn spread(v: Vec<f64>) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.3} [{lo:.3}–{hi:.3}]", median(v))
}
