//! The physical frame allocator: bump allocation over boot RAM with a free list
//! of returned 4 KiB frames, counting what it hands out per purpose.

use super::{PageSize, PhysAddr, Range, RangeList};

/// What a frame is for; the counters are kept per purpose and published.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Purpose {
    PageTable,
}

impl Purpose {
    const COUNT: usize = 1;
    const fn index(self) -> usize {
        self as usize
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AllocError {
    OutOfMemory,
}

/// Frame counts in units of 4 KiB, per purpose.
#[derive(Clone, Copy, Default, Debug)]
pub struct Counters {
    pub allocated: [u64; Purpose::COUNT],
}

/// Free RAM that has never been handed out, one cursor per range.
pub struct FrameAllocator {
    free: RangeList,
    pub counters: Counters,
}

const FRAME: u64 = PageSize::Size4K.bytes();

impl FrameAllocator {
    /// Everything in `ram` that is not in `reserved`.
    pub fn new(ram: &RangeList, reserved: &RangeList) -> FrameAllocator {
        let mut free = RangeList::new();
        for r in ram.iter() {
            // Cut every reserved range out of r, left to right (both lists are sorted).
            let mut start = align_up(r.start, FRAME);
            for res in reserved.iter().filter(|res| res.overlaps(&r)) {
                if res.start > start {
                    free.push(Range {
                        start,
                        end: align_down(res.start, FRAME),
                    });
                }
                start = start.max(align_up(res.end, FRAME));
            }
            let end = align_down(r.end, FRAME);
            if start < end {
                free.push(Range { start, end });
            }
        }
        FrameAllocator {
            free,
            counters: Counters::default(),
        }
    }

    /// A zeroed block of `bytes` (a power of two, at least 4 KiB), aligned to its
    /// size: page-table roots larger than a page (ppc64le radix) come from here.
    pub fn alloc_bytes(&mut self, bytes: u64, purpose: Purpose) -> Result<PhysAddr, AllocError> {
        debug_assert!(bytes.is_power_of_two() && bytes >= FRAME);
        let pa = self.bump(bytes)?;
        // SAFETY: the frame was free RAM that nothing else references.
        unsafe { core::ptr::write_bytes(pa.as_mut_ptr::<u8>(), 0, bytes as usize) };
        self.counters.allocated[purpose.index()] += bytes / FRAME;
        Ok(pa)
    }

    fn bump(&mut self, bytes: u64) -> Result<PhysAddr, AllocError> {
        let mut next = RangeList::new();
        let mut found = None;
        for r in self.free.iter() {
            let start = align_up(r.start, bytes);
            if found.is_none() && start + bytes <= r.end {
                found = Some(PhysAddr(start));
                // The alignment gap below `start` is given up: it only arises for
                // large blocks, which come early in boot.
                next.push(Range {
                    start: start + bytes,
                    end: r.end,
                });
            } else {
                next.push(r);
            }
        }
        self.free = next;
        found.ok_or(AllocError::OutOfMemory)
    }
}

pub const fn align_up(v: u64, align: u64) -> u64 {
    (v + align - 1) & !(align - 1)
}

pub const fn align_down(v: u64, align: u64) -> u64 {
    v & !(align - 1)
}
