//! The vmemmap model: the struct pages of all memory, mapped at
//! `arch::VMEMMAP_BASE` as Linux keeps them under SPARSEMEM_VMEMMAP, in
//! miniature. Split as Linux's files are:
//! - `boot`: boot population and memmap init (mm/sparse-vmemmap.c, mm/mm_init.c);
//! - `hugetlb`: HugeTLB folios, their vmemmap optimization and restore
//!   (mm/hugetlb_vmemmap.c);
//! - `dax`: device DAX compound pages (the ZONE_DEVICE paths of mm/sparse-vmemmap.c);
//! - `hotplug`: hot-added memory, and hot removal (mm/memory_hotplug.c);
//! - `shared_tails`: the pages all tails of a (zone, order) map under the unified layout.

mod boot;
mod dax;
mod hotplug;
mod hugetlb;
mod shared_tails;

use hvo_abi::model::{Knob, Layout, RegionKind, StructPage, Zone, STRUCT_PAGE_SIZE};
use hvo_abi::refusal::Refusal;
use hvo_guest::sparse::SectionError;

use crate::arch::{self, PAGE};
use crate::mm::frames::{AllocError, FrameAllocator};
use crate::mm::pagetable::{Flush, MapError, Prot, Sequence};
use crate::mm::{Pfn, PhysAddr, RangeList, VirtAddr};
use crate::paging::Table;

pub use dax::DaxRequest;
pub use shared_tails::SharedTails;

pub const MAX_REGIONS: usize = hvo_abi::manifest::MAX_REGIONS;
const STRUCT_PAGES_PER_PAGE: u64 = PAGE / STRUCT_PAGE_SIZE;
/// The zone memmap init gives boot memory, and its freed pages go back to.
const BOOT_ZONE: Zone = Zone::Normal;

/// The architecture's sections.
type Sections = hvo_guest::sparse::Sections<{ arch::SECTION_SIZE_BITS }, { arch::BASE_PAGE.shift() }>;

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

impl VmemmapError {
    /// The reason the host is told.
    pub fn refusal(self) -> Refusal {
        match self {
            VmemmapError::Map(MapError::Alloc(AllocError::Injected)) => Refusal::InjectedFailure,
            VmemmapError::Map(MapError::Alloc(AllocError::OutOfMemory)) => Refusal::OutOfMemory,
            VmemmapError::Map(MapError::Misaligned) => Refusal::Misaligned,
            VmemmapError::Map(MapError::AlreadyMapped) => Refusal::AlreadyMapped,
            VmemmapError::Map(MapError::NotMapped) => Refusal::NotMapped,
            VmemmapError::Map(MapError::SizeNotSupported) => Refusal::SizeNotSupported,
            VmemmapError::NoSuchRegion => Refusal::NoSuchRegion,
            VmemmapError::TooManyRegions => Refusal::NoRegionSlot,
            VmemmapError::TooManySharedTails => Refusal::NoSharedTailSlot,
            VmemmapError::TooSmallToOptimize => Refusal::TooSmallToOptimize,
            VmemmapError::AlreadyOptimized => Refusal::AlreadyOptimized,
            VmemmapError::NotOptimized => Refusal::NotOptimized,
            VmemmapError::TooLate => Refusal::TooLate,
            VmemmapError::Busy => Refusal::Busy,
            VmemmapError::Sections(_) => Refusal::BadRange,
            VmemmapError::NoRoomForAltmap => Refusal::NoRoomForAltmap,
            VmemmapError::BadPmemSize => Refusal::BadPmemSize,
        }
    }
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

/// What a vmemmap change works on: the kernel page table the vmemmap lives
/// in, and the allocator its frames come from.
pub struct Mm<'a> {
    pub table: &'a mut Table,
    pub frames: &'a mut FrameAllocator,
}

/// The frame holding the byte address `pa`, in base pages (`arch::BASE_PAGE`).
fn pfn_of(pa: u64) -> Pfn {
    Pfn::containing(PhysAddr(pa), arch::BASE_PAGE)
}

/// The byte address of `pfn`, a frame in base pages (`arch::BASE_PAGE`).
fn addr_of(pfn: Pfn) -> u64 {
    pfn.start(arch::BASE_PAGE).0
}

/// A run of compound pages allocated together.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub kind: RegionKind,
    pub start_pfn: Pfn,
    pub nr_pages: u64,
    pub zone: Zone,
    pub order: u32,
    pub layout: Layout,
    pub optimized: bool,
    /// DAX with an altmap: the pages just below `start_pfn` that hold the
    /// region's struct pages, on the device (0: in system memory).
    pub altmap_pfns: u64,
}

impl Region {
    fn end_pfn(&self) -> Pfn {
        self.start_pfn.add(self.nr_pages)
    }

