//! Prerequisites: the guest targets (rustup) and QEMU (Debian packages).
//! Installs what is missing when it can, saying what it runs; otherwise prints
//! the exact command and fails with exit status 2. Also which QEMU runs:
//! the distribution's, or another one put first on PATH (`--qemu`).

mod backports;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use hvo_images::{profile, workspace_root, Arch, Loader};

/// A prerequisite that is missing and cannot be installed from here.
#[derive(Debug)]
pub struct MissingPrerequisite(pub String);

impl std::fmt::Display for MissingPrerequisite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MissingPrerequisite {}

fn run_visibly(cmd: &mut Command) -> Result<()> {
    let line = format!("{cmd:?}").replace('"', "");
    eprintln!("setup: running {line}");
    let status = cmd.status().with_context(|| format!("cannot run {line}"))?;
    if !status.success() {
        bail!("{line} failed ({status})");
    }
    Ok(())
}

/// Adds the guest targets of `arches` to the pinned toolchain if missing.
fn ensure_targets(arches: &[Arch]) -> Result<()> {
    let root = workspace_root();
    let installed = Command::new("rustup").args(["target", "list", "--installed"]).current_dir(root).output();
    let installed =
        match installed {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
            _ => return Err(MissingPrerequisite(
                "rustup is not available; install it from your distribution or rustup.rs, then run `cargo xtask setup`"
                    .into(),
            )
            .into()),
        };
    let missing: Vec<&str> =
        arches.iter().map(|&a| profile(a).rust_target).filter(|t| !installed.lines().any(|l| l.trim() == *t)).collect();
    if !missing.is_empty() {
        run_visibly(Command::new("rustup").arg("target").arg("add").args(&missing).current_dir(root))?;
    }
    Ok(())
}

fn on_path(binary: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(binary).is_file()))
        .unwrap_or(false)
}

fn is_root() -> bool {
    nix_free_uid() == Some(0)
}

/// The effective uid from /proc (avoids a dependency for one number).
fn nix_free_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn passwordless_sudo() -> bool {
    on_path("sudo") && Command::new("sudo").args(["-n", "true"]).status().is_ok_and(|s| s.success())
}

/// Installs the QEMU packages `arches` need when they are missing.
fn ensure_qemu(arches: &[Arch]) -> Result<()> {
    let mut packages: Vec<&str> = Vec::new();
    for &a in arches {
        let p = profile(a);
        // Firmware is named by file (QEMU finds it in its data directory, Debian's /usr/share/qemu).
        let firmware_missing =
            matches!(p.loader, Loader::Kernel { bios: Some(f) } if !Path::new("/usr/share/qemu").join(f).is_file());
        if (!on_path(p.qemu_binary) || firmware_missing) && !packages.contains(&p.qemu_package) {
            packages.push(p.qemu_package);
        }
    }
    if packages.is_empty() {
        return Ok(());
    }
    // --no-install-recommends: the recommended GUI and block packages are not
    // needed and can conflict with a newer qemu-utils from backports.
    let install = |prefix: &[&str]| -> Command {
        let mut c = Command::new(prefix.first().copied().unwrap_or("apt-get"));
        c.args(&prefix[1..]).args(["install", "-y", "--no-install-recommends"]).args(&packages);
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    let (update, mut install_cmd) = if is_root() {
        (Command::new("apt-get"), install(&["apt-get"]))
    } else if passwordless_sudo() {
        let mut u = Command::new("sudo");
        u.arg("apt-get");
        (u, install(&["sudo", "apt-get"]))
    } else {
        return Err(MissingPrerequisite(format!(
            "QEMU is missing; install it with:\n    sudo apt-get install -y --no-install-recommends {}",
            packages.join(" ")
        ))
        .into());
    };
    let mut update = update;
    run_visibly(update.args(["update", "-q"]))?;
    run_visibly(&mut install_cmd)
}

/// Which QEMU runs the scenarios: the harness starts `qemu-system-*` from
/// PATH, so choosing one is putting its directory first there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QemuChoice {
    /// Whatever is on PATH: the distribution's QEMU.
    Distro,
    /// Debian bookworm-backports' QEMU as `setup --qemu backports` unpacks it.
    Backports,
    /// The `qemu-system-*` binaries in this directory.
    Dir(PathBuf),
}

/// `--qemu distro`, `--qemu backports` or `--qemu DIR`.
pub fn parse_qemu(text: &str) -> Result<QemuChoice, String> {
    Ok(match text {
        "distro" => QemuChoice::Distro,
        "backports" => QemuChoice::Backports,
        "" => return Err("expected distro, backports or a directory of qemu-system-* binaries".into()),
        dir => QemuChoice::Dir(PathBuf::from(dir)),
    })
}

impl QemuChoice {
    /// Puts this QEMU first on PATH for this process and every command it
    /// starts. Call it before any thread starts: it changes the environment.
    pub fn select(&self) -> Result<()> {
        let dir = match self {
            QemuChoice::Distro => return Ok(()),
            QemuChoice::Backports => backports::root().join("bin"),
            QemuChoice::Dir(dir) => dir.clone(),
        };
        let dir = std::path::absolute(&dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
        if !Arch::ALL.iter().any(|&a| dir.join(profile(a).qemu_binary).is_file()) {
            return Err(MissingPrerequisite(match self {
                QemuChoice::Backports => {
                    "bookworm-backports' QEMU is not unpacked yet: run `cargo xtask setup --qemu backports`".into()
                }
                _ => format!("{} holds no qemu-system-* binary the profiles run", dir.display()),
            })
            .into());
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        let joined = std::env::join_paths(std::iter::once(dir.clone()).chain(std::env::split_paths(&path)))
            .with_context(|| format!("{} cannot go on PATH", dir.display()))?;
        eprintln!("qemu: running the qemu-system-* binaries in {}", dir.display());
        std::env::set_var("PATH", joined);
        Ok(())
    }
}

/// `cargo xtask setup`: what `arches` need, with the chosen QEMU fetched first.
pub fn setup(arches: &[Arch], qemu: &QemuChoice) -> Result<()> {
    match qemu {
        QemuChoice::Distro => {}
        QemuChoice::Backports => {
            backports::ensure()?;
            qemu.select()?;
        }
        QemuChoice::Dir(dir) => bail!(
            "setup fetches a QEMU (--qemu distro or backports); {} is one to run with the other commands",
            dir.display()
        ),
    }
    ensure(arches)
}

/// Everything `arches` need to build guests and run scenarios.
pub fn ensure(arches: &[Arch]) -> Result<()> {
    ensure_targets(arches)?;
    ensure_qemu(arches)
}
