//! The `[machine]` section: boot memory, persistent memory set aside at boot,
//! hotplug slots and maximum memory, checked against the architectures and
//! the steps that hotplug.
//!
//! A default never causes a refusal about a field the file does not write:
//! `slots` defaults to at least the hot-adds the steps make (none when
//! `max-memory` equals boot memory), and `max-memory` to at least 1G above
//! boot memory. Hot-adds beyond the maximum are refused at their own `size`.

use std::ops::Range;

use hvo_images::{profile, Arch};
use toml::Spanned;

use super::locate::Locator;
use super::raw::{RawMachine, Size};
use super::{DaxDevice, PlacedStep, ScenarioError, Step, MIB};
use crate::qemu::MachineSpec;

const DEFAULT_BOOT_MEMORY: u64 = 512 * MIB;
const DEFAULT_SLOTS: u32 = 4;
/// Maximum memory when hotplug is on and the file names none, unless boot
/// memory needs more.
const DEFAULT_MAX_MEMORY: u64 = 8 << 30;
/// Room a default maximum leaves above boot memory at least: one DIMM of the
/// largest compound page.
const MIN_HOTPLUG_ROOM: u64 = 1 << 30;
/// QEMU's limit on memory slots (ACPI_MAX_RAM_SLOTS).
const MAX_SLOTS: u32 = 256;
/// The guest's boot allocations (page tables, images) need at least this.
pub(super) const MIN_BOOT_MEMORY: u64 = 64 * MIB;
/// Beyond every machine's physical address width we model.
const MAX_MEMORY_LIMIT: u64 = 1 << 46;

/// A machine size as written (value and span) or its default (no span).
fn written<T: Copy>(value: &Option<Spanned<T>>) -> Option<(T, Range<usize>)> {
    value.as_ref().map(|v| (*v.get_ref(), v.span()))
}

/// The machine, and the bytes of boot memory set aside as persistent memory.
pub(super) fn machine(
    loc: &Locator,
    raw: &RawMachine,
    arches: &[Arch],
    steps: &[PlacedStep],
) -> Result<(MachineSpec, u64), ScenarioError> {
    let boot_memory = boot_memory(loc, raw, arches)?;
    let boot_pmem = boot_pmem(loc, raw, boot_memory)?;
    check_pmem_adds(loc, steps, boot_pmem)?;
    let hot_adds = hot_adds(loc, arches, steps)?;
    let nvdimm = check_nvdimms(loc, arches, steps)?;
    let plugged: u64 = hot_adds.iter().map(|(_, size)| size).sum();
    let max_written = written(&raw.max_memory).map(|(s, span)| (s.0, span));
    let slots = match written(&raw.slots) {
        Some((s, span)) if s > MAX_SLOTS => {
            return Err(loc.error(span, Some("machine.slots"), format!("{s} slots is more than QEMU's {MAX_SLOTS}")))
        }
        Some((s, _)) => s,
        // Maximum memory equal to boot memory says: no hotplug.
        None if max_written.as_ref().is_some_and(|(m, _)| *m == boot_memory) => 0,
        None => DEFAULT_SLOTS.max(u32::try_from(hot_adds.len()).unwrap_or(u32::MAX).min(MAX_SLOTS)),
    };
    let (max_memory, max_span) = max_written.unwrap_or_else(|| {
        let room = boot_memory.saturating_add(MIN_HOTPLUG_ROOM);
        let default = if slots == 0 { boot_memory } else { DEFAULT_MAX_MEMORY.max(room).min(MAX_MEMORY_LIMIT) };
        (default, 0..0)
    });
    check_max_memory(loc, max_memory, max_span, boot_memory, slots)?;
    if hot_adds.len() > slots as usize || boot_memory + plugged > max_memory {
        return Err(loc.at_line(
            hot_adds.last().map_or(0, |(l, _)| *l),
            "size",
            format!(
                "{} hot-adds of {} in all do not fit {slots} slots and max-memory {}",
                hot_adds.len(),
                Size(plugged),
                Size(max_memory)
            ),
        ));
    }
    Ok((MachineSpec { boot_memory, slots, max_memory, nvdimm, boot_nvdimm: None }, boot_pmem))
}

/// Whether a real kernel boots with HugeTLB vmemmap optimization on. Off,
/// the agent's run-time allocations would turn it on again (it sets the
/// sysctl first), so a scenario that boots with it off allocates none.
pub(super) fn hugetlb_free_vmemmap(
    loc: &Locator,
    raw: &RawMachine,
    steps: &[PlacedStep],
) -> Result<bool, ScenarioError> {
    match &raw.hugetlb_free_vmemmap {
        Some(on) if !*on.get_ref() => match steps.iter().find(|p| matches!(p.step, Step::HugetlbAlloc { .. })) {
            Some(alloc) => Err(loc.at_line(
                alloc.line,
                "action",
                "hugetlb-alloc turns the optimization on: a scenario booting with \
                 machine.hugetlb-free-vmemmap = false allocates no pages at run time",
            )),
            None => Ok(false),
        },
        _ => Ok(true),
    }
}

fn boot_memory(loc: &Locator, raw: &RawMachine, arches: &[Arch]) -> Result<u64, ScenarioError> {
    let Some((Size(boot_memory), span)) = written(&raw.boot_memory) else {
        return Ok(DEFAULT_BOOT_MEMORY);
    };
    let refuse = |message: String| Err(loc.error(span.clone(), Some("machine.boot-memory"), message));
    if boot_memory < MIN_BOOT_MEMORY {
        return refuse(format!("{} is less than the {} the guest needs", Size(boot_memory), Size(MIN_BOOT_MEMORY)));
    }
    if boot_memory >= MAX_MEMORY_LIMIT {
        return refuse(format!("{} is beyond every machine's physical address space", Size(boot_memory)));
    }
    for &arch in arches {
        let granule = profile(arch).ram_granule;
        if !boot_memory.is_multiple_of(granule) {
            return refuse(format!("{} is not a multiple of {} as {arch} requires", Size(boot_memory), Size(granule)));
        }
    }
    Ok(boot_memory)
}

