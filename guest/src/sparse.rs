//! Sparse memory sections, as Linux's mem_section keeps them under
//! SPARSEMEM_VMEMMAP: which 2 MiB subsections of each section are present,
//! and which sections are early (present at boot, their memmap populated
//! whole then and never freed, even where part of the section is absent).
//!
//! Two levels, as SPARSEMEM_EXTREME: a root array of pointers to pages of
//! section entries, each page allocated on first use and kept for good.

use crate::arch::SECTION_SIZE_BITS;
use crate::mm::frames::{AllocError, FrameAllocator, Purpose};
use crate::mm::{PhysAddr, PAGE};

/// Subsections are 2 MiB on every architecture (SUBSECTION_SHIFT).
pub const SUBSECTION_SHIFT: u32 = 21;
pub const SUBSECTION: u64 = 1 << SUBSECTION_SHIFT;
/// The highest physical address sections are kept for (64 TiB: more than
/// any machine here can address).
const MAX_PHYSMEM_BITS: u32 = 46;
const ENTRY_BYTES: u64 = core::mem::size_of::<SectionEntry>() as u64;
const ENTRIES_PER_PAGE: u64 = PAGE / ENTRY_BYTES;
const ROOTS: u64 = (1 << (MAX_PHYSMEM_BITS - SECTION_SIZE_BITS)) / ENTRIES_PER_PAGE;
// At least one frame: the allocator hands out nothing smaller.
const ROOTS_BYTES: u64 = if ROOTS * 8 > PAGE { ROOTS * 8 } else { PAGE };

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

pub struct Sections {
    /// The root array (ROOTS page addresses, 0: none yet), allocated on first use.
    roots: Option<PhysAddr>,
}

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

impl Sections {
    pub const fn new() -> Sections {
        Sections { roots: None }
    }

    fn entry(&self, nr: u64) -> Option<*mut SectionEntry> {
        let roots = self.roots?;
        let root = nr / ENTRIES_PER_PAGE;
        if root >= ROOTS {
            return None;
        }
        // SAFETY: the root array is ours, identity-mapped, ROOTS words long.
        let page = unsafe { roots.as_mut_ptr::<u64>().add(root as usize).read() };
        (page != 0).then(|| PhysAddr(page + (nr % ENTRIES_PER_PAGE) * ENTRY_BYTES).as_mut_ptr())
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
                let r = frames.alloc_bytes(ROOTS_BYTES, Purpose::Sparse)?;
                self.roots = Some(r);
                r
            }
        };
        let mut nr = start >> SECTION_SIZE_BITS;
        while nr < section_numbers(start, end).end {
            let slot = roots.as_mut_ptr::<u64>().wrapping_add((nr / ENTRIES_PER_PAGE) as usize);
            // SAFETY: inside the root array (nr is below 2^MAX_PHYSMEM_BITS).
            if unsafe { slot.read() } == 0 {
                let page = frames.alloc_bytes(PAGE, Purpose::Sparse)?;
                // SAFETY: as above.
                unsafe { slot.write(page.0) };
            }
            nr = (nr / ENTRIES_PER_PAGE + 1) * ENTRIES_PER_PAGE;
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
        for nr in section_numbers(start, end) {
            if let Some(e) = self.entry(nr) {
                // SAFETY: prepare allocated every entry of the range.
                unsafe {
                    (*e).subsections |= subsection_mask(nr, start, end);
                    (*e).early |= early as u64;
                }
            }
        }
        Ok(())
    }

    /// Marks the subsections of `[start, end)` absent (section_deactivate).
    /// An early section stays early: its memmap is boot memory.
    pub fn deactivate(&mut self, start: u64, end: u64) {
        for nr in section_numbers(start, end) {
            if let Some(e) = self.entry(nr) {
                // SAFETY: an entry of ours.
                unsafe { (*e).subsections &= !subsection_mask(nr, start, end) };
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
        section_numbers(start, end).any(|nr| self.subsections(nr) & subsection_mask(nr, start, end) != 0)
    }
}
