//! The vmemmap model: sparse sections, boot population, memmap init, and
//! HugeTLB vmemmap optimization and restore under each layout, as Linux's
//! mm/sparse-vmemmap.c and mm/hugetlb_vmemmap.c do it, in miniature.

use hvo_abi::model::{Knob, Layout, RegionKind, StructPage, Zone, MIGRATE_MOVABLE, PAGEBLOCK_PAGES, STRUCT_PAGE_SIZE};

use crate::arch;
use crate::mm::boot::Table;
use crate::mm::frames::{align_down, align_up, AllocError, FrameAllocator, Purpose};
use crate::mm::pagetable::{Flush, MapError, Prot};
use crate::mm::{PageSize, PhysAddr, Range, RangeList, VirtAddr};

pub const MAX_REGIONS: usize = hvo_abi::manifest::MAX_REGIONS;
pub const MAX_SHARED_TAILS: usize = hvo_abi::manifest::MAX_SHARED_TAILS;
const PAGE: u64 = PageSize::Size4K.bytes();
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

    /// Vmemmap pages of one compound page.
    fn vmemmap_pages(&self) -> u64 {
        (1u64 << self.order) / STRUCT_PAGES_PER_PAGE
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
    let pa = frames.alloc(PageSize::Size4K, Purpose::Vmemmap)?;
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
                    _ => (frames.alloc(PageSize::Size4K, Purpose::Vmemmap)?, Prot::RW),
                };
                table.map(frames, VirtAddr(va), frame, PageSize::Size4K, prot)?.ignore();
                va += PAGE;
            }
        }
        self.state = BootState::Populated;
        Ok(())
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
        let fresh = frames.alloc(PageSize::Size4K, Purpose::Vmemmap)?;
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
        if region.vmemmap_pages() < 2 || layout == Layout::None {
            return Err(VmemmapError::TooSmallToOptimize);
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
        if self.knob(Knob::SkipSplit) && table.translate(base).is_some_and(|t| t.size != PageSize::Size4K) {
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
            return Err(VmemmapError::NotOptimized);
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
    /// (vmemmap_populate_compound_pages): every compound page's vmemmap is
    /// populated straight into its layout, head page (and, under legacy-dax,
    /// the first tail page) private, the rest on the shared page; unoptimized
    /// (`none`, or too small to share) every page gets its own frame. If an
    /// allocation fails, everything populated so far is torn down again.
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
    ) -> Result<usize, VmemmapError> {
        let id = self.regions.iter().position(Option::is_none).ok_or(VmemmapError::TooManyRegions)?;
        let optimized = layout != Layout::None && (1u64 << order) / STRUCT_PAGES_PER_PAGE >= 2;
        let region = Region {
            kind: RegionKind::Dax,
            start_pfn: start.0 / PAGE,
            nr_pages: size / PAGE,
            zone,
            order,
            layout: if optimized { layout } else { Layout::None },
            optimized,
        };
        for (done, head) in region.heads().enumerate() {
            if let Err(e) = self.populate_compound(table, frames, &region, head) {
                for earlier in region.heads().take(done + 1) {
                    self.depopulate_compound(table, frames, &region, earlier);
                }
                self.free_vmemmap_tables(table, frames, &region);
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
                return Err(e);
            }
        }
        if self.knob(Knob::DaxCountedUnoptimized) {
            // The bug: every compound page counted at its unoptimized size.
            let pages = region.vmemmap_pages().max(1);
            frames.miscount_vmemmap(region.heads().count() as u64 * (pages - Self::private_pages(&region)), 0);
        }
        self.regions[id] = Some(region);
        Ok(id)
    }

    /// Sets every pageblock of a device range to movable (as memmap init of
    /// ZONE_DEVICE does), in a tag array of its own; returns where it is.
    fn tag_pageblocks(&self, frames: &mut FrameAllocator, region: &Region) -> Result<(PhysAddr, u64), VmemmapError> {
        let count = region.nr_pages.div_ceil(PAGEBLOCK_PAGES);
        let bytes = count.div_ceil(PAGE) * PAGE;
        let tags = frames.alloc_data(bytes, PAGE, Purpose::Usemap)?;
        let per_compound = ((1u64 << region.order) / PAGEBLOCK_PAGES).max(1);
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
        match (region.optimized, region.layout) {
            (false, _) => region.vmemmap_pages().max(1),
            (true, Layout::LegacyDax) => 2,
            (true, _) => 1,
        }
    }

    /// Maps one DAX compound page's vmemmap and writes its private struct pages.
    fn populate_compound(
        &mut self,
        table: &mut Table,
        frames: &mut FrameAllocator,
        region: &Region,
        head: u64,
    ) -> Result<(), VmemmapError> {
        let (zone, order) = (region.zone, region.order);
        let pages = region.vmemmap_pages().max(1);
        let private = Self::private_pages(region);
        let base = self.va(head);
        let mut first_tail_page = PhysAddr(0);
        for i in 0..private {
            let frame = frames.alloc(PageSize::Size4K, Purpose::Vmemmap)?;
            if let Err(e) = table.map(frames, VirtAddr(base.0 + i * PAGE), frame, PageSize::Size4K, Prot::RW) {
                frames.free(frame, PAGE, Purpose::Vmemmap);
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
                if let Err(e) = table.map(frames, VirtAddr(base.0 + i * PAGE), target, PageSize::Size4K, prot) {
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
        let written = (private * STRUCT_PAGES_PER_PAGE).min(1 << order);
        for pfn in head..head + written {
            let page = if pfn == head { StructPage::head(zone, order) } else { StructPage::tail(zone, order) };
            self.write_struct_page(pfn, page);
        }
        self.struct_pages_initialized += written;
        Ok(())
    }

    /// Unmaps whatever of one DAX compound page's vmemmap is mapped, frees
    /// its private frames and drops its reference on the shared page.
    fn depopulate_compound(&mut self, table: &mut Table, frames: &mut FrameAllocator, region: &Region, head: u64) {
        let pages = region.vmemmap_pages().max(1);
        let private = Self::private_pages(region);
        let base = self.va(head);
        let mut held_shared = false;
        for i in 0..pages {
            if let Ok((frame, _, flush)) = table.unmap(VirtAddr(base.0 + i * PAGE)) {
                self.complete(flush);
                if i < private {
                    frames.free(frame, PAGE, Purpose::Vmemmap);
                } else {
                    held_shared = true;
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

    /// Hotplugged memory onlined as ordinary memory in `zone`: its vmemmap
    /// populated as at boot (2 MiB leaves where a whole 2 MiB is covered) and
    /// its struct pages initialized, ready for HugeTLB folios.
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
        };
        let big = PageSize::Size2M.bytes();
        let (first, end) = (self.va(region.start_pfn).0, self.va(region.start_pfn + region.nr_pages).0);
        let mut va = first;
        while va < end {
            let size = if va.is_multiple_of(big) && va + big <= end { PageSize::Size2M } else { PageSize::Size4K };
            let frame = match frames.alloc(size, Purpose::Vmemmap) {
                Ok(f) => f,
                Err(e) => {
                    self.depopulate_memory(table, frames, first, va);
                    return Err(e.into());
                }
            };
            if let Err(e) = table.map(frames, VirtAddr(va), frame, size, Prot::RW) {
                frames.free(frame, size.bytes(), Purpose::Vmemmap);
                self.depopulate_memory(table, frames, first, va);
                return Err(e.into());
            }
            va += size.bytes();
        }
        for pfn in region.start_pfn..region.start_pfn + region.nr_pages {
            self.write_struct_page(pfn, StructPage::free(zone));
        }
        self.struct_pages_initialized += region.nr_pages;
        self.regions[id] = Some(region);
        self.used[id] = 0;
        Ok(id)
    }

    /// Unmaps and frees the vmemmap of a hot-added memory range mapped from
    /// `first` up to `end`, then the page tables left empty.
    fn depopulate_memory(&mut self, table: &mut Table, frames: &mut FrameAllocator, first: u64, end: u64) {
        let mut va = first;
        while va < end {
            match table.unmap(VirtAddr(va)) {
                Ok((frame, size, flush)) => {
                    self.complete(flush);
                    frames.free(frame, size.bytes(), Purpose::Vmemmap);
                    va += size.bytes();
                }
                Err(_) => va += PAGE,
            }
        }
        table.free_empty_tables(frames, VirtAddr(first), VirtAddr(end));
    }

    /// Tears down a hot-added range's vmemmap (vmemmap_free): every PTE
    /// unmapped and flushed, private frames freed, the shared tail page's
    /// references dropped, and page-table pages freed when empty.
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
            let (first, end) = (self.va(region.start_pfn).0, self.va(region.start_pfn + region.nr_pages).0);
            self.depopulate_memory(table, frames, first, end);
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