fn check_max_memory(
    loc: &Locator,
    max_memory: u64,
    span: Range<usize>,
    boot_memory: u64,
    slots: u32,
) -> Result<(), ScenarioError> {
    let refuse = |message: String| Err(loc.error(span.clone(), Some("machine.max-memory"), message));
    if max_memory > MAX_MEMORY_LIMIT {
        return refuse(format!("{} is beyond every machine's physical address space", Size(max_memory)));
    }
    if max_memory < boot_memory || (slots > 0 && max_memory == boot_memory) {
        return refuse(format!(
            "{} must exceed boot memory ({}) when there are hotplug slots",
            Size(max_memory),
            Size(boot_memory)
        ));
    }
    if slots == 0 && max_memory != boot_memory {
        return refuse("without hotplug slots there can be no memory beyond boot memory".into());
    }
    if !max_memory.is_multiple_of(MIB) {
        return refuse("must be a whole number of MiB".into());
    }
    Ok(())
}

fn boot_pmem(loc: &Locator, raw: &RawMachine, boot_memory: u64) -> Result<u64, ScenarioError> {
    let Some(p) = &raw.boot_pmem else { return Ok(0) };
    let bytes = p.get_ref().0;
    let refuse = |message: String| Err(loc.error(p.span(), Some("machine.boot-pmem"), message));
    if bytes == 0 || !bytes.is_multiple_of(2 * MIB) {
        return refuse(format!("{} is not a whole number of 2M subsections", p.get_ref()));
    }
    if bytes.saturating_add(MIN_BOOT_MEMORY) > boot_memory {
        return refuse(format!(
            "{} leaves less than the {} of RAM the guest needs out of boot memory {}",
            p.get_ref(),
            Size(MIN_BOOT_MEMORY),
            Size(boot_memory)
        ));
    }
    Ok(bytes)
}

/// The persistent memory set aside at boot is added once, whole, and only
/// when there is some.
fn check_pmem_adds(loc: &Locator, steps: &[PlacedStep], boot_pmem: u64) -> Result<(), ScenarioError> {
    let pmem_adds: Vec<&PlacedStep> =
        steps.iter().filter(|p| matches!(p.step, Step::HotAdd { device: DaxDevice::Pmem, .. })).collect();
    if let Some(p) = pmem_adds.get(usize::from(boot_pmem > 0)) {
        let message = if boot_pmem == 0 {
            "no persistent memory is set aside: set `machine.boot-pmem`"
        } else {
            "the persistent memory set aside at boot is one range: add it once"
        };
        return Err(loc.at_line(p.line, "device", message));
    }
    match pmem_adds.iter().find_map(|p| match p.step {
        Step::HotAdd { size, .. } if size != boot_pmem => Some((p.line, size)),
        _ => None,
    }) {
        Some((line, size)) => Err(loc.at_line(
            line,
            "size",
            format!("{} is not the {} of `machine.boot-pmem`", Size(size), Size(boot_pmem)),
        )),
        None => Ok(()),
    }
}

/// The line and size of every step that hotplugs memory, each a multiple of
/// every listed architecture's DIMM granule.
fn hot_adds(loc: &Locator, arches: &[Arch], steps: &[PlacedStep]) -> Result<Vec<(usize, u64)>, ScenarioError> {
    let hot_adds: Vec<(usize, u64)> = steps
        .iter()
        .filter_map(|p| match p.step {
            Step::HotAdd { device: DaxDevice::Pmem, .. } => None,
            Step::HotAdd { size, .. } | Step::HotAddMemory { size, .. } => Some((p.line, size)),
            _ => None,
        })
        .collect();
    let granule = arches.iter().map(|a| profile(*a).dimm_granule).max().unwrap_or(1);
    match hot_adds.iter().find(|(_, size)| !size.is_multiple_of(granule)) {
        Some((line, size)) => Err(loc.at_line(
            *line,
            "size",
            format!(
                "{} is not a multiple of {} as a listed architecture's hotplug requires",
                Size(*size),
                Size(granule)
            ),
        )),
        None => Ok(hot_adds),
    }
}

/// Whether the scenario hotplugs nvdimms: only where every listed machine
/// can, and never to unplug them.
fn check_nvdimms(loc: &Locator, arches: &[Arch], steps: &[PlacedStep]) -> Result<bool, ScenarioError> {
    let nvdimms: Vec<(usize, &str)> = steps
        .iter()
        .filter_map(|p| match &p.step {
            Step::HotAdd { device: DaxDevice::Nvdimm, region, .. } => Some((p.line, region.as_str())),
            _ => None,
        })
        .collect();
    let Some((first_line, _)) = nvdimms.first() else { return Ok(false) };
    if let Some(arch) = arches.iter().find(|a| !profile(**a).nvdimm_hotplug) {
        return Err(loc.at_line(
            *first_line,
            "device",
            format!("{arch} cannot hotplug an nvdimm: list only x86_64 and aarch64 in `architectures`"),
        ));
    }
    let removed = steps
        .iter()
        .find(|p| matches!(&p.step, Step::HotRemove { region } if nvdimms.iter().any(|(_, r)| r == region)));
    match removed {
        Some(p) => Err(loc.at_line(p.line, "region", "QEMU cannot unplug an nvdimm")),
        None => Ok(true),
    }
}
