//! Memory hotplug (mm/memory_hotplug.c): hot-added memory onlined as
//! ordinary memory, its vmemmap populated with 2 MiB leaves shared with
//! neighbouring subsections, and every kind of hot-added range removed.

use hvo_abi::model::{Knob, Layout, RegionKind, StructPage, Zone, STRUCT_PAGE_SIZE};

use super::{addr_of, pfn_of, FlushPath, Mm, Region, Vmemmap, VmemmapError};
use crate::arch::{self, PAGE};
use crate::mm::frames::{align_down, align_up, Purpose};
use crate::mm::pagetable::Prot;
use crate::mm::{PageSize, PhysAddr, VirtAddr};

impl Vmemmap {
    /// Hotplugged memory onlined as ordinary memory in `zone`: its
    /// subsections activated, its vmemmap populated (see `populate_memmap`)
    /// and its struct pages initialized, ready for HugeTLB folios.
    pub fn hot_add_memory(
        &mut self,
        mm: &mut Mm,
        start: PhysAddr,
        size: u64,
        zone: Zone,
    ) -> Result<usize, VmemmapError> {
        let id = self.free_slot()?;
        let region = Region {
            kind: RegionKind::Memory,
            start_pfn: pfn_of(start.0),
            nr_pages: size / PAGE,
            zone,
            order: 0,
            layout: Layout::None,
            optimized: false,
            altmap_pfns: 0,
        };
        self.sections.activate(mm.frames, start.0, start.0 + size, false)?;
        if let Err(e) = self.populate_memmap(mm, start.0, start.0 + size) {
            self.depopulate_memmap(mm, start.0, start.0 + size);
            return Err(e);
        }
        self.fill_struct_pages(region.start_pfn, region.end_pfn(), StructPage::free(zone));
        self.struct_pages_initialized += region.nr_pages;
        self.slots[id].region = Some(region);
        self.slots[id].used = 0;
        Ok(id)
    }

    /// The physical range whose struct pages the 2 MiB of vmemmap at `window` holds.
    fn window_span(&self, window: u64) -> (u64, u64) {
        let first = self.memstart_pfn.add((window - arch::VMEMMAP_BASE) / STRUCT_PAGE_SIZE);
        let pfns = PageSize::Size2M.bytes() / STRUCT_PAGE_SIZE;
        (addr_of(first), addr_of(first.add(pfns)))
    }

    /// vmemmap_populate with huge pages, for the memory `[start, end)`: each
    /// 2 MiB of vmemmap it touches gets a 2 MiB leaf if nothing maps any of
    /// it yet (struct pages of absent neighbours included, as x86 and arm64
    /// do), is reused if a leaf maps it already (a neighbour's in the same
    /// section), and gets base pages for the range's part if base pages
    /// map some of it.
    fn populate_memmap(&mut self, mm: &mut Mm, start: u64, end: u64) -> Result<(), VmemmapError> {
        let big = PageSize::Size2M.bytes();
        let (first, last) = (self.va(pfn_of(start)).0, self.va(pfn_of(end)).0);
        let mut window = align_down(first, big);
        while window < last {
            if mm.table.block_is_empty(VirtAddr(window), PageSize::Size2M) {
                let frame = mm.frames.alloc(PageSize::Size2M, Purpose::Vmemmap)?;
                match mm.table.map(mm.frames, VirtAddr(window), frame, PageSize::Size2M, Prot::RW) {
                    // Empty entries are never cached: nothing to flush.
                    Ok(flush) => flush.ignore(),
                    Err(e) => {
                        mm.frames.free(frame, big, Purpose::Vmemmap);
                        return Err(e.into());
                    }
                }
            } else if mm.table.translate(VirtAddr(window)).map(|t| t.size) != Some(PageSize::Size2M) {
                let mut va = first.max(window);
                while va < last.min(window + big) {
                    if mm.table.translate(VirtAddr(va)).is_none() {
                        let frame = mm.frames.alloc(arch::BASE_PAGE, Purpose::Vmemmap)?;
                        if let Err(e) = mm.table.map(mm.frames, VirtAddr(va), frame, arch::BASE_PAGE, Prot::RW) {
                            mm.frames.free(frame, PAGE, Purpose::Vmemmap);
                            return Err(e.into());
                        }
                    }
                    va += PAGE;
                }
            }
            window += big;
        }
        Ok(())
    }

