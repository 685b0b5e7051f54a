//! `cargo xtask package`: `cargo package` (with its verifying build) for every crate a user
//! can depend on, which is every workspace member whose manifest does not say
//! `publish = false` (the services, xtask and mesh-codegen do).

use std::fs;

use anyhow::Context as _;

use crate::util;

pub(crate) fn run() -> anyhow::Result<()> {
    let mut cmd = util::cargo();
    // --allow-dirty: this checks that the crates package and build on their own, not that
    // the work tree is committed.
    cmd.args(["package", "--workspace", "--allow-dirty"]);
    for name in unpublished()? {
        cmd.args(["--exclude", &name]);
    }
    util::run(&mut cmd)
}

/// The names of the members that say `publish = false`.
fn unpublished() -> anyhow::Result<Vec<String>> {
    let root = util::root();
    let mut manifests = vec![root.join("xtask").join("Cargo.toml")];
    for dir in ["crates", "services"] {
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
        if !text.lines().any(|l| l.trim() == "publish = false") {
            continue;
        }
        let name = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("name = ").map(|v| v.trim_matches('"').to_string()))
            .with_context(|| format!("{} names no package", manifest.display()))?;
        names.push(name);
    }
    names.sort();
    Ok(names)
}
