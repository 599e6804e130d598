//! memmap-present, roots-in-sync and altmap-unoptimized: the vmemmap is
//! there for all memory, in every root, and on the device where it belongs.

use hvo_abi::manifest::{Region, RootKind};
use hvo_abi::model::RegionKind;

use super::findings::Findings;
use super::pfns::{pfn_of_struct_page, PfnRange};
use super::{Context, VerifyError};
use crate::addr::{Pfn, PhysAddr, VirtAddr};
use crate::pgtable;

/// Every present page has its struct page mapped: boot memory and
/// hot-added memory (device ranges are checked page by page by head-private).
pub(super) fn memmap_present(ctx: &Context, f: &mut Findings) -> Result<(), VerifyError> {
    let (manifest, page) = (ctx.manifest, ctx.map.page);
    let present = manifest.ram().map(|r| (PfnRange::covering(&r, page), "boot memory".to_string())).chain(
        manifest
            .regions
            .iter()
            .filter(|r| r.kind == RegionKind::Memory)
            .map(|r| (PfnRange::of_region(r), format!("hot-added memory region {}", r.id))),
    );
    for (pfns, what) in present {
        let (first, end) = pfns.vmemmap(manifest, page);
        let pages = (end.0 - first.0) / page;
        let unmapped: Vec<u64> =
            (first.0..end.0).step_by(page as usize).filter(|va| ctx.map.lookup(*va).is_none()).collect();
        f.cover(pages);
        if let Some(&va) = unmapped.first() {
            let pfn = pfn_of_struct_page(manifest, VirtAddr(va));
            f.fail(format!(
                "{what}: {} of its {pages} vmemmap pages are unmapped, the first at {va:#x} (struct pages of pfn {pfn} on)",
                unmapped.len(),
            ));
        }
    }
    Ok(())
}

/// Every root carries the kernel's entries over the vmemmap.
pub(super) fn roots_in_sync(ctx: &Context, f: &mut Findings) -> Result<(), VerifyError> {
    let (manifest, mem, map) = (ctx.manifest, ctx.mem, ctx.map);
    let Some(process) = manifest.root(RootKind::Process) else { return Ok(()) };
    let kernel = pgtable::walker_for(ctx.arch, mem, manifest, map.start)?;
    let other = pgtable::Walker::like(&kernel, PhysAddr(process.pa));
    let theirs = other.root_entries(mem, map.start, map.end)?;
    for ((index, ours), (_, raw)) in kernel.root_entries(mem, map.start, map.end)?.into_iter().zip(theirs) {
        f.cover(1);
        if kernel.decode_root_entry(ours) != other.decode_root_entry(raw) {
            f.fail(format!(
                "top-level entry {index} over the vmemmap is {ours:#x} in the kernel root but {raw:#x} in the process root at {:#x}",
                process.pa
            ));
        }
    }
    Ok(())
}

/// Struct pages on the device (altmap) are never optimized: every vmemmap
/// page its own writable frame, inside the device's altmap, nothing shared;
/// but for vmemmap pages a neighbour's leaf maps already, which stay in
/// system memory (radix__vmemmap_populate reuses the PMD leaf it finds, and
/// radix's free_vmemmap_pages knows "even though altmap is specified we
/// never used altmap").
pub(super) fn altmap_unoptimized(ctx: &Context, f: &mut Findings) -> Result<(), VerifyError> {
    for region in ctx.manifest.regions.iter().filter(|r| r.altmap_pfns > 0) {
        altmap_region(ctx, f, region);
    }
    Ok(())
}

fn altmap_region(ctx: &Context, f: &mut Findings, region: &Region) {
    let map = ctx.map;
    f.cover(1);
    if region.optimized {
        f.fail(format!(
            "region {} keeps its struct pages on the device (altmap), yet it is optimized under {}",
            region.id,
            region.layout.name()
        ));
    }
    let altmap = PfnRange::altmap(region);
    for c in ctx.compounds().filter(|c| c.region.id == region.id) {
        let (view, head) = (&c.view, c.view.head_pfn);
        for (i, (_, m)) in view.pages.iter().enumerate() {
            f.cover(1);
            let where_ = format!("region {} compound page at pfn {head}, vmemmap[{i}]", region.id);
            let problem = match m {
                None => Some("unmapped".to_string()),
                Some((_, frame)) if !c.borrowed(i) && !altmap.contains(Pfn::containing(*frame, map.page)) => {
                    Some(format!("maps {frame}, outside the device's altmap (pfns {}..{})", altmap.start, altmap.end))
                }
                Some((_, frame)) if map.mappers(*frame) != 1 => {
                    Some(format!("maps {frame}, shared by {} vmemmap pages", map.mappers(*frame)))
                }
                Some((leaf, frame)) if !leaf.perms.write => Some(format!("maps {frame} read-only")),
                Some(_) => None,
            };
            if let Some(p) = problem {
                f.fail_in(view, None, format!("{where_}: {p}"));
            }
        }
    }
}
