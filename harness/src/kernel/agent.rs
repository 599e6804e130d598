//! The agent a real kernel runs as /init ([`AGENT_SCRIPT`], a busybox sh
//! script) and the host's half of talking to it: the commands it takes, the
//! replies it gives, and the initramfs that carries it with busybox-static.
//!
//! The agent answers in the project's console line protocol (ready banner,
//! one `ok`/`err` reply per `<seq> <verb>` line), so the console code that
//! drives the firmware drives it too; only the verbs differ, because a real
//! kernel does what sysfs lets it do, not what the firmware's knobs do.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use hvo_abi::manifest::ABI_VERSION;
use hvo_abi::protocol::MAX_LINE;
use hvo_abi::Arch;
use object::Object;

use super::initramfs::{Archive, InitramfsError, CONSOLE, NULL};
use super::modules::KernelModule;
use crate::addr::{PhysAddr, VirtAddr};

mod devices;
pub use devices::{DaxDevice, DaxMode, MemGone, MemOnline, MEM_WAIT_S};

/// The agent's source, with `@ABI@` where the protocol version goes.
pub const AGENT_SCRIPT: &str = include_str!("agent.sh");

/// The agent as /init runs it: the protocol version filled in.
pub fn agent_script() -> String {
    AGENT_SCRIPT.replace("@ABI@", &ABI_VERSION.to_string())
}

/// The busybox applets the agent calls, linked to busybox in /bin.
const APPLETS: &[&str] =
    &["sh", "mount", "stty", "awk", "cat", "uname", "tr", "grep", "sync", "poweroff", "insmod", "readlink", "sleep"];

/// Where the initramfs keeps its modules, and the file naming them in the
/// order the agent loads them (one name a line; `<name>.ko` beside it).
const MODULES_DIR: &str = "lib/modules";
const LOAD_ORDER: &str = "lib/modules/load-order";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("reading busybox {path}: {source}")]
    ReadBusybox { path: PathBuf, source: std::io::Error },
    #[error("busybox {path} is no ELF program: {why}")]
    BusyboxNotElf { path: PathBuf, why: String },
    #[error("busybox {path} is built for {found}, the kernel runs {arch} ({expected})")]
    BusyboxArch { path: PathBuf, found: String, arch: Arch, expected: String },
    #[error("busybox {path} is dynamically linked; the initramfs has no C library (use busybox-static)")]
    BusyboxDynamic { path: PathBuf },
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    #[error("the agent's {verb} reply {payload:?}: {why}")]
    BadReply { verb: &'static str, payload: String, why: String },
}

/// The machine a busybox for `arch` must be built for, as an ELF header
/// says it (every profile is little-endian).
fn busybox_machine(arch: Arch) -> object::Architecture {
    match arch {
        Arch::X86_64 => object::Architecture::X86_64,
        Arch::Aarch64 => object::Architecture::Aarch64,
        Arch::Ppc64le | Arch::Ppc64le64k => object::Architecture::PowerPc64,
    }
}

/// Checks that `bytes` is a static little-endian program for `arch`.
fn check_busybox(path: &Path, bytes: &[u8], arch: Arch) -> Result<(), AgentError> {
    let file = object::File::parse(bytes)
        .map_err(|e| AgentError::BusyboxNotElf { path: path.to_path_buf(), why: e.to_string() })?;
    let expected = busybox_machine(arch);
    if file.architecture() != expected || !file.is_little_endian() {
        let endian = if file.is_little_endian() { "little-endian" } else { "big-endian" };
        return Err(AgentError::BusyboxArch {
            path: path.to_path_buf(),
            found: format!("{:?} {endian}", file.architecture()),
            arch,
            expected: format!("{expected:?} little-endian"),
        });
    }
    if file.section_by_name(".interp").is_some() {
        return Err(AgentError::BusyboxDynamic { path: path.to_path_buf() });
    }
    Ok(())
}