    fn heads(&self) -> impl Iterator<Item = Pfn> {
        let step = 1u64 << self.order;
        let start = self.start_pfn;
        (0..self.nr_pages / step).map(move |i| start.add(i * step))
    }

    /// Vmemmap pages of one compound page; 0 when its struct pages take less
    /// than a page (2 MiB with 64 KiB pages: 2 KiB of struct pages), which
    /// then shares its vmemmap page with its neighbours.
    fn vmemmap_pages(&self) -> u64 {
        (1u64 << self.order) / STRUCT_PAGES_PER_PAGE
    }

    /// Whether `frame` is one of the device pages holding the struct pages.
    fn in_altmap(&self, frame: PhysAddr) -> bool {
        let altmap = self.start_pfn.sub(self.altmap_pfns);
        (altmap..self.start_pfn).contains(&Pfn::containing(frame, arch::BASE_PAGE))
    }

    /// The whole device range in bytes: the altmap, then the compound pages.
    fn device_range(&self) -> (u64, u64) {
        (addr_of(self.start_pfn.sub(self.altmap_pfns)), addr_of(self.end_pfn()))
    }
}

/// One region id: the region, if any, and what hangs off it.
#[derive(Clone, Copy)]
pub struct RegionSlot {
    pub region: Option<Region>,
    /// For a HugeTLB region carved from hot-added memory: that memory region.
    origin: Option<usize>,
    /// For a hot-added memory region: how many of its pages are handed out.
    used: u64,
    /// For a DAX region: its pageblock migratetype tags, one byte per
    /// pageblock (where, and the bytes allocated).
    pub pageblock_tags: Option<(PhysAddr, u64)>,
}

impl RegionSlot {
    const EMPTY: RegionSlot = RegionSlot { region: None, origin: None, used: 0, pageblock_tags: None };
}

/// Which change a TLB flush completes (the path-named flush knobs forget
/// only their own).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FlushPath {
    /// Optimize's splits and tail remaps, and a rollback's remaps back.
    Optimize,
    /// Optimize's copy of a private vmemmap page (the head; legacy-dax's
    /// page 1) to a fresh frame.
    PrivateCopy,
    /// Restore giving a tail its own frame again (and its rollback).
    Restore,
    /// A vmemmap page unmapped as its range goes.
    Teardown,
}

/// Where boot is: gigantic pages can be reserved only before the vmemmap is
/// populated (they are populated already optimized).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BootState {
    Early,
    Populated,
}

/// Vmemmap pages an optimized compound page keeps private under `layout`
/// (VMEMMAP_RESERVE_NR): the head page, and under legacy-dax the first tail page.
const fn reserved_vmemmap_pages(layout: Layout) -> u64 {
    match layout {
        Layout::LegacyDax => 2,
        _ => 1,
    }
}

pub struct Vmemmap {
    memstart_pfn: Pfn,
    pub slots: [RegionSlot; MAX_REGIONS],
    pub shared_tails: SharedTails,
    pub struct_pages_initialized: u64,
    /// Bug knobs in force, one bit per `Knob`.
    pub knobs: u64,
    state: BootState,
    /// Which subsections are present, and which sections are early.
    sections: Sections,
}

impl Vmemmap {
    pub fn new(ram: &RangeList) -> Vmemmap {
        let first = ram.iter().next().map(|r| r.start).unwrap_or(0);
        let memstart = arch::MEMSTART_ALIGN.map(|a| crate::mm::frames::align_down(first, a)).unwrap_or(0);
        Vmemmap {
            memstart_pfn: pfn_of(memstart),
            slots: [RegionSlot::EMPTY; MAX_REGIONS],
            shared_tails: SharedTails::new(),
            struct_pages_initialized: 0,
            knobs: 0,
            state: BootState::Early,
            sections: Sections::new(),
        }
    }

    fn knob(&self, knob: Knob) -> bool {
        self.knobs & knob.bit() != 0
    }

    /// Completes a change to a live entry: invalidates the translation it
    /// removed (and, after a break, writes the new entry), unless a knob
    /// forgets the invalidation on purpose: `no-tlb-flush` on every path,
    /// the path-named ones on theirs.
    fn complete(&self, flush: Flush, path: FlushPath) {
        let path_knob = match path {
            FlushPath::Optimize => None,
            FlushPath::PrivateCopy => Some(Knob::NoFlushHeadCopy),
            FlushPath::Restore => Some(Knob::NoFlushRestore),
            FlushPath::Teardown => Some(Knob::NoFlushUnmap),
        };
        if self.knob(Knob::NoTlbFlush) || path_knob.is_some_and(|k| self.knob(k)) {
            flush.ignore();
        } else {
            flush.flush(&self.tlb());
        }
    }

