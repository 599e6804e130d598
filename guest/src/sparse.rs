//! Sparse memory sections, as Linux's mem_section keeps them under
//! SPARSEMEM_VMEMMAP: which 2 MiB subsections of each section are present,
//! and which sections are early (present at boot, their memmap populated
//! whole then and never freed, even where part of the section is absent).
//!
//! Two levels, as SPARSEMEM_EXTREME: a root array of pointers to pages of
//! section entries, each page allocated on first use and kept for good.

use crate::mm::frames::{AllocError, FrameAllocator, Purpose};
use crate::mm::PhysAddr;

/// Subsections are 2 MiB on every architecture (SUBSECTION_SHIFT).
pub const SUBSECTION_SHIFT: u32 = 21;
pub const SUBSECTION: u64 = 1 << SUBSECTION_SHIFT;
/// The highest physical address sections are kept for (64 TiB: more than
/// any machine here can address).
const MAX_PHYSMEM_BITS: u32 = 46;
const ENTRY_BYTES: u64 = core::mem::size_of::<SectionEntry>() as u64;

/// One section: its subsection map, and whether it is early.
#[repr(C)]
struct SectionEntry {
    subsections: u64,
    early: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SectionError {
    Alloc(AllocError),
    /// A subsection of the range is present already (Linux: -EEXIST).
    AlreadyPresent,
    /// The range is not made of whole subsections, or lies beyond MAX_PHYSMEM_BITS.
    BadRange,
}

impl From<AllocError> for SectionError {
    fn from(e: AllocError) -> SectionError {
        SectionError::Alloc(e)
    }
}

/// The sections of an architecture: `1 << SECTION_SIZE_BITS` bytes each
/// (Linux's SECTION_SIZE_BITS), kept in pages of `1 << PAGE_SHIFT` bytes.
#[derive(Default)]
pub struct Sections<const SECTION_SIZE_BITS: u32, const PAGE_SHIFT: u32> {
    /// The root array (ROOTS page addresses, 0: none yet), allocated on first use.
    roots: Option<PhysAddr>,
}

impl<const SECTION_SIZE_BITS: u32, const PAGE_SHIFT: u32> Sections<SECTION_SIZE_BITS, PAGE_SHIFT> {
    const PAGE: u64 = 1 << PAGE_SHIFT;
    const ENTRIES_PER_PAGE: u64 = Self::PAGE / ENTRY_BYTES;
    const ROOTS: u64 = (1 << (MAX_PHYSMEM_BITS - SECTION_SIZE_BITS)) / Self::ENTRIES_PER_PAGE;
    // At least one frame: the allocator hands out nothing smaller.
    const ROOTS_BYTES: u64 = if Self::ROOTS * 8 > Self::PAGE { Self::ROOTS * 8 } else { Self::PAGE };

    /// The subsection bits of `[start, end)` within the section `nr`.
    fn subsection_mask(nr: u64, start: u64, end: u64) -> u64 {
        let base = nr << SECTION_SIZE_BITS;
        let first = (start.max(base) - base) >> SUBSECTION_SHIFT;
        let last = (end.min(base + (1 << SECTION_SIZE_BITS)) - base) >> SUBSECTION_SHIFT;
        let bits = last - first;
        let ones = if bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 };
        ones << first
    }

    /// The sections `[start, end)` touches.
    fn section_numbers(start: u64, end: u64) -> core::ops::Range<u64> {
        (start >> SECTION_SIZE_BITS)..end.div_ceil(1 << SECTION_SIZE_BITS)
    }

    pub const fn new() -> Self {
        Sections { roots: None }
    }

    fn entry(&self, nr: u64) -> Option<*mut SectionEntry> {
        let roots = self.roots?;
        let root = nr / Self::ENTRIES_PER_PAGE;
        if root >= Self::ROOTS {
            return None;
        }
        // SAFETY: the root array is ours, identity-mapped, ROOTS words long.
        let page = unsafe { roots.as_mut_ptr::<u64>().add(root as usize).read() };
        (page != 0).then(|| PhysAddr(page + (nr % Self::ENTRIES_PER_PAGE) * ENTRY_BYTES).as_mut_ptr())
    }

