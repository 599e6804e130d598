//! Compound pages found from the pattern of the vmemmap's mappings alone: a
//! head vmemmap page followed by tails that are read-only or share a frame.
//! Nothing the kernel says about its folios is read here.

use std::collections::BTreeSet;

use hvo_abi::model::{Layout, STRUCT_PAGE_SIZE};

use super::{CompoundKind, FoundRegion, KernelView};
use crate::addr::{Pfn, PhysAddr};
use crate::verify::{compound_cost, CompoundView, PageMapping, VmemmapMap};

/// One optimized compound page the pattern found.
pub(crate) struct FoundCompound {
    pub head: Pfn,
    pub bytes: u64,
    /// The layout its first tail says it has (the tails after it are held
    /// to that layout by the checks).
    pub layout: Layout,
    /// How its head vmemmap page is mapped, and the frame it maps.
    pub head_mapping: PageMapping,
    pub head_frame: PhysAddr,
    pub view: CompoundView,
    /// The DAX range it belongs to (an index into the view's), or None for
    /// a HugeTLB folio.
    pub device: Option<usize>,
    /// What messages put before where it is: "dax0.0: " or nothing.
    pub owner: String,
}

impl FoundCompound {
    /// "2M compound page at pfn 0x100200, vmemmap[2]": where a finding is.
    pub fn at(&self, i: usize) -> String {
        format!(
            "{}{} compound page at pfn {}, vmemmap[{i}]",
            self.owner,
            crate::verify::size_name(self.bytes),
            self.head
        )
    }

    /// Its tail vmemmap pages that are mapped: index, mapping, frame.
    pub fn tails(&self) -> impl Iterator<Item = (usize, PageMapping, PhysAddr)> + '_ {
        self.view.pages.iter().enumerate().skip(1).filter_map(|(i, (_, m))| m.map(|(m, f)| (i, m, f)))
    }

    /// Under the unified layout, the shared tail page it uses: the frame its
    /// first tail maps.
    pub fn shared_tail(&self) -> Option<PhysAddr> {
        let first = self.tails().next().map(|(_, _, frame)| frame);
        first.filter(|_| self.layout == Layout::Unified)
    }
}

/// Vmemmap pages one compound page of `bytes` fills with `page`-byte pages
/// (0 when its struct pages fill less than one: nothing to optimize).
pub fn vmemmap_pages(bytes: u64, page: u64) -> u64 {
    bytes / page * STRUCT_PAGE_SIZE / page
}

/// Every optimized compound page of `sizes` (largest first) over RAM: at
/// each aligned pfn not inside a larger one already found, vmemmap pages
/// whose first tails read as an optimized compound page's.
pub fn find(view: &KernelView, map: &VmemmapMap, sizes: &[u64]) -> Vec<FoundCompound> {
    let page = view.page_size;
    let mut found: Vec<FoundCompound> = Vec::new();
    for &bytes in sizes {
        let n = vmemmap_pages(bytes, page);
        if n < 2 {
            continue;
        }
        let pfns = bytes / page;
        let larger: Vec<(u64, u64)> = found.iter().map(|c| (c.head.0, c.head.0 + c.bytes / page)).collect();
        for ram in &view.ram {
            let mut head = ram.start.0.div_ceil(pfns) * pfns;
            while head + pfns <= ram.end.0 {
                let inside = larger.iter().any(|&(start, end)| head >= start && head < end);
                if !inside {
                    let pages = map.span(view.struct_page(Pfn(head)), n);
                    if let Some((layout, (head_mapping, head_frame))) = classify(map, &pages) {
                        let view = CompoundView::of_pages(Pfn(head), pages, page);
                        found.push(FoundCompound {
                            head: Pfn(head),
                            bytes,
                            layout,
                            head_mapping,
                            head_frame,
                            view,
                            device: None,
                            owner: String::new(),
                        });
                    }
                }
                head += pfns;
            }
        }
    }
    found.sort_by_key(|c| c.head);
    found
}

