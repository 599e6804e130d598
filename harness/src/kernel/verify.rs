//! The independent oracle for a real kernel: which HugeTLB vmemmap
//! optimization it implements, and whether its page tables keep that
//! generation's contract. Compound pages are found from the pattern of the
//! vmemmap's mappings alone (the host's walker, never the kernel's
//! structures); the kernel's own numbers (hstate pools, memmap counters) are
//! evidence to cross-check, never the verdict.
//!
//! The checks report through the project's invariant names, so a real
//! kernel's verdict reads like the firmware's. Device DAX ranges and
//! hot-added memory are judged alike: DAX compound pages are found at the
//! device's aligned pfns, hot-added memory is more RAM.

mod accounting;
mod checks;
mod dax;
mod pattern;
mod removed;

pub use dax::DaxRange;

use std::fmt::Write as _;
use std::ops::Range;

use hvo_abi::model::{Layout, STRUCT_PAGE_SIZE};

use super::agent::{HvoSysctl, KernelReport};
use crate::addr::{Pfn, VirtAddr};
use crate::invariant::Invariant;
use crate::memory::GuestMemory;
use crate::pgtable::{WalkError, Walker};
use crate::report::{Check, CheckStatus};
use crate::verify::{size_name, VmemmapMap};

use pattern::FoundCompound;

/// What HugeTLB vmemmap optimization a kernel implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Generation {
    /// None: every struct page on a private, writable frame.
    NotOptimizing,
    /// Linux up to 6.x: a folio's tail vmemmap pages map its head's frame.
    Legacy,
    /// The unified series: tails map one shared page per (zone, order).
    Unified,
}

impl Generation {
    pub fn name(self) -> &'static str {
        match self {
            Generation::NotOptimizing => "not-optimizing",
            Generation::Legacy => "legacy",
            Generation::Unified => "unified",
        }
    }

    /// What the kernel showed that makes it this generation, for failures.
    pub fn evidence(self) -> &'static str {
        match self {
            Generation::NotOptimizing => "vm.hugetlb_optimize_vmemmap is absent",
            Generation::Legacy => "vm.hugetlb_optimize_vmemmap exists, the BTF has no vmemmap_tails",
            Generation::Unified => "the BTF has vmemmap_tails",
        }
    }

    /// The layout its optimized HugeTLB folios have (None: it optimizes none).
    pub fn layout(self) -> Option<Layout> {
        match self {
            Generation::NotOptimizing => None,
            Generation::Legacy => Some(Layout::LegacyHugetlb),
            Generation::Unified => Some(Layout::Unified),
        }
    }
}

/// The generation from the kernel's own description of itself: whether the
/// optimization's sysctl exists (it does exactly where HugeTLB vmemmap
/// optimization is built) and whether its BTF has `vmemmap_tails` (the
/// unified series' per-(zone, order) shared pages; only built where the
/// optimization is). Returns the generation and why, for the verdict.
pub fn detect_generation(sysctl: &HvoSysctl, btf_has_vmemmap_tails: bool) -> (Generation, String) {
    let state = match sysctl {
        HvoSysctl::Absent => "absent",
        HvoSysctl::Off => "present (0)",
        HvoSysctl::On => "present (1)",
    };
    let tails = if btf_has_vmemmap_tails { "has" } else { "has no" };
    let (generation, because) = match (sysctl, btf_has_vmemmap_tails) {
        (HvoSysctl::Absent, false) => (Generation::NotOptimizing, "HugeTLB vmemmap optimization is not built"),
        (HvoSysctl::Absent, true) => (
            Generation::NotOptimizing,
            "without the sysctl HugeTLB vmemmap optimization is not built, whatever the BTF says",
        ),
        (_, false) => (Generation::Legacy, "the optimization is built, without the unified series' shared tails"),
        (_, true) => (Generation::Unified, "the optimization is built with per-(zone, order) shared tail pages"),
    };
    let why = format!(
        "{}: vm.hugetlb_optimize_vmemmap is {state} and the BTF {tails} vmemmap_tails, so {because}",
        generation.name()
    );
    (generation, why)
}

