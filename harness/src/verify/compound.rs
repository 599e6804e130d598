//! Compound pages one by one: how each one's vmemmap pages are mapped, and
//! the invariants read off that alone (head-private, tails-readonly,
//! pte-granularity).

use std::fmt::Write as _;

use hvo_abi::manifest::{Manifest, Region};
use hvo_abi::model::{Layout, RegionKind, StructPage, STRUCT_PAGE_SIZE};

use super::findings::Findings;
use super::map::{PageMapping, VmemmapMap};
use super::pfns::{pfn_of_struct_page, struct_page_va, PfnRange};
use super::{compound_regions, vmemmap_pages_per_compound, Context, HotAddedMemory, VerifyError};
use crate::addr::{Pfn, PhysAddr, VirtAddr};
use crate::memory::GuestMemory;

/// One compound page's vmemmap pages as the tables map them.
pub(crate) struct CompoundView {
    pub head_pfn: Pfn,
    /// Where its head struct page is in the first vmemmap page, counted in
    /// struct pages (0 unless compound pages share vmemmap pages).
    first: usize,
    /// Its struct pages in the first vmemmap page.
    in_first: usize,
    pub pages: Vec<(u64, Option<(PageMapping, PhysAddr)>)>,
    /// The base page size.
    pub page: u64,
}

impl CompoundView {
    pub fn new(manifest: &Manifest, map: &VmemmapMap, region: &Region, head_pfn: Pfn) -> CompoundView {
        let n = vmemmap_pages_per_compound(region.order, map.page).max(1);
        let head_va = struct_page_va(manifest, head_pfn).0;
        let base = head_va / map.page * map.page;
        let per_page = map.page / STRUCT_PAGE_SIZE;
        let first = ((head_va - base) / STRUCT_PAGE_SIZE) as usize;
        let in_first = (1u64 << region.order).min(per_page) as usize;
        CompoundView { head_pfn, first, in_first, pages: map.span(base, n), page: map.page }
    }

    /// A compound page of whole vmemmap pages, as a real kernel's is found:
    /// from its vmemmap pages alone.
    pub(crate) fn of_pages(
        head_pfn: Pfn,
        pages: Vec<(u64, Option<(PageMapping, PhysAddr)>)>,
        page: u64,
    ) -> CompoundView {
        CompoundView { head_pfn, first: 0, in_first: (page / STRUCT_PAGE_SIZE) as usize, pages, page }
    }

    /// This compound page's struct pages among those of its first vmemmap
    /// page (those past its end when the compound page straddles two, off
    /// its alignment, are compound-aligned's finding).
    pub fn own<'p>(&self, page: &'p [StructPage]) -> &'p [StructPage] {
        page.get(self.first..(self.first + self.in_first).min(page.len())).unwrap_or(&[])
    }

    /// A small picture of the layout, in the style of vmemmap_dedup.rst: each
    /// vmemmap page, the frame it maps and how.
    pub fn diagram(&self, shared: Option<PhysAddr>) -> String {
        let mut out = format!("\n  compound page at pfn {}:", self.head_pfn);
        let shown: Vec<usize> =
            if self.pages.len() <= 6 { (0..self.pages.len()).collect() } else { vec![0, 1, 2, self.pages.len() - 1] };
        for (k, &i) in shown.iter().enumerate() {
            if k > 0 && i != shown[k - 1] + 1 {
                let _ = write!(out, "\n    ...");
            }
            let (va, mapping) = &self.pages[i];
            let _ = match mapping {
                None => write!(out, "\n    vmemmap[{i}] {va:#x} -> unmapped"),
                Some((leaf, frame)) => write!(
                    out,
                    "\n    vmemmap[{i}] {va:#x} -> {frame} {}{}{}",
                    if leaf.perms.write { "RW" } else { "RO" },
                    if leaf.size() > self.page {
                        format!(" in a {} KiB leaf", leaf.size() >> 10)
                    } else {
                        String::new()
                    },
                    if Some(*frame) == shared { " (shared tail)" } else { "" },
                ),
            };
        }
        out
    }
}

/// A compound page of a region, with the shared tail page of its zone and
/// order (if the manifest has one).
pub(super) struct Compound<'a> {
    pub region: &'a Region,
    pub view: CompoundView,
    pub shared: Option<PhysAddr>,
    /// Which of its vmemmap pages lie in a neighbour's leaf (see
    /// `in_neighbours_leaf`); empty when none does.
    pub borrowed: Vec<bool>,
    /// Whether it is optimized: its region is, and the vmemmap pages its
    /// layout keeps private are its own, not in a neighbour's leaf.
    pub optimized: bool,
}

