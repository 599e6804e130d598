//! Scenario files: TOML, parsed strictly. Unknown fields, wrong types and
//! impossible values are errors that name the file, the line and the field.
//! A scenario describes a machine and steps in our own terms; it can never run
//! a host command or pass arguments to QEMU.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use hvo_abi::model::{Knob, Layout, Zone};
use hvo_images::{profile, Arch};
use serde::Deserialize;
use toml::Spanned;

use crate::invariant::Invariant;
use crate::qemu::MachineSpec;

/// A scenario file larger than this is refused before parsing.
pub const MAX_FILE_BYTES: u64 = 256 * 1024;
const MIB: u64 = 1 << 20;
const DEFAULT_STEP_TIMEOUT_MS: u64 = 5_000;
const DEFAULT_BOOT_TIMEOUT_MS: u64 = 10_000;
const MAX_TIMEOUT_MS: u64 = 600_000;
/// A whole run, boot to verdict, unless the scenario says otherwise.
const DEFAULT_DEADLINE_MS: u64 = 120_000;
/// QEMU's limit on memory slots (ACPI_MAX_RAM_SLOTS).
const MAX_SLOTS: u32 = 256;
/// The guest's boot allocations (page tables, images) need at least this.
const MIN_BOOT_MEMORY: u64 = 64 * MIB;
/// Beyond every machine's physical address width we model.
const MAX_MEMORY_LIMIT: u64 = 1 << 46;

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

/// A size in bytes, written as an integer or as a string with a unit:
/// `"512M"`, `"1G"`, `"2MiB"`, `"64K"`, `"1T"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl Size {
    pub fn parse(text: &str) -> Result<Size, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits.parse().map_err(|_| format!("`{text}` is not a size like \"512M\" or \"1G\""))?;
        let shift = match unit.trim() {
            "" | "B" => 0,
            "K" | "KiB" => 10,
            "M" | "MiB" => 20,
            "G" | "GiB" => 30,
            "T" | "TiB" => 40,
            other => return Err(format!("unknown size unit `{other}` (use K, M, G or T)")),
        };
        n.checked_mul(1 << shift).map(Size).ok_or_else(|| format!("`{text}` is too large"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];
        match units.iter().find(|(s, _)| self.0 >= 1 << s && self.0.is_multiple_of(1 << s)) {
            Some((s, u)) => write!(f, "{}{u}", self.0 >> s),
            None => write!(f, "{}", self.0),
        }
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected a size: bytes as an integer, or a string like \"512M\""))?
        {
            Raw::Bytes(n) => Ok(Size(n)),
            Raw::Text(t) => Size::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawScenario {
    name: Option<Spanned<String>>,
    description: Option<String>,
    architectures: Option<Spanned<Vec<Spanned<String>>>>,
    step_timeout_ms: Option<Spanned<u64>>,
    boot_timeout_ms: Option<Spanned<u64>>,
    deadline_ms: Option<Spanned<u64>>,
    #[serde(default)]
    machine: RawMachine,
    bug_knobs: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    boot_gigantic: Vec<Spanned<RawBootGigantic>>,
    expect: Option<RawExpect>,
    #[serde(default)]
    step: Vec<Spanned<RawStep>>,
}

/// A step as written: the action and every parameter any action takes, each
/// spanned, so a misplaced or missing parameter is reported at its line.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawStep {
    action: Spanned<String>,
    status: Option<Spanned<u8>>,
    region: Option<Spanned<String>>,
    size: Option<Spanned<Size>>,
    count: Option<Spanned<u64>>,
    zone: Option<Spanned<String>>,
    layout: Option<Spanned<String>>,
    nth: Option<Spanned<u64>>,
    expect_failure: Option<Spanned<bool>>,
    compound: Option<Spanned<Size>>,
    sweep_failures: Option<Spanned<bool>>,
    kind: Option<Spanned<String>>,
    from: Option<Spanned<String>>,
    device: Option<Spanned<String>>,
    altmap: Option<Spanned<bool>>,
    backend: Option<Spanned<String>>,
}

const ACTIONS: &[&str] = &[
    "ping",
    "verify-manifest",
    "hugetlb-alloc",
    "optimize",
    "restore",
    "hugetlb-free",
    "verify",
    "fail-allocation",
    "hot-add",
    "hot-remove",
    "exit",
];
/// HugeTLB folio sizes the model allocates: 2 MiB to 1 GiB.
const FOLIO_SIZES: std::ops::RangeInclusive<u64> = (2 << 20)..=(1 << 30);
const MAX_FOLIOS: u64 = 65536;

