//! `cargo xtask deploy-check`: what this machine can check of deploy/ without Docker or a
//! Kubernetes cluster.
//!
//! - Every YAML file parses (each document of it).
//! - Every flag and `MESH_*` variable given to greeter-server or greeter-client in the compose
//!   file, the Kubernetes manifests and the systemd files is one the binary accepts (read
//!   from its `--help`), so a renamed flag cannot leave deploy/ behind.
//! - The Kubernetes greeter-server: the advertised address is the pod IP from the downward
//!   API, the TLS files are under a mounted secret, the termination grace covers preStop +
//!   shutdown grace + drain, and the probes are the kubelet's gRPC probe on a plaintext port:
//!   the server is started with the manifest's arguments and probed as the kubelet does
//!   (plaintext grpc.health.v1), which must answer SERVING, while the TLS port must not.
//! - The Dockerfile copies paths that exist, builds packages of this workspace, and copies
//!   out the binaries it built; its default command serves and stops cleanly on SIGTERM (in
//!   the image built for real where a Docker engine answers, else run with the binary built
//!   here).
//! - systemd: `systemd-analyze verify` passes on greeter-server.service and `systemd-analyze
//!   security --offline` rates it at most 2.0, where systemd-analyze exists.
//! - docs/OPERATING.md names every flag and `MESH_*` variable of both services.
//! - The etcd configurations run: the one-member file and the three member files start a
//!   real etcd (on loopback ports instead of their hosts') that becomes healthy.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use yaml_rust2::{Yaml, YamlLoader};

use crate::util;

pub(crate) fn run() -> anyhow::Result<()> {
    let root = util::root();
    let deploy = root.join("deploy");
    util::run(util::cargo().args(["build", "-q", "-p", "greeter-server", "-p", "greeter-client"]))?;
    let bin = util::target_dir().join("debug");
    let server = Cli::read(&bin.join("greeter-server"), &[])?;
    let client =
        Cli::read(&bin.join("greeter-client"), &[])?.with(Cli::read(&bin.join("greeter-client"), &["health"])?);

    let mut files = Vec::new();
    yaml_files(&deploy, &mut files)?;
    for file in &files {
        load(file)?;
    }
    println!("deploy-check: {} YAML files parse", files.len());

    compose(&load(&deploy.join("docker/compose.yaml"))?, &server, &client)?;
    println!("deploy-check: compose: every greeter flag and MESH_* variable exists");
    kubernetes(&deploy.join("k8s"), &bin, &server, &client)?;
    println!(
        "deploy-check: k8s: flags, downward-API pod IP, TLS mounts, termination grace; the kubelet's plaintext gRPC probe gets SERVING from the server started with the manifest's arguments"
    );
    systemd(&deploy.join("systemd"), &server)?;
    println!("deploy-check: systemd: MESH_* variables exist; the stop timeout covers grace and drain");
    println!("deploy-check: systemd: {}", systemd_analyze(&root, &deploy.join("systemd"), &bin)?);
    let image = dockerfile(&root, &deploy.join("docker/Dockerfile"))?;
    println!("deploy-check: Dockerfile: its COPY sources exist, it builds workspace binaries and copies them out");
    let how = default_command(&root, &image, &bin)?;
    println!("deploy-check: Dockerfile: {how}");
    let subcommands =
        [Cli::read(&bin.join("greeter-server"), &["config"])?, Cli::read(&bin.join("greeter-client"), &["bench"])?];
    operators_guide(&root.join("docs").join("OPERATING.md"), [&server, &client].into_iter().chain(&subcommands))?;
    println!("deploy-check: docs/OPERATING.md names every flag and MESH_* variable of both services");
    etcd_configs(&root, &deploy.join("etcd"))?;
    println!("deploy-check: etcd: the one-member and three-member configurations run and become healthy");
    Ok(())
}

/// The long flags and `MESH_*` variables a binary accepts, from its `--help`.
struct Cli {
    name: String,
    flags: BTreeSet<String>,
    env: BTreeSet<String>,
}

