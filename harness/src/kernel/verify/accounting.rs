//! accounting: the kernel's own account against the tables. Its HugeTLB
//! pool per size against the optimized folios found; its memmap counters
//! against the frames the vmemmap maps, under Linux's counting rules.
//!
//! What Linux counts, and when (mm/sparse.c, mm/sparse-vmemmap.c):
//! - at boot, `sparse_init_nid` adds to `nr_memmap_boot_pages` each present
//!   section's memmap rounded up to whole pages;
//! - at run time, `section_activate` (memory hot-add, device DAX) adds to
//!   `nr_memmap_pages` the memmap of each section it activates (a section,
//!   or the part of one the range covers), rounded up to whole pages, unless
//!   the section was present at boot (its memmap is reused). Pages on the
//!   device (altmap) count alike. Before "mm/sparse-vmemmap: Fix DAX
//!   vmemmap accounting with optimization" (Linux 7.2, backported to 7.1.y
//!   and 6.12.101) a DAX range counted that unoptimized size even where its
//!   vmemmap is optimized; since, `section_nr_vmemmap_pages` counts
//!   `VMEMMAP_RESERVE_NR` (2) pages per compound page: what it maps;
//! - HugeTLB's optimization takes the frames it frees off the counter they
//!   were counted in, and counts the head pages it allocates; the unified
//!   layout's shared tail pages are counted by neither.
//!
//! So the counters' sum is the distinct frames the vmemmap of every counted
//! section maps, but the shared tail pages, plus what the per-section
//! rounding counts again wherever a vmemmap page holds several sections'
//! memmaps unoptimized (64 KiB pages, 16 MiB sections).

use std::collections::HashSet;
use std::ops::Range;

use hvo_abi::model::{Layout, STRUCT_PAGE_SIZE};

use super::checks::Context;
use super::compound_sizes;
use super::pattern::vmemmap_pages;
use crate::addr::{Pfn, PhysAddr};
use crate::kernel::agent::{HstateSize, HvoSysctl};
use crate::verify::{size_name, Findings};

pub(super) fn accounting(ctx: &Context) -> Findings {
    let mut f = Findings::default();
    let mut words = Vec::new();
    hugetlb_pools(ctx, &mut f, &mut words);
    match (ctx.report.nr_memmap_pages, ctx.report.nr_memmap_boot_pages) {
        (Some(memmap), Some(boot)) => memmap_counters(ctx, &mut f, &mut words, memmap, boot),
        _ => words.push("no memmap counters (Linux before 6.9)".to_string()),
    }
    f.covered_as(words.join("; "));
    f
}

/// Each HugeTLB size's pool against the optimized folios of that size.
fn hugetlb_pools(ctx: &Context, f: &mut Findings, words: &mut Vec<String>) {
    let optimizing = ctx.generation.layout().is_some();
    for bytes in compound_sizes(ctx.report) {
        let kernel = ctx.report.hstate(HstateSize::from_kib(bytes >> 10)).map(|h| h.pages);
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
}

/// One section (or part of one) Linux counts the memmap of: a present RAM
/// section, or a DAX range's section activation.
struct Counted {
    pfns: Range<Pfn>,
    /// The DAX range it is of, or None for RAM.
    device: Option<usize>,
    /// Whether its vmemmap is optimized (Linux then counts what it maps,
    /// not its memmap's size rounded up).
    optimized: bool,
}

/// What the tables say Linux counts, over some of the counted sections.
#[derive(Default)]
struct Tally {
    /// Distinct frames their vmemmap maps, but the shared tail pages.
    frames: u64,
    /// What the per-section rounding counts again.
    rounding: u64,
    /// Their memmaps' size rounded up section by section: what Linux
    /// counts where nothing is optimized.
    unoptimized: u64,
}

impl Tally {
    fn total(&self) -> u64 {
        self.frames + self.rounding
    }
}

/// Every section Linux counts the memmap of: RAM's present sections whole
/// (boot, or hot-added), and each DAX namespace split at section
/// boundaries, less the sections RAM is present in.
fn counted_sections(ctx: &Context) -> Vec<Counted> {
    let view = ctx.view;
    let per = view.pfns_per_section();
    let mut out = Vec::new();
    for run in view.section_runs() {
        out.extend(run.map(|s| Counted { pfns: Pfn(s * per)..Pfn((s + 1) * per), device: None, optimized: false }));
    }
    for (index, d) in view.dax.iter().enumerate() {
        // Whether Linux optimizes a device is the device's (and the
        // kernel's) property, `vmemmap_can_optimize`: its compound pages
        // show it.
        let optimized =
            ctx.dax.iter().any(|c| c.device == Some(index) && c.layout != Layout::None && !view.in_ram_section(c.head));
        let mut pfn = d.namespace.start;
        while pfn < d.namespace.end {
            let next = Pfn(((pfn.0 / per + 1) * per).min(d.namespace.end.0));
            if !view.in_ram_section(pfn) {
                out.push(Counted { pfns: pfn..next, device: Some(index), optimized });
            }
            pfn = next;
        }
    }
    out
}

/// The tables' count over `sections`.
fn tally<'s>(ctx: &Context, sections: impl Iterator<Item = &'s Counted>, shared: &HashSet<PhysAddr>) -> Tally {
    let page = ctx.view.page_size;
    let mut frames = HashSet::new();
    let mut pages: Vec<Range<u64>> = Vec::new();
    let mut t = Tally::default();
    for s in sections {
        let span = ctx.view.vmemmap_of(&s.pfns);
        frames.extend(ctx.map.pages_in(span.start.0, span.end.0).map(|(_, _, frame)| frame));
        let bytes = (s.pfns.end.0 - s.pfns.start.0) * STRUCT_PAGE_SIZE;
        t.unoptimized += bytes.div_ceil(page);
        if !s.optimized {
            let start = ctx.view.struct_page(s.pfns.start);
            pages.push(start / page..(start + bytes).div_ceil(page));
        }
    }
    // Unoptimized sections count their memmap rounded up, once each: the
    // vmemmap pages several share are counted once per section.
    let counted: u64 = pages.iter().map(|p| p.end - p.start).sum();
    pages.sort_by_key(|p| p.start);
    let mut spanned = 0;
    let mut reach = 0;
    for p in pages {
        let start = p.start.max(reach);
        spanned += p.end.saturating_sub(start);
        reach = reach.max(p.end);
    }
    t.rounding = counted - spanned;
    t.frames = frames.iter().filter(|f| !shared.contains(f)).count() as u64;
    t
}

