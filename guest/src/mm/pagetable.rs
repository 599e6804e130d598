//! A page-table mapper written once over an architecture's entry format.
//!
//! The architecture describes its radix tree (levels, index bits, which levels
//! may hold leaves) and how entries are encoded; the walking, table allocation,
//! splitting and freeing live here. Every change that needs a TLB invalidation
//! returns a [`Flush`] the caller must use.

use core::marker::PhantomData;

use super::frames::{AllocError, FrameAllocator, Purpose};
use super::{PageSize, PhysAddr, VirtAddr};

/// Protection of a leaf. Kernel-only always: the firmware has no user mode.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Prot {
    pub write: bool,
    pub exec: bool,
    /// Device (uncached, strongly ordered) memory, for MMIO.
    pub device: bool,
}

impl Prot {
    pub const RW: Prot = Prot { write: true, exec: false, device: false };
    pub const RO: Prot = Prot { write: false, exec: false, device: false };
    pub const RWX: Prot = Prot { write: true, exec: true, device: false };
    pub const MMIO: Prot = Prot { write: true, exec: false, device: true };
}

/// A decoded entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Entry {
    Empty,
    Table(PhysAddr),
    Leaf { pa: PhysAddr, prot: Prot },
}

/// An architecture's page-table format. Level 0 is the root.
pub trait Format {
    const LEVELS: usize;
    /// Lowest virtual-address bit each level indexes, root first.
    const SHIFTS: [u32; 4];
    /// Index bits at each level, root first.
    const INDEX_BITS: [u32; 4];
    /// The size the last level's leaves map.
    const BASE_PAGE: PageSize;

    /// Whether a leaf of the level's size may be placed at `level`.
    fn leaf_allowed(level: usize) -> bool;
    fn decode(raw: u64, level: usize) -> Entry;
    fn encode_table(pa: PhysAddr, level: usize) -> u64;
    fn encode_leaf(pa: PhysAddr, level: usize, prot: Prot) -> u64;

    /// Entries are stored in the byte order the MMU reads (big-endian on radix).
    fn load(slot: PhysAddr) -> u64 {
        // SAFETY: callers pass a slot inside a live table.
        unsafe { slot.as_mut_ptr::<u64>().read_volatile() }
    }
    fn store(slot: PhysAddr, raw: u64) {
        // SAFETY: as for `load`.
        unsafe { slot.as_mut_ptr::<u64>().write_volatile(raw) }
    }

    /// What a table at `level` takes from the frame allocator: its entries,
    /// in at least one base page (a 64 KiB-page radix PTE table is 256 bytes;
    /// Linux packs those as fragments, the firmware does not bother).
    fn table_bytes(level: usize) -> u64 {
        (8u64 << Self::INDEX_BITS[level]).max(Self::BASE_PAGE.bytes())
    }
}

/// Invalidates cached translations: the architecture's instructions in the
/// firmware, a record of what was asked in tests.
pub trait Tlb {
    /// Invalidates one page's translation (and walk caches over it) everywhere.
    fn invalidate(&self, va: VirtAddr);
}

/// A TLB invalidation owed after a page-table change. Boot mappings are made
/// before the MMU uses the table, so they `ignore()` it; changes to live
/// tables (vmemmap optimization) must `flush()`.
#[must_use = "a page-table change is not visible until its TLB entry is flushed"]
#[derive(PartialEq, Eq, Debug)]
pub struct Flush(VirtAddr);

impl Flush {
    pub fn flush(self, tlb: &impl Tlb) {
        tlb.invalidate(self.0);
    }

    /// For changes made before the MMU uses this table, where no TLB entry
    /// can exist, and for the bug knob that forgets the flush on purpose.
    pub fn ignore(self) {}
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MapError {
    Alloc(AllocError),
    /// The address is not aligned to the page size.
    Misaligned,
    /// Something is mapped there already.
    AlreadyMapped,
    NotMapped,
    /// A leaf of this size cannot be placed on this architecture.
    SizeNotSupported,
}

impl From<AllocError> for MapError {
    fn from(e: AllocError) -> MapError {
        MapError::Alloc(e)
    }
}

/// What a virtual address translates to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Translation {
    pub pa: PhysAddr,
    pub size: PageSize,
    pub prot: Prot,
}

fn level_size<F: Format>(level: usize) -> Option<PageSize> {
    PageSize::from_shift(F::SHIFTS[level])
}

/// One page-table tree.
pub struct PageTable<F: Format> {
    root: PhysAddr,
    _format: PhantomData<F>,
}

fn leaf_level<F: Format>(size: PageSize) -> Option<usize> {
    (0..F::LEVELS).find(|&l| F::SHIFTS[l] == size.shift() && F::leaf_allowed(l))
}

