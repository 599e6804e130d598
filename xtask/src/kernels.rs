//! Debian's kernels for real-kernel runs: `cargo xtask fetch-kernel SPEC
//! --arch A` resolves a spec (`debian-6.12`, `debian-7.2`) to the newest
//! matching packages, downloads them with `apt-get download` through a
//! private apt configuration under `target/kernels/apt/<debian arch>/` (its
//! own sources, lists, cache and empty dpkg status; the machine's sources,
//! dpkg state and architectures are never read or changed), unpacks them
//! with `dpkg-deb -x` into `target/kernels/<spec>/<arch>/`, and writes the
//! initramfs the agent runs from. What is already there is used without
//! touching the network; a missing network is a bounded error.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use hvo_harness::kernel::agent::build_initramfs;
use hvo_harness::kernel::modules::{resolve_modules, wanted_modules};
use hvo_harness::kernel::symbols::{KernelSymbols, SymbolSource};
use hvo_harness::runner::KernelGuest;
use hvo_images::{workspace_root, Arch};

use crate::apt::{PrivateApt, ARCHIVE, SECURITY};

mod spec;
mod uefi;

use spec::DebianSpec;

#[derive(clap::Args)]
pub struct FetchKernelArgs {
    /// `debian-6.12` or `debian-7.2`.
    spec: String,
    #[arg(long, value_parser = crate::run::parse_arch)]
    arch: Arch,
}

/// Debian's names for a profile: the architecture and the kernel flavour.
fn debian_names(arch: Arch) -> (&'static str, &'static str) {
    match arch {
        Arch::X86_64 => ("amd64", "amd64"),
        Arch::Aarch64 => ("arm64", "arm64"),
        Arch::Ppc64le => ("ppc64el", "powerpc64le"),
        Arch::Ppc64le64k => ("ppc64el", "powerpc64le-64k"),
    }
}

/// The suites a Debian architecture's packages come from. ppc64el has no
/// bookworm-security (its index there was inconsistent when measured), so
/// its 6.12 kernels come from trixie.
fn suites(debian_arch: &str) -> &'static [(&'static str, &'static str)] {
    match debian_arch {
        "ppc64el" => &[(ARCHIVE, "bookworm"), (ARCHIVE, "trixie"), (ARCHIVE, "sid")],
        _ => &[(SECURITY, "bookworm-security"), (ARCHIVE, "bookworm"), (ARCHIVE, "sid")],
    }
}

/// busybox-static, pinned so every run's userland is the same: bookworm's.
const BUSYBOX_PACKAGE: &str = "busybox-static";
const BUSYBOX_VERSION: &str = "1:1.35.0-4+deb12u1+b1";

/// The private apt of one Debian architecture's kernels.
fn kernel_apt(debian_arch: &'static str) -> PrivateApt {
    PrivateApt::new(kernels_dir().join("apt").join(debian_arch), debian_arch, suites(debian_arch))
}

fn kernels_dir() -> PathBuf {
    workspace_root().join("target/kernels")
}

/// The version key of `name` if it is `<kind>-<series>.<patch>+deb<n>-<flavour>`.
fn package_version(name: &str, kind: &str, series: &str, flavour: &str) -> Option<(u32, u32)> {
    let rest = name.strip_prefix(kind)?.strip_prefix('-')?.strip_prefix(series)?.strip_prefix('.')?;
    let (patch, rest) = rest.split_once("+deb")?;
    let (debian, rest) = rest.split_once('-')?;
    (rest == flavour).then_some(())?;
    Some((patch.parse().ok()?, debian.parse().ok()?))
}

/// The names among `names` of the spec's image package for `flavour`, newest first.
fn packages_newest_first<'a>(
    names: impl IntoIterator<Item = &'a str>,
    spec: DebianSpec,
    flavour: &str,
) -> Vec<&'a str> {
    let kind = spec.series.image_kind();
    let mut found: Vec<_> = names
        .into_iter()
        .filter_map(|n| Some((package_version(n, kind, spec.series.series(), flavour)?, n)))
        .filter(|((patch, _), _)| spec.point.is_none_or(|p| p == *patch))
        .collect();
    found.sort_by(|a, b| b.cmp(a));
    found.into_iter().map(|(_, n)| n).collect()
}

/// The package a cached `.deb` file holds (`name_version_arch.deb`).
fn deb_package(file: &Path) -> Option<&str> {
    let name = file.file_name()?.to_str()?.strip_suffix(".deb")?;
    name.split('_').next()
}

fn cached_debs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut debs: Vec<PathBuf> =
        entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| deb_package(p).is_some()).collect();
    debs.sort();
    debs
}