/// The kernel's vmemmap as the host sees it, supplied by whoever booted it.
pub struct KernelView<'a> {
    pub mem: &'a dyn GuestMemory,
    /// Rooted at the kernel's page-table root, in the format it runs.
    pub walker: Walker<'a>,
    /// The VA of pfn 0's struct page.
    pub vmemmap_start: VirtAddr,
    /// The guest's RAM, as pfn ranges in ascending order.
    pub ram: Vec<Range<Pfn>>,
    /// The base page size.
    pub page_size: u64,
    /// Linux's memory section size (`1 << SECTION_SIZE_BITS`) on this
    /// architecture: its memmap counters count a section at a time.
    pub section_size: u64,
    /// The device DAX ranges the kernel was asked to create, in any order.
    pub dax: Vec<DaxRange>,
    /// Memory removed since boot (unplugged DIMMs, DAX devices torn
    /// down): its vmemmap must be gone.
    pub removed: Vec<Range<Pfn>>,
}

impl KernelView<'_> {
    /// The struct page address of `pfn`.
    pub fn struct_page(&self, pfn: Pfn) -> u64 {
        self.vmemmap_start.0.wrapping_add(pfn.0 * STRUCT_PAGE_SIZE)
    }

    /// The vmemmap pages holding the struct pages of `pfns`, whole pages.
    fn vmemmap_of(&self, pfns: &Range<Pfn>) -> Range<VirtAddr> {
        round_out(self.struct_page(pfns.start)..self.struct_page(pfns.end), self.page_size)
    }

    fn pfns_per_section(&self) -> u64 {
        self.section_size / self.page_size
    }

    /// Whether `pfn` is in a section RAM is present in: Linux reuses such a
    /// section's memmap, populated whole at boot, for anything added there
    /// later (`section_activate` returns the early section's memmap).
    fn in_ram_section(&self, pfn: Pfn) -> bool {
        let section = pfn.0 / self.pfns_per_section();
        self.section_runs().iter().any(|run| run.contains(&section))
    }

    /// RAM's memory sections as section numbers: runs of consecutive
    /// present sections, ascending.
    fn section_runs(&self) -> Vec<Range<u64>> {
        let pfns_per_section = self.pfns_per_section();
        let mut ram: Vec<&Range<Pfn>> = self.ram.iter().filter(|r| !r.is_empty()).collect();
        ram.sort_by_key(|r| r.start);
        let mut runs: Vec<Range<u64>> = Vec::new();
        for r in ram {
            let sections = r.start.0 / pfns_per_section..(r.end.0 - 1) / pfns_per_section + 1;
            match runs.last_mut() {
                Some(last) if sections.start <= last.end => last.end = last.end.max(sections.end),
                _ => runs.push(sections),
            }
        }
        runs
    }

    /// RAM's vmemmap, rounded out to whole 2 MiB granules, ascending and
    /// merged. The kernel maps and counts its vmemmap a granule at a time,
    /// and a granule split into base pages keeps the frames past RAM's end
    /// that its leaf mapped.
    fn walked_spans(&self) -> Vec<Range<VirtAddr>> {
        granule_spans(self, self.ram.iter())
    }

    /// The vmemmap the walk reads: RAM's and every DAX namespace's, in
    /// whole granules.
    fn map_spans(&self) -> Vec<Range<VirtAddr>> {
        granule_spans(self, self.ram.iter().chain(self.dax.iter().map(|d| &d.namespace)).chain(&self.removed))
    }

    /// The vmemmap pages holding struct pages of memory the kernel has now
    /// (RAM and DAX namespaces), whole pages.
    fn live_spans(&self) -> Vec<Range<VirtAddr>> {
        self.ram.iter().chain(self.dax.iter().map(|d| &d.namespace)).map(|r| self.vmemmap_of(r)).collect()
    }
}