/// The initramfs of a real-kernel run: busybox-static for `arch`, its
/// applets, the console and null devices, the agent as /init, and the
/// `modules` it loads at start, in the order given (dependencies first:
/// [`super::modules::resolve_modules`]).
pub fn build_initramfs(busybox: &Path, arch: Arch, modules: &[KernelModule]) -> Result<Vec<u8>, AgentError> {
    let bytes =
        std::fs::read(busybox).map_err(|source| AgentError::ReadBusybox { path: busybox.to_path_buf(), source })?;
    check_busybox(busybox, &bytes, arch)?;
    let mut archive = Archive::new();
    for dir in ["bin", "dev", "proc", "sys", "tmp", "lib", MODULES_DIR] {
        archive.directory(dir, 0o755)?;
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    archive.char_device("dev/console", 0o600, CONSOLE)?;
    archive.char_device("dev/null", 0o666, NULL)?;
    archive.file("bin/busybox", 0o755, &bytes)?;
    for applet in APPLETS {
        archive.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    let mut order = String::new();
    for module in modules {
        archive.file(&format!("{MODULES_DIR}/{}.ko", module.name), 0o644, &module.bytes)?;
        order.push_str(&module.name);
        order.push('\n');
    }
    archive.file(LOAD_ORDER, 0o644, order.as_bytes())?;
    archive.file("init", 0o755, agent_script().as_bytes())?;
    Ok(archive.finish())
}

/// A HugeTLB page size (an hstate), in KiB as sysfs names it
/// (`hugepages-2048kB`). Sizes, not orders: the 64 KiB-page ppc64 kernel's
/// hstates are 2 MiB and 1 GiB, which no order of its base page names alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HstateSize {
    kib: u64,
}

impl HstateSize {
    pub const fn from_kib(kib: u64) -> HstateSize {
        HstateSize { kib }
    }

    pub const fn kib(self) -> u64 {
        self.kib
    }

    pub const fn bytes(self) -> u64 {
        self.kib << 10
    }
}

impl fmt::Display for HstateSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}kB", self.kib)
    }
}

/// A command the agent takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentCommand<'a> {
    /// `ok pong [token]`.
    Ping { token: Option<&'a str> },
    /// What the kernel is: [`KernelFacts`].
    Kernel,
    /// What it holds now: [`KernelReport`].
    Report,
    /// Grow the pool of `size` pages by `count` (the optimization sysctl
    /// turned on first where it exists); refused, and the pool put back,
    /// when the kernel finds fewer.
    HugetlbAlloc { size: HstateSize, count: u64 },
    /// Shrink the pool of `size` pages by `count`.
    HugetlbFree { size: HstateSize, count: u64 },
    /// The addresses of these symbols in /proc/kallsyms (see [`ksyms_commands`]).
    Ksyms(Vec<&'a str>),
    /// Whether a type or member of this name is in the kernel's BTF.
    BtfHas(&'a str),
    /// A device-dax instance over the whole of the first free pmem
    /// namespace, its struct pages where `mode` says, mapped in `align`
    /// bytes: [`DaxDevice`]. Needs the nvdimm and dax modules.
    DaxCreate { mode: DaxMode, align: u64 },
    /// Tears down the device-dax instance `daxX.Y` (its struct pages go).
    DaxDestroy { dev: &'a str },
    /// Waits at most `wait_s` seconds until every memory block of the range
    /// exists and is online (after the host plugged a DIMM there): [`MemOnline`].
    MemOnline { start: PhysAddr, size: u64, wait_s: u32 },
    /// Waits at most `wait_s` seconds until no memory block of the range
    /// exists any more (after the host unplugged it): [`MemGone`].
    MemGone { start: PhysAddr, size: u64, wait_s: u32 },
    /// `ok`, then the kernel powers off.
    Exit,
}

impl AgentCommand<'_> {
    pub fn verb(&self) -> &'static str {
        match self {
            AgentCommand::Ping { .. } => "ping",
            AgentCommand::Kernel => "kernel",
            AgentCommand::Report => "report",
            AgentCommand::HugetlbAlloc { .. } => "hugetlb-alloc",
            AgentCommand::HugetlbFree { .. } => "hugetlb-free",
            AgentCommand::Ksyms(_) => "ksyms",
            AgentCommand::BtfHas(_) => "btf-has",
            AgentCommand::DaxCreate { .. } => "dax-create",
            AgentCommand::DaxDestroy { .. } => "dax-destroy",
            AgentCommand::MemOnline { .. } => "mem-online",
            AgentCommand::MemGone { .. } => "mem-gone",
            AgentCommand::Exit => "exit",
        }
    }

    /// The line to send, without its newline.
    pub fn line(&self, seq: u64) -> String {
        let verb = self.verb();
        match self {
            AgentCommand::Ping { token: Some(t) } => format!("{seq} {verb} {t}"),
            AgentCommand::Ping { token: None } | AgentCommand::Kernel | AgentCommand::Report | AgentCommand::Exit => {
                format!("{seq} {verb}")
            }
            AgentCommand::HugetlbAlloc { size, count } | AgentCommand::HugetlbFree { size, count } => {
                format!("{seq} {verb} {} {count}", size.kib())
            }
            AgentCommand::Ksyms(names) => format!("{seq} {verb} {}", names.join(" ")),
            AgentCommand::BtfHas(name) => format!("{seq} {verb} {name}"),
            AgentCommand::DaxCreate { mode, align } => format!("{seq} {verb} {} {align}", mode.name()),
            AgentCommand::DaxDestroy { dev } => format!("{seq} {verb} {dev}"),
            AgentCommand::MemOnline { start, size, wait_s } | AgentCommand::MemGone { start, size, wait_s } => {
                format!("{seq} {verb} {:#x} {size:#x} {wait_s}", start.0)
            }
        }
    }
}

/// `ksyms` commands asking for all of `names`, each small enough that its
/// reply (` name=0x` and 16 digits per name) fits one protocol line.
pub fn ksyms_commands<'a>(names: &[&'a str]) -> Vec<AgentCommand<'a>> {
    // "@hvo <seq> ok" with a 10-digit seq.
    const REPLY_HEAD: usize = 20;
    let mut out: Vec<Vec<&str>> = Vec::new();
    let mut used = REPLY_HEAD;
    for &name in names {
        let cost = name.len() + " =0x".len() + 16;
        if out.is_empty() || used + cost > MAX_LINE {
            out.push(Vec::new());
            used = REPLY_HEAD;
        }
        used += cost;
        if let Some(batch) = out.last_mut() {
            batch.push(name);
        }
    }
    out.into_iter().map(AgentCommand::Ksyms).collect()
}

