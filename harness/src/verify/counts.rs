//! accounting and no-leak: what the guest counted and kept, recounted from
//! the page tables.

use std::collections::HashMap;

use hvo_abi::model::Layout;

use super::findings::Findings;
use super::pfns::PfnRange;
use super::{Context, VerifyError};
use crate::addr::{Pfn, PhysAddr};
use crate::pgtable;

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

/// Every shared tail page has users and is mapped by the vmemmap.
pub(super) fn no_leak(ctx: &Context, f: &mut Findings) -> Result<(), VerifyError> {
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
