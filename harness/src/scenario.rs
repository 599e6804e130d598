//! Scenario files: TOML, parsed strictly. Unknown fields, wrong types and
//! impossible values are errors that name the file, the line and the field.
//! A scenario describes a machine and steps in our own terms; it can never run
//! a host command or pass arguments to QEMU.
//!
//! The file as written is [`raw`]; [`steps`], [`machine`] and [`expect`] give
//! it meaning; [`names`] holds every word a field accepts.

mod boot_fit;
mod expect;
mod linux;
mod locate;
mod machine;
mod names;
mod raw;
mod release;
mod steps;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

use hvo_abi::model::{Knob, Layout, Zone};
use hvo_abi::refusal::Refusal;
use hvo_images::Arch;
use serde::Deserialize;
use toml::Spanned;

use crate::qemu::MachineSpec;
pub use linux::LINUX_HUGETLB_SIZES;
use locate::Locator;
use names::Choice;
use raw::RawScenario;
pub use raw::Size;
pub use release::{LinuxFix, LinuxRelease};

/// A scenario file larger than this is refused before parsing.
pub const MAX_FILE_BYTES: u64 = 256 * 1024;
const MIB: u64 = 1 << 20;
const DEFAULT_STEP_TIMEOUT_MS: u64 = 5_000;
const DEFAULT_BOOT_TIMEOUT_MS: u64 = 10_000;
const MAX_TIMEOUT_MS: u64 = 600_000;
/// A whole run, boot to verdict, unless the scenario says otherwise (and
/// never less than a boot and one step take at most).
const DEFAULT_DEADLINE_MS: u64 = 120_000;

const ARCHITECTURES: Choice<Arch> = Choice::all("architecture");

/// A problem in a scenario file, located.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ScenarioError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// Dotted path of the field, e.g. `machine.boot-memory` or `step[2].status`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "field `{}`: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Pass,
    Fail,
}

/// The page order of `bytes` with base pages of `2^page_shift` bytes: sizes
/// in scenario files are bytes, so one file means the same compound pages
/// on every architecture, whatever its base page.
pub fn order_of(bytes: u64, page_shift: u32) -> u32 {
    bytes.trailing_zeros().saturating_sub(page_shift)
}

/// One thing the runner does, in order. The machine boots before the first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Round trip on the console.
    Ping,
    /// Read the manifest through QMP and through the shared RAM mapping, check
    /// both agree and describe what the guest said it is, and check QEMU's own
    /// MMU translates the linear map the way the manifest says.
    VerifyManifest,
    /// Ask the guest to exit with `status` and check QEMU ends with it.
    Exit { status: u8 },
    /// Allocate `count` HugeTLB folios of `folio_size` bytes in `zone`, named
    /// `region`, from boot memory or from the hot-added memory region `from`.
    HugetlbAlloc { region: String, folio_size: u64, count: u64, zone: Zone, from: Option<String> },
    /// Optimize a region's vmemmap under `layout`.
    Optimize { region: String, layout: Layout },
    /// Restore a region's vmemmap.
    Restore { region: String },
    /// Restore if needed, then free a region's folios.
    HugetlbFree { region: String },
    /// Check every invariant of the vmemmap as it is now.
    Verify,
    /// Fault injection: the `nth` frame allocation from now fails, once.
    FailAllocation { nth: u64 },
    /// Hotplug `size` bytes of memory on `device` (or take the persistent
    /// memory set aside at boot) and make it device DAX with compound pages
    /// of `compound_size` bytes, its vmemmap under `layout`, its struct pages
    /// on the device itself with `altmap`; a DIMM at the guest-physical
    /// `address` when one is given (else where QEMU places it).
    HotAdd {
        region: String,
        size: u64,
        compound_size: u64,
        zone: Zone,
        layout: Layout,
        device: DaxDevice,
        altmap: bool,
        backend: Backend,
        address: Option<u64>,
    },
    /// Hotplug `size` bytes and online them as ordinary memory in `zone`.
    HotAddMemory { region: String, size: u64, zone: Zone, backend: Backend },
    /// Unplug a hot-added region: the guest tears its vmemmap down and the
    /// platform completes the removal.
    HotRemove { region: String },
}

/// A boot-time gigantic page reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootGigantic {
    pub region: String,
    /// Bytes per folio.
    pub size: u64,
    pub count: u64,
    pub zone: Zone,
}

impl Step {
    pub fn name(&self) -> &'static str {
        match self {
            Step::Ping => "ping",
            Step::VerifyManifest => "verify-manifest",
            Step::Exit { .. } => "exit",
            Step::HugetlbAlloc { .. } => "hugetlb-alloc",
            Step::Optimize { .. } => "optimize",
            Step::Restore { .. } => "restore",
            Step::HugetlbFree { .. } => "hugetlb-free",
            Step::Verify => "verify",
            Step::FailAllocation { .. } => "fail-allocation",
            Step::HotAdd { .. } => "hot-add",
            Step::HotRemove { .. } => "hot-remove",
            Step::HotAddMemory { .. } => "hot-add",
        }
    }
}