impl Compound<'_> {
    /// Whether vmemmap page `i` lies in a neighbour's leaf.
    pub fn borrowed(&self, i: usize) -> bool {
        self.borrowed.get(i).copied().unwrap_or(false)
    }

    /// "region 3 compound page at pfn 0x100200, vmemmap[2]": where a finding is.
    pub fn at(&self, i: usize) -> String {
        format!("region {} compound page at pfn {}, vmemmap[{i}]", self.region.id, self.view.head_pfn)
    }

    /// How the head vmemmap page is mapped; `None` when it is not (which
    /// head-private reports, and every other check skips).
    pub fn head(&self) -> Option<(PageMapping, PhysAddr)> {
        self.view.pages[0].1
    }
}

/// Every compound page of every region of compound pages, each seen once
/// and read by every check.
pub(super) fn every_compound<'a>(
    manifest: &'a Manifest,
    map: &VmemmapMap,
    memory: &HotAddedMemory,
) -> Vec<Compound<'a>> {
    let neighbours = Neighbours::of(manifest, memory, map.page);
    compound_regions(manifest)
        .flat_map(|region| {
            let shared = manifest.shared_tails.find(region.zone, region.order).map(|t| PhysAddr(t.pa));
            let neighbours = &neighbours;
            region.heads().map(move |head| {
                let view = CompoundView::new(manifest, map, region, Pfn(head));
                let borrowed = borrowed_pages(manifest, map, region, &view, neighbours);
                let (private, _) = tails_under(region.layout, view.pages.len());
                let optimized = region.optimized && !borrowed.iter().take(private).any(|b| *b);
                Compound { region, view, shared, borrowed, optimized }
            })
        })
        .collect()
}

/// Which of a device compound page's vmemmap pages lie in a neighbour's
/// leaf (empty when none does; see `in_neighbours_leaf`).
fn borrowed_pages(
    manifest: &Manifest,
    map: &VmemmapMap,
    region: &Region,
    view: &CompoundView,
    neighbours: &Neighbours,
) -> Vec<bool> {
    let borrowed: Vec<bool> = view
        .pages
        .iter()
        .map(|(va, m)| {
            m.is_some_and(|(leaf, frame)| {
                in_neighbours_leaf(manifest, region, *va, &leaf, &frame, map.page, neighbours)
            })
        })
        .collect();
    if borrowed.iter().any(|b| *b) {
        borrowed
    } else {
        Vec::new()
    }
}

/// The frames whose memmap may have populated a leaf a device range found
/// already there: boot RAM, every region (with its altmap), and the memory
/// the scenario hot-added, removed ranges included.
pub(super) struct Neighbours {
    ranges: Vec<(PfnRange, Option<u32>)>,
}

impl Neighbours {
    pub fn of(manifest: &Manifest, memory: &HotAddedMemory, page: u64) -> Neighbours {
        let boot = manifest.ram().map(|r| (PfnRange::covering(&r, page), None));
        let regions = manifest.regions.iter().map(|r| (PfnRange::with_altmap(r), Some(r.id)));
        let plugged = memory.iter().map(|m| {
            let range = PfnRange { start: Pfn::containing(PhysAddr(m.start), page), end: Pfn(m.end.div_ceil(page)) };
            (range, None)
        });
        Neighbours { ranges: boot.chain(regions).chain(plugged).collect() }
    }

    /// Whether frames of `[first, end)` other than region `id`'s are, or
    /// were, memory.
    fn beside(&self, id: u32, first: Pfn, end: Pfn, device: &PfnRange) -> bool {
        self.ranges.iter().filter(|(_, owner)| *owner != Some(id)).any(|(r, _)| {
            let (lo, hi) = (r.start.max(first), r.end.min(end));
            // Frames of the device itself are no neighbour's.
            lo < hi && (lo < device.start || hi > device.end)
        })
    }
}

/// Whether the vmemmap page at `va` of a device region, mapped by `leaf` to
/// `frame`, lies in a neighbour's leaf: a leaf larger than a base page, of
/// system memory (not the device's altmap), that also holds the struct
/// pages of memory beside the device (boot RAM, another region, or memory
/// the scenario hot-added). With 64 KiB pages one 2 MiB leaf holds the
/// struct pages of 2 GiB, so memory hot-added beside a device range may
/// have populated it first; the range's own population leaves it alone
/// (radix__vmemmap_populate's vmemmap_check_pmd, and radix's
/// vmemmap_populate_compound_pages: "existing huge mapping. Skip the
/// range"), and those struct pages stay there, unoptimized. A leaf holding
/// no one else's struct pages is the device's own: not excused. HugeTLB
/// never borrows: it splits the leaf it optimizes under.
fn in_neighbours_leaf(
    manifest: &Manifest,
    region: &Region,
    va: u64,
    leaf: &PageMapping,
    frame: &PhysAddr,
    page: u64,
    neighbours: &Neighbours,
) -> bool {
    if region.kind != RegionKind::Dax || leaf.size() <= page {
        return false;
    }
    if PfnRange::altmap(region).contains(Pfn::containing(*frame, page)) {
        return false;
    }
    let start = va / leaf.size() * leaf.size();
    let first = pfn_of_struct_page(manifest, VirtAddr(start));
    let end = pfn_of_struct_page(manifest, VirtAddr(start + leaf.size()));
    neighbours.beside(region.id, first, end, &PfnRange::with_altmap(region))
}