impl RawStep {
    /// The step, whether the guest must refuse it, and whether to sweep failures.
    fn into_step(self, loc: &Locator, index: usize) -> Result<(Step, bool, bool), ScenarioError> {
        let field = |name: &str| format!("step[{index}].{name}");
        let action = self.action.get_ref().as_str();
        let action_span = self.action.span();
        let missing = |name: &str, what: &str| {
            loc.error(action_span.clone(), Some(&field(name)), format!("`{action}` needs {what}"))
        };
        // Parameters present, with their spans, for the "not a parameter" check.
        let given: Vec<(&str, Range<usize>)> = [
            ("status", self.status.as_ref().map(|s| s.span())),
            ("region", self.region.as_ref().map(|s| s.span())),
            ("size", self.size.as_ref().map(|s| s.span())),
            ("count", self.count.as_ref().map(|s| s.span())),
            ("zone", self.zone.as_ref().map(|s| s.span())),
            ("layout", self.layout.as_ref().map(|s| s.span())),
            ("nth", self.nth.as_ref().map(|s| s.span())),
            ("expect-failure", self.expect_failure.as_ref().map(|s| s.span())),
            ("compound", self.compound.as_ref().map(|s| s.span())),
            ("sweep-failures", self.sweep_failures.as_ref().map(|s| s.span())),
            ("kind", self.kind.as_ref().map(|s| s.span())),
            ("from", self.from.as_ref().map(|s| s.span())),
            ("device", self.device.as_ref().map(|s| s.span())),
            ("altmap", self.altmap.as_ref().map(|s| s.span())),
            ("backend", self.backend.as_ref().map(|s| s.span())),
        ]
        .into_iter()
        .filter_map(|(n, s)| Some((n, s?)))
        .collect();
        let region = || -> Result<String, ScenarioError> {
            let r = self.region.as_ref().ok_or_else(|| missing("region", "a `region` name"))?;
            if !valid_name(r.get_ref()) {
                return Err(loc.error(r.span(), Some(&field("region")), "use only a-z, 0-9, '-' and '_'"));
            }
            Ok(r.get_ref().clone())
        };
        let backend = || -> Result<Option<Backend>, ScenarioError> {
            match &self.backend {
                None => Ok(None),
                Some(b) if b.get_ref() == "ram" => Ok(Some(Backend::Ram)),
                Some(b) if b.get_ref() == "file" => Ok(Some(Backend::File)),
                Some(b) => Err(loc.error(
                    b.span(),
                    Some(&field("backend")),
                    format!("unknown backend `{}` (known: ram, file)", b.get_ref()),
                )),
            }
        };
        let (step, takes): (Step, &[&str]) = match action {
            "ping" => (Step::Ping, &[]),
            "verify-manifest" => (Step::VerifyManifest, &[]),
            "verify" => (Step::Verify, &[]),
            "exit" => (Step::Exit { status: self.status.as_ref().map(|s| *s.get_ref()).unwrap_or(0) }, &["status"]),
            "hugetlb-alloc" => {
                let size =
                    self.size.as_ref().ok_or_else(|| missing("size", "a folio `size`, like \"2M\" or \"1G\""))?;
                let bytes = size.get_ref().0;
                if !bytes.is_power_of_two() || !FOLIO_SIZES.contains(&bytes) {
                    return Err(loc.error(
                        size.span(),
                        Some(&field("size")),
                        format!("{} is not a HugeTLB folio size: a power of two from 2M to 1G", size.get_ref()),
                    ));
                }
                let (count, count_span) =
                    self.count.as_ref().map(|c| (*c.get_ref(), c.span())).unwrap_or((1, action_span.clone()));
                if count == 0 || count > MAX_FOLIOS {
                    return Err(loc.error(
                        count_span,
                        Some(&field("count")),
                        format!("{count} folios is outside 1..={MAX_FOLIOS}"),
                    ));
                }
                let zone = match &self.zone {
                    None => Zone::Normal,
                    Some(z) => Zone::from_name(z.get_ref()).ok_or_else(|| {
                        loc.error(
                            z.span(),
                            Some(&field("zone")),
                            format!("unknown zone `{}` (known: normal, movable, device)", z.get_ref()),
                        )
                    })?,
                };

                let from = self.from.as_ref().map(|f| f.get_ref().clone());
                (
                    Step::HugetlbAlloc { region: region()?, folio_size: bytes, count, zone, from },
                    &["region", "size", "count", "zone", "from", "expect-failure", "sweep-failures"],
                )
            }
            "optimize" => {
                let layout = match &self.layout {
                    None => Layout::Unified,
                    Some(l) => Layout::from_name(l.get_ref()).filter(|l| *l != Layout::None).ok_or_else(|| {
                        loc.error(
                            l.span(),
                            Some(&field("layout")),
                            format!("unknown layout `{}` (known: unified, legacy-hugetlb, legacy-dax)", l.get_ref()),
                        )
                    })?,
                };
                (
                    Step::Optimize { region: region()?, layout },
                    &["region", "layout", "expect-failure", "sweep-failures"],
                )
            }
            "restore" => (Step::Restore { region: region()? }, &["region", "expect-failure", "sweep-failures"]),
            "hot-add" if self.kind.as_ref().is_some_and(|k| k.get_ref() == "memory") => {
                let size = self.size.as_ref().ok_or_else(|| missing("size", "the hotplugged memory's `size`"))?;
                let zone = match &self.zone {
                    None => Zone::Movable,
                    Some(z) => Zone::from_name(z.get_ref()).filter(|z| *z != Zone::Device).ok_or_else(|| {
                        loc.error(
                            z.span(),
                            Some(&field("zone")),
                            format!("memory goes to the normal or movable zone, not `{}`", z.get_ref()),
                        )
                    })?,
                };
                (
                    Step::HotAddMemory {
                        region: region()?,
                        size: size.get_ref().0,
                        zone,
                        backend: backend()?.unwrap_or(Backend::Ram),
                    },
                    &["region", "size", "zone", "kind", "backend", "expect-failure", "sweep-failures"],
                )
            }
            "hot-add" => {
                if let Some(k) = self.kind.as_ref().filter(|k| k.get_ref() != "dax") {
                    return Err(loc.error(
                        k.span(),
                        Some(&field("kind")),
                        format!("unknown kind `{}` (known: dax, memory)", k.get_ref()),
                    ));
                }
                let size = self.size.as_ref().ok_or_else(|| missing("size", "the hotplugged memory's `size`"))?;
                let device = match &self.device {
                    None => DaxDevice::Dimm,
                    Some(d) => DaxDevice::from_name(d.get_ref()).ok_or_else(|| {
                        loc.error(
                            d.span(),
                            Some(&field("device")),
                            format!("unknown device `{}` (known: dimm, nvdimm, pmem)", d.get_ref()),
                        )
                    })?,
                };
                let altmap = self.altmap.as_ref().is_some_and(|a| *a.get_ref());
                let backend = match (device, backend()?, altmap) {
                    (DaxDevice::Pmem, Some(_), _) => {
                        let span = self.backend.as_ref().map(|b| b.span()).unwrap_or(action_span.clone());
                        return Err(loc.error(
                            span,
                            Some(&field("backend")),
                            "persistent memory set aside at boot is boot RAM: it has no backend of its own",
                        ));
                    }
                    (DaxDevice::Pmem, None, true) => {
                        let span = self.altmap.as_ref().map(|a| a.span()).unwrap_or(action_span.clone());
                        return Err(loc.error(
                            span,
                            Some(&field("altmap")),
                            "boot persistent memory keeps its struct pages in the boot memmap, not an altmap",
                        ));
                    }
                    (_, Some(Backend::Ram), true) => {
                        let span = self.backend.as_ref().map(|b| b.span()).unwrap_or(action_span.clone());
                        return Err(loc.error(
                            span,
                            Some(&field("backend")),
                            "an altmap keeps struct pages on the device, which the host reads through a file: use backend = \"file\"",
                        ));
                    }
                    // The host reads the struct pages an altmap keeps on the device.
                    (_, None, true) => Backend::File,
                    (_, chosen, _) => chosen.unwrap_or(Backend::Ram),
                };
                let compound =
                    self.compound.as_ref().map(|c| (c.get_ref().0, c.span())).unwrap_or((2 << 20, size.span()));
                if !compound.0.is_power_of_two() || !FOLIO_SIZES.contains(&compound.0) {
                    return Err(loc.error(
                        compound.1,
                        Some(&field("compound")),
                        format!("{} is not a compound page size: a power of two from 2M to 1G", Size(compound.0)),
                    ));
                }
                if size.get_ref().0 == 0 || !size.get_ref().0.is_multiple_of(compound.0) {
                    return Err(loc.error(
                        size.span(),
                        Some(&field("size")),
                        format!("{} is not a whole number of {} compound pages", size.get_ref(), Size(compound.0)),
                    ));
                }
                let zone = match &self.zone {
                    None => Zone::Device,
                    Some(z) => Zone::from_name(z.get_ref()).ok_or_else(|| {
                        loc.error(z.span(), Some(&field("zone")), format!("unknown zone `{}`", z.get_ref()))
                    })?,
                };
                let layout = match &self.layout {
                    None => Layout::Unified,
                    Some(l) => Layout::from_name(l.get_ref()).ok_or_else(|| {
                        loc.error(
                            l.span(),
                            Some(&field("layout")),
                            format!("unknown layout `{}` (known: unified, legacy-dax, none)", l.get_ref()),
                        )
                    })?,
                };
                (
                    Step::HotAdd {
                        region: region()?,
                        size: size.get_ref().0,
                        compound_size: compound.0,
                        zone,
                        layout,
                        device,
                        altmap,
                        backend,
                    },
                    &[
                        "region",
                        "size",
                        "compound",
                        "zone",
                        "layout",
                        "kind",
                        "device",
                        "altmap",
                        "backend",
                        "expect-failure",
                        "sweep-failures",
                    ],
                )
            }
            "hot-remove" => (Step::HotRemove { region: region()? }, &["region"]),
            "fail-allocation" => {
                let nth = self.nth.as_ref().ok_or_else(|| missing("nth", "`nth`: which allocation from now fails"))?;
                if *nth.get_ref() == 0 || *nth.get_ref() > u32::MAX as u64 {
                    return Err(loc.error(nth.span(), Some(&field("nth")), "must be from 1 (the next allocation) up"));
                }
                (Step::FailAllocation { nth: *nth.get_ref() }, &["nth"])
            }
            "hugetlb-free" => (Step::HugetlbFree { region: region()? }, &["region"]),
            other => {
                return Err(loc.error(
                    action_span.clone(),
                    Some(&field("action")),
                    format!("unknown action `{other}` (known: {})", ACTIONS.join(", ")),
                ))
            }
        };
        if let Some((name, span)) = given.iter().find(|(n, _)| !takes.contains(n)) {
            return Err(loc.error(
                span.clone(),
                Some(&field(name)),
                format!("`{name}` is not a parameter of `{action}`"),
            ));
        }
        let sweep = self.sweep_failures.as_ref().is_some_and(|e| *e.get_ref());
        if sweep && self.expect_failure.as_ref().is_some_and(|e| *e.get_ref()) {
            let span = self.sweep_failures.as_ref().map(|s| s.span()).unwrap_or(action_span);
            return Err(loc.error(
                span,
                Some(&field("sweep-failures")),
                "a swept step fails and then succeeds: drop `expect-failure`",
            ));
        }
        Ok((step, self.expect_failure.as_ref().is_some_and(|e| *e.get_ref()), sweep))
    }
}

