//! Memory management common to every architecture: address types, the frame
//! allocator, a page-table mapper written over an architecture's entry format,
//! and the update log its stores and the TLB invalidations go into.

pub mod frames;
pub mod pagetable;
#[cfg(test)]
pub mod test_memory;
pub mod update_log;

use core::fmt;

/// A guest-physical address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(transparent)]
pub struct PhysAddr(pub u64);

/// A guest-virtual address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(transparent)]
pub struct VirtAddr(pub u64);

impl PhysAddr {
    pub const fn add(self, bytes: u64) -> PhysAddr {
        PhysAddr(self.0 + bytes)
    }
    pub const fn is_aligned(self, size: PageSize) -> bool {
        self.0 & (size.bytes() - 1) == 0
    }
    /// Where this physical address is reached (see [`FrameAccess`]).
    pub fn as_mut_ptr<T>(self) -> *mut T {
        Memory::ptr(self).cast()
    }
}

/// How the memory code reaches physical memory it owns (page tables, the
/// section table, the allocator's own lists).
pub trait FrameAccess {
    fn ptr(pa: PhysAddr) -> *mut u8;
}

/// The firmware keeps all RAM identity-mapped, before and after the MMU is on.
pub enum IdentityMapped {}

impl FrameAccess for IdentityMapped {
    fn ptr(pa: PhysAddr) -> *mut u8 {
        pa.0 as usize as *mut u8
    }
}

#[cfg(not(test))]
type Memory = IdentityMapped;
/// Host tests: a pool in a Vec standing for a range of physical memory.
#[cfg(test)]
type Memory = test_memory::TestMemory;

impl VirtAddr {
    pub const fn is_aligned(self, size: PageSize) -> bool {
        self.0 & (size.bytes() - 1) == 0
    }
}

/// A page frame number: a physical address in units of a base page. The
/// conversions name the page size they divide or multiply by.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
#[repr(transparent)]
pub struct Pfn(pub u64);

impl Pfn {
    /// The frame holding `pa`, in pages of `page`.
    pub const fn containing(pa: PhysAddr, page: PageSize) -> Pfn {
        Pfn(pa.0 >> page.shift())
    }
    /// The first byte of the frame, in pages of `page`.
    pub const fn start(self, page: PageSize) -> PhysAddr {
        PhysAddr(self.0 << page.shift())
    }
    /// The frame `pages` frames on.
    pub const fn add(self, pages: u64) -> Pfn {
        Pfn(self.0 + pages)
    }
    /// The frame `pages` frames back.
    pub const fn sub(self, pages: u64) -> Pfn {
        Pfn(self.0 - pages)
    }
    /// How many frames `self` is past `earlier`.
    pub const fn pages_since(self, earlier: Pfn) -> u64 {
        self.0 - earlier.0
    }
    /// The frames from `self` up to, not including, `end`.
    pub fn up_to(self, end: Pfn) -> impl Iterator<Item = Pfn> {
        (self.0..end.0).map(Pfn)
    }
}

impl fmt::Debug for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pa:{:#x}", self.0)
    }
}

impl fmt::Debug for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "va:{:#x}", self.0)
    }
}

/// The sizes a page-table leaf can map. Which of them an architecture's
/// tables hold is its format's business, and so is its base page
/// (`pagetable::Format::BASE_PAGE`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PageSize {
    Size4K,
    Size64K,
    Size2M,
    Size1G,
}

impl PageSize {
    /// Largest first: the order `boot` tries them in.
    pub const DESCENDING: [PageSize; 4] = [PageSize::Size1G, PageSize::Size2M, PageSize::Size64K, PageSize::Size4K];

    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size64K => 16,
            PageSize::Size2M => 21,
            PageSize::Size1G => 30,
        }
    }
    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }
    pub fn from_shift(shift: u32) -> Option<PageSize> {
        PageSize::DESCENDING.into_iter().find(|s| s.shift() == shift)
    }
}

/// A physical range.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub const fn new(start: u64, size: u64) -> Range {
        Range { start, end: start + size }
    }
    pub const fn size(&self) -> u64 {
        self.end - self.start
    }
    pub const fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end
    }
    pub const fn overlaps(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end
    }
}

const MAX_RANGES: usize = 64;

/// A small fixed-capacity list of ranges (no heap in the firmware).
#[derive(Clone, Copy)]
pub struct RangeList {
    ranges: [Range; MAX_RANGES],
    len: usize,
}

impl RangeList {
    pub const fn new() -> RangeList {
        RangeList { ranges: [Range { start: 0, end: 0 }; MAX_RANGES], len: 0 }
    }

    /// Adds a range, merged with any it overlaps or touches; more disjoint
    /// ranges than we can hold is a firmware failure.
    pub fn push(&mut self, range: Range) {
        if range.start >= range.end {
            return;
        }
        let mut merged = range;
        let mut kept = 0;
        for i in 0..self.len {
            let r = self.ranges[i];
            if r.start <= merged.end && merged.start <= r.end {
                merged = Range { start: r.start.min(merged.start), end: r.end.max(merged.end) };
            } else {
                self.ranges[kept] = r;
                kept += 1;
            }
        }
        assert!(kept < MAX_RANGES, "more than {MAX_RANGES} disjoint memory ranges");
        self.ranges[kept] = merged;
        self.len = kept + 1;
        self.ranges[..self.len].sort_unstable_by_key(|r| r.start);
    }

    /// Cuts `range` out of every range it overlaps.
    pub fn remove(&mut self, range: Range) {
        let old = *self;
        *self = RangeList::new();
        for r in old.iter() {
            self.push(Range { start: r.start, end: r.end.min(range.start) });
            self.push(Range { start: r.start.max(range.end), end: r.end });
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = Range> + '_ {
        self.ranges[..self.len].iter().copied()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Default for RangeList {
    fn default() -> RangeList {
        RangeList::new()
    }
}

#[cfg(test)]
mod tests;