    /// Allocates whatever entry pages `[start, end)` needs, before anything
    /// changes, so that a failed allocation leaves nothing half done.
    fn prepare(&mut self, frames: &mut FrameAllocator, start: u64, end: u64) -> Result<(), SectionError> {
        if start >= end
            || !start.is_multiple_of(SUBSECTION)
            || !end.is_multiple_of(SUBSECTION)
            || end > 1 << MAX_PHYSMEM_BITS
        {
            return Err(SectionError::BadRange);
        }
        let roots = match self.roots {
            Some(r) => r,
            None => {
                let r = frames.alloc_bytes(Self::ROOTS_BYTES, Purpose::Sparse)?;
                self.roots = Some(r);
                r
            }
        };
        let mut nr = start >> SECTION_SIZE_BITS;
        while nr < Self::section_numbers(start, end).end {
            let slot = roots.as_mut_ptr::<u64>().wrapping_add((nr / Self::ENTRIES_PER_PAGE) as usize);
            // SAFETY: inside the root array (nr is below 2^MAX_PHYSMEM_BITS).
            if unsafe { slot.read() } == 0 {
                let page = frames.alloc_bytes(Self::PAGE, Purpose::Sparse)?;
                // SAFETY: as above.
                unsafe { slot.write(page.0) };
            }
            nr = (nr / Self::ENTRIES_PER_PAGE + 1) * Self::ENTRIES_PER_PAGE;
        }
        Ok(())
    }

    /// Marks the subsections of `[start, end)` present (section_activate's
    /// bookkeeping). `early`: boot memory, whose sections keep their memmap.
    /// Refused, with nothing changed, if any of them is present already.
    pub fn activate(
        &mut self,
        frames: &mut FrameAllocator,
        start: u64,
        end: u64,
        early: bool,
    ) -> Result<(), SectionError> {
        self.prepare(frames, start, end)?;
        if self.any_present(start, end) {
            return Err(SectionError::AlreadyPresent);
        }
        for nr in Self::section_numbers(start, end) {
            if let Some(e) = self.entry(nr) {
                // SAFETY: prepare allocated every entry of the range.
                unsafe {
                    (*e).subsections |= Self::subsection_mask(nr, start, end);
                    (*e).early |= early as u64;
                }
            }
        }
        Ok(())
    }

    /// Marks the subsections of `[start, end)` absent (section_deactivate).
    /// An early section stays early: its memmap is boot memory.
    pub fn deactivate(&mut self, start: u64, end: u64) {
        for nr in Self::section_numbers(start, end) {
            if let Some(e) = self.entry(nr) {
                // SAFETY: an entry of ours.
                unsafe { (*e).subsections &= !Self::subsection_mask(nr, start, end) };
            }
        }
    }

    fn subsections(&self, nr: u64) -> u64 {
        // SAFETY: an entry of ours.
        self.entry(nr).map(|e| unsafe { (*e).subsections }).unwrap_or(0)
    }

    /// Whether the section holding `pa` is early (its memmap is the boot one).
    pub fn is_early(&self, pa: u64) -> bool {
        // SAFETY: an entry of ours.
        self.entry(pa >> SECTION_SIZE_BITS).is_some_and(|e| unsafe { (*e).early } != 0)
    }