/// Whether the format can map a leaf of `size` at all.
pub fn supports<F: Format>(size: PageSize) -> bool {
    leaf_level::<F>(size).is_some()
}

impl<F: Format> PageTable<F> {
    pub fn new(frames: &mut FrameAllocator) -> Result<Self, AllocError> {
        let root = frames.alloc_bytes(F::table_bytes(0), Purpose::PageTable)?;
        Ok(PageTable { root, _format: PhantomData })
    }

    pub fn root(&self) -> PhysAddr {
        self.root
    }

    /// Where the entry for `va` is in `table`, a table at `level`.
    fn slot(table: PhysAddr, level: usize, va: VirtAddr) -> PhysAddr {
        let index = (va.0 >> F::SHIFTS[level]) & ((1 << F::INDEX_BITS[level]) - 1);
        table.add(index * 8)
    }

    /// The slot at `level` for `va`, allocating intermediate tables on the way.
    fn walk_create(&mut self, frames: &mut FrameAllocator, va: VirtAddr, level: usize) -> Result<PhysAddr, MapError> {
        let mut table = self.root;
        for l in 0..level {
            let slot = Self::slot(table, l, va);
            table = match F::decode(F::load(slot), l) {
                Entry::Table(next) => next,
                Entry::Leaf { .. } => return Err(MapError::AlreadyMapped),
                Entry::Empty => {
                    let next = frames.alloc_bytes(F::table_bytes(l + 1), Purpose::PageTable)?;
                    F::store(slot, F::encode_table(next, l));
                    next
                }
            };
        }
        Ok(Self::slot(table, level, va))
    }

    pub fn map(
        &mut self,
        frames: &mut FrameAllocator,
        va: VirtAddr,
        pa: PhysAddr,
        size: PageSize,
        prot: Prot,
    ) -> Result<Flush, MapError> {
        if !va.is_aligned(size) || !pa.is_aligned(size) {
            return Err(MapError::Misaligned);
        }
        let level = leaf_level::<F>(size).ok_or(MapError::SizeNotSupported)?;
        let slot = self.walk_create(frames, va, level)?;
        if F::decode(F::load(slot), level) != Entry::Empty {
            return Err(MapError::AlreadyMapped);
        }
        F::store(slot, F::encode_leaf(pa, level, prot));
        Ok(Flush(va))
    }

    /// The slot holding the leaf for `va`, and its level.
    fn find_leaf(&self, va: VirtAddr) -> Option<(PhysAddr, usize)> {
        let mut table = self.root;
        for l in 0..F::LEVELS {
            let slot = Self::slot(table, l, va);
            match F::decode(F::load(slot), l) {
                Entry::Empty => return None,
                Entry::Leaf { .. } => return Some((slot, l)),
                Entry::Table(next) => table = next,
            }
        }
        None
    }

    /// Whether nothing at all is mapped in the `size` block holding `va`:
    /// the walk down to that block's level meets an empty entry.
    pub fn block_is_empty(&self, va: VirtAddr, size: PageSize) -> bool {
        let Some(level) = leaf_level::<F>(size) else { return false };
        let mut table = self.root;
        for l in 0..=level {
            match F::decode(F::load(Self::slot(table, l, va)), l) {
                Entry::Empty => return true,
                Entry::Leaf { .. } => return false,
                Entry::Table(next) => table = next,
            }
        }
        false
    }

    pub fn translate(&self, va: VirtAddr) -> Option<Translation> {
        let (slot, level) = self.find_leaf(va)?;
        let Entry::Leaf { pa, prot } = F::decode(F::load(slot), level) else {
            return None;
        };
        let size = level_size::<F>(level)?;
        Some(Translation { pa: pa.add(va.0 & (size.bytes() - 1)), size, prot })
    }

    /// Points the base-page leaf mapping `va` at `pa` with `prot`; returns the
    /// frame it mapped before.
    pub fn remap(&mut self, va: VirtAddr, pa: PhysAddr, prot: Prot) -> Result<(PhysAddr, Flush), MapError> {
        let (slot, level) = self.find_leaf(va).ok_or(MapError::NotMapped)?;
        let Entry::Leaf { pa: old, .. } = F::decode(F::load(slot), level) else {
            return Err(MapError::NotMapped);
        };
        if level_size::<F>(level) != Some(F::BASE_PAGE) {
            return Err(MapError::SizeNotSupported);
        }
        F::store(slot, F::encode_leaf(pa, level, prot));
        Ok((old, Flush(va)))
    }

