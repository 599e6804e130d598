//! `cargo xtask setup --qemu backports`: Debian bookworm-backports' QEMU,
//! downloaded with apt through a private configuration (its own sources,
//! lists, cache and state under `target/qemu/apt/`; the machine's apt sources
//! and dpkg database are never touched), unpacked with `dpkg-deb -x` under
//! `target/qemu/backports/`, and run through small wrappers in its `bin/`.
//!
//! The wrappers exist because Debian builds QEMU with absolute data
//! directories (`qemu-system-x86_64 -L help` says `/usr/share/qemu`): run
//! from elsewhere, the binary would load the machine's own (older) firmware
//! blobs. Each wrapper passes `-L` for the unpacked data directories and puts
//! any unpacked libraries on `LD_LIBRARY_PATH`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use hvo_images::{profile, workspace_root, Arch};

use super::{run_visibly, MissingPrerequisite};
use crate::apt::{PrivateApt, ARCHIVE};

/// The QEMU packages: the three system emulators the profiles use, and what
/// they share.
const QEMU_PACKAGES: &[&str] =
    &["qemu-system-x86", "qemu-system-arm", "qemu-system-ppc", "qemu-system-data", "qemu-system-common"];
/// Libraries QEMU links that a machine may lack, by soname, and the
/// bookworm package that ships each. Only the missing ones are fetched.
const LIBRARIES: &[(&str, &str)] = &[
    ("libaio.so.1", "libaio1"),
    ("libbpf.so.1", "libbpf1"),
    ("libcapstone.so.4", "libcapstone4"),
    ("libdaxctl.so.1", "libdaxctl1"),
    ("libelf.so.1", "libelf1"),
    ("libfdt.so.1", "libfdt1"),
    ("libfuse3.so.3", "libfuse3-3"),
    ("libibverbs.so.1", "libibverbs1"),
    ("libndctl.so.6", "libndctl6"),
    ("libnuma.so.1", "libnuma1"),
    ("libpixman-1.so.0", "libpixman-1-0"),
    ("libpmem.so.1", "libpmem1"),
    ("librdmacm.so.1", "librdmacm1"),
    ("libslirp.so.0", "libslirp0"),
    ("liburing.so.2", "liburing2"),
    ("libvdeplug.so.2", "libvdeplug2"),
    ("libusbredirparser.so.1", "libusbredirparser1"),
    ("libcacard.so.0", "libcacard0"),
    ("libbrlapi.so.0.8", "libbrlapi0.8"),
    ("libjpeg.so.62", "libjpeg62-turbo"),
    ("libpng16.so.16", "libpng16-16"),
    ("libseccomp.so.2", "libseccomp2"),
    ("libsasl2.so.2", "libsasl2-2"),
    ("libgnutls.so.30", "libgnutls30"),
    ("libusb-1.0.so.0", "libusb-1.0-0"),
    ("libcap-ng.so.0", "libcap-ng0"),
    ("libasound.so.2", "libasound2"),
];

/// Where the unpacked QEMU lives; `bin/` under it holds the wrappers.
pub fn root() -> PathBuf {
    workspace_root().join("target/qemu/backports")
}

/// bookworm-backports' QEMU, with bookworm for the libraries it may need.
const SUITES: &[(&str, &str)] = &[(ARCHIVE, "bookworm-backports"), (ARCHIVE, "bookworm")];

/// The private apt under `target/qemu/apt/`, for the machine's own architecture.
fn backports_apt() -> Result<PrivateApt> {
    let debian_arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64el",
        other => bail!("no Debian QEMU packages are known for a {other} host"),
    };
    Ok(PrivateApt::new(workspace_root().join("target/qemu/apt"), debian_arch, SUITES))
}

/// Downloads `packages` into a fresh `debs` directory and returns the files.
fn download(apt: &PrivateApt, packages: &[String], debs: &Path) -> Result<Vec<PathBuf>> {
    // Packages left by an earlier round would be unpacked twice.
    if debs.exists() {
        std::fs::remove_dir_all(debs).with_context(|| format!("cannot clear {}", debs.display()))?;
    }
    apt.download(packages, debs)?;
    deb_files(debs)
}

fn deb_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let mut out = Vec::new();
    for e in entries {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "deb") {
            out.push(path);
        }
    }
    Ok(out)
}

fn unpack(debs: &[PathBuf], into: &Path) -> Result<()> {
    for deb in debs {
        run_visibly(Command::new("dpkg-deb").arg("-x").arg(deb).arg(into))?;
    }
    Ok(())
}

/// The emulator binaries the profiles run, once each.
fn emulators() -> Vec<&'static str> {
    let mut out: Vec<&str> = Arch::ALL.iter().map(|&a| profile(a).qemu_binary).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Library directories inside the unpacked tree (`usr/lib/<multiarch>`, `lib/<multiarch>`).