/// `key=value` words of a reply payload.
struct Fields<'a> {
    verb: &'static str,
    payload: &'a str,
    map: HashMap<&'a str, &'a str>,
}

impl<'a> Fields<'a> {
    fn parse(verb: &'static str, payload: &'a str) -> Fields<'a> {
        let map = payload.split_ascii_whitespace().filter_map(|w| w.split_once('=')).collect();
        Fields { verb, payload, map }
    }

    fn bad(&self, why: String) -> AgentError {
        AgentError::BadReply { verb: self.verb, payload: self.payload.to_string(), why }
    }

    fn text(&self, key: &str) -> Result<&'a str, AgentError> {
        self.map.get(key).copied().ok_or_else(|| self.bad(format!("no {key}=")))
    }

    fn number(&self, key: &str) -> Result<u64, AgentError> {
        let text = self.text(key)?;
        text.parse().map_err(|_| self.bad(format!("{key}={text} is not a number")))
    }

    /// A `0x` hexadecimal number (an address or a size).
    fn hex(&self, key: &str) -> Result<u64, AgentError> {
        let text = self.text(key)?;
        text.strip_prefix("0x")
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .ok_or_else(|| self.bad(format!("{key}={text} is not a 0x number")))
    }

    fn optional_number(&self, key: &str) -> Result<Option<u64>, AgentError> {
        match self.map.contains_key(key) {
            true => self.number(key).map(Some),
            false => Ok(None),
        }
    }

    fn sysctl(&self) -> Result<HvoSysctl, AgentError> {
        match self.text("hvo")? {
            "absent" => Ok(HvoSysctl::Absent),
            "0" => Ok(HvoSysctl::Off),
            "1" => Ok(HvoSysctl::On),
            other => Err(self.bad(format!("hvo={other} is not absent, 0 or 1"))),
        }
    }

    /// A comma-separated list (empty when there is nothing to list).
    fn list(&self, key: &str) -> Result<Vec<&'a str>, AgentError> {
        Ok(self.text(key)?.split(',').filter(|s| !s.is_empty()).collect())
    }

    fn size(&self, text: &str) -> Result<HstateSize, AgentError> {
        text.parse().map(HstateSize::from_kib).map_err(|_| self.bad(format!("hstate size {text} is not a number")))
    }
}

