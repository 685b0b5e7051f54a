use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::Error;

/// How to get etcd, for messages shown when none is found.
pub const INSTALL_HINT: &str = "install it (Debian/Ubuntu as root: `apt-get install -y etcd-server etcd-client`; \
macOS: `brew install etcd`; elsewhere: a release from https://github.com/etcd-io/etcd/releases), \
or point ETCD_BIN at an etcd binary; `cargo xtask test` and `cargo xtask etcd-up` install it where they can";

/// Finds an etcd binary: `ETCD_BIN` if set, else `etcd` on `PATH`. Never installs.
pub fn find_etcd() -> Result<PathBuf, Error> {
    find_etcd_in(env::var_os("ETCD_BIN"), env::var_os("PATH"))
}

pub(crate) fn find_etcd_in(etcd_bin: Option<OsString>, path: Option<OsString>) -> Result<PathBuf, Error> {
    if let Some(bin) = etcd_bin {
        let bin = PathBuf::from(bin);
        return if is_executable(&bin) {
            Ok(bin)
        } else {
            Err(Error::NotFound { detail: format!("ETCD_BIN={} is not an executable file", bin.display()) })
        };
    }
    search(path, "etcd")
        .ok_or_else(|| Error::NotFound { detail: format!("no `etcd` on PATH and ETCD_BIN is not set; {INSTALL_HINT}") })
}

/// Finds etcdctl: `ETCDCTL_BIN` if set, else beside the etcd binary, else on `PATH`.
pub fn find_etcdctl() -> Option<PathBuf> {
    if let Some(bin) = env::var_os("ETCDCTL_BIN") {
        return Some(PathBuf::from(bin)).filter(|p| is_executable(p));
    }
    find_etcd()
        .ok()
        .and_then(|etcd| etcd.parent().map(|dir| dir.join("etcdctl")))
        .filter(|p| is_executable(p))
        .or_else(|| on_path("etcdctl"))
}

/// Finds the tool that restores an etcd snapshot into a data directory: `ETCDUTL_BIN` if
/// set, else `etcdutl` beside the etcd binary or on `PATH` (etcd 3.5 and later), else
/// etcdctl, whose `snapshot restore` does the same up to etcd 3.5. Returns the binary and
/// whether it is etcdutl.
pub fn find_snapshot_restorer() -> Option<(PathBuf, bool)> {
    if let Some(bin) = env::var_os("ETCDUTL_BIN") {
        return Some((PathBuf::from(bin), true)).filter(|(p, _)| is_executable(p));
    }
    find_etcd()
        .ok()
        .and_then(|etcd| etcd.parent().map(|dir| dir.join("etcdutl")))
        .filter(|p| is_executable(p))
        .or_else(|| on_path("etcdutl"))
        .map(|p| (p, true))
        .or_else(|| find_etcdctl().map(|p| (p, false)))
}

/// Finds etcd, installing it first where this machine allows (see [`install_etcd`]).
pub fn ensure_etcd() -> Result<PathBuf, Error> {
    match find_etcd() {
        Ok(bin) => Ok(bin),
        Err(not_found) if env::var_os("ETCD_BIN").is_some() => Err(not_found),
        Err(_) => {
            install_etcd()?;
            find_etcd()
        }
    }
}

/// Installs etcd with the system package manager: `apt-get` when root on Debian or Ubuntu,
/// `brew` on macOS. Anything else is an error that says how to get etcd.
pub fn install_etcd() -> Result<(), Error> {
    install("etcd", &["etcd-server", "etcd-client"], "etcd", INSTALL_HINT)
}

/// Finds the tool `name` on `PATH`, installing it first where this machine allows: Debian's
/// `apt_packages` with `apt-get` when root, or `brew_package` on macOS. The error says how to
/// get it, with `hint`. Used for tools such as h2load (Debian's nghttp2-client).
pub fn ensure_tool(name: &str, apt_packages: &[&str], brew_package: &str, hint: &str) -> Result<PathBuf, Error> {
    if let Some(found) = on_path(name) {
        return Ok(found);
    }
    install(name, apt_packages, brew_package, hint)?;
    on_path(name)
        .ok_or_else(|| Error::NotFound { detail: format!("{name} is still not on PATH after installing it; {hint}") })
}

/// Installs packages with `brew` (macOS) or `apt-get` (Linux, as root), updating the package
/// lists once if the first attempt fails (a fresh machine has none).
fn install(name: &str, apt_packages: &[&str], brew_package: &str, hint: &str) -> Result<(), Error> {
    if cfg!(target_os = "macos") && on_path("brew").is_some() {
        return run_install(Command::new("brew").args(["install", brew_package]));
    }
    if cfg!(target_os = "linux") && on_path("apt-get").is_some() {
        if !nix::unistd::geteuid().is_root() {
            return Err(Error::NotFound {
                detail: format!("{name} is missing and installing it with apt-get needs root; {hint}"),
            });
        }
        let install = || {
            let mut cmd = Command::new("apt-get");
            cmd.args(["install", "-y", "-q"]).args(apt_packages).env("DEBIAN_FRONTEND", "noninteractive");
            cmd
        };
        eprintln!("{name} not found; installing Debian's {} with apt-get", apt_packages.join(" and "));
        if run_install(&mut install()).is_ok() {
            return Ok(());
        }
        run_install(Command::new("apt-get").args(["update", "-q"]))?;
        return run_install(&mut install());
    }
    Err(Error::NotFound {
        detail: format!("{name} is missing and this machine has no package manager mesh knows; {hint}"),
    })
}

fn run_install(cmd: &mut Command) -> Result<(), Error> {
    let shown = format!("{cmd:?}");
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Install { command: shown.clone(), detail: e.to_string() })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
    Err(Error::Install {
        command: shown,
        detail: format!("{}: {}", output.status, tail.into_iter().rev().collect::<Vec<_>>().join(" | ")),
    })
}

fn on_path(name: &str) -> Option<PathBuf> {
    search(env::var_os("PATH"), name)
}

fn search(path: Option<OsString>, name: &str) -> Option<PathBuf> {
    env::split_paths(&path?).map(|dir| dir.join(name)).find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}