/// The vmemmap of `ranges` rounded out to whole granules, ascending and merged.
fn granule_spans<'r>(view: &KernelView, ranges: impl Iterator<Item = &'r Range<Pfn>>) -> Vec<Range<VirtAddr>> {
    let mut spans: Vec<Range<VirtAddr>> = ranges
        .filter(|r| !r.is_empty())
        .map(|r| round_out(view.struct_page(r.start)..view.struct_page(r.end), VMEMMAP_GRANULE))
        .collect();
    spans.sort_by_key(|s| s.start);
    let mut merged: Vec<Range<VirtAddr>> = Vec::new();
    for span in spans {
        match merged.last_mut() {
            Some(last) if span.start <= last.end => last.end = last.end.max(span.end),
            _ => merged.push(span),
        }
    }
    merged
}

/// The largest leaf the kernels here map the vmemmap with (a PMD: 2 MiB in
/// every format, 4 KiB and 64 KiB pages alike).
const VMEMMAP_GRANULE: u64 = 2 << 20;

fn round_out(va: Range<u64>, to: u64) -> Range<VirtAddr> {
    VirtAddr(va.start / to * to)..VirtAddr(va.end.div_ceil(to) * to)
}

/// Whose compound pages: HugeTLB's folios or a device DAX range's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CompoundKind {
    Hugetlb,
    Dax,
}

impl CompoundKind {
    /// The name reports use (the firmware's region costs say the same).
    pub fn name(self) -> &'static str {
        match self {
            CompoundKind::Hugetlb => "hugetlb",
            CompoundKind::Dax => "dax",
        }
    }
}

/// Compound pages of one kind, size and layout the pattern found. HugeTLB
/// regions list optimized folios only; DAX regions list every compound
/// page of the devices (`Layout::None` where not optimized).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundRegion {
    pub kind: CompoundKind,
    pub compound_bytes: u64,
    pub count: u64,
    /// `Layout::None` = not optimized.
    pub layout: Layout,
    /// Writable vmemmap only one compound page maps, per compound page
    /// (bytes, the mean over the region).
    pub private_vmemmap_bytes: u64,
    /// Frames its compound pages map that are read-only or mapped by
    /// others too (the shared tail pages).
    pub shared_tail_pages: u64,
}

/// The oracle's verdict on one kernel state.
#[derive(Clone, Debug)]
pub struct KernelVerdict {
    pub generation: Generation,
    /// One per invariant the tables decide for a kernel, in report order.
    pub checks: Vec<Check>,
    /// The compound pages found, by kind, size and layout.
    pub found: Vec<FoundRegion>,
    /// A human-readable summary of the vmemmap, for artifacts.
    pub dump: String,
}

