//! `cargo xtask <command>`: the project's commands. See `cargo xtask help`.

mod bench;
mod demo;
mod deploy;
mod etcd;
mod package;
mod soak;
mod test;
mod util;

use std::process::ExitCode;

const HELP: &str = "\
cargo xtask <command>

  demo [--quick]          the narrated tour: etcd, greeter-servers and clients through every part,
                          checked and cleaned up; --quick tells it in seconds on a private etcd
  test [--busy N]         provision etcd, then fmt check, clippy -D warnings, every test, the
                          API docs, deploy-check, package, and the quick demo; --busy N runs
                          it all beside N processes that keep a core busy each
  soak [--seconds N] [--ops K] [--etcd VERSION]
                          the randomized etcd lifecycle checker for N seconds (default 300) of
                          fresh seeds, one etcd member and three in turn
  soak --seed S [--members 1|3] [--ops K]
                          one sequence again, as a failure printed it
  etcd-up [--cluster N]   a detached local etcd under target/etcd/ (N = 1 or 3), idempotent
  etcd-up --secure        a detached local etcd with TLS, auth and mesh's roles; prints the flags to use
  etcd-down               stop it (its data stays under target/etcd/)
  etcd-status             show what runs and whether it is healthy
  deploy-check            check deploy/: YAML parses, flags exist, k8s shutdown and probes, the
                          Dockerfile's steps, and the etcd configurations run
  package                 cargo package (and its verifying build) for every library crate
  codegen [--check]       regenerate crates/mesh-proto from proto/ and examples/inventory from
                          its proto/; --check fails if stale
  bench [--runs N] [--duration SECS] [--quick] [--only SECTION,...]
                          benchmark suite; prints a markdown table, saved under target/bench/
                          (sections: clients, servers, pick, channel, breaker, limiter,
                          update, registry, config)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprint!("{HELP}");
        return ExitCode::from(2);
    };
    let result = match command.as_str() {
        "demo" => demo::parse(rest).and_then(demo::run),
        "test" => test::busy_flag(rest).and_then(test::run),
        // Keeps a core busy for at most the given seconds (what `test --busy` starts).
        "spin" => test::spin(rest),
        "etcd-up" if rest.iter().any(|a| a == "--secure") => {
            if rest.len() == 1 {
                etcd::up_secure()
            } else {
                Err(anyhow::anyhow!("usage: cargo xtask etcd-up --secure"))
            }
        }
        "etcd-up" => etcd::parse_cluster(rest).and_then(etcd::up).map(drop),
        "etcd-down" => util::no_args(rest).and_then(|()| etcd::down()),
        "etcd-status" => util::no_args(rest).and_then(|()| etcd::status()),
        "deploy-check" => util::no_args(rest).and_then(|()| deploy::run()),
        "package" => util::no_args(rest).and_then(|()| package::run()),
        "codegen" => codegen(rest),
        "bench" => bench::parse(rest).and_then(bench::run),
        "soak" => soak::parse(rest).and_then(soak::run),
        "help" | "--help" | "-h" => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("error: unknown command {other:?}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {command}: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn codegen(rest: &[String]) -> anyhow::Result<()> {
    let check = match rest {
        [] => false,
        [flag] if flag == "--check" => true,
        _ => anyhow::bail!("usage: cargo xtask codegen [--check]"),
    };
    let mut cmd = util::cargo();
    cmd.args(["run", "-q", "-p", "mesh-codegen", "--"]);
    if check {
        cmd.arg("--check");
    }
    util::run(&mut cmd)
}