fn find_deb(dir: &Path, package: &str) -> Option<PathBuf> {
    cached_debs(dir).into_iter().find(|p| deb_package(p) == Some(package))
}

fn unpack(deb: &Path, into: &Path) -> Result<()> {
    fs::create_dir_all(into)?;
    let mut c = Command::new("dpkg-deb");
    c.arg("-x").arg(deb).arg(into);
    eprintln!("running: {c:?}");
    let status = c.status().context("starting dpkg-deb (Debian's dpkg package)")?;
    if !status.success() {
        bail!("dpkg-deb -x {} failed ({status})", deb.display());
    }
    Ok(())
}

/// What `fetch-kernel` found or fetched.
pub struct FetchedKernel {
    pub release: String,
    pub image: PathBuf,
    pub config: PathBuf,
    pub symbols: SymbolSource,
    /// Why the files on the host give no symbols, when they give none.
    pub symbols_note: Option<String>,
    pub busybox: PathBuf,
    pub initramfs: PathBuf,
    /// The modules the initramfs holds, in load order.
    pub modules: Vec<String>,
}

/// The busybox-static of a Debian architecture, unpacked (fetched if needed).
fn ensure_busybox(apt: &PrivateApt, debs: &Path) -> Result<PathBuf> {
    let root = kernels_dir().join("busybox").join(apt.debian_arch);
    let busybox = root.join("bin/busybox");
    if busybox.exists() {
        return Ok(busybox);
    }
    let deb = match find_deb(debs, BUSYBOX_PACKAGE) {
        Some(deb) => deb,
        None => {
            if !apt.has_indexes() {
                apt.update()?;
            }
            apt.download(&[format!("{BUSYBOX_PACKAGE}:{}={BUSYBOX_VERSION}", apt.debian_arch)], debs)?;
            find_deb(debs, BUSYBOX_PACKAGE).context("apt-get download left no busybox-static .deb")?
        }
    };
    unpack(&deb, &root)?;
    busybox.exists().then_some(busybox).with_context(|| format!("{} holds no bin/busybox", deb.display()))
}

/// How many versions to try, newest first, when a mirror lists a version
/// it does not serve (a mirror still syncing, or a partial one).
const VERSIONS_TRIED: usize = 3;

/// The package set of `image`: the image package first, then its
/// companions (base, and modules when `with_modules`).
fn package_set(spec: DebianSpec, image: &str, with_modules: bool) -> Vec<String> {
    let image_kind = spec.series.image_kind();
    let mut packages = vec![image.to_string()];
    packages.extend(spec.series.companion_kinds(with_modules).iter().map(|kind| image.replacen(image_kind, kind, 1)));
    packages
}

/// The cached `.deb` files of `packages`, downloading the missing ones.
fn download_set(packages: &[String], apt: &PrivateApt, debs: &Path) -> Result<Vec<PathBuf>> {
    packages
        .iter()
        .map(|package| match find_deb(debs, package) {
            Some(deb) => Ok(deb),
            None => {
                if !apt.has_indexes() {
                    apt.update()?;
                }
                apt.download(&[format!("{package}:{}", apt.debian_arch)], debs)?;
                find_deb(debs, package).with_context(|| format!("apt-get download left no {package} .deb"))
            }
        })
        .collect()
}

/// The spec's packages for `flavour`: cached ones if any, else the newest
/// version in the freshly downloaded indexes that the mirror serves.
fn ensure_packages(
    spec: DebianSpec,
    flavour: &str,
    with_modules: bool,
    apt: &PrivateApt,
    debs: &Path,
) -> Result<Vec<PathBuf>> {
    let cached = cached_debs(debs);
    if let Some(image) = packages_newest_first(cached.iter().filter_map(|p| deb_package(p)), spec, flavour).first() {
        return download_set(&package_set(spec, image, with_modules), apt, debs);
    }
    let image_kind = spec.series.image_kind();
    apt.update()?;
    let names = apt.package_names(&format!("{image_kind}-{}.", spec.series.series()))?;
    let candidates = packages_newest_first(names.iter().map(String::as_str), spec, flavour);
    if candidates.is_empty() {
        bail!("no {image_kind} package of {} for {flavour} in Debian's indexes", spec.name());
    }
    let mut failures = Vec::new();
    for image in candidates.iter().take(VERSIONS_TRIED) {
        match download_set(&package_set(spec, image, with_modules), apt, debs) {
            Ok(files) => return Ok(files),
            Err(e) => {
                eprintln!("{image} could not be downloaded; trying the next newest version");
                failures.push(format!("{image}: {e:#}"));
            }
        }
    }
    bail!(
        "none of the {} newest {image_kind}-{}.*-{flavour} versions could be downloaded:\n{}",
        failures.len(),
        spec.series.series(),
        failures.join("\n")
    )
}

