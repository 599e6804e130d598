//! The contract of each generation, one function per invariant over the
//! compound pages the pattern found and the walked vmemmap. HugeTLB's
//! folios are held to the generation's layout; device DAX compound pages
//! to their own (the dax module), with the same invariants.

use std::collections::BTreeMap;

use hvo_abi::model::Layout;

use super::pattern::{describe, unified_tails_on, FoundCompound};
use super::{accounting, compound_sizes, dax, FoundRegion, Generation, KernelView};
use crate::addr::PhysAddr;
use crate::invariant::Invariant;
use crate::kernel::agent::KernelReport;
use crate::verify::{size_name, Findings, VmemmapMap};

/// Everything the checks read.
pub struct Context<'a> {
    pub view: &'a KernelView<'a>,
    pub map: &'a VmemmapMap,
    pub report: &'a KernelReport,
    pub generation: Generation,
    /// HugeTLB's optimized folios.
    pub compounds: &'a [FoundCompound],
    /// Every DAX range's compound pages, optimized or not.
    pub dax: &'a [FoundCompound],
    pub found: &'a [FoundRegion],
}

impl Context<'_> {
    /// "64 x 2M + 1 x 1G compound pages, legacy-hugetlb layout": the
    /// HugeTLB folios found.
    fn covered(&self) -> String {
        let layouts: Vec<&str> = self
            .found
            .iter()
            .filter(|r| r.kind == super::CompoundKind::Hugetlb)
            .map(|r| r.layout.name())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        match layouts.is_empty() {
            true => describe(self.found),
            false => format!("{}, {} layout", describe(self.found), layouts.join(" and ")),
        }
    }

    /// What a check covered over HugeTLB's folios (`hugetlb`), and then
    /// each DAX range's compound pages by layout.
    fn with_dax(&self, hugetlb: String) -> String {
        match self.view.dax.is_empty() {
            true => hugetlb,
            false => format!("{hugetlb}; DAX {}", dax::covered(self)),
        }
    }

    /// Every compound page found, HugeTLB's and DAX's.
    fn every_compound(&self) -> impl Iterator<Item = &FoundCompound> {
        self.compounds.iter().chain(self.dax)
    }

    /// HugeTLB's unified shared tail pages: frame -> compound sizes using it.
    pub(super) fn shared_tails(&self) -> BTreeMap<PhysAddr, Vec<u64>> {
        let mut shared: BTreeMap<PhysAddr, Vec<u64>> = BTreeMap::new();
        for c in self.compounds.iter().filter(|c| c.layout == Layout::Unified) {
            if let Some(frame) = c.shared_tail() {
                let sizes = shared.entry(frame).or_default();
                if !sizes.contains(&c.bytes) {
                    sizes.push(c.bytes);
                }
            }
        }
        shared
    }
}

type CheckFn = fn(&Context) -> Findings;

/// The invariants the tables decide for a real kernel, in report order.
pub const CHECKS: [(Invariant, CheckFn); 8] = [
    (Invariant::HeadPrivate, head_private),
    (Invariant::TailsShared, tails_shared),
    (Invariant::TailsReadonly, tails_readonly),
    (Invariant::PteGranularity, pte_granularity),
    (Invariant::Accounting, accounting::accounting),
    (Invariant::MemmapPresent, memmap_present),
    (Invariant::AltmapUnoptimized, dax::altmap_unoptimized),
    (Invariant::NoLeak, super::removed::no_leak),
];

pub(super) fn rw(writable: bool) -> &'static str {
    if writable {
        "RW"
    } else {
        "RO"
    }
}

/// Each head vmemmap page maps, writable, a frame no vmemmap page outside
/// its own compound page maps.
fn head_private(ctx: &Context) -> Findings {
    let mut f = Findings::default();
    for c in ctx.every_compound() {
        let own = c.view.pages.iter().filter(|(_, m)| m.is_some_and(|(_, frame)| frame == c.head_frame)).count() as u64;
        let mappers = ctx.map.mappers(c.head_frame);
        if !c.head_mapping.perms.write || mappers != own {
            let what = format!(
                "{}: head maps {} {}, expected a private writable frame; {mappers} vmemmap pages map it, {own} of them this compound page's",
                c.at(0),
                c.head_frame,
                rw(c.head_mapping.perms.write),
            );
            f.fail_in(&c.view, None, what);
        }
    }
    f.covered_as(ctx.with_dax(format!("{}: every head on a private writable frame", ctx.covered())));
    f
}

