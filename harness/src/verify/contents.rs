//! contents: head, tail and shared struct pages, device pageblocks'
//! migratetypes, and (sampled) the struct pages of plain boot RAM hold what
//! the model says.

use hvo_abi::model::{pageblock_pages, Layout, RegionKind, StructPage, MIGRATE_MOVABLE, STRUCT_PAGE_SIZE};

use super::compound::{read_page, Compound};
use super::findings::Findings;
use super::pfns::{pfn_of_struct_page, PfnRange};
use super::{Context, VerifyError};
use crate::addr::{Pfn, PhysAddr, VirtAddr};
use crate::memory::GuestMemory;

pub(super) fn contents(ctx: &Context, f: &mut Findings) -> Result<(), VerifyError> {
    for c in ctx.compounds() {
        let Some((_, head_frame)) = c.head() else { continue };
        head_page(ctx.mem, f, c, head_frame);
        if !c.optimized {
            tails_in_pages(ctx.mem, f, c, |_| true);
        } else {
            // Tails left in a neighbour's leaf are written there, one by one.
            tails_in_pages(ctx.mem, f, c, |i| c.borrowed(i));
            if let (Layout::Unified, Some(page)) = (c.region.layout, c.shared) {
                shared_page(ctx.mem, f, c, page);
            }
        }
    }
    pageblocks(ctx, f);
    super::plain::plain_boot_ram(ctx, f);
    free_memory(ctx, f);
    Ok(())
}

/// The head vmemmap page: the head struct page, then its tails.
fn head_page(mem: &dyn GuestMemory, f: &mut Findings, c: &Compound, head_frame: PhysAddr) {
    let region = c.region;
    f.cover(1);
    match read_page(mem, head_frame, c.view.page) {
        None => f.fail(format!("{}: head page {head_frame} unreadable", c.at(0))),
        Some(page) => {
            let pages = c.view.own(&page);
            let expect_tail = StructPage::tail(region.zone, region.order);
            if pages.first() != Some(&StructPage::head(region.zone, region.order)) {
                f.fail(format!("{}: head struct page is {:?}", c.at(0), pages.first()));
            } else if let Some(k) = pages[1..].iter().position(|p| *p != expect_tail) {
                f.fail(format!(
                    "{}: struct page {} of the head page is {:?}, expected a tail",
                    c.at(0),
                    k + 1,
                    pages[k + 1]
                ));
            }
        }
    }
}

/// Every tail struct page past its head vmemmap page in the vmemmap pages
/// `which` picks (all of an unoptimized compound page's): each is this zone
/// and order's tail, not poison nor anything else.
fn tails_in_pages(mem: &dyn GuestMemory, f: &mut Findings, c: &Compound, which: impl Fn(usize) -> bool) {
    let (region, view) = (c.region, &c.view);
    let expect_tail = StructPage::tail(region.zone, region.order);
    let per_page = view.page / STRUCT_PAGE_SIZE;
    let mut wrong = 0u64;
    let mut first = None;
    for (i, (_, m)) in view.pages.iter().enumerate().skip(1).filter(|(i, _)| which(*i)) {
        let Some((_, frame)) = m else { continue };
        f.cover(1);
        match read_page(mem, *frame, view.page) {
            None => {
                f.fail(format!(
                    "region {} compound page at pfn {}, vmemmap[{i}]: {frame} unreadable",
                    region.id, view.head_pfn
                ));
                return;
            }
            Some(pages) => {
                for (k, p) in pages.iter().enumerate().filter(|(_, p)| **p != expect_tail) {
                    wrong += 1;
                    first.get_or_insert((i as u64 * per_page + k as u64, *p));
                }
            }
        }
    }
    if let Some((index, page)) = first {
        let what = if page == StructPage::POISONED { "still poisoned".to_string() } else { format!("{page:?}") };
        f.fail(format!(
            "region {} compound page at pfn {}: {wrong} of its {} tail struct pages are not initialized tails; struct page {index} (pfn {}) is {what}",
            region.id,
            view.head_pfn,
            (1u64 << region.order) - 1,
            view.head_pfn + index
        ));
    }
}

