//! HugeTLB folios and their vmemmap optimization (mm/hugetlb_vmemmap.c):
//! each folio's tail vmemmap pages remapped onto one page under the
//! layout asked for, and restored to private pages again.

use hvo_abi::model::{Knob, Layout, RegionKind, StructPage, Zone};

use super::shared_tails::tail_page;
use super::{addr_of, reserved_vmemmap_pages, FlushPath, Mm, Region, Vmemmap, VmemmapError, BOOT_ZONE};
use crate::arch::{self, PAGE};
use crate::mm::frames::{align_down, align_up, AllocError, FrameAllocator, Purpose};
use crate::mm::pagetable::{MapError, Prot};
use crate::mm::{PageSize, Pfn, PhysAddr, VirtAddr};

/// A change to one compound page of a region (optimize, restore, and their undos).
type FolioOp = fn(&mut Vmemmap, &mut Mm, &Region, Pfn) -> Result<(), VmemmapError>;

impl Vmemmap {
    /// Allocates `count` HugeTLB folios of `order` as one region; returns its id.
    pub fn hugetlb_alloc(
        &mut self,
        frames: &mut FrameAllocator,
        order: u32,
        count: u64,
        zone: Zone,
        from: Option<usize>,
    ) -> Result<usize, VmemmapError> {
        let id = self.free_slot()?;
        let folio = PAGE << order;
        let start = match from {
            None => frames.alloc_data(folio * count, folio, Purpose::HugeTlb)?,
            Some(memory) => {
                // Carved from hot-added memory, which stays that region's.
                let m = self.region(memory)?;
                if m.kind != RegionKind::Memory {
                    return Err(VmemmapError::NoSuchRegion);
                }
                let start = align_up(addr_of(m.start_pfn.add(self.slots[memory].used)), folio);
                let end = start + folio * count;
                if end > addr_of(m.end_pfn()) {
                    return Err(VmemmapError::Map(MapError::Alloc(AllocError::OutOfMemory)));
                }
                self.slots[memory].used = super::pfn_of(end).pages_since(m.start_pfn);
                self.slots[id].origin = Some(memory);
                PhysAddr(start)
            }
        };
        let region = Region {
            kind: RegionKind::HugeTlb,
            start_pfn: Pfn::containing(start, arch::BASE_PAGE),
            nr_pages: count << order,
            zone,
            order,
            layout: Layout::None,
            optimized: false,
            altmap_pfns: 0,
        };
        for head in region.heads() {
            self.write_struct_page(head, StructPage::head(zone, order));
            self.fill_struct_pages(head.add(1), head.add(1 << order), StructPage::tail(zone, order));
        }
        self.slots[id].region = Some(region);
        Ok(id)
    }

    /// Returns a region's folios: restored first if optimized, struct pages
    /// back to free, data pages back to the allocator.
    pub fn hugetlb_free(&mut self, mm: &mut Mm, id: usize) -> Result<(), VmemmapError> {
        let region = self.region(id)?;
        if region.optimized {
            self.restore(mm, id)?;
        }
        // The pages go back to the zone of the memory they came from:
        // hot-added memory's own, boot memory's normal (as memmap init left
        // it). Knob `free-resets-zone`: always the normal zone.
        let origin = self.slots[id].origin;
        let home = origin.and_then(|m| self.slots[m].region).map_or(BOOT_ZONE, |m| m.zone);
        let zone = if self.knob(Knob::FreeResetsZone) { Zone::Normal } else { home };
        self.fill_struct_pages(region.start_pfn, region.end_pfn(), StructPage::free(zone));
        // Folios of hot-added memory go back to it, not to the boot allocator.
        if self.slots[id].origin.take().is_none() {
            let start = region.start_pfn.start(arch::BASE_PAGE);
            mm.frames.free(start, region.nr_pages * PAGE, Purpose::HugeTlb);
        }
        self.slots[id].region = None;
        Ok(())
    }

    /// Points the vmemmap page at `va` to a fresh copy of itself; returns the copy.
    fn copy_to_fresh(&self, mm: &mut Mm, va: VirtAddr) -> Result<PhysAddr, VmemmapError> {
        let fresh = mm.frames.alloc(arch::BASE_PAGE, Purpose::Vmemmap)?;
        // SAFETY: `va` is mapped (readable) vmemmap; `fresh` is ours.
        unsafe { core::ptr::copy_nonoverlapping(va.0 as *const u8, fresh.as_mut_ptr::<u8>(), PAGE as usize) };
        self.remap_and_free(mm, va, fresh, Prot::RW, FlushPath::PrivateCopy)?;
        Ok(fresh)
    }