/// Gigantic pages reserved at boot, before memmap init: populated already optimized.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawBootGigantic {
    region: Spanned<String>,
    size: Spanned<Size>,
    count: Option<Spanned<u64>>,
    zone: Option<Spanned<String>>,
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

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawMachine {
    boot_memory: Option<Spanned<Size>>,
    slots: Option<Spanned<u32>>,
    max_memory: Option<Spanned<Size>>,
    boot_pmem: Option<Spanned<Size>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawExpect {
    outcome: Spanned<Outcome>,
    invariant: Option<Spanned<String>>,
    /// Invariants that fire too, as consequences of the same bug.
    also: Option<Vec<Spanned<String>>>,
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
    /// on the device itself with `altmap`.
    HotAdd {
        region: String,
        size: u64,
        compound_size: u64,
        zone: Zone,
        layout: Layout,
        device: DaxDevice,
        altmap: bool,
        backend: Backend,
    },
    /// Hotplug `size` bytes and online them as ordinary memory in `zone`.
    HotAddMemory { region: String, size: u64, zone: Zone, backend: Backend },
    /// Unplug a hot-added region: the guest tears its vmemmap down and the
    /// platform completes the removal.
    HotRemove { region: String },
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
    fn from_name(name: &str) -> Option<DaxDevice> {
        match name {
            "dimm" => Some(DaxDevice::Dimm),
            "nvdimm" => Some(DaxDevice::Nvdimm),
            "pmem" => Some(DaxDevice::Pmem),
            _ => None,
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

/// Whether a scenario can name `name` as a check that must fail.
fn is_check_name(name: &str) -> bool {
    RUN_CHECKS.contains(&name) || Invariant::from_name(name).is_some()
}

/// Every check name, comma-separated.
fn known_check_names() -> String {
    format!("{}, {}", RUN_CHECKS.join(", "), Invariant::known_names())
}

#[derive(Debug, Clone)]
pub struct PlacedStep {
    pub step: Step,
    /// The guest must refuse this step (an injected allocation failure).
    pub expect_failure: bool,
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
    /// Bugs the guest reintroduces on purpose, turned on right after boot.
    pub bug_knobs: Vec<Knob>,
    /// Gigantic pages reserved before memmap init.
    pub boot_gigantic: Vec<BootGigantic>,
    /// Bytes at the end of boot memory set aside as persistent memory (0: none).
    pub boot_pmem: u64,
    pub steps: Vec<PlacedStep>,
}

/// Maps byte offsets to 1-based line and column and names the field there.
struct Locator<'a> {
    file: &'a Path,
    source: &'a str,
}

impl Locator<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.source[..offset.min(self.source.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
        (line, column)
    }

    /// The dotted path of the key on the line of `offset`, within the table
    /// header above it (`[machine]`, or the n-th `[[step]]`).
    fn field_at(&self, offset: usize) -> String {
        let offset = offset.min(self.source.len());
        let line_start = self.source[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
        let line_end = self.source[offset..].find('\n').map(|i| offset + i).unwrap_or(self.source.len());
        let line = self.source[line_start..line_end].trim();
        let header = |l: &str| -> Option<String> {
            let l = l.trim();
            let inner = l
                .strip_prefix("[[")
                .and_then(|r| r.split("]]").next())
                .or_else(|| l.strip_prefix('[').and_then(|r| r.split(']').next()))?;
            Some(inner.trim().to_string())
        };
        if let Some(h) = header(line).filter(|_| line.starts_with('[')) {
            return h;
        }
        let key = line.split('=').next().unwrap_or("").trim().trim_matches('"').to_string();
        // Find the table this line belongs to, counting array-of-table entries.
        let mut table = String::new();
        let mut index = None;
        for l in self.source[..line_start].lines() {
            let t = l.trim();
            if t.starts_with("[[") {
                let name = header(t).unwrap_or_default();
                index = if name == table { index.map(|i: usize| i + 1) } else { Some(1) };
                table = name;
            } else if t.starts_with('[') {
                table = header(t).unwrap_or_default();
                index = None;
            }
        }
        match (table.is_empty(), index, key.is_empty()) {
            (true, _, _) => key,
            (false, Some(i), true) => format!("{table}[{i}]"),
            (false, Some(i), false) => format!("{table}[{i}].{key}"),
            (false, None, true) => table,
            (false, None, false) => format!("{table}.{key}"),
        }
    }

    fn error(&self, span: Range<usize>, field: Option<&str>, message: impl Into<String>) -> ScenarioError {
        let (line, column) = self.line_col(span.start);
        ScenarioError {
            file: self.file.to_path_buf(),
            line,
            column,
            field: field.map(str::to_string).unwrap_or_else(|| self.field_at(span.start)),
            message: message.into(),
        }
    }
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

        let name = match &raw.name {
            Some(n) => {
                if !valid_name(n.get_ref()) {
                    return Err(loc.error(
                        n.span(),
                        Some("name"),
                        "use only a-z, 0-9, '-' and '_' (it names log directories)",
                    ));
                }
                n.get_ref().clone()
            }
            None => {
                let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
                if !valid_name(stem) {
                    return Err(loc.error(
                        0..0,
                        Some("name"),
                        format!("the file name `{stem}` cannot name the scenario: set `name`"),
                    ));
                }
                stem.to_string()
            }
        };

        let architectures = match &raw.architectures {
            None => Arch::ALL.to_vec(),
            Some(list) => {
                if list.get_ref().is_empty() {
                    return Err(loc.error(list.span(), Some("architectures"), "must name at least one architecture"));
                }
                let mut out = Vec::new();
                for a in list.get_ref() {
                    let arch = Arch::from_name(a.get_ref()).ok_or_else(|| {
                        loc.error(
                            a.span(),
                            Some("architectures"),
                            format!("unknown architecture `{}` (known: {})", a.get_ref(), Arch::known_names()),
                        )
                    })?;
                    if out.contains(&arch) {
                        return Err(loc.error(a.span(), Some("architectures"), format!("`{arch}` is listed twice")));
                    }
                    out.push(arch);
                }
                out
            }
        };

        let timeout = |v: &Option<Spanned<u64>>, field: &str, default: u64| -> Result<u64, ScenarioError> {
            match v {
                None => Ok(default),
                Some(t) if *t.get_ref() == 0 || *t.get_ref() > MAX_TIMEOUT_MS => {
                    Err(loc.error(t.span(), Some(field), format!("{} ms is outside 1..={MAX_TIMEOUT_MS}", t.get_ref())))
                }
                Some(t) => Ok(*t.get_ref()),
            }
        };
        let step_timeout_ms = timeout(&raw.step_timeout_ms, "step-timeout-ms", DEFAULT_STEP_TIMEOUT_MS)?;
        let boot_timeout_ms = timeout(&raw.boot_timeout_ms, "boot-timeout-ms", DEFAULT_BOOT_TIMEOUT_MS)?;
        let deadline_ms = timeout(&raw.deadline_ms, "deadline-ms", DEFAULT_DEADLINE_MS)?;

        let machine = machine(&loc, &raw.machine, &architectures)?;

        let known_check = |c: &Spanned<String>, field: &str| -> Result<String, ScenarioError> {
            if is_check_name(c.get_ref()) {
                Ok(c.get_ref().clone())
            } else {
                Err(loc.error(
                    c.span(),
                    Some(field),
                    format!("unknown invariant `{}` (known: {})", c.get_ref(), known_check_names()),
                ))
            }
        };
        let expect = match &raw.expect {
            None => Expect::Pass,
            Some(e) => match (e.outcome.get_ref(), &e.invariant, &e.also) {
                (Outcome::Pass, None, None) => Expect::Pass,
                (Outcome::Pass, Some(i), _) => {
                    return Err(loc.error(
                        i.span(),
                        Some("expect.invariant"),
                        "only a scenario expecting `fail` names an invariant",
                    ))
                }
                (Outcome::Pass, None, Some(_)) => {
                    return Err(loc.error(
                        e.outcome.span(),
                        Some("expect.also"),
                        "only a scenario expecting `fail` names invariants",
                    ))
                }
                (Outcome::Fail, None, _) => {
                    return Err(loc.error(
                        e.outcome.span(),
                        Some("expect.invariant"),
                        "a scenario expecting `fail` must name the invariant that must fire",
                    ))
                }
                (Outcome::Fail, Some(i), also) => Expect::Fail {
                    invariant: known_check(i, "expect.invariant")?,
                    also: also.iter().flatten().map(|a| known_check(a, "expect.also")).collect::<Result<_, _>>()?,
                },
            },
        };

        let mut bug_knobs = Vec::new();
        for k in raw.bug_knobs.iter().flatten() {
            let knob = Knob::from_name(k.get_ref()).ok_or_else(|| {
                let known: Vec<&str> = Knob::ALL.iter().map(|k| k.name()).collect();
                loc.error(
                    k.span(),
                    Some("bug-knobs"),
                    format!("unknown bug knob `{}` (known: {})", k.get_ref(), known.join(", ")),
                )
            })?;
            bug_knobs.push(knob);
        }

        let mut boot_gigantic: Vec<BootGigantic> = Vec::new();
        for (i, g) in raw.boot_gigantic.iter().enumerate() {
            let field = |name: &str| format!("boot-gigantic[{}].{name}", i + 1);
            let g = g.get_ref();
            let name = g.region.get_ref();
            if !valid_name(name) || boot_gigantic.iter().any(|b| &b.region == name) {
                return Err(loc.error(
                    g.region.span(),
                    Some(&field("region")),
                    format!("`{name}` must be a new name of a-z, 0-9, '-' and '_'"),
                ));
            }
            let bytes = g.size.get_ref().0;
            if !bytes.is_power_of_two() || !FOLIO_SIZES.contains(&bytes) {
                return Err(loc.error(
                    g.size.span(),
                    Some(&field("size")),
                    format!("{} is not a HugeTLB folio size: a power of two from 2M to 1G", g.size.get_ref()),
                ));
            }
            let count = g.count.as_ref().map(|c| *c.get_ref()).unwrap_or(1);
            if count == 0 || count > MAX_FOLIOS {
                let span = g.count.as_ref().map(|c| c.span()).unwrap_or(g.size.span());
                return Err(loc.error(
                    span,
                    Some(&field("count")),
                    format!("{count} folios is outside 1..={MAX_FOLIOS}"),
                ));
            }
            let zone = match &g.zone {
                None => Zone::Normal,
                Some(z) => Zone::from_name(z.get_ref()).ok_or_else(|| {
                    loc.error(z.span(), Some(&field("zone")), format!("unknown zone `{}`", z.get_ref()))
                })?,
            };
            boot_gigantic.push(BootGigantic { region: name.clone(), size: bytes, count, zone });
        }

        let mut steps = Vec::with_capacity(raw.step.len());
        for (i, spanned) in raw.step.into_iter().enumerate() {
            let span = spanned.span();
            if steps.last().is_some_and(|s: &PlacedStep| matches!(s.step, Step::Exit { .. })) {
                return Err(loc.error(
                    span,
                    Some(&format!("step[{}]", i + 1)),
                    "no step can follow `exit`: the guest is gone",
                ));
            }
            let line = loc.line_col(span.start).0;
            let (step, expect_failure, sweep_failures) = spanned.into_inner().into_step(&loc, i + 1)?;
            let allocated = |name: &str| {
                boot_gigantic.iter().any(|g| g.region == name)
                    || steps.iter().any(|s: &PlacedStep| {
                        matches!(&s.step, Step::HugetlbAlloc { region, .. } | Step::HotAdd { region, .. } | Step::HotAddMemory { region, .. } if region == name)
                    })
            };
            match &step {
                Step::Optimize { region, .. }
                | Step::Restore { region }
                | Step::HugetlbFree { region }
                | Step::HotRemove { region }
                    if !allocated(region) =>
                {
                    return Err(loc.error(
                        span,
                        Some(&format!("step[{}].region", i + 1)),
                        format!("no earlier step allocates region `{region}`"),
                    ));
                }
                Step::HugetlbAlloc { region, .. } | Step::HotAdd { region, .. } | Step::HotAddMemory { region, .. }
                    if allocated(region) =>
                {
                    return Err(loc.error(
                        span,
                        Some(&format!("step[{}].region", i + 1)),
                        format!("region `{region}` is allocated twice"),
                    ));
                }
                _ => {}
            }
            if let Step::HugetlbAlloc { from: Some(from), .. } = &step {
                let hot_memory = steps
                    .iter()
                    .any(|s: &PlacedStep| matches!(&s.step, Step::HotAddMemory { region, .. } if region == from));
                if !hot_memory {
                    return Err(loc.error(
                        span,
                        Some(&format!("step[{}].from", i + 1)),
                        format!("no earlier hot-add of kind \"memory\" names `{from}`"),
                    ));
                }
            }
            steps.push(PlacedStep { step, expect_failure, sweep_failures, line });
        }

        let boot_pmem = match &raw.machine.boot_pmem {
            None => 0,
            Some(p) => {
                let bytes = p.get_ref().0;
                if bytes == 0 || !bytes.is_multiple_of(2 * MIB) {
                    return Err(loc.error(
                        p.span(),
                        Some("machine.boot-pmem"),
                        format!("{} is not a whole number of 2M subsections", p.get_ref()),
                    ));
                }
                if bytes.saturating_add(MIN_BOOT_MEMORY) > machine.boot_memory {
                    return Err(loc.error(
                        p.span(),
                        Some("machine.boot-pmem"),
                        format!(
                            "{} leaves less than the {} of RAM the guest needs out of boot memory {}",
                            p.get_ref(),
                            Size(MIN_BOOT_MEMORY),
                            Size(machine.boot_memory)
                        ),
                    ));
                }
                bytes
            }
        };
        let pmem_adds: Vec<&PlacedStep> =
            steps.iter().filter(|p| matches!(p.step, Step::HotAdd { device: DaxDevice::Pmem, .. })).collect();
        if let Some(p) = pmem_adds.get(usize::from(boot_pmem > 0)) {
            return Err(ScenarioError {
                file: file.to_path_buf(),
                line: p.line,
                column: 1,
                field: "device".into(),
                message: if boot_pmem == 0 {
                    "no persistent memory is set aside: set `machine.boot-pmem`".into()
                } else {
                    "the persistent memory set aside at boot is one range: add it once".into()
                },
            });
        }
        if let Some((p, size)) = pmem_adds.iter().find_map(|p| match p.step {
            Step::HotAdd { size, .. } if size != boot_pmem => Some((p, size)),
            _ => None,
        }) {
            return Err(ScenarioError {
                file: file.to_path_buf(),
                line: p.line,
                column: 1,
                field: "size".into(),
                message: format!("{} is not the {} of `machine.boot-pmem`", Size(size), Size(boot_pmem)),
            });
        }

        let hot_adds: Vec<(usize, u64)> = steps
            .iter()
            .filter_map(|p| match p.step {
                Step::HotAdd { device: DaxDevice::Pmem, .. } => None,
                Step::HotAdd { size, .. } | Step::HotAddMemory { size, .. } => Some((p.line, size)),
                _ => None,
            })
            .collect();
        let plugged: u64 = hot_adds.iter().map(|(_, size)| size).sum();
        let granule = architectures.iter().map(|a| profile(*a).dimm_granule).max().unwrap_or(1);
        if let Some((line, size)) = hot_adds.iter().find(|(_, size)| !size.is_multiple_of(granule)) {
            return Err(ScenarioError {
                file: file.to_path_buf(),
                line: *line,
                column: 1,
                field: "size".into(),
                message: format!(
                    "{} is not a multiple of {} as a listed architecture's hotplug requires",
                    Size(*size),
                    Size(granule)
                ),
            });
        }
        let nvdimms: Vec<&PlacedStep> =
            steps.iter().filter(|p| matches!(p.step, Step::HotAdd { device: DaxDevice::Nvdimm, .. })).collect();
        if let Some(first) = nvdimms.first() {
            if let Some(arch) = architectures.iter().find(|a| !profile(**a).nvdimm_hotplug) {
                return Err(ScenarioError {
                    file: file.to_path_buf(),
                    line: first.line,
                    column: 1,
                    field: "device".into(),
                    message: format!(
                        "{arch} cannot hotplug an nvdimm: list only x86_64 and aarch64 in `architectures`"
                    ),
                });
            }
        }
        let nvdimm_regions: Vec<&str> = nvdimms
            .iter()
            .filter_map(|p| match &p.step {
                Step::HotAdd { region, .. } => Some(region.as_str()),
                _ => None,
            })
            .collect();
        if let Some(p) = steps
            .iter()
            .find(|p| matches!(&p.step, Step::HotRemove { region } if nvdimm_regions.contains(&region.as_str())))
        {
            return Err(ScenarioError {
                file: file.to_path_buf(),
                line: p.line,
                column: 1,
                field: "region".into(),
                message: "QEMU cannot unplug an nvdimm".into(),
            });
        }
        let mut machine = machine;
        machine.nvdimm = !nvdimms.is_empty();
        if hot_adds.len() > machine.slots as usize || machine.boot_memory + plugged > machine.max_memory {
            return Err(ScenarioError {
                file: file.to_path_buf(),
                line: hot_adds.last().map(|(l, _)| *l).unwrap_or(0),
                column: 1,
                field: "size".into(),
                message: format!(
                    "{} hot-adds of {} in all do not fit {} slots and max-memory {}",
                    hot_adds.len(),
                    Size(plugged),
                    machine.slots,
                    Size(machine.max_memory)
                ),
            });
        }

        Ok(Scenario {
            name,
            file: file.to_path_buf(),
            description: raw.description.unwrap_or_default(),
            architectures,
            machine,
            step_timeout_ms,
            boot_timeout_ms,
            deadline_ms,
            expect,
            bug_knobs,
            boot_gigantic,
            boot_pmem,
            steps,
        })
    }
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

fn machine(loc: &Locator, raw: &RawMachine, arches: &[Arch]) -> Result<MachineSpec, ScenarioError> {
    let boot = raw.boot_memory.as_ref().map(|s| (s.get_ref().0, s.span()));
    let (boot_memory, boot_span) = boot.unwrap_or((512 * MIB, 0..0));
    let slots = raw.slots.as_ref().map(|s| *s.get_ref()).unwrap_or(4);
    let max = raw.max_memory.as_ref().map(|s| (s.get_ref().0, s.span()));
    let (max_memory, max_span) = max.unwrap_or((if slots > 0 { 8 << 30 } else { boot_memory }, 0..0));

    if boot_memory < MIN_BOOT_MEMORY {
        return Err(loc.error(
            boot_span,
            Some("machine.boot-memory"),
            format!("{} is less than the {} the guest needs", Size(boot_memory), Size(MIN_BOOT_MEMORY)),
        ));
    }
    for &arch in arches {
        let granule = profile(arch).ram_granule;
        if !boot_memory.is_multiple_of(granule) {
            return Err(loc.error(
                boot_span.clone(),
                Some("machine.boot-memory"),
                format!("{} is not a multiple of {} as {arch} requires", Size(boot_memory), Size(granule)),
            ));
        }
    }
    if let Some(s) = &raw.slots {
        if *s.get_ref() > MAX_SLOTS {
            return Err(loc.error(
                s.span(),
                Some("machine.slots"),
                format!("{} slots is more than QEMU's {MAX_SLOTS}", s.get_ref()),
            ));
        }
    }
    if max_memory > MAX_MEMORY_LIMIT {
        return Err(loc.error(
            max_span,
            Some("machine.max-memory"),
            format!("{} is beyond every machine's physical address space", Size(max_memory)),
        ));
    }
    if max_memory < boot_memory || (slots > 0 && max_memory == boot_memory) {
        return Err(loc.error(
            max_span,
            Some("machine.max-memory"),
            format!(
                "{} must exceed boot memory ({}) when there are hotplug slots",
                Size(max_memory),
                Size(boot_memory)
            ),
        ));
    }
    if slots == 0 && max_memory != boot_memory {
        return Err(loc.error(
            max_span,
            Some("machine.max-memory"),
            "without hotplug slots there can be no memory beyond boot memory",
        ));
    }
    if !max_memory.is_multiple_of(MIB) {
        return Err(loc.error(max_span, Some("machine.max-memory"), "must be a whole number of MiB"));
    }
    Ok(MachineSpec { boot_memory, slots, max_memory, nvdimm: false })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<Scenario, ScenarioError> {
        Scenario::parse(Path::new("scenarios/t.toml"), src)
    }

    fn err(src: &str) -> ScenarioError {
        parse(src).expect_err("should be rejected")
    }

    const GOOD: &str = r#"
name = "boot"
description = "boots"
architectures = ["x86_64", "ppc64le"]

[machine]
boot-memory = "1G"
slots = 2
max-memory = "4G"

[[step]]
action = "ping"

[[step]]
action = "verify-manifest"

[[step]]
action = "exit"
status = 0
"#;

    #[test]
    fn a_good_scenario_parses_with_its_lines() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.name, "boot");
        assert_eq!(s.architectures, vec![Arch::X86_64, Arch::Ppc64le]);
        assert_eq!(s.machine, MachineSpec { boot_memory: 1 << 30, slots: 2, max_memory: 4 << 30, nvdimm: false });
        assert_eq!(
            s.steps.iter().map(|s| s.step.clone()).collect::<Vec<_>>(),
            vec![Step::Ping, Step::VerifyManifest, Step::Exit { status: 0 }]
        );
        assert_eq!(s.steps[0].line, 11);
        assert_eq!(s.expect, Expect::Pass);
        assert_eq!(s.step_timeout_ms, DEFAULT_STEP_TIMEOUT_MS);
    }

    #[test]
    fn defaults_fill_an_almost_empty_file() {
        let s = parse("[[step]]\naction = \"ping\"\n").unwrap();
        assert_eq!(s.name, "t");
        assert_eq!(s.architectures, Arch::ALL.to_vec());
        assert_eq!(s.machine.boot_memory, 512 << 20);
    }

    #[test]
    fn unknown_fields_are_named_with_their_line() {
        let e = err("name = \"x\"\n[machine]\nboot-memory = \"1G\"\nbogus = 3\n");
        assert_eq!((e.line, e.field.as_str()), (4, "machine.bogus"), "{e}");
        assert!(e.message.contains("unknown field"), "{e}");
        assert!(e.to_string().starts_with("scenarios/t.toml:4:1: field `machine.bogus`"), "{e}");

        let e = err("[[step]]\naction = \"ping\"\n[[step]]\naction = \"exit\"\nstatus = 0\ncolour = 1\n");
        assert_eq!((e.line, e.field.as_str()), (6, "step[2].colour"), "{e}");
    }

    #[test]
    fn wrong_types_and_unknown_steps_are_named() {
        let e = err("[machine]\nslots = \"four\"\n");
        assert_eq!((e.line, e.field.as_str()), (2, "machine.slots"), "{e}");

        let e = err("[[step]]\naction = \"launch-missiles\"\n");
        assert_eq!((e.line, e.field.as_str()), (2, "step[1].action"), "{e}");
        assert!(e.message.contains("launch-missiles"), "{e}");

        let e = err("[[step]]\naction = \"ping\"\nstatus = 1\n");
        assert_eq!((e.line, e.field.as_str()), (3, "step[1].status"), "{e}");
        assert!(e.message.contains("not a parameter of `ping`"), "{e}");

        let e = err("[[step]]\naction = \"exit\"\nstatus = 300\n");
        assert_eq!((e.line, e.field.as_str()), (3, "step[1].status"), "{e}");

        let e = err("[machine]\nboot-memory = \"12Q\"\n");
        assert_eq!((e.line, e.field.as_str()), (2, "machine.boot-memory"), "{e}");
        assert!(e.message.contains("unit"), "{e}");
    }

    #[test]
    fn impossible_values_are_refused() {
        let e = err("architectures = [\"x86_64\", \"sparc\"]\n");
        assert_eq!((e.line, e.field.as_str()), (1, "architectures"), "{e}");

        let e = err("architectures = [\"ppc64le\"]\n[machine]\nboot-memory = \"300M\"\n");
        assert!(e.message.contains("256M"), "{e}");
        assert_eq!(e.line, 3);

        let e = err("[machine]\nboot-memory = \"1M\"\n");
        assert!(e.message.contains("needs"), "{e}");

        let e = err("[machine]\nboot-memory = \"1G\"\nmax-memory = \"512M\"\n");
        assert_eq!(e.field, "machine.max-memory", "{e}");

        let e = err("[machine]\nmax-memory = \"1000T\"\n");
        assert!(e.message.contains("beyond"), "{e}");

        let e = err("[machine]\nslots = 9999\n");
        assert_eq!(e.field, "machine.slots", "{e}");

        let e = err("step-timeout-ms = 0\n");
        assert_eq!(e.field, "step-timeout-ms", "{e}");

        let e = err("name = \"../../etc\"\n");
        assert_eq!(e.field, "name", "{e}");

        let e = err("[[step]]\naction = \"exit\"\n[[step]]\naction = \"ping\"\n");
        assert_eq!(e.line, 3, "{e}");
    }

    #[test]
    fn hugetlb_steps_parse_with_defaults_and_are_checked() {
        let s = parse(
            "[[step]]\naction = \"hugetlb-alloc\"\nregion = \"a\"\nsize = \"1G\"\ncount = 2\nzone = \"movable\"\n\
             [[step]]\naction = \"optimize\"\nregion = \"a\"\n[[step]]\naction = \"verify\"\n",
        )
        .unwrap();
        assert_eq!(
            s.steps[0].step,
            Step::HugetlbAlloc { region: "a".into(), folio_size: 1 << 30, count: 2, zone: Zone::Movable, from: None }
        );
        assert_eq!(s.steps[1].step, Step::Optimize { region: "a".into(), layout: Layout::Unified });

        let e = err("[[step]]\naction = \"hugetlb-alloc\"\nregion = \"a\"\nsize = \"3M\"\n");
        assert_eq!((e.line, e.field.as_str()), (4, "step[1].size"), "{e}");
        let e = err("[[step]]\naction = \"hugetlb-alloc\"\nregion = \"a\"\nsize = \"2M\"\ncount = 0\n");
        assert_eq!(e.field, "step[1].count", "{e}");
        let e = err("[[step]]\naction = \"hugetlb-alloc\"\nregion = \"a\"\nsize = \"2M\"\nzone = \"dma\"\n");
        assert_eq!(e.field, "step[1].zone", "{e}");
        let e = err("[[step]]\naction = \"optimize\"\nregion = \"nope\"\n");
        assert!(e.message.contains("no earlier step allocates"), "{e}");
        let e = err("[[step]]\naction = \"hugetlb-alloc\"\nregion = \"a\"\nsize = \"2M\"\n[[step]]\naction = \"optimize\"\nregion = \"a\"\nlayout = \"sideways\"\n");
        assert_eq!((e.line, e.field.as_str()), (8, "step[2].layout"), "{e}");
        let e = err("[[step]]\naction = \"optimize\"\n");
        assert_eq!(e.field, "step[1].region", "{e}");
    }

    #[test]
    fn nvdimms_need_a_machine_that_hotplugs_them_and_never_go() {
        let add = "[[step]]\naction = \"hot-add\"\nregion = \"pm\"\ndevice = \"nvdimm\"\nsize = \"1G\"\n";
        let e = err(add);
        assert!(e.message.contains("ppc64le cannot hotplug an nvdimm"), "{e}");
        let s = parse(&format!("architectures = [\"x86_64\"]\n{add}")).unwrap();
        assert!(s.machine.nvdimm);
        let e =
            err(&format!("architectures = [\"x86_64\"]\n{add}[[step]]\naction = \"hot-remove\"\nregion = \"pm\"\n"));
        assert!(e.message.contains("cannot unplug an nvdimm"), "{e}");
        let e = err("[[step]]\naction = \"hot-add\"\nregion = \"x\"\ndevice = \"floppy\"\nsize = \"1G\"\n");
        assert_eq!(e.field, "step[1].device", "{e}");
    }

    #[test]
    fn boot_pmem_is_added_once_whole_and_without_a_backend() {
        let machine = "[machine]\nboot-memory = \"512M\"\nboot-pmem = \"8M\"\n";
        let add = "[[step]]\naction = \"hot-add\"\nregion = \"pm\"\ndevice = \"pmem\"\nsize = \"8M\"\n";
        let s = parse(&format!("{machine}{add}")).unwrap();
        assert_eq!(s.boot_pmem, 8 << 20);
        assert!(matches!(s.steps[0].step, Step::HotAdd { device: DaxDevice::Pmem, .. }));
        let e = err(add);
        assert!(e.message.contains("set `machine.boot-pmem`"), "{e}");
        let e = err(&format!("{machine}{}", add.replace("8M", "4M")));
        assert_eq!(e.field, "size", "{e}");
        let e = err(&format!("{machine}{add}{}", add.replace("\"pm\"", "\"again\"")));
        assert!(e.message.contains("add it once"), "{e}");
        let e = err(&format!("{machine}{add}backend = \"file\"\n"));
        assert_eq!((e.line, e.field.as_str()), (9, "step[1].backend"), "{e}");
        let e = err("[machine]\nboot-memory = \"512M\"\nboot-pmem = \"3M\"\n");
        assert_eq!((e.line, e.field.as_str()), (3, "machine.boot-pmem"), "{e}");
        let e = err("[machine]\nboot-memory = \"512M\"\nboot-pmem = \"500M\"\n");
        assert!(e.message.contains("leaves less than"), "{e}");
    }

    #[test]
    fn an_altmap_lives_on_a_file_backed_device() {
        let add = "[[step]]\naction = \"hot-add\"\nregion = \"d\"\nsize = \"1G\"\naltmap = true\n";
        let s = parse(add).unwrap();
        assert!(matches!(s.steps[0].step, Step::HotAdd { altmap: true, backend: Backend::File, .. }));
        let e = err(&format!("{add}backend = \"ram\"\n"));
        assert_eq!((e.line, e.field.as_str()), (6, "step[1].backend"), "{e}");
        let e = err(&add.replace("size = \"1G\"", "size = \"1G\"\nbackend = \"tape\""));
        assert!(e.message.contains("unknown backend"), "{e}");
    }

    #[test]
    fn only_scenarios_that_touch_the_vmemmap_get_one_populated() {
        assert!(!parse("[[step]]\naction = \"verify-manifest\"\n[[step]]\naction = \"exit\"\n")
            .unwrap()
            .needs_vmemmap());
        assert!(parse("[[step]]\naction = \"verify\"\n").unwrap().needs_vmemmap());
        assert!(parse("[[boot-gigantic]]\nregion = \"g\"\nsize = \"1G\"\n").unwrap().needs_vmemmap());
    }

    #[test]
    fn a_bug_knob_scenario_has_a_knobs_off_control_expecting_a_pass() {
        let s = parse("bug-knobs = [\"no-tlb-flush\"]\n[expect]\noutcome = \"fail\"\ninvariant = \"write-faults\"\n")
            .unwrap();
        let control = s.knobs_off().unwrap();
        assert_eq!((control.expect, control.bug_knobs.len()), (Expect::Pass, 0));
        assert!(control.name.ends_with(KNOBS_OFF_SUFFIX));
        assert!(parse("").unwrap().knobs_off().is_none());
    }

    #[test]
    fn expectations_must_be_coherent() {
        let e = err("[expect]\noutcome = \"fail\"\n");
        assert_eq!(e.field, "expect.invariant", "{e}");
        let e = err("[expect]\noutcome = \"fail\"\ninvariant = \"made-up\"\n");
        assert!(e.message.contains("unknown invariant"), "{e}");
        let s = parse("[expect]\noutcome = \"fail\"\ninvariant = \"exit-status\"\n").unwrap();
        assert_eq!(s.expect, Expect::Fail { invariant: "exit-status".into(), also: vec![] });
        let s = parse(
            "bug-knobs = [\"no-tlb-flush\"]\n[expect]\noutcome = \"fail\"\ninvariant = \"write-faults\"\nalso = [\"contents\"]\n",
        )
        .unwrap();
        assert_eq!(s.expect, Expect::Fail { invariant: "write-faults".into(), also: vec!["contents".into()] });
        assert_eq!(s.bug_knobs, vec![Knob::NoTlbFlush]);
        let e = err("bug-knobs = [\"flip-bits\"]\n");
        assert_eq!((e.line, e.field.as_str()), (1, "bug-knobs"), "{e}");
        let e = err("[expect]\noutcome = \"fail\"\ninvariant = \"contents\"\nalso = [\"nonsense\"]\n");
        assert_eq!((e.line, e.field.as_str()), (4, "expect.also"), "{e}");
    }

    #[test]
    fn not_toml_at_all_is_located() {
        let e = err("name = \"x\"\nthis is not toml\n");
        assert_eq!(e.line, 2, "{e}");
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(Size::parse("512M"), Ok(Size(512 << 20)));
        assert_eq!(Size::parse("2MiB"), Ok(Size(2 << 20)));
        assert_eq!(Size::parse("1T"), Ok(Size(1 << 40)));
        assert_eq!(Size::parse("4096"), Ok(Size(4096)));
        assert!(Size::parse("99999999999999T").is_err());
        assert!(Size::parse("M").is_err());
        assert_eq!(Size(3 << 30).to_string(), "3G");
        assert_eq!(Size(4097).to_string(), "4097");
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        let deep = format!("bug-knobs = {}{}\n", "[".repeat(50_000), "]".repeat(50_000));
        let e = err(&deep);
        assert_eq!(e.line, 1, "{e}");
        let tables = "[a.".repeat(20_000) + "b]\n";
        let e = err(&tables);
        assert_eq!(e.line, 1, "{e}");
    }

    #[test]
    fn huge_sizes_and_counts_are_refused_with_their_field() {
        let e = err("[machine]\nboot-memory = \"99999999999999T\"\n");
        assert_eq!(e.field, "machine.boot-memory", "{e}");
        let e = err("[machine]\nmax-memory = 18446744073709551615\n");
        assert_eq!(e.field, "machine.max-memory", "{e}");
        let e = err("[[step]]\naction = \"hugetlb-alloc\"\nregion = \"a\"\nsize = \"2M\"\ncount = 99999999999\n");
        assert_eq!(e.field, "step[1].count", "{e}");
        let e = err("[[step]]\naction = \"hot-add\"\nregion = \"a\"\nsize = \"1T\"\n");
        assert!(e.message.contains("do not fit"), "{e}");
    }

    #[test]
    fn overlapping_and_unknown_things_are_refused() {
        // The same region twice, and persistent memory added twice, would overlap.
        let e = err("[[step]]\naction = \"hot-add\"\nregion = \"a\"\nsize = \"1G\"\n[[step]]\naction = \"hot-add\"\nregion = \"a\"\nsize = \"1G\"\n");
        assert!(e.message.contains("allocated twice"), "{e}");
        let e = err("[[step]]\naction = \"format-disk\"\n");
        assert_eq!(e.field, "step[1].action", "{e}");
        let e = err("[[step]]\naction = \"ping\"\ncommand = \"rm -rf /\"\n");
        assert_eq!(e.line, 3, "{e}");
        let e = err("[machine]\nqemu-args = [\"-monitor\", \"stdio\"]\n");
        assert_eq!(e.line, 2, "{e}");
    }
}
