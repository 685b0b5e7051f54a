use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

/// The workspace root (the parent of `xtask/`).
pub(crate) fn root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// Where cargo puts what it builds: `CARGO_TARGET_DIR` (relative to the workspace root when
/// relative), else `target/` in the workspace root.
pub(crate) fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => root().join(dir),
        None => root().join("target"),
    }
}

/// `cargo`, the same one that runs xtask, in the workspace root.
pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Runs `cmd`, inheriting stdio; fails naming the command if it fails.
pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = shown(cmd);
    eprintln!("$ {shown}");
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("`{shown}` failed with {status}");
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails with its stderr if it fails.
pub(crate) fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = shown(cmd);
    let out = cmd.output().with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!("`{shown}` failed with {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// SIGTERM to `child`, and SIGKILL if it has not exited within `within`; reaped either way.
pub(crate) fn terminate(child: &mut std::process::Child, within: std::time::Duration) {
    let _ = mesh_etcd_local::signal(child.id(), mesh_etcd_local::Signal::Term);
    if !mesh_etcd_local::wait_until(within, || matches!(child.try_wait(), Ok(Some(_)))) {
        let _ = child.kill();
    }
    let _ = child.wait();
}

pub(crate) fn shown(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub(crate) fn no_args(rest: &[String]) -> anyhow::Result<()> {
    if let Some(extra) = rest.first() {
        bail!("unexpected argument {extra:?}");
    }
    Ok(())
}

/// Whether `go` (or `$GO`) is at least the version interop/go/go.mod names; why not if not.
pub(crate) fn go_toolchain() -> Result<(), String> {
    let go_mod = root().join("interop").join("go").join("go.mod");
    let text = std::fs::read_to_string(&go_mod).map_err(|e| format!("reading {}: {e}", go_mod.display()))?;
    let needed = text
        .lines()
        .find_map(|l| l.strip_prefix("go "))
        .map(str::trim)
        .ok_or_else(|| format!("{} names no Go version", go_mod.display()))?;
    let go = std::env::var_os("GO").unwrap_or_else(|| "go".into());
    let out = Command::new(&go)
        .args(["env", "GOVERSION"])
        .output()
        .map_err(|e| format!("no Go toolchain (`go` could not be run: {e}); go.mod needs go {needed}"))?;
    let have = String::from_utf8_lossy(&out.stdout).trim().trim_start_matches("go").to_string();
    if !out.status.success() || version(&have) < version(needed) {
        return Err(format!("Go {have} is older than the go {needed} interop/go/go.mod needs"));
    }
    Ok(())
}

/// "1.26.8" as numbers, for comparing; a pre-release tail ("rc1") is dropped.
fn version(v: &str) -> Vec<u64> {
    v.split('.').map(|p| p.chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap_or(0)).collect()
}

/// Builds interop/go's commands (the Go greeter-server and client) into target/go-interop/;
/// that directory, or why not.
pub(crate) fn build_go_interop() -> Result<PathBuf, String> {
    go_toolchain()?;
    build_go(&root().join("interop").join("go"), &root().join("target").join("go-interop"))
}

/// The etcd releases besides the machine's that the etcd-facing tests also run against:
/// each directory `interop/etcd/vX.Y` is a Go module that builds that release's `etcd` and
/// `etcdutl` from the Go module proxy. Their versions, in order.
pub(crate) fn etcd_releases() -> Vec<String> {
    let dir = root().join("interop").join("etcd");
    let mut versions: Vec<String> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("go.mod").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    versions.sort();
    versions
}

/// Builds etcd release `version` (a directory of interop/etcd) into
/// target/etcd-releases/`version`/; the path of its `etcd`, with `etcdutl` beside it.
pub(crate) fn build_etcd_release(version: &str) -> Result<PathBuf, String> {
    go_toolchain()?;
    let out = root().join("target").join("etcd-releases").join(version);
    build_go(&root().join("interop").join("etcd").join(version), &out)?;
    Ok(out.join("etcd"))
}

/// `go build` of every command of the module in `module` into `out`.
fn build_go(module: &std::path::Path, out: &std::path::Path) -> Result<PathBuf, String> {
    // `go build -o DIR` of several commands needs DIR to exist.
    std::fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let go = std::env::var_os("GO").unwrap_or_else(|| "go".into());
    let built = Command::new(go)
        .current_dir(module)
        .args(["build", "-mod=readonly", "-buildvcs=false", "-o"])
        .arg(out)
        .arg("./cmd/...")
        .output()
        .map_err(|e| format!("running go build: {e}"))?;
    if !built.status.success() {
        return Err(format!(
            "go build in {} failed: {}",
            module.display(),
            String::from_utf8_lossy(&built.stderr).trim()
        ));
    }
    Ok(out.to_path_buf())
}
