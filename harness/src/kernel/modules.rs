//! The kernel modules a real kernel's agent loads before it answers: the
//! ones an architecture's scenarios need ([`wanted_modules`]) and everything
//! they depend on, found in the kernel's own modules directory
//! (`lib/modules/<release>/`), decompressed on the host and put in load
//! order, so that the guest only runs `insmod` (under TCG, decompressing and
//! resolving in the guest would cost seconds per boot).
//!
//! Dependencies come from each module's `.modinfo` section (`depends=`),
//! the same record `depmod` reads; Debian ships no `modules.dep` in its
//! packages (the package's postinst runs depmod). Modules built into the
//! kernel (`modules.builtin`) need no file and are left out.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use hvo_abi::Arch;
use object::{Object, ObjectSection};

/// The modules each architecture's agent loads, wanted for device DAX over
/// persistent memory present at boot: on x86_64 legacy persistent memory
/// (`memmap=SIZE!START`), whose region nd_e820 makes; on arm64 a QEMU
/// nvdimm, whose region nfit makes from ACPI's NFIT (booted by UEFI).
/// nd_pmem (with nd_btt) is the namespace's first driver, dax_pmem makes
/// the nd dax device and device_dax the memory behind /dev/daxX.Y (its
/// probe is what builds the struct pages). libnvdimm comes in as their
/// dependency.
///
/// ppc64le wants none: Debian's ppc64le kernels are built without
/// LIBNVDIMM.
const WANTED: &[(Arch, &[&str])] = &[
    (Arch::X86_64, &["libnvdimm", "nd_e820", "nd_btt", "nd_pmem", "dax_pmem", "device_dax"]),
    (Arch::Aarch64, &["libnvdimm", "nfit", "nd_btt", "nd_pmem", "dax_pmem", "device_dax"]),
    (Arch::Ppc64le, &[]),
    (Arch::Ppc64le64k, &[]),
];

/// The modules `arch`'s agent loads (before their dependencies are added).
pub fn wanted_modules(arch: Arch) -> &'static [&'static str] {
    WANTED.iter().find(|(a, _)| *a == arch).map_or(&[], |(_, m)| m)
}

/// A module ready for `insmod`: its name and its uncompressed ELF bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelModule {
    pub name: String,
    pub bytes: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("the kernel has no modules directory {dir}")]
    NoModulesDir { dir: PathBuf },
    #[error("module {module}{} is neither under {dir} nor in its modules.builtin", needed_by_text(.needed_by))]
    Missing { module: String, needed_by: Option<String>, dir: PathBuf },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("decompressing {path} with `{tool} -dc`: {why}")]
    Decompress { path: PathBuf, tool: &'static str, why: String },
    #[error("{path} is no kernel module: {why}")]
    NotAModule { path: PathBuf, why: String },
    #[error("modules depend on each other in a loop: {chain}")]
    Loop { chain: String },
}

fn needed_by_text(needed_by: &Option<String>) -> String {
    needed_by.as_ref().map(|m| format!(" (which {m} depends on)")).unwrap_or_default()
}

/// How a module file is compressed, by its name's ending; with the tool
/// that decompresses it (xz is on every Debian: dpkg depends on it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compression {
    None,
    Xz,
    Zstd,
    Gzip,
}

const ENDINGS: &[(&str, Compression)] = &[
    (".ko", Compression::None),
    (".ko.xz", Compression::Xz),
    (".ko.zst", Compression::Zstd),
    (".ko.gz", Compression::Gzip),
];

impl Compression {
    fn tool(self) -> Option<&'static str> {
        match self {
            Compression::None => None,
            Compression::Xz => Some("xz"),
            Compression::Zstd => Some("zstd"),
            Compression::Gzip => Some("gzip"),
        }
    }
}

/// The module name a file holds (`nd_e820.ko.xz` holds nd_e820; Linux
/// names `dm-mod.ko` dm_mod) and its compression.
fn module_file(file_name: &str) -> Option<(String, Compression)> {
    ENDINGS.iter().find_map(|(ending, c)| {
        let stem = file_name.strip_suffix(ending)?;
        (!stem.is_empty()).then(|| (normalize(stem), *c))
    })
}

fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module files under a modules directory, and the built-in modules.
struct ModuleIndex {
    dir: PathBuf,
    files: HashMap<String, (PathBuf, Compression)>,
    builtin: HashSet<String>,
}

impl ModuleIndex {
    fn scan(dir: &Path) -> Result<ModuleIndex, ModuleError> {
        if !dir.is_dir() {
            return Err(ModuleError::NoModulesDir { dir: dir.to_path_buf() });
        }
        let mut files = HashMap::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(d) = pending.pop() {
            let entries = fs::read_dir(&d).map_err(|source| ModuleError::Read { path: d.clone(), source })?;
            for entry in entries {
                let entry = entry.map_err(|source| ModuleError::Read { path: d.clone(), source })?;
                let path = entry.path();
                let Ok(kind) = entry.file_type() else { continue };
                if kind.is_dir() {
                    pending.push(path);
                } else if let Some((name, c)) = entry.file_name().to_str().and_then(module_file) {
                    files.entry(name).or_insert((path, c));
                }
            }
        }
        // "kernel/drivers/nvdimm/libnvdimm.ko" per line; absent when the
        // kernel has nothing built in that could be a module.
        let builtin = fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.rsplit('/').next().and_then(module_file))
            .map(|(name, _)| name)
            .collect();
        Ok(ModuleIndex { dir: dir.to_path_buf(), files, builtin })
    }
}

