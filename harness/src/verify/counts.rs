//! accounting and no-leak: what the guest counted and kept, recounted from
//! the page tables.

use std::collections::HashMap;

use hvo_abi::model::Layout;

use super::findings::Findings;
use super::pfns::PfnRange;
use super::{Context, VerifyError};
use crate::addr::{Pfn, PhysAddr, VirtAddr};
use crate::pgtable::{self, Decoded};

/// The guest's counters equal what the host counts in the page tables.
pub(super) fn accounting(ctx: &Context, f: &mut Findings) -> Result<(), VerifyError> {
    let (manifest, map, page) = (ctx.manifest, ctx.map, ctx.map.page);
    // The shared page counts its users (a missing page is tails-shared's finding).
    for region in ctx.compound_regions() {
        let shared = manifest.shared_tails.find(region.zone, region.order);
        if let (true, Layout::Unified, Some(t)) = (region.optimized, region.layout, shared) {
            f.cover(1);
            // Compound pages left in a neighbour's leaf hold no reference.
            let compound_pages = ctx.compounds().filter(|c| c.region.id == region.id && c.optimized).count() as u64;
            if t.users < compound_pages {
                f.fail(format!(
                    "the {}/order {} shared tail page counts {} users, region {} alone has {compound_pages} optimized compound pages",
                    region.zone.name(), region.order, t.users, region.id
                ));
            }
        }
    }

    // Frames on the device (altmap) are the device's, not system memory.
    let counted = manifest.counters.vmemmap_live();
    let altmap_frames = manifest
        .regions
        .iter()
        .map(|r| {
            let altmap = PfnRange::altmap(r);
            (altmap.start.0..altmap.end.0).filter(|&pfn| map.mappers(Pfn(pfn).addr(page)) > 0).count() as u64
        })
        .sum::<u64>();
    let system_frames = map.frames() - altmap_frames;
    f.cover(2);
    if counted != system_frames {
        f.fail(format!(
            "the guest counts {counted} live vmemmap frames, the page tables map {system_frames} distinct ones in system memory"
        ));
    }
    // Roots share their lower tables: count each table once.
    let trees = pgtable::published_trees(ctx.arch, ctx.mem, manifest)?;
    let mut tables = HashMap::new();
    for t in &trees {
        tables.extend(t.tables(ctx.mem)?);
    }
    // The guest gives every table at least a frame of its own (a 64 KiB-page
    // radix PTE table is 256 bytes).
    let table_frames: u64 = tables.values().map(|bytes: &u64| bytes.div_ceil(page)).sum();
    if manifest.counters.pagetable_live() != table_frames {
        f.fail(format!(
            "the guest counts {} live page-table frames, the roots reach {table_frames}",
            manifest.counters.pagetable_live()
        ));
    }
    Ok(())
}

/// Every shared tail page has users and is mapped by the vmemmap, and no
/// page-table page over the vmemmap is left linked mapping nothing.
pub(super) fn no_leak(ctx: &Context, f: &mut Findings) -> Result<(), VerifyError> {
    empty_tables(ctx, f)?;
    for t in ctx.manifest.shared_tails.iter() {
        f.cover(1);
        let problem = if t.users == 0 {
            "has no users but was not freed"
        } else if ctx.map.mappers(PhysAddr(t.pa)) == 0 {
            "is mapped by no vmemmap page"
        } else {
            continue;
        };
        f.fail(format!("shared tail page {:#x} ({}/order {}) {problem}", t.pa, t.zone.name(), t.order));
    }
    Ok(())
}

/// Teardown frees the page-table pages it empties: no table below the
/// root's children over the vmemmap maps nothing. The root's children stay
/// (every root points at them, as Linux keeps its top-level vmemmap entries
/// and, with 4-level tables, the PUD pages under them), so they may be
/// empty; accounting counts every table, empty or not, so only this sees
/// one left behind.
fn empty_tables(ctx: &Context, f: &mut Findings) -> Result<(), VerifyError> {
    let (manifest, map) = (ctx.manifest, ctx.map);
    let walker = pgtable::walker_for(ctx.arch, ctx.mem, manifest, VirtAddr(manifest.vmemmap_base))?;
    let format = walker.format();
    let bits = format.va_bits();
    let mask = if bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 };
    // The root entries over the vmemmap: from its base to the end of the
    // one holding the last struct page walked (removed memory's included).
    let span = walker.root_entry_span();
    let first = (manifest.vmemmap_base & mask) / span;
    let last = ((map.end.0.max(manifest.vmemmap_base + 1) - 1) & mask) / span;
    let mut empty = Vec::new();
    let mut checked = 0u64;
    for table in walker.visit_tables(ctx.mem)? {
        if table.level < 2 || !(first..=last).contains(&(table.va / span)) {
            continue;
        }
        checked += 1;
        if table.entries.iter().all(|&raw| format.decode(raw, table.level, table.shift) == Decoded::Invalid) {
            empty.push(table);
        }
    }
    f.cover(checked);
    if let Some(t) = empty.first() {
        f.fail(format!(
            "{} page-table pages over the vmemmap map nothing yet stay linked; the first, at {} (level {}), covers {:#x}..{:#x}",
            empty.len(),
            t.pa,
            t.level,
            t.va | (manifest.vmemmap_base & !mask),
            (t.va | (manifest.vmemmap_base & !mask)) + (1u64 << (t.shift + t.index_bits)),
        ));
    }
    Ok(())
}
