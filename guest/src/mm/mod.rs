//! Memory management common to every architecture: address types, the frame
//! allocator, and a page-table mapper written over an architecture's entry format.

pub mod boot;
pub mod frames;
pub mod pagetable;

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
    /// The address the firmware reaches this frame at: it keeps all RAM
    /// identity-mapped, before and after the MMU is on.
    pub fn as_mut_ptr<T>(self) -> *mut T {
        self.0 as usize as *mut T
    }
}

impl VirtAddr {
    pub const fn is_aligned(self, size: PageSize) -> bool {
        self.0 & (size.bytes() - 1) == 0
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
/// tables hold is its format's business; its base page is `arch::BASE_PAGE`.
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

/// The base page: the frame allocator's unit and the vmemmap's page.
pub const PAGE: u64 = crate::arch::BASE_PAGE.bytes();

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
}