/// Fetches (or finds cached) `spec`'s kernel for `arch`, with busybox and the initramfs.
pub fn ensure_kernel(spec: DebianSpec, arch: Arch) -> Result<FetchedKernel> {
    let (debian_arch, flavour) = debian_names(arch);
    let apt = kernel_apt(debian_arch);
    let debs = kernels_dir().join("debs").join(debian_arch);
    let out = kernels_dir().join(spec.name()).join(arch.name());
    let root = out.join("root");
    let complete = out.join("unpacked");
    let wanted = wanted_modules(arch);
    let with_modules = !wanted.is_empty();
    if !complete.exists() {
        let packages = ensure_packages(spec, flavour, with_modules, &apt, &debs)?;
        if root.exists() {
            fs::remove_dir_all(&root).with_context(|| format!("clearing a partial unpack in {}", root.display()))?;
        }
        for deb in &packages {
            unpack(deb, &root)?;
        }
        // linux-image-<release>: the release is what `uname -r` will say.
        let image_package = packages.first().and_then(|p| deb_package(p)).unwrap_or_default();
        let release = image_package.strip_prefix(spec.series.image_kind()).and_then(|r| r.strip_prefix('-'));
        let names: Vec<&str> = packages.iter().filter_map(|p| deb_package(p)).collect();
        fs::write(out.join(UNPACKED_PACKAGES), names.join("\n") + "\n")?;
        fs::write(&complete, release.context("the image package name holds no release")?)?;
    }
    let release = fs::read_to_string(&complete)?.trim().to_string();
    unpack_missing_companions(spec, &release, with_modules, &apt, &debs, &out)?;
    let layout = spec.series.layout(&release);
    let image = layout
        .images
        .iter()
        .map(|i| root.join(i))
        .find(|p| p.exists())
        .with_context(|| format!("no kernel image ({}) under {}", layout.images.join(" or "), root.display()))?;
    let (symbols, symbols_note) = symbol_source(&root.join(&layout.system_map), &image);
    let busybox = ensure_busybox(&apt, &debs)?;
    let modules = resolve_modules(&root.join(&layout.modules), wanted, &out.join("modules"))
        .with_context(|| format!("the modules {} the agent loads on {arch}", wanted.join(", ")))?;
    let initramfs = out.join("initramfs.cpio");
    write_initramfs(&initramfs, &build_initramfs(&busybox, arch, &modules)?)?;
    Ok(FetchedKernel {
        release,
        image,
        config: root.join(&layout.config),
        symbols,
        symbols_note,
        busybox,
        initramfs,
        modules: modules.into_iter().map(|m| m.name).collect(),
    })
}

/// The packages unpacked into a kernel's root, one name a line.
const UNPACKED_PACKAGES: &str = "unpacked-packages";

