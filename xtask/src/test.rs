//! `cargo xtask test`: provision what the tests need, then fmt, clippy, every test, the API
//! docs, deploy/, the library crates packaged,
//! and the quick demo.

use std::process::Command;

use crate::util;

/// `--busy N`, if given: how many busy processes to run beside the tests.
pub(crate) fn busy_flag(rest: &[String]) -> anyhow::Result<usize> {
    match rest {
        [] => Ok(0),
        [flag, n] if flag == "--busy" => {
            n.parse().map_err(|_| anyhow::anyhow!("--busy takes a number of processes, not {n:?}"))
        }
        _ => anyhow::bail!("usage: cargo xtask test [--busy N]"),
    }
}

/// The longest a busy process spins, whatever happens to the run that started it.
const SPIN_AT_MOST: std::time::Duration = std::time::Duration::from_secs(3 * 3600);

/// `spin SECONDS`: keeps one core busy until the time has passed.
pub(crate) fn spin(rest: &[String]) -> anyhow::Result<()> {
    let [seconds] = rest else { anyhow::bail!("usage: cargo xtask spin SECONDS") };
    let seconds: u64 = seconds.parse().map_err(|_| anyhow::anyhow!("spin takes seconds, not {seconds:?}"))?;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(seconds).min(SPIN_AT_MOST);
    let mut x = 0u64;
    while std::time::Instant::now() < until {
        for _ in 0..100_000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
    Ok(())
}

/// Busy processes started for `--busy`, stopped (by their PIDs) when dropped.
struct Busy(Vec<std::process::Child>);

impl Busy {
    fn start(n: usize) -> anyhow::Result<Busy> {
        let me = std::env::current_exe()?;
        let mut children = Vec::new();
        for _ in 0..n {
            let child = Command::new(&me)
                .args(["spin", &SPIN_AT_MOST.as_secs().to_string()])
                .stdin(std::process::Stdio::null())
                .spawn()?;
            children.push(child);
        }
        if n > 0 {
            eprintln!("running beside {n} busy processes");
        }
        Ok(Busy(children))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn run(busy: usize) -> anyhow::Result<()> {
    let _busy = Busy::start(busy)?;
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
    let nextest = has_nextest();
    if nextest {
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
    // The etcd-facing tests again against each etcd release interop/etcd builds (the
    // machine's etcd ran them above): users run 3.5 and 3.6 as well as Debian's 3.4.
    for version in util::etcd_releases() {
        if let Err(why) = &go {
            eprintln!("skipped: the etcd-facing tests against etcd {version}: {why}");
            continue;
        }
        let etcd = util::build_etcd_release(&version).map_err(anyhow::Error::msg)?;
        eprintln!("the etcd-facing tests against etcd {version} ({})", etcd.display());
        let mut cmd = util::cargo();
        if nextest {
            cmd.args(["nextest", "run", "--workspace", "--no-fail-fast", "-E", &etcd_facing_filter()]);
        } else {
            cmd.args(["test", "--no-fail-fast"]);
            for (package, test) in ETCD_FACING {
                cmd.args(["-p", package, "--test", test]);
            }
        }
        util::run(cmd.env("ETCD_BIN", &etcd))?;
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

/// The test binaries that talk to etcd (package, test target): what runs again against
/// every etcd release.
const ETCD_FACING: &[(&str, &str)] = &[
    ("mesh-etcd", "etcd"),
    ("mesh-etcd", "scale"),
    ("mesh-etcd", "secure"),
    ("mesh-registry", "registry"),
    ("mesh-discovery", "discovery"),
    ("mesh-config", "live"),
    ("greeter-server", "e2e"),
    ("greeter-server", "lifecycle"),
    ("greeter-client", "config"),
];

fn etcd_facing_filter() -> String {
    ETCD_FACING.iter().map(|(p, t)| format!("binary_id({p}::{t})")).collect::<Vec<_>>().join(" | ")
}

fn has_nextest() -> bool {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}