/// A module's uncompressed bytes, from `cache` when an earlier run
/// decompressed it there and the source is no newer.
fn uncompressed(name: &str, path: &Path, c: Compression, cache: &Path) -> Result<Vec<u8>, ModuleError> {
    let read = |p: &Path| fs::read(p).map_err(|source| ModuleError::Read { path: p.to_path_buf(), source });
    let Some(tool) = c.tool() else { return read(path) };
    let cached = cache.join(format!("{name}.ko"));
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(c), Some(s)) = (modified(&cached), modified(path)) {
        if c >= s {
            return read(&cached);
        }
    }
    let bad = |why: String| ModuleError::Decompress { path: path.to_path_buf(), tool, why };
    let out = Command::new(tool).arg("-dc").arg(path).output().map_err(|e| bad(format!("cannot run it: {e}")))?;
    if !out.status.success() {
        return Err(bad(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())));
    }
    // Written aside and renamed, so a reader never sees half a module.
    let write =
        |p: &Path, bytes: &[u8]| fs::write(p, bytes).map_err(|source| ModuleError::Write { path: p.into(), source });
    fs::create_dir_all(cache).map_err(|source| ModuleError::Write { path: cache.to_path_buf(), source })?;
    let partial = cache.join(format!("{name}.ko.partial"));
    write(&partial, &out.stdout)?;
    fs::rename(&partial, &cached).map_err(|source| ModuleError::Write { path: cached, source })?;
    Ok(out.stdout)
}

/// The `key=value` records of a module's `.modinfo` section.
fn modinfo(path: &Path, bytes: &[u8]) -> Result<Vec<(String, String)>, ModuleError> {
    let bad = |why: String| ModuleError::NotAModule { path: path.to_path_buf(), why };
    let file = object::File::parse(bytes).map_err(|e| bad(e.to_string()))?;
    let section = file.section_by_name(".modinfo").ok_or_else(|| bad("no .modinfo section".into()))?;
    let data = section.data().map_err(|e| bad(e.to_string()))?;
    Ok(data
        .split(|&b| b == 0)
        .filter_map(|r| std::str::from_utf8(r).ok()?.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// The modules a module's `.modinfo` says it depends on.
fn depends(path: &Path, bytes: &[u8]) -> Result<Vec<String>, ModuleError> {
    let info = modinfo(path, bytes)?;
    Ok(info
        .iter()
        .filter(|(k, _)| k == "depends")
        .flat_map(|(_, v)| v.split(','))
        .filter(|d| !d.is_empty())
        .map(normalize)
        .collect())
}

/// `wanted` and every module they depend on, from the modules directory
/// `dir`, each after its dependencies; decompressed copies are kept in
/// `cache`. A module that is built in is left out; one that is neither
/// built in nor a file is an error naming it and `dir`.
pub fn resolve_modules(dir: &Path, wanted: &[&str], cache: &Path) -> Result<Vec<KernelModule>, ModuleError> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let index = ModuleIndex::scan(dir)?;
    let mut walk = Walk { index: &index, cache, done: HashSet::new(), path: Vec::new(), order: Vec::new() };
    for name in wanted {
        walk.visit(&normalize(name), None)?;
    }
    Ok(walk.order)
}

/// A depth-first walk that emits each module after its dependencies.
struct Walk<'a> {
    index: &'a ModuleIndex,
    cache: &'a Path,
    done: HashSet<String>,
    /// The modules being visited, outermost first: a loop shows as a repeat.
    path: Vec<String>,
    order: Vec<KernelModule>,
}

impl Walk<'_> {
    fn visit(&mut self, name: &str, needed_by: Option<&str>) -> Result<(), ModuleError> {
        if self.done.contains(name) || self.index.builtin.contains(name) {
            return Ok(());
        }
        if self.path.iter().any(|p| p == name) {
            let chain = self.path.iter().map(String::as_str).chain([name]).collect::<Vec<_>>().join(" -> ");
            return Err(ModuleError::Loop { chain });
        }
        let Some((path, c)) = self.index.files.get(name) else {
            return Err(ModuleError::Missing {
                module: name.to_string(),
                needed_by: needed_by.map(str::to_string),
                dir: self.index.dir.clone(),
            });
        };
        let bytes = uncompressed(name, path, *c, self.cache)?;
        self.path.push(name.to_string());
        for dep in depends(path, &bytes)? {
            self.visit(&dep, Some(name))?;
        }
        self.path.pop();
        self.done.insert(name.to_string());
        self.order.push(KernelModule { name: name.to_string(), bytes });
        Ok(())
    }
}

#[cfg(test)]
mod tests;