    /// Unmaps the leaf at `va`, if any, and frees its frame.
    fn unmap_and_free(&self, mm: &mut Mm, va: u64) {
        if let Ok((frame, size, flush)) = mm.table.unmap(VirtAddr(va)) {
            self.complete(flush, FlushPath::Teardown);
            mm.frames.free(frame, size.bytes(), Purpose::Vmemmap);
        }
    }

    /// vmemmap_free for the memory `[start, end)`, after its subsections go:
    /// a 2 MiB leaf is freed only once no subsection under it is present
    /// (x86's vmemmap_pmd_is_unused; knob `subsection-remove-frees-leaf`
    /// frees it regardless, the arm64 bug); base pages are freed for the
    /// range's part, or for the whole 2 MiB once nothing under it is present.
    fn depopulate_memmap(&mut self, mm: &mut Mm, start: u64, end: u64) {
        self.sections.deactivate(start, end);
        let big = PageSize::Size2M.bytes();
        let (first, last) = (self.va(pfn_of(start)).0, self.va(pfn_of(end)).0);
        let mut window = align_down(first, big);
        while window < last {
            let (lo, hi) = self.window_span(window);
            let in_use = self.sections.any_present(lo, hi);
            match mm.table.translate(VirtAddr(window)) {
                Some(t) if t.size == PageSize::Size2M => {
                    if !in_use || self.knob(Knob::SubsectionRemoveFreesLeaf) {
                        self.unmap_and_free(mm, window);
                    }
                }
                _ => {
                    let (mut va, stop) =
                        if in_use { (first.max(window), last.min(window + big)) } else { (window, window + big) };
                    while va < stop {
                        self.unmap_and_free(mm, va);
                        va += PAGE;
                    }
                }
            }
            window += big;
        }
        let (from, to) = (VirtAddr(align_down(first, big)), VirtAddr(align_up(last, big)));
        self.free_empty_tables(mm, from, to);
    }

    /// Frees the 2 MiB leaves over the struct pages of `[start, end)` that
    /// no present subsection needs any more: a leaf memory populated stays
    /// while a device range beside it keeps its struct pages there, and goes
    /// with the last of them (radix's remove_pmd_table: vmemmap_pmd_is_unused).
    pub(super) fn free_unused_leaves(&mut self, mm: &mut Mm, start: u64, end: u64) {
        let big = PageSize::Size2M.bytes();
        let (first, last) = (self.va(pfn_of(start)).0, self.va(pfn_of(end)).0);
        let mut window = align_down(first, big);
        while window < last {
            let (lo, hi) = self.window_span(window);
            let leaf = mm.table.translate(VirtAddr(window)).is_some_and(|t| t.size == PageSize::Size2M);
            if leaf && !self.sections.any_present(lo, hi) {
                self.unmap_and_free(mm, window);
            }
            window += big;
        }
    }

    /// Tears down a hot-added range's vmemmap (vmemmap_free): every PTE
    /// unmapped and flushed, private frames freed, the shared tail page's
    /// references dropped, the range's subsections deactivated, and leaves
    /// and page-table pages freed once nothing needs them.
    pub fn hot_remove(&mut self, mm: &mut Mm, id: usize) -> Result<(), VmemmapError> {
        let region = self.region(id)?;
        if region.kind == RegionKind::Memory {
            // Memory still lending HugeTLB folios cannot go.
            if self.slots.iter().any(|s| s.origin == Some(id)) {
                return Err(VmemmapError::Busy);
            }
            let (start, end) = region.device_range();
            self.depopulate_memmap(mm, start, end);
            self.slots[id].region = None;
            return Ok(());
        }
        if region.kind != RegionKind::Dax {
            return Err(VmemmapError::NoSuchRegion);
        }
        for head in region.heads() {
            self.depopulate_compound(mm, &region, head);
        }
        let (start, end) = region.device_range();
        self.sections.deactivate(start, end);
        self.free_unused_leaves(mm, start, end);
        self.free_vmemmap_tables(mm, &region);
        if let Some((tags, bytes)) = self.slots[id].pageblock_tags.take() {
            mm.frames.free(tags, bytes, Purpose::Usemap);
        }
        self.slots[id].region = None;
        Ok(())
    }
}