    /// Points the vmemmap page at `va` to `target` and frees the frame it mapped.
    fn remap_and_free(
        &self,
        mm: &mut Mm,
        va: VirtAddr,
        target: PhysAddr,
        prot: Prot,
        path: FlushPath,
    ) -> Result<(), VmemmapError> {
        let (old, flush) = mm.table.remap(va, target, prot, self.sequence())?;
        self.complete(flush, path);
        mm.frames.free(old, PAGE, Purpose::Vmemmap);
        Ok(())
    }

    /// Optimizes every compound page of a region under `layout`. If an
    /// allocation fails, the compound pages already optimized are restored:
    /// the region ends as it began, with every frame accounted for.
    pub fn optimize(&mut self, mm: &mut Mm, id: usize, layout: Layout) -> Result<(), VmemmapError> {
        let mut region = self.region(id)?;
        if region.optimized {
            return Err(VmemmapError::AlreadyOptimized);
        }
        if layout == Layout::None {
            return Err(VmemmapError::TooSmallToOptimize);
        }
        // Nothing to share (hugetlb_vmemmap_optimize_folio returns when the
        // optimizable size is 0): the folios stay as they are. Knob
        // `small-compound-optimized` is off by one: a folio with exactly as
        // many vmemmap pages as the layout keeps private is optimized.
        let (pages, kept) = (region.vmemmap_pages(), reserved_vmemmap_pages(layout));
        let too_small = if self.knob(Knob::SmallCompoundOptimized) { pages < kept } else { pages <= kept };
        if too_small {
            return Ok(());
        }
        region.layout = layout;
        // A failing compound page is left unoptimized; the others are restored.
        self.each_folio(mm, &region, Self::optimize_folio, Self::restore_folio)?;
        region.optimized = true;
        self.slots[id].region = Some(region);
        Ok(())
    }