fn memmap_counters(ctx: &Context, f: &mut Findings, words: &mut Vec<String>, memmap: u64, boot: u64) {
    let view = ctx.view;
    let sections = counted_sections(ctx);
    let mut shared: HashSet<PhysAddr> = ctx.shared_tails().into_keys().collect();
    shared.extend(ctx.dax.iter().filter(|c| c.layout == Layout::Unified).filter_map(|c| c.shared_tail()));
    let all = tally(ctx, sections.iter(), &shared);
    let devices: Vec<(usize, Tally)> = (0..view.dax.len())
        .map(|i| (i, tally(ctx, sections.iter().filter(|s| s.device == Some(i)), &shared)))
        .collect();

    let over = match view.dax.is_empty() {
        true => "RAM",
        false => "RAM and DAX",
    };
    let uncounted = match shared.len() {
        0 => String::new(),
        n => format!(" ({n} shared tail pages not counted)"),
    };
    let counted_again = match all.rounding {
        0 => String::new(),
        n => format!(
            " + {n} Linux counts again (it rounds each {} section's {} KiB memmap up to a {} KiB page)",
            size_name(view.section_size),
            (view.section_size / view.page_size * STRUCT_PAGE_SIZE) >> 10,
            view.page_size >> 10
        ),
    };
    let shares: Vec<String> =
        devices.iter().map(|(i, t)| format!("{}: {} for {}", view.dax[*i].name, t.total(), whose(ctx, *i))).collect();
    let shares = match shares.is_empty() {
        true => String::new(),
        false => format!(" ({})", shares.join(", ")),
    };
    let tables = format!("{} distinct vmemmap frames mapped over {over}{uncounted}{counted_again}{shares}", all.frames);
    let kernel = memmap + boot;
    let expected = all.total();
    if kernel == expected {
        words.push(format!("nr_memmap_pages {memmap} + nr_memmap_boot_pages {boot} = {tables}"));
        return;
    }
    let lead = format!(
        "nr_memmap_pages {memmap} + nr_memmap_boot_pages {boot} = {kernel}, where the page tables make it {expected}"
    );
    // Linux before the fix counts each DAX range at its memmap's size,
    // optimized or not: recognise that, and say which range it is.
    let excess: Vec<(usize, &Tally, u64)> = devices
        .iter()
        .map(|(i, t)| (*i, t, t.unoptimized.saturating_sub(t.total())))
        .filter(|(_, _, extra)| *extra > 0)
        .collect();
    let extra: u64 = excess.iter().map(|(_, _, e)| e).sum();
    if extra > 0 && kernel == expected + extra {
        let each: Vec<String> = excess
            .iter()
            .map(|(i, t, _)| {
                format!(
                    "nr_memmap_pages counts {} for {}, whose vmemmap maps {} frames",
                    t.unoptimized,
                    whose(ctx, *i),
                    t.total()
                )
            })
            .collect();
        f.fail(format!(
            "{lead}: {} (DAX counted at its unoptimized size, as Linux did before \"mm/sparse-vmemmap: Fix DAX vmemmap accounting with optimization\")",
            each.join("; ")
        ));
    } else {
        f.fail(format!("{lead}: {tables}"));
    }
}

/// "dax0.0's 2G of 2M compound pages": a DAX range as the counters see it.
fn whose(ctx: &Context, index: usize) -> String {
    let d = &ctx.view.dax[index];
    let bytes = (d.namespace.end.0 - d.namespace.start.0) * ctx.view.page_size;
    format!("{}'s {} of {} compound pages", d.name, size_name(bytes), size_name(d.compound_bytes))
}
