//! The vmemmap model: sparse sections, boot population, memmap init, and
//! HugeTLB vmemmap optimization and restore under each layout, as Linux's
//! mm/sparse-vmemmap.c and mm/hugetlb_vmemmap.c do it, in miniature.

use hvo_abi::model::{pageblock_pages, Knob, Layout, RegionKind, StructPage, Zone, MIGRATE_MOVABLE, STRUCT_PAGE_SIZE};

use crate::arch;
use crate::mm::boot::Table;
use crate::mm::frames::{align_down, align_up, AllocError, FrameAllocator, Purpose};
use crate::mm::pagetable::{Flush, MapError, Prot};
use crate::mm::{PageSize, PhysAddr, Range, RangeList, VirtAddr, PAGE};
use crate::sparse::{SectionError, Sections, SUBSECTION};

pub const MAX_REGIONS: usize = hvo_abi::manifest::MAX_REGIONS;
pub const MAX_SHARED_TAILS: usize = hvo_abi::manifest::MAX_SHARED_TAILS;
const STRUCT_PAGES_PER_PAGE: u64 = PAGE / STRUCT_PAGE_SIZE;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum VmemmapError {
    Map(MapError),
    /// No free region slot, shared-tail slot, or such region.
    NoSuchRegion,
    TooManyRegions,
    TooManySharedTails,
    /// The compound page's struct pages fit in fewer than two vmemmap pages.
    TooSmallToOptimize,
    AlreadyOptimized,
    NotOptimized,
    /// Gigantic pages are reserved, and the vmemmap populated, once, at boot.
    TooLate,
    /// The region is still in use.
    Busy,
    /// Section bookkeeping refused the range (overlap, misalignment).
    Sections(SectionError),
    /// The range is too small to hold its own struct pages (altmap).
    NoRoomForAltmap,
    /// Persistent memory set aside at boot must be whole subsections of
    /// the last boot RAM range, and leave some RAM.
    BadPmemSize,
}

impl From<SectionError> for VmemmapError {
    fn from(e: SectionError) -> VmemmapError {
        match e {
            // Fault injection and exhaustion read the same everywhere.
            SectionError::Alloc(a) => VmemmapError::Map(MapError::Alloc(a)),
            other => VmemmapError::Sections(other),
        }
    }
}

impl From<MapError> for VmemmapError {
    fn from(e: MapError) -> VmemmapError {
        VmemmapError::Map(e)
    }
}

impl From<AllocError> for VmemmapError {
    fn from(e: AllocError) -> VmemmapError {
        VmemmapError::Map(MapError::Alloc(e))
    }
}

/// A run of compound pages allocated together.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub kind: RegionKind,
    pub start_pfn: u64,
    pub nr_pages: u64,
    pub zone: Zone,
    pub order: u32,
    pub layout: Layout,
    pub optimized: bool,
    /// DAX with an altmap: the pages just below `start_pfn` that hold the
    /// region's struct pages, on the device (0: in system memory).
    pub altmap_pfns: u64,
}

/// Where boot is: gigantic pages can be reserved only before the vmemmap is
/// populated (they are populated already optimized).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BootState {
    Early,
    Populated,
}

impl Region {
    fn heads(&self) -> impl Iterator<Item = u64> {
        let step = 1u64 << self.order;
        let start = self.start_pfn;
        (0..self.nr_pages / step).map(move |i| start + i * step)
    }

    /// Vmemmap pages of one compound page; 0 when its struct pages take less
    /// than a page (2 MiB with 64 KiB pages: 2 KiB of struct pages), which
    /// then shares its vmemmap page with its neighbours.
    fn vmemmap_pages(&self) -> u64 {
        (1u64 << self.order) / STRUCT_PAGES_PER_PAGE
    }

    /// Whether `frame` is one of the device pages holding the struct pages.
    fn in_altmap(&self, frame: PhysAddr) -> bool {
        (self.start_pfn - self.altmap_pfns..self.start_pfn).contains(&(frame.0 / PAGE))
    }

    /// The whole device range: the altmap, then the compound pages.
    fn device_range(&self) -> (u64, u64) {
        ((self.start_pfn - self.altmap_pfns) * PAGE, (self.start_pfn + self.nr_pages) * PAGE)
    }
}

