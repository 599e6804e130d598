//! Device DAX: hot-added ranges of compound pages whose vmemmap is
//! populated straight into its layout (vmemmap_populate_compound_pages and
//! the other ZONE_DEVICE paths of mm/sparse-vmemmap.c), and taken down again.

use hvo_abi::model::{pageblock_pages, Knob, Layout, RegionKind, StructPage, Zone, MIGRATE_MOVABLE, STRUCT_PAGE_SIZE};

use super::shared_tails::tail_page;
use super::{addr_of, pfn_of, reserved_vmemmap_pages, Mm, Region, Vmemmap, VmemmapError, STRUCT_PAGES_PER_PAGE};
use crate::arch::{self, PAGE};
use crate::mm::frames::{align_down, align_up, FrameAllocator, Purpose};
use crate::mm::pagetable::Prot;
use crate::mm::{Pfn, PhysAddr, VirtAddr};

/// A hot-added device DAX range (the HotAdd command).
#[derive(Clone, Copy, Debug)]
pub struct DaxRequest {
    pub start: PhysAddr,
    pub size: u64,
    /// Of its compound pages.
    pub order: u32,
    pub zone: Zone,
    pub layout: Layout,
    /// The struct pages go on the device itself (vmem_altmap).
    pub altmap: bool,
}

/// Where a range's vmemmap frames come from: system memory, or the pages
/// set aside at the start of the device (vmem_altmap).
enum MemmapSource {
    System,
    Altmap { next: u64, end: u64 },
}

impl MemmapSource {
    fn frame(&mut self, frames: &mut FrameAllocator) -> Result<PhysAddr, VmemmapError> {
        match self {
            MemmapSource::System => Ok(frames.alloc(arch::BASE_PAGE, Purpose::Vmemmap)?),
            MemmapSource::Altmap { next, end } if *next < *end => {
                let frame = PhysAddr(*next);
                *next += PAGE;
                Ok(frame)
            }
            MemmapSource::Altmap { .. } => Err(VmemmapError::NoRoomForAltmap),
        }
    }
}

impl Vmemmap {
    /// A hotplugged range becomes device DAX with compound pages of `order`
    /// (section_activate, then vmemmap_populate_compound_pages): every
    /// compound page's vmemmap is populated straight into its layout, head
    /// page (and, under legacy-dax, the first tail page) private, the rest
    /// on the shared page; unoptimized (`none`, too small to share, or with
    /// an altmap) every page gets its own frame. Compound pages in the empty
    /// subsections of an early section keep the boot memmap, unoptimized.
    /// If an allocation fails, everything done so far is undone.
    pub fn hot_add(&mut self, mm: &mut Mm, request: DaxRequest) -> Result<usize, VmemmapError> {
        let DaxRequest { start, size, order, zone, layout, altmap } = request;
        let id = self.free_slot()?;
        let compound = PAGE << order;
        // The altmap holds the whole range's struct pages, rounded up to
        // whole compound pages; the compound pages start after it.
        let reserve = if altmap { align_up(size / PAGE * STRUCT_PAGE_SIZE, compound) } else { 0 };
        if reserve >= size {
            return Err(VmemmapError::NoRoomForAltmap);
        }
        // vmemmap_can_optimize: more vmemmap pages than the layout keeps
        // private (knob `small-compound-optimized` forgets to ask).
        let room = (1u64 << order) / STRUCT_PAGES_PER_PAGE > reserved_vmemmap_pages(layout);
        let optimizable = layout != Layout::None && (room || self.knob(Knob::SmallCompoundOptimized));
        // Knob `optimize-altmap`: the altmap is no obstacle.
        let optimized =
            optimizable && (!altmap || self.knob(Knob::OptimizeAltmap)) && !self.sections.is_early(start.0 + reserve);
        let region = Region {
            kind: RegionKind::Dax,
            start_pfn: pfn_of(start.0 + reserve),
            nr_pages: (size - reserve) / PAGE,
            zone,
            order,
            layout: if optimized { layout } else { Layout::None },
            optimized,
            altmap_pfns: reserve / PAGE,
        };
        self.sections.activate(mm.frames, start.0, start.0 + size, false)?;
        let mut source =
            if altmap { MemmapSource::Altmap { next: start.0, end: start.0 + reserve } } else { MemmapSource::System };
        for (done, head) in region.heads().enumerate() {
            let populated = if self.sections.is_early(addr_of(head)) {
                self.init_in_boot_memmap(&region, head, if optimizable { Some(layout) } else { None });
                Ok(())
            } else {
                self.populate_compound(mm, &region, head, &mut source)
            };
            if let Err(e) = populated {
                self.roll_back_hot_add(mm, &region, done + 1);
                if self.knob(Knob::HotAddRollbackOvercount) {
                    // The bug: the whole range's vmemmap is subtracted.
                    let never = (region.heads().count() - done) as u64 * Self::private_pages(&region);
                    mm.frames.miscount_vmemmap(0, never);
                }
                return Err(e);
            }
        }
        match self.tag_pageblocks(mm.frames, &region) {
            Ok(tags) => self.slots[id].pageblock_tags = Some(tags),
            Err(e) => {
                self.roll_back_hot_add(mm, &region, region.heads().count());
                return Err(e);
            }
        }
        if self.knob(Knob::DaxCountedUnoptimized) && !altmap {
            // The bug: every compound page counted at its unoptimized size.
            let pages = region.vmemmap_pages().max(1);
            mm.frames.miscount_vmemmap(region.heads().count() as u64 * (pages - Self::private_pages(&region)), 0);
        }
        self.slots[id].region = Some(region);
        Ok(id)
    }