/// Tails map what the generation's layout says; a kernel that does not
/// optimize HugeTLB shows no optimized vmemmap page over RAM. DAX ranges
/// are held to their own layouts (whether a kernel optimizes DAX does not
/// follow from HugeTLB: arm64 builds neither, ppc64's radix only DAX's).
fn tails_shared(ctx: &Context) -> Findings {
    let mut f = Findings::default();
    dax::tails_shared(ctx, &mut f);
    let Some(expected) = ctx.generation.layout() else {
        for c in ctx.compounds {
            let what = format!(
                "the kernel does not optimize ({}), yet the {} shows the {} layout",
                ctx.generation.evidence(),
                c.at(0),
                c.layout.name()
            );
            f.fail_in(&c.view, c.shared_tail(), what);
        }
        stray_pages(ctx, &mut f, "the kernel does not optimize, yet");
        let words = format!("nothing optimized: {} vmemmap pages, each private and writable", ctx.map.ptes());
        f.covered_as(ctx.with_dax(words));
        return f;
    };
    for c in ctx.compounds {
        if c.layout != expected {
            let what = format!(
                "{}: the kernel is {} ({}), yet this compound page shows the {} layout",
                c.at(1),
                ctx.generation.name(),
                ctx.generation.evidence(),
                c.layout.name()
            );
            f.fail_in(&c.view, c.shared_tail(), what);
            continue;
        }
        let (want, whose) = match expected {
            Layout::LegacyHugetlb => (Some(c.head_frame), "the head's frame"),
            _ => (c.shared_tail(), "the shared tail page vmemmap[1] maps"),
        };
        for (i, _, frame) in c.tails() {
            if Some(frame) != want {
                let expected = want.map(|w| w.to_string()).unwrap_or_default();
                let what = format!("{}: maps {frame}, expected {whose} {expected}", c.at(i));
                f.fail_in(&c.view, c.shared_tail(), what);
            }
        }
    }
    if expected == Layout::Unified {
        unified_shared_pages(ctx, &mut f);
    }
    stray_pages(ctx, &mut f, "outside every compound page,");
    let words = match expected {
        Layout::Unified => format!("{} on {} shared tail pages", ctx.covered(), ctx.shared_tails().len()),
        _ => format!("{}, tails on their head's frame", ctx.covered()),
    };
    f.covered_as(ctx.with_dax(words));
    f
}

/// The unified layout's shared pages: one per (zone, order), so never one
/// for two sizes, at most one per zone for a size, mapped only by tails.
fn unified_shared_pages(ctx: &Context, f: &mut Findings) {
    /// DMA, DMA32, Normal, Movable: the most zones a size's pages can be in.
    const ZONES_AT_MOST: usize = 4;
    let shared = ctx.shared_tails();
    for (frame, sizes) in &shared {
        if sizes.len() > 1 {
            let names: Vec<String> = sizes.iter().map(|s| size_name(*s)).collect();
            f.fail(format!(
                "shared tail page {frame} serves {} compound pages alike: one page per (zone, order)",
                names.join(" and ")
            ));
        }
        let tails = unified_tails_on(ctx.compounds, *frame);
        let mappers = ctx.map.mappers(*frame);
        if mappers != tails {
            f.fail(format!(
                "shared tail page {frame} is mapped by {mappers} vmemmap pages, {tails} of them compound pages' tails"
            ));
        }
    }
    for bytes in compound_sizes(ctx.report) {
        let pages = shared.values().filter(|sizes| sizes.contains(&bytes)).count();
        if pages > ZONES_AT_MOST {
            f.fail(format!(
                "{} compound pages use {pages} shared tail pages: one per (zone, order) allows at most {ZONES_AT_MOST}",
                size_name(bytes)
            ));
        }
    }
}