impl Cli {
    fn read(bin: &Path, sub: &[&str]) -> anyhow::Result<Cli> {
        let help = util::output(Command::new(bin).args(sub).arg("--help"))?;
        let mut flags = BTreeSet::new();
        let mut env = BTreeSet::new();
        for line in help.lines() {
            let t = line.trim_start();
            if let Some(rest) = t.strip_prefix("--").or_else(|| t.split_once(", --").map(|(_, r)| r)) {
                let flag: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
                flags.insert(flag);
            }
            if let Some((_, rest)) = line.split_once("[env: ") {
                env.insert(rest.split('=').next().unwrap_or_default().to_string());
            }
        }
        let name = bin.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        ensure!(!flags.is_empty(), "no flags found in `{} --help`", name);
        Ok(Cli { name, flags, env })
    }

    fn with(mut self, other: Cli) -> Cli {
        self.flags.extend(other.flags);
        self.env.extend(other.env);
        self
    }

    /// Checks the `--flag` or `--flag=value` words of `args`.
    fn check_args(&self, args: &[String], at: &str) -> anyhow::Result<()> {
        for arg in args {
            if let Some(flag) = arg.strip_prefix("--") {
                let flag = flag.split('=').next().unwrap_or_default();
                ensure!(self.flags.contains(flag), "{at}: {} has no flag --{flag}", self.name);
            }
        }
        Ok(())
    }

    fn check_env(&self, name: &str, at: &str) -> anyhow::Result<()> {
        if name.starts_with("MESH_") {
            ensure!(self.env.contains(name), "{at}: {} reads no variable {name}", self.name);
        }
        Ok(())
    }
}