/// Where the memory of a DAX hot-add comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaxDevice {
    /// A `pc-dimm` hotplugged over QMP.
    Dimm,
    /// An `nvdimm` hotplugged over QMP (q35 and virt only).
    Nvdimm,
    /// The boot memory set aside as persistent memory (`machine.boot-pmem`):
    /// no hotplug, only the guest's side of adding it.
    Pmem,
}

impl DaxDevice {
    pub const ALL: [DaxDevice; 3] = [DaxDevice::Dimm, DaxDevice::Nvdimm, DaxDevice::Pmem];

    /// How a scenario's `device` names it.
    pub const fn name(self) -> &'static str {
        match self {
            DaxDevice::Dimm => "dimm",
            DaxDevice::Nvdimm => "nvdimm",
            DaxDevice::Pmem => "pmem",
        }
    }
}

/// What backs a hotplugged DIMM on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `memory-backend-ram`, reserving nothing: the host cannot read it.
    Ram,
    /// `memory-backend-file` shared on tmpfs and mapped by the host, so the
    /// verifier reads what the guest keeps there.
    File,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Ram, Backend::File];

    /// How a scenario's `backend` names it.
    pub const fn name(self) -> &'static str {
        match self {
            Backend::Ram => "ram",
            Backend::File => "file",
        }
    }
}

/// What a scenario expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    Pass,
    /// The named check must fail; no other may, except those in `also`.
    Fail {
        invariant: String,
        also: Vec<String>,
    },
}

/// The checks a run makes besides the invariants (a scenario can expect
/// these to fail too).
pub const RUN_CHECKS: &[&str] = &["guest-ready", "ping", "manifest", "exit-status"];

#[derive(Debug, Clone)]
pub struct PlacedStep {
    pub step: Step,
    /// The guest must refuse this step, for this reason: the injected
    /// allocation failure (`expect-failure`), or the one `expect-refusal`
    /// names. Any other refusal fails the run, naming the real reason.
    pub expect_refusal: Option<Refusal>,
    /// Run the step with its 1st, 2nd, ... allocation failing, checking the
    /// rollback each time, until it no longer reaches the failing allocation.
    pub sweep_failures: bool,
    /// 1-based line of the step in its file.
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub file: PathBuf,
    pub description: String,
    pub architectures: Vec<Arch>,
    pub machine: MachineSpec,
    /// How long the guest may stay silent while a step waits on it.
    pub step_timeout_ms: u64,
    pub boot_timeout_ms: u64,
    /// The whole run, boot to verdict.
    pub deadline_ms: u64,
    pub expect: Expect,
    /// For a Linux bug (`expect.fixed-in`): the first release with the fix.
    /// Kernels before it must fail as `expect` says; kernels from it on must
    /// pass. Such a scenario is kernel-only.
    pub fixed_in: Option<LinuxFix>,
    /// Bugs the guest reintroduces on purpose, turned on right after boot.
    pub bug_knobs: Vec<Knob>,
    /// Gigantic pages reserved before memmap init.
    pub boot_gigantic: Vec<BootGigantic>,
    /// Bytes at the end of boot memory set aside as persistent memory (0: none).
    pub boot_pmem: u64,
    /// A real kernel boots with HugeTLB vmemmap optimization on (the
    /// default) or off (`machine.hugetlb-free-vmemmap = false`: then the
    /// kernel must optimize nothing, and the verdict says so).
    pub hugetlb_free_vmemmap: bool,
    pub steps: Vec<PlacedStep>,
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let whole_file = |message: String| ScenarioError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            field: String::new(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| whole_file(format!("cannot read: {e}")))?;
        if meta.len() > MAX_FILE_BYTES {
            return Err(whole_file(format!(
                "{} bytes is larger than a scenario may be ({MAX_FILE_BYTES})",
                meta.len()
            )));
        }
        let source = std::fs::read_to_string(path).map_err(|e| whole_file(format!("cannot read: {e}")))?;
        Scenario::parse(path, &source)
    }

    pub fn parse(file: &Path, source: &str) -> Result<Scenario, ScenarioError> {
        let loc = Locator { file, source };
        let raw: RawScenario = toml::from_str(source).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            loc.error(span, None, e.message().trim().to_string())
        })?;
        let name = scenario_name(&loc, raw.name.as_ref())?;
        let architectures = architectures(&loc, raw.architectures.as_ref())?;
        let timeout = |value: &Option<Spanned<u64>>, field: &str, default: u64| match value {
            None => Ok(default),
            Some(t) if *t.get_ref() == 0 || *t.get_ref() > MAX_TIMEOUT_MS => {
                Err(loc.error(t.span(), Some(field), format!("{} ms is outside 1..={MAX_TIMEOUT_MS}", t.get_ref())))
            }
            Some(t) => Ok(*t.get_ref()),
        };
        let step_timeout_ms = timeout(&raw.step_timeout_ms, "step-timeout-ms", DEFAULT_STEP_TIMEOUT_MS)?;
        let boot_timeout_ms = timeout(&raw.boot_timeout_ms, "boot-timeout-ms", DEFAULT_BOOT_TIMEOUT_MS)?;
        // The default deadline leaves room for the boot and one step the file allows.
        let deadline_default = DEFAULT_DEADLINE_MS.max(boot_timeout_ms + step_timeout_ms).min(MAX_TIMEOUT_MS);
        let deadline_ms = timeout(&raw.deadline_ms, "deadline-ms", deadline_default)?;
        let boot_gigantic = steps::boot_gigantic(&loc, &raw.boot_gigantic)?;
        let steps = steps::place_steps(&loc, raw.step, &boot_gigantic)?;
        let (machine, boot_pmem) = machine::machine(&loc, &raw.machine, &architectures, &steps)?;
        boot_fit::check(&loc, &raw.boot_gigantic, &boot_gigantic, &architectures, machine.boot_memory, boot_pmem)?;
        let hugetlb_free_vmemmap = machine::hugetlb_free_vmemmap(&loc, &raw.machine, &steps)?;
        Ok(Scenario {
            name,
            file: file.to_path_buf(),
            description: raw.description.unwrap_or_default(),
            architectures,
            machine,
            step_timeout_ms,
            boot_timeout_ms,
            deadline_ms,
            expect: expect::expect(&loc, raw.expect.as_ref())?,
            fixed_in: expect::fixed_in(&loc, raw.expect.as_ref())?,
            bug_knobs: expect::bug_knobs(&loc, raw.bug_knobs.as_ref())?,
            boot_gigantic,
            boot_pmem,
            hugetlb_free_vmemmap,
            steps,
        })
    }
}

