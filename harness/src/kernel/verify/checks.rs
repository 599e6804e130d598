//! The contract of each generation, one function per invariant over the
//! compound pages the pattern found and the walked vmemmap.

use std::collections::{BTreeMap, HashSet};

use hvo_abi::model::Layout;

use super::pattern::{describe, vmemmap_pages, FoundCompound};
use super::{compound_sizes, FoundRegion, Generation, KernelView};
use crate::addr::PhysAddr;
use crate::invariant::Invariant;
use crate::kernel::agent::{HvoSysctl, KernelReport};
use crate::verify::{size_name, Findings, VmemmapMap};

/// Everything the checks read.
pub struct Context<'a> {
    pub view: &'a KernelView<'a>,
    pub map: &'a VmemmapMap,
    pub report: &'a KernelReport,
    pub generation: Generation,
    pub compounds: &'a [FoundCompound],
    pub found: &'a [FoundRegion],
}

impl Context<'_> {
    /// "64 x 2M + 1 x 1G compound pages, legacy-hugetlb layout".
    fn covered(&self) -> String {
        let layouts: Vec<&str> =
            self.found.iter().map(|r| r.layout.name()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        match layouts.is_empty() {
            true => describe(self.found),
            false => format!("{}, {} layout", describe(self.found), layouts.join(" and ")),
        }
    }

    /// The unified layout's shared tail pages: frame -> compound sizes using it.
    fn shared_tails(&self) -> BTreeMap<PhysAddr, Vec<u64>> {
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
pub const CHECKS: [(Invariant, CheckFn); 6] = [
    (Invariant::HeadPrivate, head_private),
    (Invariant::TailsShared, tails_shared),
    (Invariant::TailsReadonly, tails_readonly),
    (Invariant::PteGranularity, pte_granularity),
    (Invariant::Accounting, accounting),
    (Invariant::MemmapPresent, memmap_present),
];

fn rw(writable: bool) -> &'static str {
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
    for c in ctx.compounds {
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
    f.covered_as(format!("{}: every head on a private writable frame", ctx.covered()));
    f
}

/// Tails map what the generation's layout says; a kernel that does not
/// optimize shows no optimized vmemmap page at all.
fn tails_shared(ctx: &Context) -> Findings {
    let mut f = Findings::default();
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
        f.covered_as(format!("nothing optimized: {} vmemmap pages, each private and writable", ctx.map.ptes()));
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
    f.covered_as(words);
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
        let tails: u64 = ctx
            .compounds
            .iter()
            .filter(|c| c.layout == Layout::Unified)
            .map(|c| c.tails().filter(|(_, _, t)| t == frame).count() as u64)
            .sum();
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
        ctx.compounds.iter().any(|c| {
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

/// Tails of the layouts that share them are read-only, and a shared tail
/// page is writable through no vmemmap page.
fn tails_readonly(ctx: &Context) -> Findings {
    let mut f = Findings::default();
    for c in ctx.compounds.iter().filter(|c| c.layout != Layout::LegacyDax) {
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
    f.covered_as(format!("{}: every tail read-only", ctx.covered()));
    f
}

/// Optimized compound pages are mapped by base-page entries only.
fn pte_granularity(ctx: &Context) -> Findings {
    let mut f = Findings::default();
    for c in ctx.compounds {
        for (i, (_, m)) in c.view.pages.iter().enumerate() {
            if let Some((m, _)) = m.filter(|(m, _)| m.size() != ctx.view.page_size) {
                let what = format!("{}: mapped by a {} leaf, not a base page", c.at(i), size_name(m.size()));
                f.fail_in(&c.view, None, what);
            }
        }
    }
    f.covered_as(format!("{}: base-page entries only", ctx.covered()));
    f
}

/// The kernel's account agrees with the tables: its HugeTLB pool per size
/// with the optimized compound pages found, its memmap counters with the
/// frames the vmemmap maps.
fn accounting(ctx: &Context) -> Findings {
    let mut f = Findings::default();
    let mut words = Vec::new();
    let optimizing = ctx.generation.layout().is_some();
    for bytes in compound_sizes(ctx.report) {
        let kernel = ctx.report.hstate(crate::kernel::agent::HstateSize::from_kib(bytes >> 10)).map(|h| h.pages);
        let found = ctx.compounds.iter().filter(|c| c.bytes == bytes).count() as u64;
        let name = size_name(bytes);
        if vmemmap_pages(bytes, ctx.view.page_size) < 2 {
            if kernel.is_some_and(|k| k > 0) {
                words.push(format!("{name}: not optimizable with {} KiB pages", ctx.view.page_size >> 10));
            }
            continue;
        }
        let kernel = kernel.unwrap_or(0);
        // With the sysctl off, pages allocated since stay unoptimized.
        let agrees = match (optimizing, ctx.report.hvo_sysctl) {
            (false, _) => true,
            (true, HvoSysctl::Off) => found <= kernel,
            (true, _) => found == kernel,
        };
        if !agrees {
            f.fail(format!(
                "{name}: the kernel's pool holds {kernel} HugeTLB pages, the page tables show {found} optimized compound pages"
            ));
        } else if optimizing && (kernel > 0 || found > 0) {
            words.push(format!("{name}: {found} optimized = the kernel's {kernel}"));
        }
    }
    match (ctx.report.nr_memmap_pages, ctx.report.nr_memmap_boot_pages) {
        (Some(memmap), Some(boot)) => {
            let shared_tails = ctx.shared_tails();
            let shared = shared_tails.len() as u64;
            let frames = counted_frames(ctx, &shared_tails);
            let overcount = ctx.view.boot_memmap_overcount();
            let uncounted = match shared {
                0 => String::new(),
                n => format!(" ({n} shared tail pages not counted)"),
            };
            let counted_again = match overcount {
                0 => String::new(),
                n => format!(
                    " + {n} Linux counts again (it rounds each {} section's {} KiB memmap up to a {} KiB page)",
                    size_name(ctx.view.section_size),
                    (ctx.view.section_size / ctx.view.page_size * hvo_abi::model::STRUCT_PAGE_SIZE) >> 10,
                    ctx.view.page_size >> 10
                ),
            };
            let tables = format!("{frames} distinct vmemmap frames mapped over RAM{uncounted}{counted_again}");
            if memmap + boot != frames + overcount {
                f.fail(format!(
                    "nr_memmap_pages {memmap} + nr_memmap_boot_pages {boot} = {}, where the page tables make it {}: {tables}",
                    memmap + boot,
                    frames + overcount
                ));
            } else {
                words.push(format!("nr_memmap_pages {memmap} + nr_memmap_boot_pages {boot} = {tables}"));
            }
        }
        _ => words.push("no memmap counters (Linux before 6.9)".to_string()),
    }
    f.covered_as(words.join("; "));
    f
}

/// The distinct frames the vmemmap of RAM's present sections maps, but
/// the shared tail pages (which no memmap counter counts).
fn counted_frames(ctx: &Context, shared_tails: &BTreeMap<PhysAddr, Vec<u64>>) -> u64 {
    let mut frames = HashSet::new();
    for span in ctx.view.counted_spans() {
        frames.extend(ctx.map.pages_in(span.start.0, span.end.0).map(|(_, _, frame)| frame));
    }
    frames.iter().filter(|f| !shared_tails.contains_key(f)).count() as u64
}

/// Every RAM pfn's struct page is mapped.
fn memmap_present(ctx: &Context) -> Findings {
    let mut f = Findings::default();
    let page = ctx.view.page_size;
    let mut pages = 0;
    for ram in &ctx.view.ram {
        let span = ctx.view.vmemmap_of(ram);
        let mut hole: Option<(u64, u64)> = None;
        let report = |f: &mut Findings, (first, last): (u64, u64)| {
            f.fail(format!(
                "RAM pfns {}..{}: vmemmap pages {first:#x}..{:#x} unmapped",
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
    f.covered_as(format!("{pages} vmemmap pages over {pfns} RAM pfns"));
    f
}