/// Vmemmap pages an optimized compound page keeps private under `layout`
/// (VMEMMAP_RESERVE_NR): the head page, and under legacy-dax the first tail page.
const fn reserved_vmemmap_pages(layout: Layout) -> u64 {
    match layout {
        Layout::LegacyDax => 2,
        _ => 1,
    }
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

/// The page all tails of a (zone, order) map under the unified layout.
#[derive(Clone, Copy, Debug)]
pub struct SharedTail {
    pub pa: PhysAddr,
    pub zone: Zone,
    pub order: u32,
    pub users: u64,
}

/// A fresh vmemmap page holding only tail struct pages of (zone, order).
fn tail_page(frames: &mut FrameAllocator, zone: Zone, order: u32) -> Result<PhysAddr, VmemmapError> {
    let pa = frames.alloc(arch::BASE_PAGE, Purpose::Vmemmap)?;
    let words = StructPage::tail(zone, order).to_words();
    let ptr = pa.as_mut_ptr::<u64>();
    for i in 0..STRUCT_PAGES_PER_PAGE as usize {
        for (w, word) in words.iter().enumerate() {
            // SAFETY: a fresh frame of ours, identity-mapped.
            unsafe { ptr.add(i * 8 + w).write_volatile(*word) };
        }
    }
    Ok(pa)
}

/// A change to one compound page of a region (optimize, restore, and their undos).
type FolioOp = fn(&mut Vmemmap, &mut Table, &mut FrameAllocator, &Region, u64) -> Result<(), VmemmapError>;

pub struct Vmemmap {
    memstart_pfn: u64,
    pub regions: [Option<Region>; MAX_REGIONS],
    pub shared_tails: [Option<SharedTail>; MAX_SHARED_TAILS],
    pub struct_pages_initialized: u64,
    /// Bug knobs in force, one bit per `Knob`.
    pub knobs: u64,
    state: BootState,
    /// For a HugeTLB region carved from hot-added memory: that memory region.
    origin: [Option<usize>; MAX_REGIONS],
    /// For a hot-added memory region: how many of its pages are handed out.
    used: [u64; MAX_REGIONS],
    /// For a DAX region: its pageblock migratetype tags, one byte per
    /// pageblock (where, and the bytes allocated).
    pub pageblock_tags: [Option<(PhysAddr, u64)>; MAX_REGIONS],
    /// Which subsections are present, and which sections are early.
    sections: Sections,
}

/// The sections holding any of `ram`, merged into ranges.
fn present_sections(ram: &RangeList) -> RangeList {
    let section = 1u64 << arch::SECTION_SIZE_BITS;
    let mut out = RangeList::new();
    let mut current: Option<Range> = None;
    for r in ram.iter() {
        let s = Range { start: align_down(r.start, section), end: align_up(r.end, section) };
        current = match current {
            Some(c) if s.start <= c.end => Some(Range { start: c.start, end: c.end.max(s.end) }),
            Some(c) => {
                out.push(c);
                Some(s)
            }
            None => Some(s),
        };
    }
    if let Some(c) = current {
        out.push(c);
    }
    out
}

impl Vmemmap {
    pub fn new(ram: &RangeList) -> Vmemmap {
        let first = ram.iter().next().map(|r| r.start).unwrap_or(0);
        let memstart = arch::MEMSTART_ALIGN.map(|a| align_down(first, a)).unwrap_or(0);
        Vmemmap {
            memstart_pfn: memstart / PAGE,
            regions: [None; MAX_REGIONS],
            shared_tails: [None; MAX_SHARED_TAILS],
            struct_pages_initialized: 0,
            knobs: 0,
            state: BootState::Early,
            origin: [None; MAX_REGIONS],
            used: [0; MAX_REGIONS],
            pageblock_tags: [None; MAX_REGIONS],
            sections: Sections::new(),
        }
    }

    fn knob(&self, knob: Knob) -> bool {
        self.knobs & knob.bit() != 0
    }

    /// Invalidates the TLB entry a change left stale, unless the
    /// `no-tlb-flush` knob forgets it on purpose.
    fn complete(&self, flush: Flush) {
        if self.knob(Knob::NoTlbFlush) {
            flush.ignore();
        } else {
            flush.flush();
        }
    }

    pub fn memstart_pfn(&self) -> u64 {
        self.memstart_pfn
    }

    /// The struct page of `pfn`.
    pub fn va(&self, pfn: u64) -> VirtAddr {
        VirtAddr(arch::VMEMMAP_BASE + (pfn - self.memstart_pfn) * STRUCT_PAGE_SIZE)
    }

    /// Reserves gigantic folios before memmap init (as boot-time HugeTLB does):
    /// `populate_boot` maps their vmemmap already optimized.
    pub fn reserve_gigantic(
        &mut self,
        frames: &mut FrameAllocator,
        order: u32,
        count: u64,
        zone: Zone,
    ) -> Result<usize, VmemmapError> {
        if self.state != BootState::Early {
            return Err(VmemmapError::TooLate);
        }
        if (1u64 << order) / STRUCT_PAGES_PER_PAGE < 2 {
            return Err(VmemmapError::TooSmallToOptimize);
        }
        let id = self.regions.iter().position(Option::is_none).ok_or(VmemmapError::TooManyRegions)?;
        let folio = PAGE << order;
        let start = frames.alloc_data(folio * count, folio, Purpose::HugeTlb)?;
        self.regions[id] = Some(Region {
            kind: RegionKind::HugeTlb,
            start_pfn: start.0 / PAGE,
            nr_pages: count << order,
            zone,
            order,
            layout: Layout::Unified,
            optimized: true,
            altmap_pfns: 0,
        });
        Ok(id)
    }

    /// Which reserved compound page's vmemmap page `va` is, if any: (zone,
    /// order, index of the page in that compound page's vmemmap). Only
    /// regions optimized before the vmemmap existed are reserved ones.
    fn boot_gigantic_page(&self, va: u64) -> Option<(Zone, u32, u64)> {
        self.regions.iter().flatten().filter(|r| r.optimized).find_map(|r| {
            let first = self.va(r.start_pfn).0;
            let last = self.va(r.start_pfn + r.nr_pages).0;
            if va < first || va >= last {
                return None;
            }
            let per_folio = r.vmemmap_pages() * PAGE;
            Some((r.zone, r.order, (va - first) % per_folio / PAGE))
        })
    }

    /// Whether any reserved compound page's vmemmap lies in `[start, end)`.
    fn overlaps_boot_gigantic(&self, start: u64, end: u64) -> bool {
        self.regions.iter().flatten().filter(|r| r.optimized).any(|r| {
            let first = self.va(r.start_pfn).0;
            let last = self.va(r.start_pfn + r.nr_pages).0;
            first < end && start < last
        })
    }

    /// Maps the vmemmap of every present section (vmemmap_populate): 2 MiB
    /// leaves where a whole 2 MiB of vmemmap is covered, base pages otherwise.
    /// Reserved gigantic pages get their head page only; their tails map the
    /// shared tail page straight away, read-only.
    pub fn populate_boot(
        &mut self,
        table: &mut Table,
        frames: &mut FrameAllocator,
        ram: &RangeList,
    ) -> Result<(), VmemmapError> {
        if self.state != BootState::Early {
            return Err(VmemmapError::TooLate);
        }
        // Boot memory's subsections, partial ones included (subsection_map_init).
        let mut present = RangeList::new();
        for r in ram.iter() {
            present.push(Range { start: align_down(r.start, SUBSECTION), end: align_up(r.end, SUBSECTION) });
        }
        for r in present.iter() {
            self.sections.activate(frames, r.start, r.end, true)?;
        }
        let big = PageSize::Size2M.bytes();
        for sections in present_sections(ram).iter() {
            let start = self.va(sections.start / PAGE).0;
            let end = self.va(sections.end / PAGE).0;
            let mut va = start;
            while va < end {
                if va.is_multiple_of(big) && va + big <= end && !self.overlaps_boot_gigantic(va, va + big) {
                    let frame = frames.alloc(PageSize::Size2M, Purpose::Vmemmap)?;
                    // Empty entries are never cached: nothing to flush.
                    table.map(frames, VirtAddr(va), frame, PageSize::Size2M, Prot::RW)?.ignore();
                    va += big;
                    continue;
                }
                let (frame, prot) = match self.boot_gigantic_page(va) {
                    Some((zone, order, index)) if index > 0 => {
                        // One user per compound page, counted at its first tail page.
                        let shared = if index == 1 {
                            self.get_shared_tail(frames, zone, order)?
                        } else {
                            self.shared_tail_pa(zone, order)?
                        };
                        (shared, Prot::RO)
                    }
                    _ => (frames.alloc(arch::BASE_PAGE, Purpose::Vmemmap)?, Prot::RW),
                };
                table.map(frames, VirtAddr(va), frame, arch::BASE_PAGE, prot)?.ignore();
                va += PAGE;
            }
            // The memmap of a section's absent part is raw boot memory:
            // poisoned, as CONFIG_DEBUG_VM leaves it, never initialized.
            let mut pfn = sections.start / PAGE;
            for r in ram.iter().filter(|r| r.end > sections.start && r.start < sections.end) {
                self.poison(pfn, r.start / PAGE);
                pfn = r.end.div_ceil(PAGE);
            }
            self.poison(pfn, sections.end / PAGE);
        }
        self.state = BootState::Populated;
        Ok(())
    }

    fn poison(&self, start_pfn: u64, end_pfn: u64) {
        for pfn in start_pfn..end_pfn {
            self.write_struct_page(pfn, StructPage::POISONED);
        }
    }

    /// Sets the last `size` bytes of boot memory aside as persistent memory
    /// (Linux's `memmap=nn!ss`): out of the allocator and of boot memory, so
    /// memmap init leaves its struct pages alone. A section it shares with
    /// RAM stays early, its memmap populated whole, as Linux does.
    pub fn reserve_pmem(
        &mut self,
        frames: &mut FrameAllocator,
        ram: &mut RangeList,
        size: u64,
    ) -> Result<PhysAddr, VmemmapError> {
        if self.state != BootState::Early {
            return Err(VmemmapError::TooLate);
        }
        let last = ram.iter().last().ok_or(VmemmapError::BadPmemSize)?;
        if size == 0 || !size.is_multiple_of(SUBSECTION) || !last.end.is_multiple_of(SUBSECTION) || size >= last.size()
        {
            return Err(VmemmapError::BadPmemSize);
        }
        let pmem = Range { start: last.end - size, end: last.end };
        frames.take(pmem)?;
        ram.remove(pmem);
        Ok(PhysAddr(pmem.start))
    }

    /// The vmemmap of all boot RAM, section aligned.
    pub fn range(&self, ram: &RangeList) -> (VirtAddr, VirtAddr) {
        let sections = present_sections(ram);
        let first = sections.iter().next().map(|r| r.start).unwrap_or(0);
        let last = sections.iter().last().map(|r| r.end).unwrap_or(0);
        (self.va(first / PAGE), self.va(last / PAGE))
    }

    fn shared_tail_pa(&self, zone: Zone, order: u32) -> Result<PhysAddr, VmemmapError> {
        let any_zone = self.knob(Knob::CrossZoneTail);
        self.shared_tails
            .iter()
            .flatten()
            .find(|t| (any_zone || t.zone == zone) && t.order == order)
            .map(|t| t.pa)
            .ok_or(VmemmapError::TooManySharedTails)
    }

    fn write_struct_page(&self, pfn: u64, page: StructPage) {
        let ptr = self.va(pfn).0 as *mut u64;
        for (i, word) in page.to_words().into_iter().enumerate() {
            // SAFETY: the vmemmap of every RAM pfn is mapped and writable.
            unsafe { ptr.add(i).write_volatile(word) };
        }
    }

    /// memmap_init: every RAM page's struct page. A reserved gigantic page's
    /// head and the tails in its head vmemmap page are written; its other
    /// tails live in the shared tail page and are skipped, not counted.
    pub fn memmap_init(&mut self, ram: &RangeList) {
        for r in ram.iter() {
            let mut pfn = r.start / PAGE;
            while pfn < r.end / PAGE {
                let gigantic = self
                    .regions
                    .iter()
                    .flatten()
                    .find(|g| g.optimized && pfn >= g.start_pfn && pfn < g.start_pfn + g.nr_pages)
                    .copied();
                let page = match gigantic {
                    None => StructPage::free(Zone::Normal),
                    Some(g) => {
                        let position = (pfn - g.start_pfn) % (1 << g.order);
                        if position >= STRUCT_PAGES_PER_PAGE {
                            // The rest of this compound page is in the shared page.
                            pfn += (1 << g.order) - position;
                            continue;
                        }
                        if position == 0 {
                            StructPage::head(g.zone, g.order)
                        } else {
                            StructPage::tail(g.zone, g.order)
                        }
                    }
                };
                self.write_struct_page(pfn, page);
                self.struct_pages_initialized += 1;
                pfn += 1;
            }
        }
    }

    /// Allocates `count` HugeTLB folios of `order` as one region; returns its id.
    pub fn hugetlb_alloc(
        &mut self,
        frames: &mut FrameAllocator,
        order: u32,
        count: u64,
        zone: Zone,
        from: Option<usize>,
    ) -> Result<usize, VmemmapError> {
        let id = self.regions.iter().position(Option::is_none).ok_or(VmemmapError::TooManyRegions)?;
        let folio = PAGE << order;
        let start = match from {
            None => frames.alloc_data(folio * count, folio, Purpose::HugeTlb)?,
            Some(memory) => {
                // Carved from hot-added memory, which stays that region's.
                let m = self.region(memory)?;
                if m.kind != RegionKind::Memory {
                    return Err(VmemmapError::NoSuchRegion);
                }
                let start = align_up((m.start_pfn + self.used[memory]) * PAGE, folio);
                let end = start + folio * count;
                if end > (m.start_pfn + m.nr_pages) * PAGE {
                    return Err(VmemmapError::Map(MapError::Alloc(AllocError::OutOfMemory)));
                }
                self.used[memory] = end / PAGE - m.start_pfn;
                self.origin[id] = Some(memory);
                PhysAddr(start)
            }
        };
        let region = Region {
            kind: RegionKind::HugeTlb,
            start_pfn: start.0 / PAGE,
            nr_pages: count << order,
            zone,
            order,
            layout: Layout::None,
            optimized: false,
            altmap_pfns: 0,
        };
        for head in region.heads() {
            self.write_struct_page(head, StructPage::head(zone, order));
            for pfn in head + 1..head + (1 << order) {
                self.write_struct_page(pfn, StructPage::tail(zone, order));
            }
        }
        self.regions[id] = Some(region);
        Ok(id)
    }

    fn region(&self, id: usize) -> Result<Region, VmemmapError> {
        self.regions.get(id).copied().flatten().ok_or(VmemmapError::NoSuchRegion)
    }

    /// The shared tail page of (zone, order), created on first use.
    fn get_shared_tail(
        &mut self,
        frames: &mut FrameAllocator,
        zone: Zone,
        order: u32,
    ) -> Result<PhysAddr, VmemmapError> {
        // Knob `cross-zone-tail`: the lookup forgets the zone.
        let any_zone = self.knob(Knob::CrossZoneTail);
        if let Some(t) =
            self.shared_tails.iter_mut().flatten().find(|t| (any_zone || t.zone == zone) && t.order == order)
        {
            t.users += 1;
            return Ok(t.pa);
        }
        let slot = self.shared_tails.iter().position(Option::is_none).ok_or(VmemmapError::TooManySharedTails)?;
        // Knob `stale-tail-contents`: the page is filled for the wrong order.
        let filled_order = if self.knob(Knob::StaleTailContents) { order + 1 } else { order };
        let pa = tail_page(frames, zone, filled_order)?;
        self.shared_tails[slot] = Some(SharedTail { pa, zone, order, users: 1 });
        Ok(pa)
    }

    fn put_shared_tail(&mut self, frames: &mut FrameAllocator, zone: Zone, order: u32) {
        let leak = self.knob(Knob::SharedTailLeak);
        for slot in self.shared_tails.iter_mut() {
            if let Some(t) = slot.as_mut().filter(|t| t.zone == zone && t.order == order) {
                t.users -= 1;
                // Knob `shared-tail-leak`: the last user does not free it.
                if t.users == 0 && !leak {
                    frames.free(t.pa, PAGE, Purpose::Vmemmap);
                    *slot = None;
                }
                return;
            }
        }
    }

    /// Points the vmemmap page at `va` to a fresh copy of itself; returns the copy.
    fn copy_to_fresh(
        &self,
        table: &mut Table,
        frames: &mut FrameAllocator,
        va: VirtAddr,
    ) -> Result<PhysAddr, VmemmapError> {
        let fresh = frames.alloc(arch::BASE_PAGE, Purpose::Vmemmap)?;
        // SAFETY: `va` is mapped (readable) vmemmap; `fresh` is ours.
        unsafe { core::ptr::copy_nonoverlapping(va.0 as *const u8, fresh.as_mut_ptr::<u8>(), PAGE as usize) };
        let (old, flush) = table.remap(va, fresh, Prot::RW)?;
        self.complete(flush);
        frames.free(old, PAGE, Purpose::Vmemmap);
        Ok(fresh)
    }

    /// Optimizes every compound page of a region under `layout`. If an
    /// allocation fails, the compound pages already optimized are restored:
    /// the region ends as it began, with every frame accounted for.
    pub fn optimize(
        &mut self,
        table: &mut Table,
        frames: &mut FrameAllocator,
        id: usize,
        layout: Layout,
    ) -> Result<(), VmemmapError> {
        let mut region = self.region(id)?;
        if region.optimized {
            return Err(VmemmapError::AlreadyOptimized);
        }
        if layout == Layout::None {
            return Err(VmemmapError::TooSmallToOptimize);
        }
        if region.vmemmap_pages() <= reserved_vmemmap_pages(layout) {
            // Nothing to share (hugetlb_vmemmap_optimize_folio returns when
            // the optimizable size is 0): the folios stay as they are.
            return Ok(());
        }
        region.layout = layout;
        // A failing compound page is left unoptimized; the others are restored.
        self.each_folio(table, frames, &region, Self::optimize_folio, Self::restore_folio)?;
        region.optimized = true;
        self.regions[id] = Some(region);
        Ok(())
    }

    /// Applies `op` to every compound page of `region`; if it fails on one,
    /// `undo` is applied to those done, so the region ends as it began.
    fn each_folio(
        &mut self,
        table: &mut Table,
        frames: &mut FrameAllocator,
        region: &Region,
        op: FolioOp,
        undo: FolioOp,
    ) -> Result<(), VmemmapError> {
        for (done, head) in region.heads().enumerate() {
            if let Err(e) = op(self, table, frames, region, head) {
                for earlier in region.heads().take(done) {
                    undo(self, table, frames, region, earlier)?;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// One compound page. Every allocation comes before the first tail is
    /// remapped, so a failure leaves it unoptimized (all pages private).
    fn optimize_folio(
        &mut self,
        table: &mut Table,
        frames: &mut FrameAllocator,
        region: &Region,
        head: u64,
    ) -> Result<(), VmemmapError> {
        let pages = region.vmemmap_pages();
        let base = self.va(head);
        // Knob `skip-split`: a vmemmap under a 2 MiB leaf is left as it is.
        if self.knob(Knob::SkipSplit) && table.translate(base).is_some_and(|t| t.size != arch::BASE_PAGE) {
            return Ok(());
        }
        // HVO needs base-page PTEs: split any 2 MiB leaf over this vmemmap.
        let mut va = base.0;
        while va < base.0 + pages * PAGE {
            if let Some(flush) = table.split(frames, VirtAddr(va))? {
                self.complete(flush);
            }
            va = align_down(va, PageSize::Size2M.bytes()) + PageSize::Size2M.bytes();
        }
        let head_frame = if self.knob(Knob::HeadShared) {
            // Knob `head-shared`: the head page goes to the shared tail page too.
            let shared = self.get_shared_tail(frames, region.zone, region.order)?;
            let (old, flush) = table.remap(base, shared, Prot::RO)?;
            self.complete(flush);
            frames.free(old, PAGE, Purpose::Vmemmap);
            shared
        } else {
            self.copy_to_fresh(table, frames, base)?
        };
        let (first_shared, target, prot) = match region.layout {
            // Knob `per-folio-tail`: every folio gets a tail page of its own.
            Layout::Unified if self.knob(Knob::PerFolioTail) => {
                (1, tail_page(frames, region.zone, region.order)?, Prot::RO)
            }
            Layout::Unified => (1, self.get_shared_tail(frames, region.zone, region.order)?, Prot::RO),
            Layout::LegacyHugetlb => (1, head_frame, Prot::RO),
            Layout::LegacyDax => (2, self.copy_to_fresh(table, frames, VirtAddr(base.0 + PAGE))?, Prot::RW),
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
            let (old, flush) = table.remap(va, target, prot)?;
            self.complete(flush);
            frames.free(old, PAGE, Purpose::Vmemmap);
        }
        Ok(())
    }

    /// The first tail page a layout shares, and what the tails map and how.
    fn sharing(&self, table: &Table, region: &Region, base: VirtAddr) -> Result<(u64, PhysAddr, Prot), VmemmapError> {
        let first_shared = if region.layout == Layout::LegacyDax { 2 } else { 1 };
        let tail =
            table.translate(VirtAddr(base.0 + first_shared * PAGE)).ok_or(VmemmapError::Map(MapError::NotMapped))?;
        Ok((first_shared, tail.pa, tail.prot))
    }

    /// Gives every vmemmap page of a region's compound pages its own frame
    /// again. If an allocation fails, the compound pages already restored are
    /// optimized again: the region stays optimized, every frame accounted for.
    pub fn restore(&mut self, table: &mut Table, frames: &mut FrameAllocator, id: usize) -> Result<(), VmemmapError> {
        let mut region = self.region(id)?;
        if !region.optimized {
            // Nothing to give back (hugetlb_vmemmap_restore_folio returns 0
            // for a folio that was never optimized, as a small one is not).
            return Ok(());
        }
        // A failing compound page stays optimized; the others are optimized again.
        self.each_folio(table, frames, &region, Self::restore_folio, Self::reoptimize_folio)?;
        region.optimized = false;
        region.layout = Layout::None;
        self.regions[id] = Some(region);
        Ok(())
    }

    /// One compound page; on a failed allocation its tails go back where they were.
    fn restore_folio(
        &mut self,
        table: &mut Table,
        frames: &mut FrameAllocator,
        region: &Region,
        head: u64,
    ) -> Result<(), VmemmapError> {
        let pages = region.vmemmap_pages();
        let base = self.va(head);
        let (first_shared, target, prot) = self.sharing(table, region, base)?;
        for i in first_shared..pages {
            let fresh = match tail_page(frames, region.zone, region.order) {
                Ok(f) => f,
                Err(e) => {
                    for j in first_shared..i {
                        let (fresh, flush) = table.remap(VirtAddr(base.0 + j * PAGE), target, prot)?;
                        self.complete(flush);
                        frames.free(fresh, PAGE, Purpose::Vmemmap);
                    }
                    return Err(e);
                }
            };
            // The old frame is shared (or the head's): it stays.
            let (_shared, flush) = table.remap(VirtAddr(base.0 + i * PAGE), fresh, Prot::RW)?;
            self.complete(flush);
        }
        if region.layout == Layout::Unified {
            self.put_shared_tail(frames, region.zone, region.order);
        }
        Ok(())
    }

    /// Maps a restored compound page's tails back onto its layout's page,
    /// without allocating (the rollback of a failed restore).
    fn reoptimize_folio(
        &mut self,
        table: &mut Table,
        frames: &mut FrameAllocator,
        region: &Region,
        head: u64,
    ) -> Result<(), VmemmapError> {
        let base = self.va(head);
        let (first_shared, target, prot) = match region.layout {
            // The region's other compound pages still hold the shared page.
            Layout::Unified => (1, self.get_shared_tail(frames, region.zone, region.order)?, Prot::RO),
            Layout::LegacyHugetlb => {
                (1, table.translate(base).ok_or(VmemmapError::Map(MapError::NotMapped))?.pa, Prot::RO)
            }
            Layout::LegacyDax => (
                2,
                table.translate(VirtAddr(base.0 + PAGE)).ok_or(VmemmapError::Map(MapError::NotMapped))?.pa,
                Prot::RW,
            ),
            Layout::None => return Err(VmemmapError::NotOptimized),
        };
        for i in first_shared..region.vmemmap_pages() {
            let (fresh, flush) = table.remap(VirtAddr(base.0 + i * PAGE), target, prot)?;
            self.complete(flush);
            frames.free(fresh, PAGE, Purpose::Vmemmap);
        }
        Ok(())
    }

    /// A hotplugged range becomes device DAX with compound pages of `order`
    /// (section_activate, then vmemmap_populate_compound_pages): every
    /// compound page's vmemmap is populated straight into its layout, head
    /// page (and, under legacy-dax, the first tail page) private, the rest
    /// on the shared page; unoptimized (`none`, too small to share, or with
    /// an altmap) every page gets its own frame. Compound pages in the empty
    /// subsections of an early section keep the boot memmap, unoptimized.
    /// If an allocation fails, everything done so far is undone.
    #[allow(clippy::too_many_arguments)]
    pub fn hot_add(
        &mut self,
        table: &mut Table,
        frames: &mut FrameAllocator,
        start: PhysAddr,
        size: u64,
        order: u32,
        zone: Zone,
        layout: Layout,
        altmap: bool,
    ) -> Result<usize, VmemmapError> {
        let id = self.regions.iter().position(Option::is_none).ok_or(VmemmapError::TooManyRegions)?;
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
            start_pfn: (start.0 + reserve) / PAGE,
            nr_pages: (size - reserve) / PAGE,
            zone,
            order,
            layout: if optimized { layout } else { Layout::None },
            optimized,
            altmap_pfns: reserve / PAGE,
        };
        self.sections.activate(frames, start.0, start.0 + size, false)?;
        let mut source =
            if altmap { MemmapSource::Altmap { next: start.0, end: start.0 + reserve } } else { MemmapSource::System };
        for (done, head) in region.heads().enumerate() {
            let populated = if self.sections.is_early(head * PAGE) {
                self.init_in_boot_memmap(&region, head, if optimizable { Some(layout) } else { None });
                Ok(())
            } else {
                self.populate_compound(table, frames, &region, head, &mut source)
            };
            if let Err(e) = populated {
                for earlier in region.heads().take(done + 1) {
                    self.depopulate_compound(table, frames, &region, earlier);
                }
                self.free_vmemmap_tables(table, frames, &region);
                self.sections.deactivate(start.0, start.0 + size);
                if self.knob(Knob::HotAddRollbackOvercount) {
                    // The bug: the whole range's vmemmap is subtracted.
                    let never = (region.heads().count() - done) as u64 * Self::private_pages(&region);
                    frames.miscount_vmemmap(0, never);
                }
                return Err(e);
            }
        }
        match self.tag_pageblocks(frames, &region) {
            Ok(tags) => self.pageblock_tags[id] = Some(tags),
            Err(e) => {
                for head in region.heads() {
                    self.depopulate_compound(table, frames, &region, head);
                }
                self.free_vmemmap_tables(table, frames, &region);
                self.sections.deactivate(start.0, start.0 + size);
                return Err(e);
            }
        }
        if self.knob(Knob::DaxCountedUnoptimized) && !altmap {
            // The bug: every compound page counted at its unoptimized size.
            let pages = region.vmemmap_pages().max(1);
            frames.miscount_vmemmap(region.heads().count() as u64 * (pages - Self::private_pages(&region)), 0);
        }
        self.regions[id] = Some(region);
        Ok(id)
    }

    /// memmap_init_compound for a compound page whose struct pages are in an
    /// early section's boot memmap: nothing is shared there, so all of them
    /// are written. Knob `boot-section-partial-init` writes only those an
    /// optimized compound page under `wanted` would keep private (v8 6/6),
    /// leaving the rest of the boot memmap's poison.
    fn init_in_boot_memmap(&mut self, region: &Region, head: u64, wanted: Option<Layout>) {
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
    fn write_compound(&mut self, region: &Region, head: u64, count: u64) {
        let (zone, order) = (region.zone, region.order);
        for pfn in head..head + count {
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

    /// Maps one DAX compound page's vmemmap and writes its private struct pages.
    fn populate_compound(
        &mut self,
        table: &mut Table,
        frames: &mut FrameAllocator,
        region: &Region,
        head: u64,
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
            if table.translate(page).is_none() {
                let frame = source.frame(frames)?;
                if let Err(e) = table.map(frames, page, frame, arch::BASE_PAGE, Prot::RW) {
                    if !region.in_altmap(frame) {
                        frames.free(frame, PAGE, Purpose::Vmemmap);
                    }
                    return Err(e.into());
                }
            }
            self.write_compound(region, head, 1 << order);
            return Ok(());
        }
        let mut first_tail_page = PhysAddr(0);
        for i in 0..private {
            let frame = source.frame(frames)?;
            if let Err(e) = table.map(frames, VirtAddr(base.0 + i * PAGE), frame, arch::BASE_PAGE, Prot::RW) {
                if !region.in_altmap(frame) {
                    frames.free(frame, PAGE, Purpose::Vmemmap);
                }
                return Err(e.into());
            }
            if i == 1 {
                first_tail_page = frame;
            }
        }
        if private < pages {
            let (target, prot) = match region.layout {
                Layout::LegacyDax => (first_tail_page, Prot::RW),
                // Knob `per-folio-tail`: every compound page gets a tail page of its own.
                _ if self.knob(Knob::PerFolioTail) => (tail_page(frames, zone, order)?, Prot::RO),
                _ => (self.get_shared_tail(frames, zone, order)?, Prot::RO),
            };
            // Knob `tails-writable`: the tails keep write permission.
            let prot = if self.knob(Knob::TailsWritable) { Prot::RW } else { prot };
            for i in private..pages {
                if let Err(e) = table.map(frames, VirtAddr(base.0 + i * PAGE), target, arch::BASE_PAGE, prot) {
                    // With no tail mapped, the undo cannot see the reference taken.
                    if i == private && region.layout == Layout::Unified {
                        self.put_shared_tail(frames, zone, order);
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
    fn depopulate_compound(&mut self, table: &mut Table, frames: &mut FrameAllocator, region: &Region, head: u64) {
        if self.sections.is_early(head * PAGE) {
            return;
        }
        let pages = region.vmemmap_pages().max(1);
        let private = Self::private_pages(region);
        // A vmemmap page shared with neighbours goes with the first of them:
        // they are all in this range and all going.
        let base = VirtAddr(align_down(self.va(head).0, PAGE));
        let mut held_shared = false;
        for i in 0..pages {
            if let Ok((frame, _, flush)) = table.unmap(VirtAddr(base.0 + i * PAGE)) {
                self.complete(flush);
                if i >= private {
                    held_shared = true;
                } else if !region.in_altmap(frame) {
                    frames.free(frame, PAGE, Purpose::Vmemmap);
                }
            }
        }
        if held_shared && region.optimized && region.layout == Layout::Unified {
            self.put_shared_tail(frames, region.zone, region.order);
        }
    }

    fn free_vmemmap_tables(&self, table: &mut Table, frames: &mut FrameAllocator, region: &Region) {
        let end = self.va(region.start_pfn + region.nr_pages);
        table.free_empty_tables(frames, self.va(region.start_pfn), end);
    }

    /// Hotplugged memory onlined as ordinary memory in `zone`: its
    /// subsections activated, its vmemmap populated (see `populate_memmap`)
    /// and its struct pages initialized, ready for HugeTLB folios.
    pub fn hot_add_memory(
        &mut self,
        table: &mut Table,
        frames: &mut FrameAllocator,
        start: PhysAddr,
        size: u64,
        zone: Zone,
    ) -> Result<usize, VmemmapError> {
        let id = self.regions.iter().position(Option::is_none).ok_or(VmemmapError::TooManyRegions)?;
        let region = Region {
            kind: RegionKind::Memory,
            start_pfn: start.0 / PAGE,
            nr_pages: size / PAGE,
            zone,
            order: 0,
            layout: Layout::None,
            optimized: false,
            altmap_pfns: 0,
        };
        self.sections.activate(frames, start.0, start.0 + size, false)?;
        if let Err(e) = self.populate_memmap(table, frames, start.0, start.0 + size) {
            self.depopulate_memmap(table, frames, start.0, start.0 + size);
            return Err(e);
        }
        for pfn in region.start_pfn..region.start_pfn + region.nr_pages {
            self.write_struct_page(pfn, StructPage::free(zone));
        }
        self.struct_pages_initialized += region.nr_pages;
        self.regions[id] = Some(region);
        self.used[id] = 0;
        Ok(id)
    }

    /// The physical range whose struct pages the 2 MiB of vmemmap at `window` holds.
    fn window_span(&self, window: u64) -> (u64, u64) {
        let pfn = (window - arch::VMEMMAP_BASE) / STRUCT_PAGE_SIZE + self.memstart_pfn;
        let pfns = PageSize::Size2M.bytes() / STRUCT_PAGE_SIZE;
        (pfn * PAGE, (pfn + pfns) * PAGE)
    }

    /// vmemmap_populate with huge pages, for the memory `[start, end)`: each
    /// 2 MiB of vmemmap it touches gets a 2 MiB leaf if nothing maps any of
    /// it yet (struct pages of absent neighbours included, as x86 and arm64
    /// do), is reused if a leaf maps it already (a neighbour's in the same
    /// section), and gets base pages for the range's part if base pages
    /// map some of it.
    fn populate_memmap(
        &mut self,
        table: &mut Table,
        frames: &mut FrameAllocator,
        start: u64,
        end: u64,
    ) -> Result<(), VmemmapError> {
        let big = PageSize::Size2M.bytes();
        let (first, last) = (self.va(start / PAGE).0, self.va(end / PAGE).0);
        let mut window = align_down(first, big);
        while window < last {
            if table.block_is_empty(VirtAddr(window), PageSize::Size2M) {
                let frame = frames.alloc(PageSize::Size2M, Purpose::Vmemmap)?;
                match table.map(frames, VirtAddr(window), frame, PageSize::Size2M, Prot::RW) {
                    // Empty entries are never cached: nothing to flush.
                    Ok(flush) => flush.ignore(),
                    Err(e) => {
                        frames.free(frame, big, Purpose::Vmemmap);
                        return Err(e.into());
                    }
                }
            } else if table.translate(VirtAddr(window)).map(|t| t.size) != Some(PageSize::Size2M) {
                let mut va = first.max(window);
                while va < last.min(window + big) {
                    if table.translate(VirtAddr(va)).is_none() {
                        let frame = frames.alloc(arch::BASE_PAGE, Purpose::Vmemmap)?;
                        if let Err(e) = table.map(frames, VirtAddr(va), frame, arch::BASE_PAGE, Prot::RW) {
                            frames.free(frame, PAGE, Purpose::Vmemmap);
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

    /// vmemmap_free for the memory `[start, end)`, after its subsections go:
    /// a 2 MiB leaf is freed only once no subsection under it is present
    /// (x86's vmemmap_pmd_is_unused; knob `subsection-remove-frees-leaf`
    /// frees it regardless, the arm64 bug); base pages are freed for the
    /// range's part, or for the whole 2 MiB once nothing under it is present.
    fn depopulate_memmap(&mut self, table: &mut Table, frames: &mut FrameAllocator, start: u64, end: u64) {
        self.sections.deactivate(start, end);
        let big = PageSize::Size2M.bytes();
        let (first, last) = (self.va(start / PAGE).0, self.va(end / PAGE).0);
        let mut window = align_down(first, big);
        while window < last {
            let (lo, hi) = self.window_span(window);
            let in_use = self.sections.any_present(lo, hi);
            match table.translate(VirtAddr(window)) {
                Some(t) if t.size == PageSize::Size2M => {
                    if !in_use || self.knob(Knob::SubsectionRemoveFreesLeaf) {
                        if let Ok((frame, size, flush)) = table.unmap(VirtAddr(window)) {
                            self.complete(flush);
                            frames.free(frame, size.bytes(), Purpose::Vmemmap);
                        }
                    }
                }
                _ => {
                    let (mut va, stop) =
                        if in_use { (first.max(window), last.min(window + big)) } else { (window, window + big) };
                    while va < stop {
                        if let Ok((frame, size, flush)) = table.unmap(VirtAddr(va)) {
                            self.complete(flush);
                            frames.free(frame, size.bytes(), Purpose::Vmemmap);
                        }
                        va += PAGE;
                    }
                }
            }
            window += big;
        }
        table.free_empty_tables(frames, VirtAddr(align_down(first, big)), VirtAddr(align_up(last, big)));
    }

    /// Tears down a hot-added range's vmemmap (vmemmap_free): every PTE
    /// unmapped and flushed, private frames freed, the shared tail page's
    /// references dropped, page-table pages freed when empty, and the
    /// range's subsections deactivated.
    pub fn hot_remove(
        &mut self,
        table: &mut Table,
        frames: &mut FrameAllocator,
        id: usize,
    ) -> Result<(), VmemmapError> {
        let region = self.region(id)?;
        if region.kind == RegionKind::Memory {
            // Memory still lending HugeTLB folios cannot go.
            if self.origin.contains(&Some(id)) {
                return Err(VmemmapError::Busy);
            }
            let (start, end) = region.device_range();
            self.depopulate_memmap(table, frames, start, end);
            self.regions[id] = None;
            return Ok(());
        }
        if region.kind != RegionKind::Dax {
            return Err(VmemmapError::NoSuchRegion);
        }
        for head in region.heads() {
            self.depopulate_compound(table, frames, &region, head);
        }
        self.free_vmemmap_tables(table, frames, &region);
        let (start, end) = region.device_range();
        self.sections.deactivate(start, end);
        if let Some((tags, bytes)) = self.pageblock_tags[id].take() {
            frames.free(tags, bytes, Purpose::Usemap);
        }
        self.regions[id] = None;
        Ok(())
    }

    /// Returns a region's folios: restored first if optimized, struct pages
    /// back to free, data pages back to the allocator.
    pub fn hugetlb_free(
        &mut self,
        table: &mut Table,
        frames: &mut FrameAllocator,
        id: usize,
    ) -> Result<(), VmemmapError> {
        let region = self.region(id)?;
        if region.optimized {
            self.restore(table, frames, id)?;
        }
        for pfn in region.start_pfn..region.start_pfn + region.nr_pages {
            self.write_struct_page(pfn, StructPage::free(Zone::Normal));
        }
        // Folios of hot-added memory go back to it, not to the boot allocator.
        if self.origin[id].take().is_none() {
            frames.free(PhysAddr(region.start_pfn * PAGE), region.nr_pages * PAGE, Purpose::HugeTlb);
        }
        self.regions[id] = None;
        Ok(())
    }
}