    /// Applies `op` to every compound page of `region`; if it fails on one,
    /// `undo` is applied to those done, so the region ends as it began.
    fn each_folio(&mut self, mm: &mut Mm, region: &Region, op: FolioOp, undo: FolioOp) -> Result<(), VmemmapError> {
        for (done, head) in region.heads().enumerate() {
            if let Err(e) = op(self, mm, region, head) {
                for earlier in region.heads().take(done) {
                    undo(self, mm, region, earlier)?;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// One compound page. Every allocation comes before the first tail is
    /// remapped, so a failure leaves it unoptimized (all pages private).
    fn optimize_folio(&mut self, mm: &mut Mm, region: &Region, head: Pfn) -> Result<(), VmemmapError> {
        let pages = region.vmemmap_pages();
        let base = self.va(head);
        // Knob `skip-split`: a vmemmap under a 2 MiB leaf is left as it is.
        if self.knob(Knob::SkipSplit) && mm.table.translate(base).is_some_and(|t| t.size != arch::BASE_PAGE) {
            return Ok(());
        }
        // HVO needs base-page PTEs: split any 2 MiB leaf over this vmemmap.
        let mut va = base.0;
        while va < base.0 + pages * PAGE {
            if let Some(flush) = mm.table.split(mm.frames, VirtAddr(va), self.sequence())? {
                self.complete(flush, FlushPath::Optimize);
            }
            va = align_down(va, PageSize::Size2M.bytes()) + PageSize::Size2M.bytes();
        }
        let head_frame = if self.knob(Knob::HeadShared) {
            // Knob `head-shared`: the head page goes to the shared tail page too.
            let shared = self.get_shared_tail(mm.frames, region.zone, region.order)?;
            self.remap_and_free(mm, base, shared, Prot::RO, FlushPath::PrivateCopy)?;
            shared
        } else {
            self.copy_to_fresh(mm, base)?
        };
        let (first_shared, target, prot) = match region.layout {
            // Knob `per-folio-tail`: every folio gets a tail page of its own.
            Layout::Unified if self.knob(Knob::PerFolioTail) => {
                (1, tail_page(mm.frames, region.zone, region.order)?, Prot::RO)
            }
            Layout::Unified => (1, self.get_shared_tail(mm.frames, region.zone, region.order)?, Prot::RO),
            Layout::LegacyHugetlb => (1, head_frame, Prot::RO),
            Layout::LegacyDax => (2, self.copy_to_fresh(mm, VirtAddr(base.0 + PAGE))?, self.legacy_dax_tails()),
            Layout::None => return Err(VmemmapError::TooSmallToOptimize),
        };
        // Knob `tails-writable`: the tails keep write permission.
        let prot = if self.knob(Knob::TailsWritable) { Prot::RW } else { prot };
        for i in first_shared..pages {
            let va = VirtAddr(base.0 + i * PAGE);
            // Like the kernel's remap walk, look at the tail page before
            // remapping it: its old translation is live in the TLB, which
            // is what the flush after the remap must kill.
            // SAFETY: mapped, readable vmemmap.
            let _ = unsafe { (va.0 as *const u64).read_volatile() };
            self.remap_and_free(mm, va, target, prot, FlushPath::Optimize)?;
        }
        Ok(())
    }

    /// The first tail page a layout shares, and what the tails map and how.
    fn sharing(&self, mm: &Mm, region: &Region, base: VirtAddr) -> Result<(u64, PhysAddr, Prot), VmemmapError> {
        let first_shared = if region.layout == Layout::LegacyDax { 2 } else { 1 };
        let tail =
            mm.table.translate(VirtAddr(base.0 + first_shared * PAGE)).ok_or(VmemmapError::Map(MapError::NotMapped))?;
        Ok((first_shared, tail.pa, tail.prot))
    }

    /// Gives every vmemmap page of a region's compound pages its own frame
    /// again. If an allocation fails, the compound pages already restored are
    /// optimized again: the region stays optimized, every frame accounted for.
    pub fn restore(&mut self, mm: &mut Mm, id: usize) -> Result<(), VmemmapError> {
        let mut region = self.region(id)?;
        if !region.optimized {
            // Nothing to give back (hugetlb_vmemmap_restore_folio returns 0
            // for a folio that was never optimized, as a small one is not).
            return Ok(());
        }
        // A failing compound page stays optimized; the others are optimized again.
        self.each_folio(mm, &region, Self::restore_folio, Self::reoptimize_folio)?;
        region.optimized = false;
        region.layout = Layout::None;
        self.slots[id].region = Some(region);
        Ok(())
    }

    /// One compound page; on a failed allocation its tails go back where they were.
    fn restore_folio(&mut self, mm: &mut Mm, region: &Region, head: Pfn) -> Result<(), VmemmapError> {
        let pages = region.vmemmap_pages();
        let base = self.va(head);
        let (first_shared, target, prot) = self.sharing(mm, region, base)?;
        for i in first_shared..pages {
            let fresh = match tail_page(mm.frames, region.zone, region.order) {
                Ok(f) => f,
                Err(e) => {
                    for j in first_shared..i {
                        let va = VirtAddr(base.0 + j * PAGE);
                        self.remap_and_free(mm, va, target, prot, FlushPath::Restore)?;
                    }
                    return Err(e);
                }
            };
            // The old frame is shared (or the head's): it stays.
            let (_shared, flush) = mm.table.remap(VirtAddr(base.0 + i * PAGE), fresh, Prot::RW, self.sequence())?;
            self.complete(flush, FlushPath::Restore);
        }
        if region.layout == Layout::Unified {
            self.put_shared_tail(mm.frames, region.zone, region.order);
        }
        Ok(())
    }

    /// Maps a restored compound page's tails back onto its layout's page,
    /// without allocating (the rollback of a failed restore).
    fn reoptimize_folio(&mut self, mm: &mut Mm, region: &Region, head: Pfn) -> Result<(), VmemmapError> {
        let base = self.va(head);
        let mapped = |va: VirtAddr| mm.table.translate(va).map(|t| t.pa).ok_or(VmemmapError::Map(MapError::NotMapped));
        let (first_shared, target, prot) = match region.layout {
            // The region's other compound pages still hold the shared page.
            Layout::Unified => (1, self.get_shared_tail(mm.frames, region.zone, region.order)?, Prot::RO),
            Layout::LegacyHugetlb => (1, mapped(base)?, Prot::RO),
            Layout::LegacyDax => (2, mapped(VirtAddr(base.0 + PAGE))?, Prot::RW),
            Layout::None => return Err(VmemmapError::NotOptimized),
        };
        for i in first_shared..region.vmemmap_pages() {
            self.remap_and_free(mm, VirtAddr(base.0 + i * PAGE), target, prot, FlushPath::Optimize)?;
        }
        Ok(())
    }
}