impl KernelVerdict {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.status == CheckStatus::Pass)
    }

    /// The check of `invariant`, if the kernel verifier makes one.
    pub fn check(&self, invariant: Invariant) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == invariant.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelVerifyError {
    #[error("walking the kernel's vmemmap: {0}")]
    Walk(#[from] WalkError),
    #[error("the kernel view has no RAM to verify")]
    NoRam,
    #[error("base page size {0:#x} is not a power of two of at least 4 KiB")]
    BadPageSize(u64),
    #[error("{0}")]
    BadDaxRange(String),
}

/// The HugeTLB sizes to look for: the kernel's hstates and the two every
/// architecture here offers, largest first (a 1 GiB folio's first vmemmap
/// pages look like a 2 MiB one's).
fn compound_sizes(report: &KernelReport) -> Vec<u64> {
    let mut sizes: Vec<u64> = report.hstates.iter().map(|h| h.size.bytes()).chain([2 << 20, 1 << 30]).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    sizes.dedup();
    sizes
}

/// Holds the kernel's vmemmap to `generation`'s contract, and the kernel's
/// own account to what the tables show.
pub fn verify_kernel(
    view: &KernelView,
    report: &KernelReport,
    generation: Generation,
) -> Result<KernelVerdict, KernelVerifyError> {
    if view.page_size < 4096 || !view.page_size.is_power_of_two() {
        return Err(KernelVerifyError::BadPageSize(view.page_size));
    }
    if view.ram.iter().all(|r| r.is_empty()) {
        return Err(KernelVerifyError::NoRam);
    }
    for d in &view.dax {
        d.validate(view.page_size).map_err(KernelVerifyError::BadDaxRange)?;
    }
    let map = VmemmapMap::walk_spans(&view.walker, view.mem, &view.map_spans(), view.page_size)?;
    let sizes = compound_sizes(report);
    let compounds = pattern::find(view, &map, &sizes);
    let dax = dax::find(view, &map);
    let mut found = pattern::summarize(&map, &compounds);
    found.extend(dax::summarize(view, &map, &dax));
    let ctx = checks::Context { view, map: &map, report, generation, compounds: &compounds, dax: &dax, found: &found };
    let checks = checks::CHECKS.iter().map(|(invariant, run)| run(&ctx).into_check(*invariant)).collect();
    let dump = dump(view, &map, &found, &compounds, &dax);
    Ok(KernelVerdict { generation, checks, found, dump })
}

/// The vmemmap in words: what was walked, how it is mapped, what was found.
fn dump(
    view: &KernelView,
    map: &VmemmapMap,
    found: &[FoundRegion],
    compounds: &[FoundCompound],
    dax: &[FoundCompound],
) -> String {
    let mut out = format!("vmemmap of pfn 0 at {}, base pages of {} KiB\n", view.vmemmap_start, view.page_size >> 10);
    let ranges =
        view.ram.iter().map(|r| ("RAM".to_string(), r)).chain(view.dax.iter().map(|d| (d.describe(), &d.namespace)));
    for (what, r) in ranges {
        let span = view.vmemmap_of(r);
        let _ = writeln!(out, "{what} pfns {}..{}: struct pages {}..{}", r.start, r.end, span.start, span.end);
        let mut by_mapping: Vec<(u64, bool, u64)> = Vec::new();
        let mut unmapped = 0;
        for (_, mapping) in map.span(span.start.0, (span.end.0 - span.start.0) / view.page_size) {
            let Some((m, _)) = mapping else {
                unmapped += 1;
                continue;
            };
            match by_mapping.iter_mut().find(|(size, w, _)| *size == m.size() && *w == m.perms.write) {
                Some(entry) => entry.2 += 1,
                None => by_mapping.push((m.size(), m.perms.write, 1)),
            }
        }
        by_mapping.sort_unstable();
        for (size, writable, pages) in by_mapping {
            let how = if writable { "RW" } else { "RO" };
            let _ = writeln!(out, "  {pages} vmemmap pages in {} {how} leaves", size_name(size));
        }
        if unmapped > 0 {
            let _ = writeln!(out, "  {unmapped} vmemmap pages unmapped");
        }
    }
    let _ = writeln!(out, "{} distinct frames, {} vmemmap pages mapped", map.frames(), map.ptes());
    for f in found {
        let whose = match f.kind {
            CompoundKind::Hugetlb => "",
            CompoundKind::Dax => " DAX",
        };
        let _ = writeln!(
            out,
            "found {} x {}{whose} compound pages, {} layout",
            f.count,
            size_name(f.compound_bytes),
            f.layout.name()
        );
    }
    if let Some(first) = compounds.first() {
        let _ = writeln!(out, "first optimized compound page:{}", first.view.diagram(None));
    }
    dax::dump(&mut out, dax, view);
    out
}

#[cfg(test)]
mod dax_tests;
#[cfg(test)]
mod tests;