/// `/proc/sys/vm/hugetlb_optimize_vmemmap`: absent in kernels that cannot
/// optimize HugeTLB vmemmap (the architecture does not select it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HvoSysctl {
    Absent,
    Off,
    On,
}

/// What the running kernel says it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelFacts {
    /// `uname -r`.
    pub release: String,
    /// `uname -m`.
    pub machine: String,
    /// The base page size in KiB.
    pub page_kib: u64,
    pub hvo_sysctl: HvoSysctl,
    pub hstates: Vec<HstateSize>,
    /// /sys/kernel/btf/vmlinux exists (so `btf-has` can answer).
    pub btf: bool,
    /// The initramfs's modules the agent loaded at start, in load order.
    pub modules: Vec<String>,
    /// Those `insmod` refused (the console shows why, before the banner).
    pub modules_failed: Vec<String>,
}

impl KernelFacts {
    pub fn parse(payload: &str) -> Result<KernelFacts, AgentError> {
        let f = Fields::parse("kernel", payload);
        let hstates = f.list("hstates")?.into_iter().map(|s| f.size(s)).collect::<Result<_, _>>()?;
        Ok(KernelFacts {
            release: f.text("release")?.to_string(),
            machine: f.text("machine")?.to_string(),
            page_kib: f.number("page_kb")?,
            hvo_sysctl: f.sysctl()?,
            hstates,
            btf: f.text("btf")? == "yes",
            modules: f.list("modules")?.into_iter().map(str::to_string).collect(),
            modules_failed: f.list("modules_failed")?.into_iter().map(str::to_string).collect(),
        })
    }
}

/// One hstate's pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hstate {
    pub size: HstateSize,
    pub pages: u64,
    pub free: u64,
}

/// The kernel's own account, as `report` gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelReport {
    pub hvo_sysctl: HvoSysctl,
    /// /proc/vmstat `nr_memmap_pages` (None before Linux 6.9).
    pub nr_memmap_pages: Option<u64>,
    /// /proc/vmstat `nr_memmap_boot_pages`.
    pub nr_memmap_boot_pages: Option<u64>,
    pub hstates: Vec<Hstate>,
}

impl KernelReport {
    pub fn parse(payload: &str) -> Result<KernelReport, AgentError> {
        let f = Fields::parse("report", payload);
        let mut hstates = Vec::new();
        for item in f.list("hstates")? {
            let parts: Vec<&str> = item.split(':').collect();
            let [size, pages, free] = parts.as_slice() else {
                return Err(f.bad(format!("hstate {item} is not size:pages:free")));
            };
            let count = |t: &str| t.parse().map_err(|_| f.bad(format!("hstate {item}: {t} is not a number")));
            hstates.push(Hstate { size: f.size(size)?, pages: count(pages)?, free: count(free)? });
        }
        Ok(KernelReport {
            hvo_sysctl: f.sysctl()?,
            nr_memmap_pages: f.optional_number("nr_memmap_pages")?,
            nr_memmap_boot_pages: f.optional_number("nr_memmap_boot_pages")?,
            hstates,
        })
    }

    pub fn hstate(&self, size: HstateSize) -> Option<&Hstate> {
        self.hstates.iter().find(|h| h.size == size)
    }
}

/// The symbols a `ksyms` reply found (names it did not find are absent).
pub fn parse_ksyms(payload: &str) -> Result<Vec<(String, VirtAddr)>, AgentError> {
    let f = Fields::parse("ksyms", payload);
    payload
        .split_ascii_whitespace()
        .map(|word| {
            let (name, value) = word.split_once('=').ok_or_else(|| f.bad(format!("{word} is not name=0x...")))?;
            let addr = value
                .strip_prefix("0x")
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .ok_or_else(|| f.bad(format!("{name}: {value} is not a 0x address")))?;
            Ok((name.to_string(), VirtAddr(addr)))
        })
        .collect()
}

/// A `btf-has` reply: whether the name is there.
pub fn parse_btf_has(name: &str, payload: &str) -> Result<bool, AgentError> {
    let f = Fields::parse("btf-has", payload);
    match f.text(name)? {
        "yes" => Ok(true),
        "no" => Ok(false),
        other => Err(f.bad(format!("{name}={other} is not yes or no"))),
    }
}

#[cfg(test)]
mod tests;