    /// Undoes a failed `hot_add`: the vmemmap of the first `populated`
    /// compound pages taken down, emptied tables freed, and the whole
    /// range's subsections deactivated.
    fn roll_back_hot_add(&mut self, mm: &mut Mm, region: &Region, populated: usize) {
        for head in region.heads().take(populated) {
            self.depopulate_compound(mm, region, head);
        }
        self.free_vmemmap_tables(mm, region);
        let (start, end) = region.device_range();
        self.sections.deactivate(start, end);
    }

    /// memmap_init_compound for a compound page whose struct pages are in an
    /// early section's boot memmap: nothing is shared there, so all of them
    /// are written. Knob `boot-section-partial-init` writes only those an
    /// optimized compound page under `wanted` would keep private (v8 6/6),
    /// leaving the rest of the boot memmap's poison.
    fn init_in_boot_memmap(&mut self, region: &Region, head: Pfn, wanted: Option<Layout>) {
        let all = 1u64 << region.order;
        let written = match wanted {
            Some(layout) if self.knob(Knob::BootSectionPartialInit) => {
                (reserved_vmemmap_pages(layout) * STRUCT_PAGES_PER_PAGE).min(all)
            }
            _ => all,
        };
        self.write_compound(region, head, written);
    }

    /// Writes the first `count` struct pages of a compound page.
    fn write_compound(&mut self, region: &Region, head: Pfn, count: u64) {
        let (zone, order) = (region.zone, region.order);
        for pfn in head.up_to(head.add(count)) {
            let page = if pfn == head { StructPage::head(zone, order) } else { StructPage::tail(zone, order) };
            self.write_struct_page(pfn, page);
        }
        self.struct_pages_initialized += count;
    }

    /// Sets every pageblock of a device range to movable (as memmap init of
    /// ZONE_DEVICE does), in a tag array of its own; returns where it is.
    fn tag_pageblocks(&self, frames: &mut FrameAllocator, region: &Region) -> Result<(PhysAddr, u64), VmemmapError> {
        let pageblock = pageblock_pages(PAGE);
        let count = region.nr_pages.div_ceil(pageblock);
        let bytes = count.div_ceil(PAGE) * PAGE;
        let tags = frames.alloc_data(bytes, PAGE, Purpose::Usemap)?;
        let per_compound = ((1u64 << region.order) / pageblock).max(1);
        for i in 0..count {
            // Knob `first-pageblock-only`: a compound page's later pageblocks are skipped.
            let skipped = self.knob(Knob::FirstPageblockOnly) && i % per_compound != 0;
            let tag = if skipped { 0 } else { MIGRATE_MOVABLE };
            // SAFETY: the tag array is ours, identity-mapped.
            unsafe { tags.add(i).as_mut_ptr::<u8>().write_volatile(tag) };
        }
        Ok((tags, bytes))
    }

    /// Vmemmap pages a DAX compound page keeps private under its layout.
    fn private_pages(region: &Region) -> u64 {
        if region.optimized {
            reserved_vmemmap_pages(region.layout)
        } else {
            region.vmemmap_pages().max(1)
        }
    }