fn library_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for base in ["usr/lib", "lib"] {
        let Ok(entries) = std::fs::read_dir(root.join(base)) else { continue };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().contains("-linux-") && e.path().is_dir() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

fn library_path(root: &Path) -> String {
    library_dirs(root).iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":")
}

/// Sonames the unpacked emulators need and neither the machine nor the tree has.
fn missing_libraries(root: &Path) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for emulator in emulators() {
        let out = Command::new("ldd")
            .arg(root.join("usr/bin").join(emulator))
            .env("LD_LIBRARY_PATH", library_path(root))
            .output()
            .context("cannot run ldd")?;
        for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("=> not found")) {
            let soname = line.split_whitespace().next().unwrap_or_default().to_string();
            if !missing.contains(&soname) {
                missing.push(soname);
            }
        }
    }
    Ok(missing)
}

/// A wrapper that runs the unpacked `emulator` with its own data and libraries.
fn write_wrapper(root: &Path, emulator: &str) -> Result<()> {
    let path = root.join("bin").join(emulator);
    // Loadable modules (display, audio, USB) from the same build, never the machine's.
    let modules = library_dirs(root).into_iter().map(|d| d.join("qemu")).find(|d| d.is_dir());
    let modules =
        modules.map_or(String::new(), |d| format!("QEMU_MODULE_DIR={} ", shell_quote(&d.display().to_string())));
    let script = format!(
        "#!/bin/sh\n\
         # bookworm-backports' {emulator}, written by `cargo xtask setup --qemu backports`:\n\
         # Debian's QEMU looks for its data in /usr/share and /usr/lib, so -L and the\n\
         # module directory point it at its own.\n\
         root={root}\n\
         {modules}LD_LIBRARY_PATH=\"{libs}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}\" \\\n\
         exec \"$root/usr/bin/{emulator}\" -L \"$root/usr/share/qemu\" -L \"$root/usr/share/seabios\" \"$@\"\n",
        root = shell_quote(&root.display().to_string()),
        libs = library_path(root).replace('"', "\\\""),
    );
    std::fs::write(&path, script).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot make {} executable", path.display()))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Written last: its presence means the tree is complete.
fn marker(root: &Path) -> PathBuf {
    root.join(".complete")
}

/// Fetches and unpacks bookworm-backports' QEMU unless it is already there;
/// returns the directory to pass as `--qemu`.
pub fn ensure() -> Result<PathBuf> {
    let root = root();
    let bin = root.join("bin");
    if marker(&root).is_file() {
        eprintln!(
            "setup: bookworm-backports' QEMU is already unpacked; run it with --qemu backports ({})",
            bin.display()
        );
        return Ok(bin);
    }
    for tool in ["apt-get", "dpkg-deb", "ldd"] {
        if !super::on_path(tool) {
            return Err(
                MissingPrerequisite(format!("`{tool}` is missing: fetching Debian's QEMU needs apt and dpkg")).into()
            );
        }
    }
    eprintln!(
        "setup: fetching QEMU from Debian bookworm-backports into {} (private apt configuration)",
        root.display()
    );
    if root.exists() {
        std::fs::remove_dir_all(&root).with_context(|| format!("cannot clear {}", root.display()))?;
    }
    std::fs::create_dir_all(&bin).with_context(|| format!("cannot create {}", bin.display()))?;
    let apt = backports_apt()?;
    let debs = apt.dir.join("debs");
    apt.update().context("cannot read Debian's package lists")?;
    let qemu: Vec<String> = QEMU_PACKAGES.iter().map(|p| format!("{p}/bookworm-backports")).collect();
    unpack(&download(&apt, &qemu, &debs)?, &root)?;
    // Libraries can need libraries: a few rounds reach the bottom.
    for _ in 0..3 {
        let missing = missing_libraries(&root)?;
        let packages: Vec<String> = LIBRARIES
            .iter()
            .filter(|(soname, _)| missing.iter().any(|m| m == soname))
            .map(|(_, package)| package.to_string())
            .collect();
        if packages.is_empty() {
            break;
        }
        unpack(&download(&apt, &packages, &debs)?, &root)?;
    }
    let missing = missing_libraries(&root)?;
    if !missing.is_empty() {
        bail!("the unpacked QEMU still lacks these libraries: {}", missing.join(", "));
    }
    for emulator in emulators() {
        write_wrapper(&root, emulator)?;
    }
    let version =
        Command::new(bin.join(emulators()[0])).arg("--version").output().context("cannot run the unpacked QEMU")?;
    let version = String::from_utf8_lossy(&version.stdout);
    let version = version.lines().next().unwrap_or("an unknown version");
    std::fs::write(marker(&root), format!("{version}\n")).context("cannot mark the unpacked QEMU complete")?;
    eprintln!("setup: {version} is in {}; run it with --qemu backports", bin.display());
    Ok(bin)
}