/// Unpacks the companions of an unpacked kernel that its package set has
/// gained since (the modules package, once an architecture wants modules).
/// A root without the list was unpacked before modules were fetched: it
/// holds the image and base packages.
fn unpack_missing_companions(
    spec: DebianSpec,
    release: &str,
    with_modules: bool,
    apt: &PrivateApt,
    debs: &Path,
    out: &Path,
) -> Result<()> {
    let image = format!("{}-{release}", spec.series.image_kind());
    let list = out.join(UNPACKED_PACKAGES);
    let mut unpacked: Vec<String> = match fs::read_to_string(&list) {
        Ok(text) => text.lines().map(str::to_string).collect(),
        Err(_) => package_set(spec, &image, false),
    };
    let missing: Vec<String> =
        package_set(spec, &image, with_modules).into_iter().filter(|p| !unpacked.contains(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    for deb in download_set(&missing, apt, debs)? {
        unpack(&deb, &out.join("root"))?;
    }
    unpacked.extend(missing);
    fs::write(&list, unpacked.join("\n") + "\n")?;
    Ok(())
}

/// Writes the initramfs aside and renames it into place, so a VM starting
/// meanwhile reads the old one or the new one, never half of one.
fn write_initramfs(path: &Path, bytes: &[u8]) -> Result<()> {
    let partial = path.with_extension("cpio.partial");
    fs::write(&partial, bytes).with_context(|| format!("writing {}", partial.display()))?;
    fs::rename(&partial, path).with_context(|| format!("renaming {} into place", partial.display()))
}

/// Symbols from the System.map if it is real, else from the image if it is
/// an unstripped ELF, else from the running kernel; with why not the files.
fn symbol_source(system_map: &Path, image: &Path) -> (SymbolSource, Option<String>) {
    let map = match KernelSymbols::source_of(system_map) {
        Ok(source) => return (source, None),
        Err(e) => e,
    };
    match KernelSymbols::source_of_image(image) {
        Ok(source) => (source, Some(map.to_string())),
        Err(e) => (SymbolSource::Kallsyms, Some(format!("{map}; {e}"))),
    }
}

/// The kernel `--kernel` names for `arch`, ready to boot: a Debian spec
/// (fetched or cached), or the path of a kernel image the user built (then
/// only busybox-static is fetched). Symbols come from `system_map` when
/// given, else the host's files, else the running kernel, cached per build.
pub fn kernel_guest(kernel: &str, system_map: Option<&Path>, arch: Arch) -> Result<KernelGuest> {
    let load = |path: &Path| -> Result<Arc<KernelSymbols>> {
        Ok(Arc::new(KernelSymbols::load(path).with_context(|| format!("kernel symbols from {}", path.display()))?))
    };
    let given_map = system_map.map(load).transpose()?;
    if let Ok(spec) = DebianSpec::from_name(kernel) {
        let k = ensure_kernel(spec, arch)?;
        let from_files = match &k.symbols {
            SymbolSource::SystemMap(p) | SymbolSource::ElfSymtab(p) => Some(load(p)?),
            SymbolSource::Kallsyms => None,
        };
        let cache = kernels_dir().join(spec.name()).join(arch.name()).join("kallsyms.map");
        return Ok(KernelGuest {
            spec: spec.name(),
            image: k.image,
            initramfs: k.initramfs,
            symbols: given_map.or(from_files),
            symbols_cache: Some(cache),
            uefi: uefi::ensure_uefi(arch)?,
        });
    }
    let image = Path::new(kernel);
    if !image.is_file() {
        DebianSpec::from_name(kernel).with_context(|| format!("{kernel} is neither a kernel spec nor a file"))?;
    }
    let image = image.canonicalize().with_context(|| format!("resolving {kernel}"))?;
    let from_image = KernelSymbols::source_of_image(&image).ok().map(|_| load(&image)).transpose()?;
    // A build is told by its image's bytes: the cache is named by their hash.
    let bytes = fs::read(&image).with_context(|| format!("reading {}", image.display()))?;
    let build = format!("{:016x}", fnv1a(&bytes));
    let out = kernels_dir().join("custom").join(arch.name()).join(&build);
    fs::create_dir_all(&out)?;
    let (debian_arch, _) = debian_names(arch);
    let busybox = ensure_busybox(&kernel_apt(debian_arch), &kernels_dir().join("debs").join(debian_arch))?;
    // A kernel given by path brings no modules directory the harness could
    // trust to match it: its initramfs has none, and steps that need them
    // fail with the agent's reply naming what is missing.
    let initramfs = out.join("initramfs.cpio");
    write_initramfs(&initramfs, &build_initramfs(&busybox, arch, &[])?)?;
    Ok(KernelGuest {
        spec: image.display().to_string(),
        image,
        initramfs,
        symbols: given_map.or(from_image),
        symbols_cache: Some(out.join("kallsyms.map")),
        uefi: uefi::ensure_uefi(arch)?,
    })
}

/// FNV-1a, 64-bit: names a kernel build's cache, nothing cryptographic.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

pub fn fetch_kernel(args: FetchKernelArgs) -> Result<ExitCode> {
    let spec = DebianSpec::from_name(&args.spec)?;
    let k = ensure_kernel(spec, args.arch)?;
    println!("kernel    {} {}: {}", spec.name(), args.arch, k.release);
    println!("image     {}", k.image.display());
    println!("config    {}", k.config.display());
    println!("symbols   {}", k.symbols);
    if let Some(note) = &k.symbols_note {
        println!("          ({note})");
    }
    println!("busybox   {}", k.busybox.display());
    println!("initramfs {}", k.initramfs.display());
    if !k.modules.is_empty() {
        println!("modules   {}", k.modules.join(" "));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::spec::DebianSeries;
    use super::*;

    const LATEST_612: DebianSpec = DebianSpec { series: DebianSeries::Debian612, point: None };
    const LATEST_72: DebianSpec = DebianSpec { series: DebianSeries::Debian72, point: None };

    #[test]
    fn specs_parse_and_unknown_ones_list_the_known() {
        assert_eq!(
            DebianSpec::from_name("debian-7.2").unwrap(),
            DebianSpec { series: DebianSeries::Debian72, point: None }
        );
        let pinned = DebianSpec::from_name("debian-6.12.100").unwrap();
        assert_eq!(pinned, DebianSpec { series: DebianSeries::Debian612, point: Some(100) });
        assert_eq!(pinned.name(), "debian-6.12.100");
        for bad in ["debian-5.10", "debian-6.12.x", "debian-6.120", "debian-6.12."] {
            let e = DebianSpec::from_name(bad).unwrap_err().to_string();
            assert!(e.contains("debian-6.12, debian-7.2"), "{e}");
        }
    }

    #[test]
    fn packages_of_the_series_and_flavour_are_tried_newest_first() {
        let names = [
            "linux-image-6.12.117+deb12-amd64",
            "linux-image-6.12.117+deb12-amd64-unsigned",
            "linux-image-6.12.117+deb12-amd64-dbg",
            "linux-image-6.12.9+deb12-amd64",
            "linux-image-6.12.41+deb13-powerpc64le-64k",
            "linux-image-6.12.43+deb13-powerpc64le",
            "linux-image-6.1.0-40-amd64",
            "linux-image-6.120.1+deb12-amd64",
        ];
        assert_eq!(
            packages_newest_first(names, LATEST_612, "amd64"),
            ["linux-image-6.12.117+deb12-amd64", "linux-image-6.12.9+deb12-amd64"]
        );
        assert_eq!(
            packages_newest_first(names, LATEST_612, "powerpc64le-64k").first().copied(),
            Some("linux-image-6.12.41+deb13-powerpc64le-64k")
        );
        assert!(packages_newest_first(names, LATEST_612, "arm64").is_empty());
        let pinned = DebianSpec { point: Some(9), ..LATEST_612 };
        assert_eq!(packages_newest_first(names, pinned, "amd64"), ["linux-image-6.12.9+deb12-amd64"]);
        let sid =
            ["linux-binary-7.2.13+deb14-arm64", "linux-base-7.2.13+deb14-arm64", "linux-binary-7.2.9+deb14-arm64"];
        assert_eq!(
            packages_newest_first(sid, LATEST_72, "arm64"),
            ["linux-binary-7.2.13+deb14-arm64", "linux-binary-7.2.9+deb14-arm64"]
        );
        assert_eq!(
            package_set(LATEST_72, "linux-binary-7.2.13+deb14-arm64", false),
            ["linux-binary-7.2.13+deb14-arm64", "linux-base-7.2.13+deb14-arm64"]
        );
        assert_eq!(
            package_set(LATEST_72, "linux-binary-7.2.13+deb14-amd64", true),
            ["linux-binary-7.2.13+deb14-amd64", "linux-base-7.2.13+deb14-amd64", "linux-modules-7.2.13+deb14-amd64"]
        );
        assert_eq!(
            package_set(LATEST_612, "linux-image-6.12.117+deb12-amd64", true),
            ["linux-image-6.12.117+deb12-amd64"],
            "6.12's image package holds its modules"
        );
    }

    #[test]
    fn cached_debs_are_found_by_package_name() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "busybox-static_1%3a1.35.0-4+deb12u1+b1_arm64.deb",
            "linux-image-6.12.117+deb12-arm64_6.12.117-1_arm64.deb",
        ] {
            fs::write(dir.path().join(f), b"").unwrap();
        }
        fs::write(dir.path().join("notes.txt"), b"").unwrap();
        let found = find_deb(dir.path(), "busybox-static").unwrap();
        assert!(found.ends_with("busybox-static_1%3a1.35.0-4+deb12u1+b1_arm64.deb"));
        assert_eq!(cached_debs(dir.path()).len(), 2);
        let names: Vec<PathBuf> = cached_debs(dir.path());
        let found = packages_newest_first(names.iter().filter_map(|p| deb_package(p)), LATEST_612, "arm64");
        assert_eq!(found, ["linux-image-6.12.117+deb12-arm64"]);
        assert_eq!(find_deb(&dir.path().join("missing"), "x"), None);
    }

    #[test]
    fn ppc64el_kernels_come_from_trixie_the_others_from_bookworm_security() {
        let sources = kernel_apt("ppc64el").sources();
        assert!(sources.lines().all(|l| l.starts_with("deb [arch=ppc64el ")), "{sources}");
        assert!(!sources.contains("security"), "ppc64el takes 6.12 from trixie");
        assert!(kernel_apt("amd64").sources().contains("debian-security bookworm-security main"));
    }
}