    /// Maps `frame` at `va`; on failure a system-memory frame goes back
    /// (the altmap's are the device's).
    fn map_private(&self, mm: &mut Mm, region: &Region, va: VirtAddr, frame: PhysAddr) -> Result<(), VmemmapError> {
        if let Err(e) = mm.table.map(mm.frames, va, frame, arch::BASE_PAGE, Prot::RW) {
            if !region.in_altmap(frame) {
                mm.frames.free(frame, PAGE, Purpose::Vmemmap);
            }
            return Err(e.into());
        }
        // Empty entries are never cached: nothing to flush.
        Ok(())
    }

    /// Maps one DAX compound page's vmemmap and writes its private struct pages.
    fn populate_compound(
        &mut self,
        mm: &mut Mm,
        region: &Region,
        head: Pfn,
        source: &mut MemmapSource,
    ) -> Result<(), VmemmapError> {
        let (zone, order) = (region.zone, region.order);
        let pages = region.vmemmap_pages().max(1);
        let private = Self::private_pages(region);
        let base = self.va(head);
        if region.vmemmap_pages() == 0 {
            // The vmemmap page holds neighbours' struct pages too, as
            // vmemmap_populate over the whole range maps it: mapped once.
            let page = VirtAddr(align_down(base.0, PAGE));
            if mm.table.translate(page).is_none() {
                let frame = source.frame(mm.frames)?;
                self.map_private(mm, region, page, frame)?;
            }
            self.write_compound(region, head, 1 << order);
            return Ok(());
        }
        let mut first_tail_page = PhysAddr(0);
        for i in 0..private {
            let frame = source.frame(mm.frames)?;
            self.map_private(mm, region, VirtAddr(base.0 + i * PAGE), frame)?;
            if i == 1 {
                first_tail_page = frame;
            }
        }
        if private < pages {
            let (target, prot) = match region.layout {
                Layout::LegacyDax => (first_tail_page, Prot::RW),
                // Knob `per-folio-tail`: every compound page gets a tail page of its own.
                _ if self.knob(Knob::PerFolioTail) => (tail_page(mm.frames, zone, order)?, Prot::RO),
                _ => (self.get_shared_tail(mm.frames, zone, order)?, Prot::RO),
            };
            // Knob `tails-writable`: the tails keep write permission.
            let prot = if self.knob(Knob::TailsWritable) { Prot::RW } else { prot };
            for i in private..pages {
                if let Err(e) = mm.table.map(mm.frames, VirtAddr(base.0 + i * PAGE), target, arch::BASE_PAGE, prot) {
                    // With no tail mapped, the undo cannot see the reference taken.
                    if i == private && region.layout == Layout::Unified {
                        self.put_shared_tail(mm.frames, zone, order);
                    }
                    return Err(e.into());
                }
            }
        }
        // Struct pages in private vmemmap pages are written; those in the
        // shared page are right already (skipped, as at boot).
        self.write_compound(region, head, (private * STRUCT_PAGES_PER_PAGE).min(1 << order));
        Ok(())
    }

    /// Unmaps whatever of one DAX compound page's vmemmap is mapped, frees
    /// its private frames (the altmap's are the device's) and drops its
    /// reference on the shared page. The boot memmap of an early section stays.
    pub(super) fn depopulate_compound(&mut self, mm: &mut Mm, region: &Region, head: Pfn) {
        if self.sections.is_early(addr_of(head)) {
            return;
        }
        let pages = region.vmemmap_pages().max(1);
        let private = Self::private_pages(region);
        // A vmemmap page shared with neighbours goes with the first of them:
        // they are all in this range and all going.
        let base = VirtAddr(align_down(self.va(head).0, PAGE));
        let mut held_shared = false;
        for i in 0..pages {
            if let Ok((frame, _, flush)) = mm.table.unmap(VirtAddr(base.0 + i * PAGE)) {
                self.complete(flush);
                if i >= private {
                    held_shared = true;
                } else if !region.in_altmap(frame) {
                    mm.frames.free(frame, PAGE, Purpose::Vmemmap);
                }
            }
        }
        if held_shared && region.optimized && region.layout == Layout::Unified {
            self.put_shared_tail(mm.frames, region.zone, region.order);
        }
    }

    pub(super) fn free_vmemmap_tables(&self, mm: &mut Mm, region: &Region) {
        let end = self.va(region.end_pfn());
        mm.table.free_empty_tables(mm.frames, &self.tlb(), self.va(region.start_pfn), end);
    }
}