    /// The TLB as the knobs leave it: knob `tlbie-base-size` encodes the
    /// base page's size in every ppc64 `tlbie`.
    fn tlb(&self) -> arch::Tlb {
        let encoding =
            if self.knob(Knob::TlbieBaseSize) { arch::Encoding::BasePageSize } else { arch::Encoding::Right };
        arch::Tlb { encoding }
    }

    /// How live entries are changed: as the architecture asks, or (knob
    /// `no-break-before-make`) with one store where it asks for a break.
    fn sequence(&self) -> Sequence {
        if self.knob(Knob::NoBreakBeforeMake) {
            Sequence::SingleStore
        } else {
            Sequence::Architecture
        }
    }

    /// How the tails of an optimized compound page under legacy-dax are
    /// mapped: writable, as the kernel writes them (knob
    /// `legacy-dax-tails-readonly`: read-only, on every path that maps them).
    fn legacy_dax_tails(&self) -> Prot {
        if self.knob(Knob::LegacyDaxTailsReadonly) {
            Prot::RO
        } else {
            Prot::RW
        }
    }

    /// Frees the page-table pages a teardown emptied over the vmemmap
    /// `[from, to)`, unless knob `keep-empty-tables` leaves them linked.
    fn free_empty_tables(&self, mm: &mut Mm, from: VirtAddr, to: VirtAddr) {
        if !self.knob(Knob::KeepEmptyTables) {
            mm.table.free_empty_tables(mm.frames, &self.tlb(), from, to);
        }
    }

    pub fn memstart_pfn(&self) -> Pfn {
        self.memstart_pfn
    }

    /// The struct page of `pfn`.
    pub fn va(&self, pfn: Pfn) -> VirtAddr {
        VirtAddr(arch::VMEMMAP_BASE + pfn.pages_since(self.memstart_pfn) * STRUCT_PAGE_SIZE)
    }

    fn regions(&self) -> impl Iterator<Item = &Region> {
        self.slots.iter().filter_map(|s| s.region.as_ref())
    }

    fn region(&self, id: usize) -> Result<Region, VmemmapError> {
        self.slots.get(id).and_then(|s| s.region).ok_or(VmemmapError::NoSuchRegion)
    }

    /// The first region id with no region.
    fn free_slot(&self) -> Result<usize, VmemmapError> {
        self.slots.iter().position(|s| s.region.is_none()).ok_or(VmemmapError::TooManyRegions)
    }

    fn write_struct_page(&self, pfn: Pfn, page: StructPage) {
        let ptr = self.va(pfn).0 as *mut u64;
        for (i, word) in page.to_words().into_iter().enumerate() {
            // SAFETY: the vmemmap of every RAM pfn is mapped and writable.
            unsafe { ptr.add(i).write_volatile(word) };
        }
    }

    /// Writes `page` into the struct pages of `[start, end)`, as one run of
    /// plain stores (a million struct pages under TCG: the per-page loop
    /// with its lookups cost more than the stores).
    fn fill_struct_pages(&self, start: Pfn, end: Pfn, page: StructPage) {
        if end <= start {
            return;
        }
        let first = self.va(start).0 as *mut StructPage;
        // SAFETY: the vmemmap of these pfns is mapped, writable and virtually
        // contiguous, and nothing else holds a reference into it.
        let pages = unsafe { core::slice::from_raw_parts_mut(first, end.pages_since(start) as usize) };
        pages.fill(page);
        // The host reads them after the reply, which must not overtake them.
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    }

    /// The shared tail page of (zone, order), created on first use, with one
    /// more user. Knob `cross-zone-tail`: the lookup forgets the zone; knob
    /// `stale-tail-contents`: a new page is filled for the wrong order.
    fn get_shared_tail(
        &mut self,
        frames: &mut FrameAllocator,
        zone: Zone,
        order: u32,
    ) -> Result<PhysAddr, VmemmapError> {
        let (any_zone, stale) = (self.knob(Knob::CrossZoneTail), self.knob(Knob::StaleTailContents));
        self.shared_tails.get(frames, zone, order, any_zone, stale)
    }

    /// The shared tail page of (zone, order), without taking a user.
    fn shared_tail_pa(&self, zone: Zone, order: u32) -> Result<PhysAddr, VmemmapError> {
        self.shared_tails.find(zone, order, self.knob(Knob::CrossZoneTail)).ok_or(VmemmapError::TooManySharedTails)
    }

    /// Drops a user of the shared tail page of (zone, order). Knob
    /// `shared-tail-leak`: the last user does not free it.
    fn put_shared_tail(&mut self, frames: &mut FrameAllocator, zone: Zone, order: u32) {
        let leak = self.knob(Knob::SharedTailLeak);
        self.shared_tails.put(frames, zone, order, leak);
    }
}