/// A vmemmap page's struct pages, `None` when the frame cannot be read.
pub(super) fn read_page(mem: &dyn GuestMemory, frame: PhysAddr, page: u64) -> Option<Vec<StructPage>> {
    let mut bytes = vec![0u8; page as usize];
    mem.read(frame, &mut bytes).ok()?;
    Some(bytes.chunks_exact(64).map(|c| StructPage::from_le_bytes(c.try_into().unwrap_or(&[0; 64]))).collect())
}

/// Each head vmemmap page maps a frame of its own, writable; unoptimized,
/// every vmemmap page does.
pub(super) fn head_private(ctx: &Context, f: &mut Findings) -> Result<(), VerifyError> {
    for c in ctx.compounds() {
        let (view, shared) = (&c.view, c.shared);
        let Some((head_leaf, head_frame)) = c.head() else {
            f.fail_in(view, shared, format!("{}: head vmemmap page unmapped", c.at(0)));
            continue;
        };
        if !c.optimized {
            for (i, (_, m)) in view.pages.iter().enumerate() {
                f.cover(1);
                match m {
                    Some((leaf, frame)) if leaf.perms.write && ctx.map.mappers(*frame) == 1 => {}
                    Some((leaf, frame)) => f.fail_in(
                        view,
                        shared,
                        format!(
                            "{}: not optimized, yet it maps {frame} {} shared by {} vmemmap pages",
                            c.at(i),
                            if leaf.perms.write { "RW" } else { "RO" },
                            ctx.map.mappers(*frame)
                        ),
                    ),
                    None => f.fail_in(view, shared, format!("{}: unmapped", c.at(i))),
                }
            }
            continue;
        }
        f.cover(1);
        let head_users = ctx.map.mappers(head_frame);
        let private_ok = match c.region.layout {
            // Legacy HugeTLB maps the tails onto the head's own frame.
            Layout::LegacyHugetlb => head_users == view.pages.len() as u64,
            _ => head_users == 1,
        };
        if !head_leaf.perms.write || !private_ok || Some(head_frame) == shared {
            f.fail_in(
                view,
                shared,
                format!(
                    "{}: head page {head_frame} is {} and mapped by {} vmemmap pages{}",
                    c.at(0),
                    if head_leaf.perms.write { "writable" } else { "read-only" },
                    head_users,
                    if Some(head_frame) == shared { ", and it is the shared tail page" } else { "" }
                ),
            );
        }
    }
    Ok(())
}

/// The first tail vmemmap page of an optimized compound page under `layout`,
/// and whether its tails may be writable.
pub(super) fn tails_under(layout: Layout, pages: usize) -> (usize, bool) {
    match layout {
        Layout::Unified | Layout::LegacyHugetlb => (1, false),
        Layout::LegacyDax => (2, true),
        Layout::None => (pages, true),
    }
}

/// An optimized compound page's tails carry its layout's protection through
/// every level: read-only, or writable where the layout keeps them so
/// (legacy-dax: the kernel writes those tails, and a read-only one faults
/// it); never executable.
pub(super) fn tails_readonly(ctx: &Context, f: &mut Findings) -> Result<(), VerifyError> {
    for c in ctx.compounds().filter(|c| c.optimized && c.head().is_some()) {
        let (first_tail, writable) = tails_under(c.region.layout, c.view.pages.len());
        for (i, (_, m)) in c.view.pages.iter().enumerate().skip(first_tail).filter(|(i, _)| !c.borrowed(*i)) {
            f.cover(1);
            let Some((leaf, _)) = m else { continue };
            let problem = match (writable, leaf.perms.write, leaf.perms.exec) {
                (_, _, true) => format!("tail is executable{}", if leaf.perms.write { " and writable" } else { "" }),
                (false, true, false) => "tail is writable".to_string(),
                (true, false, false) => {
                    format!("tail is read-only, but {} keeps its tails writable", c.region.layout.name())
                }
                _ => continue,
            };
            f.fail_in(&c.view, c.shared, format!("{}: {problem} through the page tables", c.at(i)));
        }
    }
    Ok(())
}

/// An optimized compound page's vmemmap is mapped with base pages only,
/// but for pages left in a neighbour's leaf.
pub(super) fn pte_granularity(ctx: &Context, f: &mut Findings) -> Result<(), VerifyError> {
    for c in ctx.compounds().filter(|c| c.optimized && c.head().is_some()) {
        for (i, (_, m)) in c.view.pages.iter().enumerate().filter(|(i, _)| !c.borrowed(*i)) {
            f.cover(1);
            if let Some((leaf, _)) = m {
                if leaf.size() != c.view.page {
                    f.fail_in(
                        &c.view,
                        c.shared,
                        format!("{}: mapped by a {} KiB leaf, not a base page", c.at(i), leaf.size() >> 10),
                    );
                }
            }
        }
    }
    Ok(())
}