/// How many tail vmemmap pages of unified-layout compound pages among
/// `compounds` map `frame`: the users a shared tail page must have.
pub(super) fn unified_tails_on(compounds: &[FoundCompound], frame: PhysAddr) -> u64 {
    compounds
        .iter()
        .filter(|c| c.layout == Layout::Unified)
        .map(|c| c.tails().filter(|(_, _, t)| *t == frame).count() as u64)
        .sum()
}

/// The layout of one compound page's vmemmap pages, read off its first
/// tails, and how its head is mapped; `None` when they are not optimized
/// (the first tail private and writable, as every page of an unoptimized
/// compound page is) or its head or first tail is unmapped.
fn classify(
    map: &VmemmapMap,
    pages: &[(u64, Option<(PageMapping, PhysAddr)>)],
) -> Option<(Layout, (PageMapping, PhysAddr))> {
    let head = pages.first()?.1?;
    let (first_tail, frame) = pages.get(1)?.1?;
    let second_tail = pages.get(2).and_then(|(_, m)| *m).map(|(_, f)| f);
    let layout = if frame == head.1 {
        Layout::LegacyHugetlb
    } else if !first_tail.perms.write {
        Layout::Unified
    } else if second_tail == Some(frame) && map.mappers(frame) > 1 {
        Layout::LegacyDax
    } else {
        return None;
    };
    Some((layout, head))
}

/// The compound pages found, counted by kind, size (largest first) and
/// layout, with what their vmemmap costs as the tables show it.
pub fn summarize(map: &VmemmapMap, compounds: &[FoundCompound]) -> Vec<FoundRegion> {
    let mut regions: Vec<(FoundRegion, u64, BTreeSet<u64>)> = Vec::new();
    for c in compounds {
        let cost =
            compound_cost(map, c.view.pages.first().map_or(0, |(va, _)| *va), c.bytes / map.page * STRUCT_PAGE_SIZE);
        let kind = if c.device.is_some() { CompoundKind::Dax } else { CompoundKind::Hugetlb };
        let same = |r: &FoundRegion| r.kind == kind && r.compound_bytes == c.bytes && r.layout == c.layout;
        let at = match regions.iter().position(|(r, ..)| same(r)) {
            Some(i) => i,
            None => {
                let region = FoundRegion {
                    kind,
                    compound_bytes: c.bytes,
                    count: 0,
                    layout: c.layout,
                    private_vmemmap_bytes: 0,
                    shared_tail_pages: 0,
                };
                regions.push((region, 0, BTreeSet::new()));
                regions.len() - 1
            }
        };
        let entry = &mut regions[at];
        entry.0.count += 1;
        entry.1 += cost.private_bytes;
        entry.2.extend(cost.shared_frames);
    }
    let mut regions: Vec<FoundRegion> = regions
        .into_iter()
        .map(|(mut r, private, shared)| {
            r.private_vmemmap_bytes = private / r.count;
            r.shared_tail_pages = shared.len() as u64;
            r
        })
        .collect();
    regions.sort_by(|a, b| {
        a.kind.cmp(&b.kind).then(b.compound_bytes.cmp(&a.compound_bytes)).then(a.layout.name().cmp(b.layout.name()))
    });
    regions
}

/// "64 x 2M + 1 x 1G compound pages": the HugeTLB folios a check covered.
pub fn describe(found: &[FoundRegion]) -> String {
    let mut by_size: Vec<(u64, u64)> = Vec::new();
    for r in found.iter().filter(|r| r.kind == CompoundKind::Hugetlb) {
        match by_size.iter_mut().find(|(bytes, _)| *bytes == r.compound_bytes) {
            Some(entry) => entry.1 += r.count,
            None => by_size.push((r.compound_bytes, r.count)),
        }
    }
    by_size.sort_unstable();
    let parts: Vec<String> =
        by_size.iter().map(|(bytes, count)| format!("{count} x {}", crate::verify::size_name(*bytes))).collect();
    match parts.is_empty() {
        true => "no optimized compound pages".to_string(),
        false => format!("{} compound pages", parts.join(" + ")),
    }
}
