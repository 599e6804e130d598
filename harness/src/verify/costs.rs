//! What the vmemmap looks like and costs, for artifacts and reports: a dump
//! of every region's vmemmap pages, and each region's measured cost.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use hvo_abi::manifest::Manifest;
use hvo_abi::model::{Layout, RegionKind, Zone, STRUCT_PAGE_SIZE};

use super::map::VmemmapMap;
use super::pfns::{struct_page_va, PfnRange};
use crate::addr::{Pfn, PhysAddr};

/// At most this many vmemmap pages are listed in a dump.
const MAX_DUMP_PAGES: usize = 20_000;

/// A text picture of the vmemmap for a failure's artifacts: the guest's
/// counters, shared tail pages and regions as its manifest states them, then
/// every region's vmemmap pages as the host's walker found them.
pub fn dump(manifest: &Manifest, map: &VmemmapMap) -> String {
    let mut out = String::new();
    let c = &manifest.counters;
    let _ = writeln!(
        out,
        "counters: vmemmap {} allocated {} freed, page tables {} allocated {} freed, {} struct pages initialized",
        c.vmemmap_allocated, c.vmemmap_freed, c.pagetable_allocated, c.pagetable_freed, c.struct_pages_initialized
    );
    for t in manifest.shared_tails.iter() {
        let _ = writeln!(out, "shared tail {}/order {}: {:#x}, {} users", t.zone.name(), t.order, t.pa, t.users);
    }
    let mut listed = 0;
    for r in manifest.regions.iter() {
        let _ = writeln!(
            out,
            "\nregion {} {:?}: pfns {:#x}..{:#x} {}/order {} layout {} {}{}",
            r.id,
            r.kind,
            r.start_pfn,
            r.start_pfn + r.nr_pages,
            r.zone.name(),
            r.order,
            r.layout.name(),
            if r.optimized { "optimized" } else { "not optimized" },
            if r.altmap_pfns > 0 { format!(", altmap of {} pages", r.altmap_pfns) } else { String::new() },
        );
        let (start, end) = PfnRange::of_region(r).vmemmap(manifest, map.page);
        for (va, leaf, frame) in map.pages_in(start.0, end.0) {
            if listed == MAX_DUMP_PAGES {
                let _ = writeln!(out, "  ... (the rest left out: {MAX_DUMP_PAGES} pages listed)");
                return out;
            }
            listed += 1;
            let _ = writeln!(
                out,
                "  {va:#x} -> {} {}{} {} KiB leaf",
                frame,
                if leaf.perms.write { "RW" } else { "RO" },
                if leaf.perms.exec { "X" } else { "" },
                leaf.size() >> 10
            );
        }
    }
    out
}

/// What one region's vmemmap costs, measured from the page tables.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RegionCost {
    /// `dax` for device-zone regions, `hugetlb` otherwise.
    pub kind: &'static str,
    pub zone: &'static str,
    pub order: u32,
    /// The compound page's size in bytes (`page_size << order`).
    pub compound_bytes: u64,
    /// The base page size it was measured with.
    pub page_size: u64,
    pub layout: &'static str,
    pub optimized: bool,
    pub compound_pages: u64,
    /// Writable frames mapped only by one compound page's own vmemmap, per compound page.
    pub private_vmemmap_bytes: u64,
    /// Read-only or cross-compound-page frames (the shared tail pages).
    pub shared_tail_pages: u64,
    /// What one compound page's vmemmap takes unoptimized.
    pub unoptimized_vmemmap_bytes: u64,
}

/// What one compound page's vmemmap costs, counted from which vmemmap pages
/// map which frames.
pub struct CompoundCost {
    /// Bytes of frames only this compound page maps, writable.
    pub private_bytes: u64,
    /// Frames it maps that are read-only or mapped by others too.
    pub shared_frames: BTreeSet<u64>,
}

/// The cost of the compound page whose struct pages start at `base` and
/// take `struct_bytes`.
pub fn compound_cost(map: &VmemmapMap, base: u64, struct_bytes: u64) -> CompoundCost {
    let page = map.page;
    let mut cost = CompoundCost { private_bytes: 0, shared_frames: BTreeSet::new() };
    let pages = struct_bytes / page;
    if pages == 0 {
        // Less than a page of struct pages: neighbours share the vmemmap
        // page, and each owns its part of it, if the page is private and
        // writable.
        match map.lookup(base) {
            Some((leaf, frame)) if leaf.perms.write && map.mappers(frame) == 1 => cost.private_bytes = struct_bytes,
            Some((_, frame)) => {
                cost.shared_frames.insert(frame.0);
            }
            None => {}
        }
        return cost;
    }
    let own = base..base + pages * page;
    let mut frames: Vec<u64> = map.span(base, pages).into_iter().filter_map(|(_, m)| m.map(|(_, f)| f.0)).collect();
    frames.sort_unstable();
    frames.dedup();
    for frame in frames {
        // Private: this compound page's alone, and writable (legacy layouts
        // map tails onto a private page). A frame mapped only read-only is a
        // shared tail page, even with one user so far.
        let Some(summary) = map.frame_use(PhysAddr(frame)) else { continue };
        let exclusive = own.contains(&summary.lowest_va) && own.contains(&summary.highest_va);
        if exclusive && summary.writable {
            cost.private_bytes += page;
        } else {
            cost.shared_frames.insert(frame);
        }
    }
    cost
}

/// Per region: private vmemmap bytes per compound page and shared pages,
/// counted from which vmemmap pages map which frames (not from a formula).
pub fn region_costs(manifest: &Manifest, map: &VmemmapMap) -> Vec<RegionCost> {
    let page = map.page;
    let mut out = Vec::new();
    for region in manifest.regions.iter().filter(|r| r.kind != RegionKind::Memory) {
        let struct_bytes = (1u64 << region.order) * STRUCT_PAGE_SIZE;
        let mut private_bytes = 0;
        let mut shared = BTreeSet::new();
        let mut compound_pages = 0;
        for head in region.heads() {
            compound_pages += 1;
            let base = struct_page_va(manifest, Pfn(head)).0;
            let cost = compound_cost(map, base, struct_bytes);
            private_bytes += cost.private_bytes;
            shared.extend(cost.shared_frames);
        }
        out.push(RegionCost {
            kind: if region.zone == Zone::Device { "dax" } else { "hugetlb" },
            zone: region.zone.name(),
            order: region.order,
            compound_bytes: page << region.order,
            page_size: page,
            layout: if region.optimized { region.layout.name() } else { Layout::None.name() },
            optimized: region.optimized,
            compound_pages,
            private_vmemmap_bytes: private_bytes.checked_div(compound_pages).unwrap_or(0),
            shared_tail_pages: shared.len() as u64,
            unoptimized_vmemmap_bytes: struct_bytes,
        });
    }
    out
}

/// "2M", "1G", "2K": a size for messages.
pub fn size_name(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}K", b >> 10),
        b => format!("{b}B"),
    }
}