/// The operator's guide names every flag and variable the binaries accept.
fn operators_guide<'a>(path: &Path, clis: impl Iterator<Item = &'a Cli>) -> anyhow::Result<()> {
    let guide = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    for cli in clis {
        for flag in &cli.flags {
            if flag != "help" && flag != "version" {
                ensure!(guide.contains(&format!("`--{flag}`")), "{}: no `--{flag}` of {}", path.display(), cli.name);
            }
        }
        for var in &cli.env {
            ensure!(guide.contains(var.as_str()), "{}: no {var} of {}", path.display(), cli.name);
        }
    }
    Ok(())
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry.with_context(|| format!("listing {}", dir.display()))?.path();
        if path.is_dir() {
            yaml_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    out.sort();
    Ok(())
}

/// Every document of a YAML file.
fn load(path: &Path) -> anyhow::Result<Vec<Yaml>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let docs = YamlLoader::load_from_str(&text).with_context(|| format!("{} is not valid YAML", path.display()))?;
    ensure!(!docs.is_empty(), "{} holds no document", path.display());
    Ok(docs)
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec().map(|v| v.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

fn compose(docs: &[Yaml], server: &Cli, client: &Cli) -> anyhow::Result<()> {
    let services = docs[0]["services"].as_hash().context("compose.yaml: no services")?;
    let names: Vec<&str> = services.keys().filter_map(Yaml::as_str).collect();
    for want in
        ["etcd-1", "etcd-2", "etcd-3", "greeter-server-1", "greeter-server-2", "greeter-server-3", "greeter-client"]
    {
        ensure!(names.contains(&want), "compose.yaml: no service {want}");
    }
    for (name, service) in services {
        let name = name.as_str().unwrap_or_default();
        let at = format!("compose.yaml service {name}");
        let entry = strings(&service["entrypoint"]);
        let cli = match entry.first().map(String::as_str) {
            Some("greeter-client") => client,
            Some("etcd") => continue,
            _ if name.starts_with("greeter-server") => server,
            _ => continue,
        };
        cli.check_args(&strings(&service["command"]), &at)?;
        if let Some(env) = service["environment"].as_hash() {
            for key in env.keys().filter_map(Yaml::as_str) {
                cli.check_env(key, &at)?;
            }
        }
        let health = strings(&service["healthcheck"]["test"]);
        if health.get(1).map(String::as_str) == Some("greeter-client") {
            client.check_args(&health, &format!("{at} healthcheck"))?;
        }
    }
    Ok(())
}

fn kubernetes(dir: &Path, bin: &Path, server: &Cli, client: &Cli) -> anyhow::Result<()> {
    let mut saw_server = false;
    for file in ["etcd.yaml", "greeter-server.yaml", "greeter-client.yaml"] {
        for doc in load(&dir.join(file))? {
            if doc["kind"].as_str() != Some("Deployment") {
                continue;
            }
            let pod = &doc["spec"]["template"]["spec"];
            for c in pod["containers"].as_vec().context("a Deployment without containers")? {
                let command = strings(&c["command"]);
                let args = strings(&c["args"]);
                let at = format!("{file} container {}", c["name"].as_str().unwrap_or("?"));
                let cli = match command.first().map(String::as_str) {
                    Some("greeter-server") => server,
                    Some("greeter-client") => client,
                    _ => continue,
                };
                cli.check_args(&args, &at)?;
                for e in c["env"].as_vec().cloned().unwrap_or_default() {
                    cli.check_env(e["name"].as_str().unwrap_or_default(), &at)?;
                }
                if cli.name == "greeter-server" {
                    greeter_server_pod(pod, c, &args, &at)?;
                    kubelet_probe(bin, c, &args, &at)?;
                    saw_server = true;
                }
            }
        }
    }
    ensure!(saw_server, "deploy/k8s has no greeter-server Deployment");
    Ok(())
}

/// The value of `--flag=value` in `args`.
fn arg<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter().find_map(|a| a.strip_prefix(flag)?.strip_prefix('='))
}

/// Seconds in "2s", "500ms" or "1m".
fn seconds(text: &str) -> anyhow::Result<f64> {
    let parse = |n: &str| n.parse::<f64>().with_context(|| format!("{text:?} is not a duration"));
    if let Some(ms) = text.strip_suffix("ms") {
        Ok(parse(ms)? / 1000.0)
    } else if let Some(s) = text.strip_suffix('s') {
        parse(s)
    } else if let Some(m) = text.strip_suffix('m') {
        Ok(parse(m)? * 60.0)
    } else {
        bail!("{text:?} is not a duration")
    }
}

fn greeter_server_pod(pod: &Yaml, c: &Yaml, args: &[String], at: &str) -> anyhow::Result<()> {
    let env = c["env"].as_vec().cloned().unwrap_or_default();
    let field = |name: &str| {
        env.iter()
            .find(|e| e["name"].as_str() == Some(name))
            .and_then(|e| e["valueFrom"]["fieldRef"]["fieldPath"].as_str().map(str::to_string))
    };
    ensure!(field("POD_IP").as_deref() == Some("status.podIP"), "{at}: POD_IP is not the downward API's status.podIP");
    let advertise = arg(args, "--advertise").context("no --advertise")?;
    ensure!(advertise.starts_with("$(POD_IP):"), "{at}: --advertise={advertise} is not the pod IP");
    let listen = arg(args, "--listen").context("no --listen")?;
    let port: i64 = listen.rsplit(':').next().unwrap_or_default().parse().context("--listen has no port")?;
    ensure!(advertise.ends_with(&format!(":{port}")), "{at}: it advertises another port than it listens on");
    // The kubelet's gRPC probe speaks plaintext only: against a TLS port it always fails.
    let tls = arg(args, "--tls-cert").is_some();
    let health_port = arg(args, "--health-listen").map(|h| h.rsplit(':').next().unwrap_or_default().parse::<i64>());
    let health_port = health_port.transpose().context("--health-listen has no port")?;
    let probed = if tls {
        health_port
            .with_context(|| format!("{at}: a TLS server needs --health-listen for the kubelet's plaintext probe"))?
    } else {
        health_port.unwrap_or(port)
    };
    for probe in ["readinessProbe", "livenessProbe"] {
        ensure!(
            c[probe]["grpc"]["port"].as_i64() == Some(probed),
            "{at}: {probe} is not the gRPC probe on the plaintext health port {probed}"
        );
    }
    ensure!(arg(args, "--etcd").is_some_and(|e| e.contains("//etcd:")), "{at}: etcd is not reached by Service name");

    let mounts: Vec<String> = c["volumeMounts"]
        .as_vec()
        .map(|v| v.iter().filter_map(|m| m["mountPath"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    for flag in ["--tls-cert", "--tls-key"] {
        let path = arg(args, flag).with_context(|| format!("{at}: no {flag}"))?;
        ensure!(mounts.iter().any(|m| path.starts_with(m.as_str())), "{at}: {flag}={path} is not under a mount");
    }
    let secret = pod["volumes"].as_vec().and_then(|v| v.iter().find_map(|v| v["secret"]["secretName"].as_str()));
    ensure!(secret.is_some(), "{at}: the TLS files come from no Secret");

    let pre_stop = strings(&c["lifecycle"]["preStop"]["exec"]["command"]);
    ensure!(pre_stop.first().map(String::as_str) == Some("sleep"), "{at}: no preStop sleep");
    let pre_stop = pre_stop.get(1).context("preStop sleep without seconds")?.parse::<f64>()?;
    let grace = seconds(arg(args, "--shutdown-grace").unwrap_or("1s"))?;
    let drain = seconds(arg(args, "--drain-timeout").unwrap_or("10s"))?;
    let termination = pod["terminationGracePeriodSeconds"].as_i64().context("no terminationGracePeriodSeconds")? as f64;
    ensure!(
        termination > pre_stop + grace + drain,
        "{at}: terminationGracePeriodSeconds {termination} does not cover preStop {pre_stop} + grace {grace} + drain {drain}"
    );
    Ok(())
}

/// Starts greeter-server with the container's arguments (pod IP and name filled in, its
/// ports moved to free loopback ones, certificates made here, etcd pointed at a port nothing
/// listens on) and probes it as the kubelet does: a plaintext grpc.health.v1 check on the
/// readiness probe's port, which must answer SERVING.
fn kubelet_probe(bin: &Path, c: &Yaml, args: &[String], at: &str) -> anyhow::Result<()> {
    let probe_port =
        c["readinessProbe"]["grpc"]["port"].as_i64().with_context(|| format!("{at}: no gRPC readiness probe"))?;
    let dir = util::root().join("target").join("deploy-check-kubelet");
    let _ = fs::remove_dir_all(&dir);
    let pki = mesh_etcd_local::pki::Pki::create(&dir, "deploy-check")?;
    let cert = pki.issue("server", "greeter", &["127.0.0.1"], mesh_etcd_local::pki::Validity::Current)?;
    let nothing = mesh_etcd_local::free_port()?;
    let mut moved = std::collections::BTreeMap::new();
    let mut probe_at = None;
    let mut run_args = Vec::new();
    for a in args {
        let Some((flag, value)) = a.split_once('=') else {
            run_args.push(a.clone());
            continue;
        };
        let value = match flag {
            "--listen" | "--health-listen" | "--metrics-listen" => {
                let port = value.rsplit(':').next().unwrap_or_default().to_string();
                let free = mesh_etcd_local::free_port()?;
                if port == probe_port.to_string() {
                    probe_at = Some(free);
                }
                moved.insert(port, free);
                format!("127.0.0.1:{free}")
            }
            "--advertise" => "127.0.0.1:1".to_string(),
            "--instance-id" => "deploy-check".to_string(),
            "--etcd" => format!("http://127.0.0.1:{nothing}"),
            "--tls-cert" => cert.cert.display().to_string(),
            "--tls-key" => cert.key.display().to_string(),
            _ => value.to_string(),
        };
        run_args.push(format!("{flag}={value}"));
    }
    let probe_at =
        probe_at.with_context(|| format!("{at}: the probe's port {probe_port} is none the server listens on"))?;
    let log = dir.join("greeter-server.log");
    let mut command = Command::new(bin.join("greeter-server"));
    command.args(&run_args);
    let mut child = spawn_logged(command, &log).context("starting greeter-server with the manifest's arguments")?;
    let read = || fs::read_to_string(&log).unwrap_or_default();
    let served = serves(&mut child, &log);
    let probe = |port: u16| {
        Command::new(bin.join("greeter-client"))
            .args(["health", "--target", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let main_port = arg(args, "--listen").and_then(|l| l.rsplit(':').next()).unwrap_or_default();
    let (probed, main) = (probe(probe_at), moved.get(main_port).map(|&p| probe(p)));
    let _ = mesh_etcd_local::signal(child.id(), mesh_etcd_local::Signal::Term);
    let _ = child.wait();
    ensure!(served, "{at}: greeter-server did not start with the manifest's arguments {run_args:?}:\n{}", read());
    ensure!(probed, "{at}: the kubelet's plaintext gRPC probe on port {probe_port} did not get SERVING:\n{}", read());
    if arg(args, "--tls-cert").is_some() {
        // The check is worth something only if a plaintext probe of the TLS port fails.
        ensure!(main == Some(false), "{at}: a plaintext probe of the TLS port answered SERVING");
    }
    Ok(())
}

fn systemd(dir: &Path, server: &Cli) -> anyhow::Result<()> {
    let env_path = dir.join("greeter-server.env");
    let env = fs::read_to_string(&env_path).with_context(|| format!("reading {}", env_path.display()))?;
    let mut values = std::collections::BTreeMap::new();
    for line in env.lines() {
        // Commented-out settings are documentation: they must be right too.
        let line = line.trim().trim_start_matches('#');
        if let Some((key, value)) = line.split_once('=')
            && key.starts_with("MESH_")
        {
            server.check_env(key, "greeter-server.env")?;
            values.insert(key.to_string(), value.to_string());
        }
    }
    let unit_path = dir.join("greeter-server.service");
    let unit = fs::read_to_string(&unit_path).with_context(|| format!("reading {}", unit_path.display()))?;
    let setting = |key: &str| unit.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('=').map(str::trim));
    ensure!(setting("ExecStart").is_some_and(|e| e.ends_with("/greeter-server")), "greeter-server.service: ExecStart");
    let stop = seconds(setting("TimeoutStopSec").context("greeter-server.service: no TimeoutStopSec")?)?;
    let grace = seconds(values.get("MESH_SHUTDOWN_GRACE").map_or("1s", String::as_str))?;
    let drain = seconds(values.get("MESH_DRAIN_TIMEOUT").map_or("10s", String::as_str))?;
    ensure!(stop > grace + drain, "greeter-server.service: TimeoutStopSec {stop} s does not cover {grace} + {drain} s");
    Ok(())
}

/// The exposure `systemd-analyze security` may give greeter-server.service, times ten.
const MAX_EXPOSURE_TENTHS: u32 = 20;

/// `systemd-analyze verify` on greeter-server.service (its ExecStart pointed at the binary
/// built here, since verify wants it to exist) and `security --offline` within
/// [`MAX_EXPOSURE_TENTHS`]; said so where there is no systemd-analyze.
fn systemd_analyze(root: &Path, dir: &Path, bin: &Path) -> anyhow::Result<String> {
    let unit = dir.join("greeter-server.service");
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        return Ok("no systemd-analyze on this machine: the unit was neither verified nor scored".into());
    }
    let text = fs::read_to_string(&unit).with_context(|| format!("reading {}", unit.display()))?;
    let work = root.join("target").join("deploy-check-systemd");
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let copy = work.join("greeter-server.service");
    let built = bin.join("greeter-server");
    fs::write(
        &copy,
        text.replace("ExecStart=/usr/local/bin/greeter-server", &format!("ExecStart={}", built.display())),
    )
    .with_context(|| format!("writing {}", copy.display()))?;
    let verify = Command::new("systemd-analyze").arg("verify").arg(&copy).output().context("systemd-analyze verify")?;
    let said = String::from_utf8_lossy(&verify.stderr);
    // Only what is about this unit: a machine without the units it orders itself after
    // (etcd.service) says so, which is not the unit's fault.
    let complaints: Vec<&str> = said.lines().filter(|l| l.contains("greeter-server.service")).collect();
    ensure!(verify.status.success() && complaints.is_empty(), "systemd-analyze verify greeter-server.service:\n{said}");
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", &format!("--threshold={MAX_EXPOSURE_TENTHS}")])
        .arg(&unit)
        .output()
        .context("systemd-analyze security")?;
    let out = String::from_utf8_lossy(&security.stdout);
    let overall = out.lines().find(|l| l.contains("Overall exposure level")).unwrap_or("no overall exposure level");
    ensure!(
        security.status.success(),
        "systemd-analyze security: greeter-server.service is above {}.{}: {overall}\n{out}",
        MAX_EXPOSURE_TENTHS / 10,
        MAX_EXPOSURE_TENTHS % 10
    );
    Ok(format!("systemd-analyze verify passes; security: {}", overall.trim_start_matches('→').trim()))
}

/// The Dockerfile's instructions, each on one line (continuations joined).
fn instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(start) => {
                current.push_str(start);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

/// A JSON-array instruction's words (`CMD ["--listen", "0.0.0.0:50051"]`).
fn exec_form(instruction: &str, name: &str) -> anyhow::Result<Vec<String>> {
    let json = instruction.strip_prefix(name).map(str::trim).context("not this instruction")?;
    let words: Vec<String> =
        serde_json::from_str(json).with_context(|| format!("Dockerfile: {name} is not a JSON array: {json}"))?;
    Ok(words)
}

/// What the Dockerfile builds and runs by default.
struct Image {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

fn dockerfile(root: &Path, path: &Path) -> anyhow::Result<Image> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut built = Vec::new();
    let mut copied_out = Vec::new();
    let mut run_text = String::new();
    let (mut entrypoint, mut cmd) = (Vec::new(), Vec::new());
    for line in instructions(&text) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first().copied() {
            Some("COPY") if words.get(1).is_some_and(|w| w.starts_with("--from=")) => {
                let from = words.get(2).context("COPY --from without a source")?;
                copied_out.push(from.rsplit('/').next().unwrap_or_default().to_string());
            }
            Some("COPY") => {
                for src in &words[1..words.len() - 1] {
                    ensure!(root.join(src).exists(), "Dockerfile: COPY {src}: no such path in the workspace");
                }
            }
            Some("RUN") if line.contains("cargo build") => {
                let build = line.split("cargo build").nth(1).and_then(|b| b.split("&&").next()).unwrap_or_default();
                let mut it = build.split_whitespace();
                while let Some(w) = it.next() {
                    if w == "-p" {
                        built.push(it.next().context("-p without a package")?.to_string());
                    }
                }
                run_text.push_str(&line);
            }
            Some("ENTRYPOINT") => entrypoint = exec_form(&line, "ENTRYPOINT")?,
            Some("CMD") => cmd = exec_form(&line, "CMD")?,
            _ => {}
        }
    }
    ensure!(!built.is_empty(), "Dockerfile: no `cargo build -p …`");
    for package in &built {
        ensure!(
            root.join("services").join(package).join("Cargo.toml").exists()
                || root.join("crates").join(package).join("Cargo.toml").exists(),
            "Dockerfile: builds {package}, which is not a package of this workspace"
        );
    }
    for binary in &copied_out {
        ensure!(built.contains(binary), "Dockerfile: copies out {binary}, which it does not build");
        // Built in a cache mount, a binary must be copied out of it in the same step.
        ensure!(
            !run_text.contains("--mount=type=cache,target=/src/target")
                || run_text.contains(&format!("target/release/{binary}")),
            "Dockerfile: the build's target directory is a cache mount, and {binary} is not copied out of it"
        );
    }
    ensure!(!copied_out.is_empty(), "Dockerfile: copies no binary out of the build stage");
    ensure!(entrypoint == ["greeter-server"], "Dockerfile: ENTRYPOINT is {entrypoint:?}, not [\"greeter-server\"]");
    Ok(Image { entrypoint, cmd })
}

/// Whether a Docker engine answers here (a client alone is not enough).
fn docker_engine() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs the image's default command and sees it serve, then stop cleanly on SIGTERM: in
/// the image built for real where a Docker engine answers, else with this machine's binary
/// (the port moved to a free one, etcd pointed at a loopback port nothing listens on).
fn default_command(root: &Path, image: &Image, bin: &Path) -> anyhow::Result<&'static str> {
    if docker_engine() {
        let tag = "mesh-greeter:deploy-check";
        util::run(Command::new("docker").current_dir(root).args([
            "build",
            "-f",
            "deploy/docker/Dockerfile",
            "-t",
            tag,
            ".",
        ]))?;
        let out = Command::new("docker").args(["run", "-d", "--rm", tag]).output().context("docker run")?;
        ensure!(out.status.success(), "docker run {tag}: {}", String::from_utf8_lossy(&out.stderr));
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let logs = || {
            Command::new("docker")
                .args(["logs", &id])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .unwrap_or_default()
        };
        let served = wait_for(|| logs().contains("serving greeter.v1"), Duration::from_secs(60));
        let stopped = Command::new("docker").args(["stop", "-t", "20", &id]).status();
        ensure!(served, "the image's default command did not serve:\n{}", logs());
        ensure!(stopped.is_ok_and(|s| s.success()), "docker stop {id} failed");
        return Ok("built the image and ran its default command: it served and stopped on SIGTERM");
    }
    let port = mesh_etcd_local::free_port()?;
    let nothing = mesh_etcd_local::free_port()?;
    let args: Vec<String> = image
        .cmd
        .iter()
        .map(|a| if a.ends_with(":50051") { a.replace(":50051", &format!(":{port}")) } else { a.clone() })
        .collect();
    let log = root.join("target").join("deploy-check-default-command.log");
    let mut command = Command::new(bin.join(&image.entrypoint[0]));
    command.args(&args).env("MESH_ETCD", format!("http://127.0.0.1:{nothing}"));
    let mut child = spawn_logged(command, &log).context("running the image's default command")?;
    let read = || fs::read_to_string(&log).unwrap_or_default();
    let served = serves(&mut child, &log);
    let alive = matches!(child.try_wait(), Ok(None));
    if alive {
        mesh_etcd_local::signal(child.id(), mesh_etcd_local::Signal::Term)?;
    }
    let status = child.wait().context("waiting for greeter-server")?;
    ensure!(served && alive, "the image's default command {:?} {args:?} did not serve:\n{}", image.entrypoint, read());
    ensure!(status.success(), "the image's default command exited {status} on SIGTERM:\n{}", read());
    Ok(
        "no Docker engine here, so the image was not built; its ENTRYPOINT and CMD, run with this machine's binary, served and stopped on SIGTERM",
    )
}

/// Starts greeter-server as `command` says, logging at info into `log`.
fn spawn_logged(mut command: Command, log: &Path) -> anyhow::Result<Child> {
    let file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    Ok(command.env("RUST_LOG", "info").stdin(Stdio::null()).stdout(Stdio::null()).stderr(file).spawn()?)
}

/// Whether a greeter-server started by [`spawn_logged`] serves within 30 s (false as soon
/// as it exits).
fn serves(child: &mut Child, log: &Path) -> bool {
    let read = || fs::read_to_string(log).unwrap_or_default();
    wait_for(
        || read().contains("serving greeter.v1") || matches!(child.try_wait(), Ok(Some(_))),
        Duration::from_secs(30),
    )
}

fn wait_for(mut done: impl FnMut() -> bool, within: Duration) -> bool {
    let start = std::time::Instant::now();
    while !done() {
        if start.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Starts etcd on each configuration, moved to loopback ports and a temp data dir, and waits
/// until the members are healthy.
fn etcd_configs(root: &Path, dir: &Path) -> anyhow::Result<()> {
    let etcd = mesh_etcd_local::ensure_etcd()?;
    let work = root.join("target").join("deploy-check");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let single = [dir.join("etcd.conf.yml")];
    let cluster: Vec<PathBuf> = (1..=3).map(|i| dir.join("cluster").join(format!("etcd-{i}.conf.yml"))).collect();
    for configs in [&single[..], &cluster[..]] {
        let ports: Vec<(u16, u16)> = configs
            .iter()
            .map(|_| Ok((mesh_etcd_local::free_port()?, mesh_etcd_local::free_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let mut members: Vec<Child> = Vec::new();
        let result = (|| {
            for (i, config) in configs.iter().enumerate() {
                let text = fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
                let mut local = text
                    .replace("/var/lib/etcd", &work.join(format!("data-{}-{i}", configs.len())).display().to_string());
                for (j, (client, peer)) in ports.iter().enumerate() {
                    let host = if configs.len() == 1 { "127.0.0.1".to_string() } else { format!("etcd-{}", j + 1) };
                    local = local.replace(&format!("{host}:2379"), &format!("127.0.0.1:{client}"));
                    local = local.replace(&format!("{host}:2380"), &format!("127.0.0.1:{peer}"));
                }
                let (client, peer) = ports[i];
                local = local.replace("0.0.0.0:2379", &format!("127.0.0.1:{client}"));
                local = local.replace("0.0.0.0:2380", &format!("127.0.0.1:{peer}"));
                let local_path = work.join(format!("{}-{i}.yml", configs.len()));
                fs::write(&local_path, local).with_context(|| format!("writing {}", local_path.display()))?;
                let log = fs::File::create(local_path.with_extension("log")).context("creating an etcd log")?;
                members.push(
                    Command::new(&etcd)
                        .arg("--config-file")
                        .arg(&local_path)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(log)
                        .spawn()
                        .with_context(|| format!("starting {}", etcd.display()))?,
                );
            }
            let urls: Vec<String> = ports.iter().map(|(c, _)| format!("http://127.0.0.1:{c}")).collect();
            let healthy = mesh_etcd_local::wait_until(Duration::from_secs(30), || {
                urls.iter().all(|u| mesh_etcd_local::is_healthy(u, Duration::from_millis(500)))
            });
            ensure!(healthy, "etcd did not become healthy on {:?}; logs under {}", configs, work.display());
            Ok(())
        })();
        for mut m in members {
            util::terminate(&mut m, Duration::from_secs(10));
        }
        result?;
    }
    let _ = fs::remove_dir_all(&work);
    Ok(())
}
