//! Device DAX: hot-added ranges of compound pages whose vmemmap is
//! populated straight into its layout (vmemmap_populate_compound_pages and
//! the other ZONE_DEVICE paths of mm/sparse-vmemmap.c), and taken down again.

use hvo_abi::model::{pageblock_pages, Knob, Layout, RegionKind, StructPage, Zone, MIGRATE_MOVABLE, STRUCT_PAGE_SIZE};

use super::shared_tails::tail_page;
use super::{
    addr_of, pfn_of, reserved_vmemmap_pages, FlushPath, Mm, Region, Vmemmap, VmemmapError, STRUCT_PAGES_PER_PAGE,
};
use crate::arch::{self, PAGE};
use crate::mm::frames::{align_down, align_up, FrameAllocator, Purpose};
use crate::mm::pagetable::Prot;
use crate::mm::{PageSize, Pfn, PhysAddr, VirtAddr};

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
    /// Vmemmap a 2 MiB leaf maps already (hot-added memory beside the range
    /// populated it: with 64 KiB pages one leaf holds the struct pages of
    /// 2 GiB) stays in that leaf, as radix's vmemmap_populate (altmap or
    /// not) and vmemmap_populate_compound_pages leave an existing PMD leaf
    /// alone; a compound page whose private pages lie there is not optimized.
    /// If an allocation fails, everything done so far is undone.
    pub fn hot_add(&mut self, mm: &mut Mm, request: DaxRequest) -> Result<usize, VmemmapError> {
        let DaxRequest { start, size, order, zone, layout, altmap } = request;
        let id = self.free_slot()?;
        let compound = PAGE << order;
        // The altmap holds the whole range's struct pages, rounded up to
        // whole compound pages; the compound pages start after it (knob
        // `altmap-reserve-unaligned`: rounded to a page, and they start off
        // their alignment).
        let rounding = if self.knob(Knob::AltmapReserveUnaligned) { PAGE } else { compound };
        let reserve = if altmap { align_up(size / PAGE * STRUCT_PAGE_SIZE, rounding) } else { 0 };
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
        let mut region = Region {
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
        let mut any_optimized = false;
        for (done, head) in region.heads().enumerate() {
            let populated = if self.sections.is_early(addr_of(head)) {
                self.init_in_boot_memmap(&region, head, if optimizable { Some(layout) } else { None });
                Ok(())
            } else {
                any_optimized |= self.optimized_here(mm, &region, head);
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
        if !any_optimized && region.vmemmap_pages() > 0 {
            // Every compound page's vmemmap was a neighbour's leaf already.
            region.optimized = false;
            region.layout = Layout::None;
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
    /// compound pages taken down, the whole range's subsections
    /// deactivated, and leaves and tables nothing needs any more freed.
    fn roll_back_hot_add(&mut self, mm: &mut Mm, region: &Region, populated: usize) {
        for head in region.heads().take(populated) {
            self.depopulate_compound(mm, region, head);
        }
        let (start, end) = region.device_range();
        self.sections.deactivate(start, end);
        self.free_unused_leaves(mm, start, end);
        self.free_vmemmap_tables(mm, region);
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
        self.write_compound_range(region, head, 0, count);
    }

    /// Writes struct pages `from..to` of a compound page (0 is its head).
    fn write_compound_range(&mut self, region: &Region, head: Pfn, from: u64, to: u64) {
        let (zone, order) = (region.zone, region.order);
        let mut first_tail = head.add(from);
        if from == 0 && to > 0 {
            self.write_struct_page(head, StructPage::head(zone, order));
            first_tail = head.add(1);
        }
        self.fill_struct_pages(first_tail, head.add(to), StructPage::tail(zone, order));
        self.struct_pages_initialized += to - from;
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

    /// Whether the compound page at `head` is optimized: its region is, and
    /// the vmemmap pages its layout keeps private are its own, not in a
    /// neighbour's 2 MiB leaf. radix's vmemmap_populate_compound_pages skips
    /// an existing PMD leaf ("existing huge mapping. Skip the range") and,
    /// when the second vmemmap page lies in one, maps the rest "to page size
    /// without deduplication". (With the head its own and the first tail in
    /// a leaf, its legacy path fails the hot-add with -ENOMEM instead;
    /// 256 MiB-aligned ranges never place a head there.)
    fn optimized_here(&self, mm: &Mm, region: &Region, head: Pfn) -> bool {
        let base = self.va(head).0;
        let mut leaf = LeafProbe::new();
        region.optimized
            && region.vmemmap_pages() > 0
            && (0..reserved_vmemmap_pages(region.layout)).all(|i| !leaf.at(mm, base + i * PAGE))
    }

    /// Maps one DAX compound page's vmemmap and writes its private struct
    /// pages. Vmemmap pages in a neighbour's leaf stay there (see
    /// `init_in_leaf` for their struct pages).
    fn populate_compound(
        &mut self,
        mm: &mut Mm,
        region: &Region,
        head: Pfn,
        source: &mut MemmapSource,
    ) -> Result<(), VmemmapError> {
        let (zone, order) = (region.zone, region.order);
        let base = self.va(head).0;
        if region.vmemmap_pages() == 0 {
            // The vmemmap page holds neighbours' struct pages too, as
            // vmemmap_populate over the whole range maps it: mapped once
            // (or already, by a leaf of memory beside it). A compound page
            // off its alignment straddles two (compound-aligned reports it).
            let first = align_down(base, PAGE);
            for i in 0..pages_touched(base, order) {
                let page = VirtAddr(first + i * PAGE);
                if mm.table.translate(page).is_none() {
                    let frame = source.frame(mm.frames)?;
                    self.map_private(mm, region, page, frame)?;
                }
            }
            self.write_compound(region, head, 1 << order);
            return Ok(());
        }
        let pages = region.vmemmap_pages();
        let optimized = self.optimized_here(mm, region, head);
        let private = if optimized { reserved_vmemmap_pages(region.layout) } else { pages };
        let mut leaf = LeafProbe::new();
        let mut first_tail_page = PhysAddr(0);
        for i in 0..private {
            let va = base + i * PAGE;
            if leaf.at(mm, va) {
                continue;
            }
            if i == 0 && optimized && self.knob(Knob::HeadShared) {
                // Knob `head-shared`: the head page maps the shared tail
                // page too, and its struct pages are never written.
                let shared = self.get_shared_tail(mm.frames, zone, order)?;
                if let Err(e) = mm.table.map(mm.frames, VirtAddr(va), shared, arch::BASE_PAGE, Prot::RO) {
                    self.put_shared_tail(mm.frames, zone, order);
                    return Err(e.into());
                }
                continue;
            }
            let frame = source.frame(mm.frames)?;
            self.map_private(mm, region, VirtAddr(va), frame)?;
            self.write_compound_range(region, head, i * STRUCT_PAGES_PER_PAGE, (i + 1) * STRUCT_PAGES_PER_PAGE);
            if i == 1 {
                first_tail_page = frame;
            }
        }
        // Struct pages in the shared page are right already (skipped, as at boot).
        let (mut target, mut mapped_any) = (None, false);
        for i in private..pages {
            let va = base + i * PAGE;
            if leaf.at(mm, va) {
                continue;
            }
            let (frame, prot) = match target {
                Some(t) => t,
                None => {
                    let t = match region.layout {
                        Layout::LegacyDax => (first_tail_page, self.legacy_dax_tails()),
                        // Knob `per-folio-tail`: every compound page gets a tail page of its own.
                        _ if self.knob(Knob::PerFolioTail) => (tail_page(mm.frames, zone, order)?, Prot::RO),
                        _ => (self.get_shared_tail(mm.frames, zone, order)?, Prot::RO),
                    };
                    // Knob `tails-writable`: the tails keep write permission.
                    let t = if self.knob(Knob::TailsWritable) { (t.0, Prot::RW) } else { t };
                    target = Some(t);
                    t
                }
            };
            if let Err(e) = mm.table.map(mm.frames, VirtAddr(va), frame, arch::BASE_PAGE, prot) {
                // With no tail mapped, the undo cannot see the reference taken.
                if !mapped_any && region.layout == Layout::Unified {
                    self.put_shared_tail(mm.frames, zone, order);
                }
                return Err(e.into());
            }
            mapped_any = true;
        }
        self.init_in_leaf(mm, region, head);
        Ok(())
    }

    /// memmap init of the struct pages a compound page keeps in a
    /// neighbour's leaf: poisoned first (sparse_add_section's
    /// page_init_poison), then written as an unoptimized compound page's.
    /// Knob `boot-section-partial-init` writes only those an optimized
    /// compound page keeps private: memmap_init_zone_device's
    /// compound_nr_pages() asks vmemmap_can_optimize(), not where the struct
    /// pages went, and leaves the rest poisoned.
    fn init_in_leaf(&mut self, mm: &Mm, region: &Region, head: Pfn) {
        let base = self.va(head).0;
        let per_page = STRUCT_PAGES_PER_PAGE;
        let partial = self.knob(Knob::BootSectionPartialInit) && region.optimized;
        let mut leaf = LeafProbe::new();
        for i in 0..region.vmemmap_pages() {
            if !leaf.at(mm, base + i * PAGE) {
                continue;
            }
            self.fill_struct_pages(head.add(i * per_page), head.add((i + 1) * per_page), StructPage::POISONED);
            if !partial || i < reserved_vmemmap_pages(region.layout) {
                self.write_compound_range(region, head, i * per_page, (i + 1) * per_page);
            }
        }
    }

    /// Unmaps whatever of one DAX compound page's vmemmap is mapped, frees
    /// its private frames (the altmap's are the device's) and drops its
    /// reference on the shared page. The boot memmap of an early section
    /// stays, and so does a neighbour's leaf (`free_unused_leaves` frees it
    /// once nothing under it is present).
    pub(super) fn depopulate_compound(&mut self, mm: &mut Mm, region: &Region, head: Pfn) {
        if self.sections.is_early(addr_of(head)) {
            return;
        }
        let head_va = self.va(head).0;
        let pages = match region.vmemmap_pages() {
            0 => pages_touched(head_va, region.order),
            n => n,
        };
        let optimized = self.optimized_here(mm, region, head);
        let private = if optimized { reserved_vmemmap_pages(region.layout) } else { pages };
        // A vmemmap page shared with neighbours goes with the first of them:
        // they are all in this range and all going.
        let base = align_down(head_va, PAGE);
        let mut leaf = LeafProbe::new();
        let mut held_shared = false;
        for i in 0..pages {
            let va = base + i * PAGE;
            if leaf.at(mm, va) {
                continue;
            }
            if let Ok((frame, _, flush)) = mm.table.unmap(VirtAddr(va)) {
                self.complete(flush, FlushPath::Teardown);
                if i >= private {
                    held_shared = true;
                } else if Ok(frame) == self.shared_tail_pa(region.zone, region.order) {
                    // A head mapping the shared page (knob `head-shared`) held a user of it.
                    self.put_shared_tail(mm.frames, region.zone, region.order);
                } else if !region.in_altmap(frame) {
                    mm.frames.free(frame, PAGE, Purpose::Vmemmap);
                }
            }
        }
        if held_shared && optimized && region.layout == Layout::Unified {
            self.put_shared_tail(mm.frames, region.zone, region.order);
        }
    }

    pub(super) fn free_vmemmap_tables(&self, mm: &mut Mm, region: &Region) {
        let end = self.va(region.end_pfn());
        self.free_empty_tables(mm, self.va(region.start_pfn), end);
    }
}

/// The vmemmap pages the struct pages of a compound page of `order` whose
/// head struct page is at `head_va` touch: one, for a compound page smaller
/// than a vmemmap page's worth, unless it is off its alignment.
fn pages_touched(head_va: u64, order: u32) -> u64 {
    (align_up(head_va + (STRUCT_PAGE_SIZE << order), PAGE) - align_down(head_va, PAGE)) / PAGE
}

/// Whether a leaf larger than a base page (a 2 MiB leaf hot-added memory
/// populated) maps a vmemmap address, asked once per 2 MiB window.
struct LeafProbe {
    window: Option<(u64, bool)>,
}

impl LeafProbe {
    fn new() -> LeafProbe {
        LeafProbe { window: None }
    }

    fn at(&mut self, mm: &Mm, va: u64) -> bool {
        let window = align_down(va, PageSize::Size2M.bytes());
        match self.window {
            Some((w, leaf)) if w == window => leaf,
            _ => {
                let leaf = mm.table.translate(VirtAddr(window)).is_some_and(|t| t.size != arch::BASE_PAGE);
                self.window = Some((window, leaf));
                leaf
            }
        }
    }
}
