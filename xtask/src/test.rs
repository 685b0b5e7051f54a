//! `cargo xtask test`: provision what the tests need, then fmt, clippy, every test, the API
//! docs, deploy/, the library crates packaged,
//! and the quick demo.

use std::process::Command;

use crate::util;

pub(crate) fn run() -> anyhow::Result<()> {
    // The etcd integration tests start their own etcd (mesh-testkit) and only need a binary;
    // install it here so that they never do.
    let etcd = mesh_etcd_local::ensure_etcd()?;
    eprintln!("using etcd at {}", etcd.display());

    util::run(util::cargo().args(["fmt", "--all", "--", "--check"]))?;
    util::run(util::cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    // The Go interop tests need a Go toolchain; without one they are left out, said so, and
    // never counted as passed.
    let go = go_toolchain();
    if let Err(why) = &go {
        eprintln!("skipped: the Go interop tests (greeter-server::interop_go): {why}");
    }
    if has_nextest() {
        let mut cmd = util::cargo();
        cmd.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
        if go.is_err() {
            cmd.args(["-E", "not binary_id(greeter-server::interop_go)"]);
        }
        util::run(&mut cmd)?;
    } else {
        eprintln!("cargo-nextest not found; running cargo test");
        let mut cmd = util::cargo();
        cmd.args(["test", "--workspace", "--no-fail-fast", "--all-targets"]);
        if go.is_err() {
            cmd.args(["--", "--skip", "go_interop_"]);
        }
        util::run(&mut cmd)?;
    }
    // nextest does not run doctests.
    util::run(util::cargo().args(["test", "--workspace", "--doc"]))?;
    // The API docs build without a broken link or a warning.
    util::run(util::cargo().args(["doc", "--workspace", "--no-deps"]).env("RUSTDOCFLAGS", "-D warnings"))?;
    // What this machine can check of deploy/.
    crate::deploy::run()?;
    // The library crates package and build on their own, as a user's dependency would.
    crate::package::run()?;
    // The main job end to end: the demo's story, told quickly.
    eprintln!("$ cargo xtask demo --quick");
    crate::demo::run(crate::demo::Options { quick: true })
}

/// Whether `go` (or `$GO`) is at least the version interop/go/go.mod names; why not if not.
fn go_toolchain() -> Result<(), String> {
    let go_mod = util::root().join("interop").join("go").join("go.mod");
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

fn has_nextest() -> bool {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}
