//! `cargo xtask soak`: the lifecycle checker (greeter-server's `tests/lifecycle.rs`) for
//! longer than `cargo xtask test` runs it, or one sequence again by its seed.

use crate::util;

/// What to soak.
#[derive(Debug, Default)]
pub(crate) struct Options {
    seconds: Option<u64>,
    seed: Option<u64>,
    members: Option<u64>,
    ops: Option<u64>,
    etcd: Option<String>,
}

pub(crate) fn parse(rest: &[String]) -> anyhow::Result<Options> {
    const USAGE: &str = "usage: cargo xtask soak [--seconds N] [--ops K] [--etcd VERSION] | --seed S [--members 1|3] [--ops K] [--etcd VERSION]";
    let mut options = Options::default();
    let mut args = rest.iter();
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value; {USAGE}"))?;
        let number = || value.parse::<u64>().map_err(|_| anyhow::anyhow!("{flag} {value:?} is not a number; {USAGE}"));
        match flag.as_str() {
            "--seconds" => options.seconds = Some(number()?),
            "--seed" => options.seed = Some(number()?),
            "--members" if matches!(value.as_str(), "1" | "3") => options.members = Some(number()?),
            "--members" => anyhow::bail!("--members is 1 or 3, not {value:?}"),
            "--ops" => options.ops = Some(number()?),
            "--etcd" => options.etcd = Some(value.clone()),
            _ => anyhow::bail!("unknown flag {flag:?}; {USAGE}"),
        }
    }
    if options.seed.is_none() && options.members.is_some() {
        anyhow::bail!("--members goes with --seed (a soak alternates one member and three); {USAGE}");
    }
    Ok(options)
}

pub(crate) fn run(options: Options) -> anyhow::Result<()> {
    let etcd = match &options.etcd {
        Some(version) => util::build_etcd_release(version).map_err(anyhow::Error::msg)?,
        None => mesh_etcd_local::ensure_etcd()?,
    };
    eprintln!("using etcd at {}", etcd.display());
    let mut cmd = util::cargo();
    cmd.args(["test", "-p", "greeter-server", "--test", "lifecycle", "--", "--ignored", "--exact", "--nocapture"]);
    cmd.env("ETCD_BIN", &etcd);
    match options.seed {
        Some(seed) => {
            cmd.arg("replay").env("MESH_CHECK_SEED", seed.to_string());
            cmd.env("MESH_CHECK_MEMBERS", options.members.unwrap_or(1).to_string());
        }
        None => {
            cmd.arg("soak").env("MESH_SOAK_SECONDS", options.seconds.unwrap_or(300).to_string());
        }
    }
    if let Some(ops) = options.ops {
        cmd.env("MESH_CHECK_OPS", ops.to_string());
    }
    util::run(&mut cmd)
}
