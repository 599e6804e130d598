//! Where frame numbers meet bytes and vmemmap addresses. The manifest speaks
//! plain u64 (it is the guest's ABI); the verifier converts at this boundary,
//! and every conversion names the page size it uses.

use hvo_abi::manifest::{Manifest, Range, Region};
use hvo_abi::model::STRUCT_PAGE_SIZE;

use crate::addr::{Pfn, PhysAddr, VirtAddr};

/// The frames `[start, end)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PfnRange {
    pub start: Pfn,
    pub end: Pfn,
}

impl PfnRange {
    /// A region's own frames.
    pub fn of_region(region: &Region) -> PfnRange {
        PfnRange { start: Pfn(region.start_pfn), end: Pfn(region.start_pfn + region.nr_pages) }
    }

    /// A region's frames with the device pages below it that hold its
    /// struct pages (altmap).
    pub fn with_altmap(region: &Region) -> PfnRange {
        PfnRange { start: Pfn(region.start_pfn - region.altmap_pfns.min(region.start_pfn)), ..Self::of_region(region) }
    }

    /// The device pages holding a region's struct pages (empty without an altmap).
    pub fn altmap(region: &Region) -> PfnRange {
        let r = region.altmap();
        PfnRange { start: Pfn(r.start), end: Pfn(r.end) }
    }

    /// The frames of a byte range whose ends are page-aligned (boot RAM).
    pub fn of_bytes(range: &Range, page: u64) -> PfnRange {
        PfnRange {
            start: Pfn::containing(PhysAddr(range.start), page),
            end: Pfn::containing(PhysAddr(range.end()), page),
        }
    }

    /// Every frame a byte range touches.
    pub fn covering(range: &Range, page: u64) -> PfnRange {
        PfnRange { start: Pfn::containing(PhysAddr(range.start), page), end: Pfn(range.end().div_ceil(page)) }
    }

    /// The smallest range holding both.
    pub fn hull(self, other: PfnRange) -> PfnRange {
        PfnRange { start: self.start.min(other.start), end: self.end.max(other.end) }
    }

    /// Widened to whole memory sections of `section` bytes.
    pub fn to_sections(self, section: u64, page: u64) -> PfnRange {
        let start = self.start.addr(page).0 / section * section;
        let end = self.end.addr(page).0.div_ceil(section) * section;
        PfnRange { start: Pfn::containing(PhysAddr(start), page), end: Pfn::containing(PhysAddr(end), page) }
    }

    pub fn contains(&self, pfn: Pfn) -> bool {
        self.start <= pfn && pfn < self.end
    }

    /// The whole vmemmap pages (of `page` bytes) holding these frames' struct pages.
    pub fn vmemmap(&self, manifest: &Manifest, page: u64) -> (VirtAddr, VirtAddr) {
        let start = struct_page_va(manifest, self.start).0 / page * page;
        let end = struct_page_va(manifest, self.end).0.div_ceil(page) * page;
        (VirtAddr(start), VirtAddr(end))
    }
}

/// The struct page of `pfn`.
pub(crate) fn struct_page_va(manifest: &Manifest, pfn: Pfn) -> VirtAddr {
    VirtAddr(manifest.struct_page_va(pfn.0))
}

/// The frame whose struct page is at `va`.
pub(crate) fn pfn_of_struct_page(manifest: &Manifest, va: VirtAddr) -> Pfn {
    Pfn((va.0 - manifest.vmemmap_base) / STRUCT_PAGE_SIZE + manifest.memstart_pfn)
}
