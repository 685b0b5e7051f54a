//! `cargo xtask package`: `cargo package` (with its verifying build) for every crate a user
//! can depend on, which is every workspace member whose manifest does not say
//! `publish = false` (the services, xtask and mesh-codegen do).

use std::fs;

use anyhow::Context as _;

use crate::util;

pub(crate) fn run() -> anyhow::Result<()> {
    let members = members()?;
    let verify = util::root().join("target").join("package-verify");
    forget_last_packaging(members.iter().filter(|m| !m.1).map(|m| m.0.as_str()), &verify)?;
    let mut cmd = util::cargo();
    // --allow-dirty: this checks that the crates package and build on their own, not that
    // the work tree is committed. The verifying builds have a target directory of their
    // own, so that forgetting them forgets nothing of the workspace's builds.
    cmd.args(["package", "--workspace", "--allow-dirty", "--target-dir"]).arg(&verify);
    for (name, _) in members.iter().filter(|m| m.1) {
        cmd.args(["--exclude", name]);
    }
    util::run(&mut cmd)
}

/// Removes what an earlier `cargo package --workspace` left of `crates`: the temporary
/// registry it verifies against, the verifying builds of them in `verify` (cargo takes a
/// registry crate of the same version as built already, whatever its sources now), and the
/// sources it unpacked from that registry under `$CARGO_HOME/registry/src/-<hash>/` (a
/// registry with no name), which it also reuses as it finds them. Without this a crate is
/// verified against its dependencies as they were at the last packaging: `cannot find … in
/// mesh_util` for a module added since (and on a fresh machine, as CI, it passes). The
/// builds of every other crate stay, so only ours are built again.
fn forget_last_packaging<'a>(crates: impl Iterator<Item = &'a str>, verify: &std::path::Path) -> anyhow::Result<()> {
    let crates: Vec<&str> = crates.collect();
    // `cargo package --target-dir` puts the packages and the registry under it.
    remove(&verify.join("package").join("tmp-registry"))?;
    let ours = |name: &str| crates.iter().any(|c| name.starts_with(&format!("{c}-")));
    if let Ok(built) = fs::read_dir(verify.join("debug").join(".fingerprint")) {
        for unit in built.flatten() {
            if ours(&unit.file_name().to_string_lossy()) {
                remove(&unit.path())?;
            }
        }
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo")));
    let Some(sources) = cargo_home.map(|h| h.join("registry").join("src")) else { return Ok(()) };
    let Ok(registries) = fs::read_dir(&sources) else { return Ok(()) };
    for registry in registries.flatten() {
        if !registry.file_name().to_string_lossy().starts_with('-') {
            continue;
        }
        let Ok(unpacked) = fs::read_dir(registry.path()) else { continue };
        for dir in unpacked.flatten() {
            let name = dir.file_name().to_string_lossy().into_owned();
            let ours = crates.iter().any(|c| {
                name.strip_prefix(c)
                    .and_then(|v| v.strip_prefix('-'))
                    .is_some_and(|v| v.starts_with(|ch: char| ch.is_ascii_digit()))
            });
            if ours {
                remove(&dir.path())?;
            }
        }
    }
    Ok(())
}

fn remove(path: &std::path::Path) -> anyhow::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Every member's name, and whether its manifest says `publish = false`.
fn members() -> anyhow::Result<Vec<(String, bool)>> {
    let root = util::root();
    let mut manifests = vec![root.join("xtask").join("Cargo.toml")];
    for dir in ["crates", "services", "examples"] {
        let entries = fs::read_dir(root.join(dir)).with_context(|| format!("listing {dir}/"))?;
        for entry in entries {
            let manifest = entry.with_context(|| format!("listing {dir}/"))?.path().join("Cargo.toml");
            if manifest.exists() {
                manifests.push(manifest);
            }
        }
    }
    let mut names = Vec::new();
    for manifest in manifests {
        let text = fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
        let unpublished = text.lines().any(|l| l.trim() == "publish = false");
        let name = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("name = ").map(|v| v.trim_matches('"').to_string()))
            .with_context(|| format!("{} names no package", manifest.display()))?;
        names.push((name, unpublished));
    }
    names.sort();
    Ok(names)
}