/// Vmemmap pages over RAM that look optimized (read-only, or on a frame
/// another vmemmap page maps) but belong to no compound page found.
fn stray_pages(ctx: &Context, f: &mut Findings, lead: &str) {
    let page = ctx.view.page_size;
    let inside = |va: u64| {
        ctx.every_compound().any(|c| {
            let start = c.view.pages[0].0;
            va >= start && va < start + c.view.pages.len() as u64 * page
        })
    };
    for span in ctx.view.walked_spans() {
        for (va, mapping) in ctx.map.span(span.start.0, (span.end.0 - span.start.0) / page) {
            let Some((m, frame)) = mapping else { continue };
            let mappers = ctx.map.mappers(frame);
            if (m.perms.write && mappers == 1) || inside(va) {
                continue;
            }
            f.fail(format!(
                "{lead} vmemmap page {va:#x} maps {frame} {}, shared by {mappers} vmemmap pages",
                rw(m.perms.write)
            ));
        }
    }
}

/// Tails of the layouts that share them read-only are read-only, and a
/// shared tail page is writable through no vmemmap page. Legacy DAX keeps
/// its tails writable; compound pages not optimized have no tails to share.
fn tails_readonly(ctx: &Context) -> Findings {
    let mut f = Findings::default();
    for c in ctx.every_compound().filter(|c| matches!(c.layout, Layout::Unified | Layout::LegacyHugetlb)) {
        for (i, m, frame) in c.tails() {
            let writable_elsewhere =
                c.layout == Layout::Unified && ctx.map.frame_use(frame).is_some_and(|u| u.writable);
            if m.perms.write || writable_elsewhere {
                let how = if m.perms.write {
                    "writable through the page tables"
                } else {
                    "on a frame another vmemmap page maps writable"
                };
                f.fail_in(&c.view, c.shared_tail(), format!("{}: tail {frame} is {how}", c.at(i)));
            }
        }
    }
    f.covered_as(ctx.with_dax(format!("{}: every tail read-only", ctx.covered())));
    f
}

/// Optimized compound pages are mapped by base-page entries only.
fn pte_granularity(ctx: &Context) -> Findings {
    let mut f = Findings::default();
    for c in ctx.every_compound().filter(|c| c.layout != Layout::None) {
        for (i, (_, m)) in c.view.pages.iter().enumerate() {
            if let Some((m, _)) = m.filter(|(m, _)| m.size() != ctx.view.page_size) {
                let what = format!("{}: mapped by a {} leaf, not a base page", c.at(i), size_name(m.size()));
                f.fail_in(&c.view, None, what);
            }
        }
    }
    f.covered_as(ctx.with_dax(format!("{}: base-page entries only", ctx.covered())));
    f
}

/// Every RAM pfn's struct page is mapped, and every DAX range's data pfn's.
fn memmap_present(ctx: &Context) -> Findings {
    let mut f = Findings::default();
    let page = ctx.view.page_size;
    let mut pages = 0;
    let ranges = ctx.view.ram.iter().map(|r| ("RAM".to_string(), r));
    let ranges = ranges.chain(ctx.view.dax.iter().map(|d| (d.name.clone(), &d.data)));
    for (what, ram) in ranges {
        let span = ctx.view.vmemmap_of(ram);
        let mut hole: Option<(u64, u64)> = None;
        let report = |f: &mut Findings, (first, last): (u64, u64)| {
            f.fail(format!(
                "{what} pfns {}..{}: vmemmap pages {first:#x}..{:#x} unmapped",
                ram.start,
                ram.end,
                last + page
            ))
        };
        for (va, mapping) in ctx.map.span(span.start.0, (span.end.0 - span.start.0) / page) {
            pages += 1;
            hole = match (mapping, hole) {
                (None, Some((first, _))) => Some((first, va)),
                (None, None) => Some((va, va)),
                (Some(_), Some(h)) => {
                    report(&mut f, h);
                    None
                }
                (Some(_), None) => None,
            };
        }
        if let Some(h) = hole {
            report(&mut f, h);
        }
    }
    let pfns: u64 = ctx.view.ram.iter().map(|r| r.end.0 - r.start.0).sum();
    let dax: u64 = ctx.view.dax.iter().map(|d| d.data.end.0 - d.data.start.0).sum();
    let dax = match dax {
        0 => String::new(),
        n => format!(" and {n} DAX pfns"),
    };
    f.covered_as(format!("{pages} vmemmap pages over {pfns} RAM pfns{dax}"));
    f
}