/// The scenario's name: `name`, or the file's stem.
fn scenario_name(loc: &Locator, written: Option<&Spanned<String>>) -> Result<String, ScenarioError> {
    if let Some(n) = written {
        if !valid_name(n.get_ref()) {
            return Err(loc.error(n.span(), Some("name"), "use only a-z, 0-9, '-' and '_' (it names log directories)"));
        }
        return Ok(n.get_ref().clone());
    }
    let stem = loc.file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if !valid_name(stem) {
        return Err(loc.error(
            0..0,
            Some("name"),
            format!("the file name `{stem}` cannot name the scenario: set `name`"),
        ));
    }
    Ok(stem.to_string())
}

/// The listed architectures, each once; every one when the file lists none.
fn architectures(loc: &Locator, written: Option<&Spanned<Vec<Spanned<String>>>>) -> Result<Vec<Arch>, ScenarioError> {
    let Some(list) = written else { return Ok(Arch::ALL.to_vec()) };
    if list.get_ref().is_empty() {
        return Err(loc.error(list.span(), Some("architectures"), "must name at least one architecture"));
    }
    let mut out = Vec::new();
    for a in list.get_ref() {
        let arch = ARCHITECTURES.parse(loc, "architectures", a)?;
        if out.contains(&arch) {
            return Err(loc.error(a.span(), Some("architectures"), format!("`{arch}` is listed twice")));
        }
        out.push(arch);
    }
    Ok(out)
}

impl Scenario {
    /// Whether anything in the scenario looks at or changes the vmemmap: if
    /// not (a boot, manifest and exit), the runner skips populating it, so
    /// the guest's work stays proportional to what the scenario asks.
    pub fn needs_vmemmap(&self) -> bool {
        !self.boot_gigantic.is_empty()
            || self.boot_pmem > 0
            || self.steps.iter().any(|p| !matches!(p.step, Step::Ping | Step::VerifyManifest | Step::Exit { .. }))
    }

    /// The same scenario with its bug knobs off, expecting every invariant
    /// to hold: run beside each bug-knob scenario, it proves the failure is
    /// the knob's and not the scenario's. `None` without knobs.
    pub fn knobs_off(&self) -> Option<Scenario> {
        if self.bug_knobs.is_empty() {
            return None;
        }
        Some(Scenario {
            name: format!("{}{KNOBS_OFF_SUFFIX}", self.name),
            description: format!("{} (bug knobs off)", self.description),
            expect: Expect::Pass,
            bug_knobs: Vec::new(),
            ..self.clone()
        })
    }
}

/// What names a scenario's knobs-off control run.
pub const KNOBS_OFF_SUFFIX: &str = "+knobs-off";

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Every `.toml` file under `path` (or `path` itself), sorted.
pub fn discover(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.path());
        for e in entries {
            let p = e.path();
            if p.is_dir() {
                out.extend(discover(&p)?);
            } else if p.extension().is_some_and(|x| x == "toml") {
                out.push(p);
            }
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(out)
}