    /// Whether any subsection of `[start, end)` is present.
    pub fn any_present(&self, start: u64, end: u64) -> bool {
        Self::section_numbers(start, end).any(|nr| self.subsections(nr) & Self::subsection_mask(nr, start, end) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::test_memory::TestMemory;
    use crate::mm::{PageSize, RangeList};

    /// x86_64 and arm64: 128 MiB sections, 4 KiB pages.
    type Sections128M = Sections<27, 12>;
    /// ppc64le with 64 KiB pages: 16 MiB sections.
    type Sections16M = Sections<24, 16>;
    const MIB: u64 = 1 << 20;

    fn frames(memory: &TestMemory, page: PageSize) -> FrameAllocator {
        FrameAllocator::new(&memory.ram(), &RangeList::new(), page)
    }

    #[test]
    fn activated_subsections_are_present_and_nothing_else() {
        let memory = TestMemory::install(0x4000_0000, 4 * MIB);
        let mut frames = frames(&memory, PageSize::Size4K);
        let mut sections = Sections128M::new();
        // 6 MiB straddling the boundary of sections 1 and 2.
        let (start, end) = (256 * MIB - 2 * MIB, 256 * MIB + 4 * MIB);
        assert_eq!(sections.activate(&mut frames, start, end, false), Ok(()));
        assert!(sections.any_present(start, start + SUBSECTION));
        assert!(sections.any_present(end - SUBSECTION, end));
        assert!(!sections.any_present(start - SUBSECTION, start));
        assert!(!sections.any_present(end, end + SUBSECTION));
        assert!(!sections.is_early(start));
        // Nothing overlapping is taken, and the refusal changes nothing.
        let overlapping = sections.activate(&mut frames, end - SUBSECTION, end + SUBSECTION, false);
        assert_eq!(overlapping, Err(SectionError::AlreadyPresent));
        assert!(!sections.any_present(end, end + SUBSECTION));
    }

    #[test]
    fn partial_removal_keeps_the_rest_and_early_sections_stay_early() {
        let memory = TestMemory::install(0x4000_0000, 4 * MIB);
        let mut frames = frames(&memory, PageSize::Size64K);
        let mut sections = Sections16M::new();
        sections.activate(&mut frames, 0, 16 * MIB, true).unwrap();
        sections.deactivate(4 * MIB, 8 * MIB);
        assert!(!sections.any_present(4 * MIB, 8 * MIB));
        assert!(sections.any_present(0, 4 * MIB));
        assert!(sections.any_present(8 * MIB, 16 * MIB));
        assert!(sections.is_early(6 * MIB));
        // The hole can be filled again, by hotplug.
        assert_eq!(sections.activate(&mut frames, 4 * MIB, 8 * MIB, false), Ok(()));
        assert!(sections.any_present(4 * MIB, 6 * MIB));
    }

    #[test]
    fn refuses_ranges_that_are_not_whole_subsections() {
        let memory = TestMemory::install(0x4000_0000, 4 * MIB);
        let mut frames = frames(&memory, PageSize::Size4K);
        let mut sections = Sections128M::new();
        assert_eq!(sections.activate(&mut frames, MIB, 4 * MIB, false), Err(SectionError::BadRange));
        assert_eq!(sections.activate(&mut frames, 4 * MIB, 4 * MIB, false), Err(SectionError::BadRange));
        let beyond = 1 << MAX_PHYSMEM_BITS;
        assert_eq!(sections.activate(&mut frames, beyond, beyond + SUBSECTION, false), Err(SectionError::BadRange));
    }

    #[test]
    fn a_failed_allocation_leaves_nothing_present() {
        let memory = TestMemory::install(0x4000_0000, 4 * MIB);
        let mut frames = frames(&memory, PageSize::Size4K);
        let mut sections = Sections128M::new();
        // The root array is the first allocation, the entry page the second.
        frames.fail_nth(2);
        let failed = sections.activate(&mut frames, 0, 2 * MIB, false);
        assert_eq!(failed, Err(SectionError::Alloc(AllocError::Injected)));
        assert!(!sections.any_present(0, 2 * MIB));
        assert_eq!(sections.activate(&mut frames, 0, 2 * MIB, false), Ok(()));
        assert_eq!(frames.counters.allocated(Purpose::Sparse), 4 + 1);
    }
}