/// The shared page holds identical tails of this zone and order.
fn shared_page(mem: &dyn GuestMemory, f: &mut Findings, c: &Compound, page: PhysAddr) {
    let region = c.region;
    f.cover(1);
    let expect = StructPage::tail(region.zone, region.order);
    match read_page(mem, page, c.view.page) {
        Some(pages) if pages.iter().all(|p| *p == expect) => {}
        Some(pages) => {
            let k = pages.iter().position(|p| *p != expect).unwrap_or(0);
            f.fail(format!(
                "shared tail page {page} ({}/order {}): struct page {k} is {:?}",
                region.zone.name(),
                region.order,
                pages[k]
            ));
        }
        None => f.fail(format!("shared tail page {page} unreadable")),
    }
}

/// Device ranges: every pageblock tagged movable, 1 GiB compound pages too.
fn pageblocks(ctx: &Context, f: &mut Findings) {
    let page = ctx.map.page;
    for region in ctx.manifest.regions.iter().filter(|r| r.kind == RegionKind::Dax && r.pageblock_tags != 0) {
        let pageblock = pageblock_pages(page);
        let count = region.nr_pages.div_ceil(pageblock) as usize;
        let mut tags = vec![0u8; count];
        f.cover(count as u64);
        if ctx.mem.read(PhysAddr(region.pageblock_tags), &mut tags).is_err() {
            f.fail(format!("region {}: pageblock tags at {:#x} unreadable", region.id, region.pageblock_tags));
            continue;
        }
        let wrong: Vec<usize> = (0..count).filter(|&i| tags[i] != MIGRATE_MOVABLE).collect();
        if let Some(&first) = wrong.first() {
            f.fail(format!(
                "region {}: {} of {count} pageblocks are not movable, the first pageblock {first} (pfn {}) has migratetype {}",
                region.id,
                wrong.len(),
                Pfn(region.start_pfn) + first as u64 * pageblock,
                tags[first]
            ));
        }
    }
}

/// Hot-added memory: every struct page no region of compound pages holds is
/// a free page of the memory's own zone. HugeTLB folios carved from it and
/// freed again go back to that zone (movable memory stays movable).
fn free_memory(ctx: &Context, f: &mut Findings) {
    let (manifest, page) = (ctx.manifest, ctx.map.page);
    let held: Vec<PfnRange> = ctx.compound_regions().map(PfnRange::with_altmap).collect();
    for memory in manifest.regions.iter().filter(|r| r.kind == RegionKind::Memory) {
        let range = PfnRange::of_region(memory);
        let expect = StructPage::free(memory.zone);
        let (first, end) = range.vmemmap(manifest, page);
        let (mut checked, mut wrong, mut first_wrong) = (0u64, 0u64, None);
        for (va, _, frame) in ctx.map.pages_in(first.0, end.0) {
            let Some(pages) = read_page(ctx.mem, frame, page) else {
                f.fail(format!("hot-added memory region {}: vmemmap page {frame} unreadable", memory.id));
                break;
            };
            for (k, p) in pages.iter().enumerate() {
                let pfn = pfn_of_struct_page(manifest, VirtAddr(va + k as u64 * STRUCT_PAGE_SIZE));
                if !range.contains(pfn) || held.iter().any(|h| h.contains(pfn)) {
                    continue;
                }
                checked += 1;
                if *p != expect {
                    wrong += 1;
                    first_wrong.get_or_insert((pfn, *p));
                }
            }
        }
        f.cover(checked);
        if let Some((pfn, p)) = first_wrong {
            let zone = p.zone().map_or("no zone", |z| z.name());
            f.fail(format!(
                "hot-added memory region {} ({}): {wrong} of its {checked} free struct pages are not free {} pages; pfn {pfn} is {p:?} ({zone})",
                memory.id,
                memory.zone.name(),
                memory.zone.name(),
            ));
        }
    }
}
