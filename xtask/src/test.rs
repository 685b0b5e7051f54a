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
    let go = util::go_toolchain();
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

fn has_nextest() -> bool {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}