    /// Replaces the 2 MiB leaf covering `va` with a table of base pages (512
    /// of 4 KiB or 32 of 64 KiB) mapping the same frames with the same
    /// protection. A no-op when `va` is already mapped by base pages.
    pub fn split(&mut self, frames: &mut FrameAllocator, va: VirtAddr) -> Result<Option<Flush>, MapError> {
        let (slot, level) = self.find_leaf(va).ok_or(MapError::NotMapped)?;
        let Entry::Leaf { pa, prot } = F::decode(F::load(slot), level) else {
            return Err(MapError::NotMapped);
        };
        let base = F::BASE_PAGE;
        match level_size::<F>(level) {
            Some(size) if size == base => return Ok(None),
            Some(PageSize::Size2M) if level_size::<F>(level + 1) == Some(base) => {}
            _ => return Err(MapError::SizeNotSupported),
        }
        let table = frames.alloc_bytes(F::table_bytes(level + 1), Purpose::PageTable)?;
        let step = base.bytes();
        for i in 0..PageSize::Size2M.bytes() / step {
            F::store(table.add(i * 8), F::encode_leaf(pa.add(i * step), level + 1, prot));
        }
        F::store(slot, F::encode_table(table, level));
        let base = VirtAddr(va.0 & !(PageSize::Size2M.bytes() - 1));
        Ok(Some(Flush(base)))
    }

    /// Copies the root entries of `from` that cover `[start, end)` and that
    /// this root lacks: what sync_global_pgds does for a second root.
    pub fn copy_top_level(&mut self, from: &Self, start: VirtAddr, end: VirtAddr) {
        let span = 1u64 << F::SHIFTS[0];
        let mut va = start.0 & !(span - 1);
        while va < end.0 {
            let src = Self::slot(from.root, 0, VirtAddr(va));
            let dst = Self::slot(self.root, 0, VirtAddr(va));
            if F::decode(F::load(dst), 0) == Entry::Empty {
                F::store(dst, F::load(src));
            }
            va = match va.checked_add(span) {
                Some(next) => next,
                None => break,
            };
        }
    }

    /// Removes the leaf mapping `va`; returns the frame it mapped and its size.
    pub fn unmap(&mut self, va: VirtAddr) -> Result<(PhysAddr, PageSize, Flush), MapError> {
        let (slot, level) = self.find_leaf(va).ok_or(MapError::NotMapped)?;
        let Entry::Leaf { pa, .. } = F::decode(F::load(slot), level) else { return Err(MapError::NotMapped) };
        let size = level_size::<F>(level).ok_or(MapError::SizeNotSupported)?;
        F::store(slot, 0);
        Ok((pa, size, Flush(VirtAddr(va.0 & !(size.bytes() - 1)))))
    }

    /// Frees the tables below the root's children over `[start, end)` that
    /// map nothing any more. Root entries stay: other roots point at the
    /// same next-level tables, as Linux keeps its top-level vmemmap entries.
    pub fn free_empty_tables(&mut self, frames: &mut FrameAllocator, tlb: &impl Tlb, start: VirtAddr, end: VirtAddr) {
        let mut va = start.0;
        while va < end.0 {
            let span = 1u64 << F::SHIFTS[0];
            if let Entry::Table(child) = F::decode(F::load(Self::slot(self.root, 0, VirtAddr(va))), 0) {
                Self::prune(frames, tlb, child, 1, VirtAddr(va), start, end);
            }
            va = match (va & !(span - 1)).checked_add(span) {
                Some(next) => next,
                None => break,
            };
        }
    }

    /// Frees every empty table below `table` (at `level`) within the range;
    /// returns whether `table` itself is now empty.
    fn prune(
        frames: &mut FrameAllocator,
        tlb: &impl Tlb,
        table: PhysAddr,
        level: usize,
        base: VirtAddr,
        start: VirtAddr,
        end: VirtAddr,
    ) -> bool {
        let entries = 1u64 << F::INDEX_BITS[level];
        let span = 1u64 << F::SHIFTS[level];
        let table_base = base.0 & !((span << F::INDEX_BITS[level]) - 1);
        let mut empty = true;
        for i in 0..entries {
            let slot = table.add(i * 8);
            let va = table_base.wrapping_add(i * span);
            let inside = va.wrapping_add(span) > start.0 && va < end.0;
            match F::decode(F::load(slot), level) {
                Entry::Empty => {}
                Entry::Table(child) if inside && level + 1 < F::LEVELS => {
                    if Self::prune(frames, tlb, child, level + 1, VirtAddr(va), start, end) {
                        F::store(slot, 0);
                        // Walk caches may still hold the cleared entry.
                        tlb.invalidate(VirtAddr(va));
                        frames.free(child, F::table_bytes(level + 1), Purpose::PageTable);
                    } else {
                        empty = false;
                    }
                }
                _ => empty = false,
            }
        }
        empty
    }
}

#[cfg(test)]
#[path = "pagetable_tests.rs"]
mod tests;
