//! The physical frame allocator: bump allocation over boot RAM with a free list
//! of returned base-page frames, counting what it hands out per purpose.

use super::{PageSize, PhysAddr, Range, RangeList};

/// What a frame is for; the counters are kept per purpose and published.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Purpose {
    PageTable,
    Vmemmap,
    /// HugeTLB folios: data pages, not counted as overhead.
    HugeTlb,
    /// Pageblock migratetype tags (the section usemap).
    Usemap,
    /// The section table (mem_section): kept for good once allocated.
    Sparse,
}

impl Purpose {
    const COUNT: usize = 5;
    const fn index(self) -> usize {
        self as usize
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AllocError {
    OutOfMemory,
    /// The allocation fault injection was told to fail.
    Injected,
}

/// Frame counts in base pages, per purpose.
#[derive(Clone, Copy, Default, Debug)]
pub struct Counters {
    allocated: [u64; Purpose::COUNT],
    freed: [u64; Purpose::COUNT],
}

impl Counters {
    pub fn allocated(&self, purpose: Purpose) -> u64 {
        self.allocated[purpose.index()]
    }
    pub fn freed(&self, purpose: Purpose) -> u64 {
        self.freed[purpose.index()]
    }
}

/// Free RAM that has never been handed out, one cursor per range, and the
/// base-page frames given back.
///
/// Freed frames are kept on a stack inside the allocator rather than linked
/// through the frames themselves: writing a link into a just-freed vmemmap
/// frame (through the identity map) lands in the same TCG TLB slot as the
/// vmemmap page that mapped it, evicting exactly the stale translation a
/// missing TLB flush leaves behind, and the write probes could never see it.
/// Only when the stack is full (freeing whole HugeTLB regions) are frames
/// linked through themselves.
pub struct FrameAllocator {
    /// The unit: the base page.
    frame: u64,
    free: RangeList,
    /// The recycled-frame stack: `RECYCLE_SLOTS` addresses, `recycled_len` used.
    recycled: *mut u64,
    recycled_len: usize,
    /// Head of a list threaded through frames freed while the stack was full.
    overflow: Option<PhysAddr>,
    pub counters: Counters,
    /// Bug knob `counter-not-decremented`: freed vmemmap frames are not counted.
    pub forget_vmemmap_frees: bool,
    /// Fault injection: the allocation this many allocations from now fails.
    fail_in: Option<u64>,
}

const RECYCLE_BYTES: u64 = 64 * 1024;
const RECYCLE_SLOTS: usize = (RECYCLE_BYTES / 8) as usize;

impl FrameAllocator {
    /// Everything in `ram` that is not in `reserved`, in frames of the base page `frame`.
    pub fn new(ram: &RangeList, reserved: &RangeList, frame: PageSize) -> FrameAllocator {
        let mut free = RangeList::new();
        let unit = frame.bytes();
        for r in ram.iter() {
            // Cut every reserved range out of r, left to right (both lists are sorted).
            let mut start = align_up(r.start, unit);
            for res in reserved.iter().filter(|res| res.overlaps(&r)) {
                if res.start > start {
                    free.push(Range { start, end: align_down(res.start, unit) });
                }
                start = start.max(align_up(res.end, unit));
            }
            let end = align_down(r.end, unit);
            if start < end {
                free.push(Range { start, end });
            }
        }
        let mut allocator = FrameAllocator {
            frame: unit,
            free,
            recycled: core::ptr::null_mut(),
            recycled_len: 0,
            overflow: None,
            counters: Counters::default(),
            forget_vmemmap_frees: false,
            fail_in: None,
        };
        // The stack's own storage: the allocator's, counted for nothing.
        allocator.recycled = match allocator.bump(RECYCLE_BYTES) {
            Ok(pa) => pa.as_mut_ptr(),
            Err(_) => panic!("no memory for the frame allocator"),
        };
        allocator
    }

    /// Adds frames to the vmemmap counters that were never allocated or freed:
    /// only the accounting bug knobs call this.
    pub fn miscount_vmemmap(&mut self, allocated: u64, freed: u64) {
        self.counters.allocated[Purpose::Vmemmap.index()] += allocated;
        self.counters.freed[Purpose::Vmemmap.index()] += freed;
    }

    /// Makes the `nth` allocation from now (1: the next one) fail, once;
    /// 0 disarms.
    pub fn fail_nth(&mut self, nth: u64) {
        self.fail_in = (nth > 0).then_some(nth);
    }

    /// Counts down an armed fault injection; `Err` when this allocation is the one.
    fn injected_failure(&mut self) -> Result<(), AllocError> {
        match self.fail_in {
            Some(1) => {
                self.fail_in = None;
                Err(AllocError::Injected)
            }
            Some(n) => {
                self.fail_in = Some(n - 1);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// One zeroed frame of `size`, aligned to its size.
    pub fn alloc(&mut self, size: PageSize, purpose: Purpose) -> Result<PhysAddr, AllocError> {
        self.alloc_bytes(size.bytes(), purpose)
    }

    /// A zeroed block of `bytes` (a power of two, at least a base page), aligned to its
    /// size: page-table roots larger than a page (ppc64le radix) come from here.
    pub fn alloc_bytes(&mut self, bytes: u64, purpose: Purpose) -> Result<PhysAddr, AllocError> {
        let pa = self.alloc_block(bytes, purpose)?;
        // SAFETY: the frame was free RAM that nothing else references.
        unsafe { core::ptr::write_bytes(pa.as_mut_ptr::<u8>(), 0, bytes as usize) };
        Ok(pa)
    }

    /// One frame of `size`, aligned to its size, holding whatever it held:
    /// for the boot vmemmap, every byte of which memmap init or its poison
    /// writes anyway (Linux allocates it raw too, memblock_alloc_try_nid_raw).
    /// Zeroing 2 MiB leaves first cost as much as memmap init itself.
    pub fn alloc_raw(&mut self, size: PageSize, purpose: Purpose) -> Result<PhysAddr, AllocError> {
        self.alloc_block(size.bytes(), purpose)
    }

    fn alloc_block(&mut self, bytes: u64, purpose: Purpose) -> Result<PhysAddr, AllocError> {
        debug_assert!(bytes.is_power_of_two() && bytes >= self.frame);
        self.injected_failure()?;
        let one_frame = bytes == self.frame;
        let pa = match (one_frame, self.overflow) {
            (true, Some(head)) => {
                // SAFETY: an overflowed frame is ours and identity-mapped; its
                // first word links to the next one.
                self.overflow = unsafe { head.as_mut_ptr::<Option<PhysAddr>>().read() };
                head
            }
            (true, None) if self.recycled_len > 0 => {
                self.recycled_len -= 1;
                // SAFETY: below `recycled_len`, inside the stack's storage.
                PhysAddr(unsafe { self.recycled.add(self.recycled_len).read() })
            }
            _ => self.bump(bytes)?,
        };
        self.counters.allocated[purpose.index()] += bytes / self.frame;
        Ok(pa)
    }

    /// Takes memory back: a base-page frame onto the recycle stack, a larger
    /// block (a HugeTLB region) back into the free ranges whole, without
    /// touching its pages.
    pub fn free(&mut self, pa: PhysAddr, bytes: u64, purpose: Purpose) {
        if bytes > self.frame {
            self.free.push(Range { start: pa.0, end: pa.0 + bytes });
            self.count_free(purpose, bytes);
            return;
        }
        for i in 0..bytes / self.frame {
            let frame = pa.add(i * self.frame);
            if self.recycled_len < RECYCLE_SLOTS {
                // SAFETY: below the stack's capacity.
                unsafe { self.recycled.add(self.recycled_len).write(frame.0) };
                self.recycled_len += 1;
            } else {
                // SAFETY: the caller gives the frame back and no longer uses it.
                unsafe { frame.as_mut_ptr::<Option<PhysAddr>>().write(self.overflow) };
                self.overflow = Some(frame);
            }
        }
        self.count_free(purpose, bytes);
    }

    fn count_free(&mut self, purpose: Purpose, bytes: u64) {
        if !(self.forget_vmemmap_frees && purpose == Purpose::Vmemmap) {
            self.counters.freed[purpose.index()] += bytes / self.frame;
        }
    }

    /// Takes `range` out of the free memory for good (boot memory set aside
    /// as persistent memory, as `memmap=nn!ss` does); refused unless all of
    /// it is still free.
    pub fn take(&mut self, range: Range) -> Result<(), AllocError> {
        if !self.free.iter().any(|r| r.start <= range.start && range.end <= r.end) {
            return Err(AllocError::OutOfMemory);
        }
        self.free.remove(range);
        Ok(())
    }

    /// `bytes` of contiguous memory aligned to `align`, not zeroed: data pages
    /// (HugeTLB folios) whose contents the model never reads.
    pub fn alloc_data(&mut self, bytes: u64, align: u64, purpose: Purpose) -> Result<PhysAddr, AllocError> {
        self.injected_failure()?;
        let pa = self.bump_aligned(bytes, align)?;
        self.counters.allocated[purpose.index()] += bytes / self.frame;
        Ok(pa)
    }

    fn bump(&mut self, bytes: u64) -> Result<PhysAddr, AllocError> {
        self.bump_aligned(bytes, bytes)
    }

    fn bump_aligned(&mut self, bytes: u64, align: u64) -> Result<PhysAddr, AllocError> {
        let mut next = RangeList::new();
        let mut found = None;
        for r in self.free.iter() {
            let start = align_up(r.start, align);
            if found.is_none() && start + bytes <= r.end {
                found = Some(PhysAddr(start));
                // The alignment gap below `start` stays free: a 1 GiB folio
                // would otherwise take everything below it too.
                next.push(Range { start: r.start, end: start });
                next.push(Range { start: start + bytes, end: r.end });
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
