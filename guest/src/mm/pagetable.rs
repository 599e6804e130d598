//! A page-table mapper written once over an architecture's entry format.
//!
//! The architecture describes its radix tree (levels, index bits, which levels
//! may hold leaves), how entries are encoded, and whether it asks for
//! break-before-make; the walking, table allocation, splitting and freeing
//! live here. Every store goes through [`store_entry`], which records it in
//! the update log. Every change to a live entry returns a [`Flush`] the
//! caller must use: it invalidates the translation the change removed, of
//! the size it had, and, where the architecture asks for break-before-make,
//! writes the new entry only after that invalidation.

use core::marker::PhantomData;

use super::frames::{AllocError, FrameAllocator, Purpose};
use super::{update_log, PageSize, PhysAddr, VirtAddr};

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
    /// Entries are stored big-endian, as the MMU reads them (radix).
    const BIG_ENDIAN: bool = false;
    /// Replacing a live entry by one with another output address, or a block
    /// by a table, must go invalid entry, TLB invalidation, new entry (arm64:
    /// Arm ARM D8.16.1; ppc64 radix), rather than one store (x86_64).
    const BREAK_BEFORE_MAKE: bool;

    /// Whether a leaf of the level's size may be placed at `level`.
    fn leaf_allowed(level: usize) -> bool;
    fn decode(raw: u64, level: usize) -> Entry;
    fn encode_table(pa: PhysAddr, level: usize) -> u64;
    fn encode_leaf(pa: PhysAddr, level: usize, prot: Prot) -> u64;

    /// What a table at `level` takes from the frame allocator: its entries,
    /// in at least one base page (a 64 KiB-page radix PTE table is 256 bytes;
    /// Linux packs those as fragments, the firmware does not bother).
    fn table_bytes(level: usize) -> u64 {
        (8u64 << Self::INDEX_BITS[level]).max(Self::BASE_PAGE.bytes())
    }
}

/// The entry at `slot`, in the byte order the MMU reads.
pub fn load_entry(slot: PhysAddr, big_endian: bool) -> u64 {
    // SAFETY: callers pass a slot inside a table they own.
    let raw = unsafe { slot.as_mut_ptr::<u64>().read_volatile() };
    if big_endian {
        u64::from_be(raw)
    } else {
        raw
    }
}

/// The one function that writes page-table entries: it stores `raw` at
/// `slot` in the MMU's byte order and records the store, with the value it
/// replaced, in the update log the host replays.
fn store_entry(slot: PhysAddr, raw: u64, big_endian: bool) {
    let old = load_entry(slot, big_endian);
    let stored = if big_endian { raw.to_be() } else { raw };
    // SAFETY: as for `load_entry`.
    unsafe { slot.as_mut_ptr::<u64>().write_volatile(stored) };
    update_log::record_store(slot, old, raw);
}

fn load<F: Format>(slot: PhysAddr) -> u64 {
    load_entry(slot, F::BIG_ENDIAN)
}

fn store<F: Format>(slot: PhysAddr, raw: u64) {
    store_entry(slot, raw, F::BIG_ENDIAN)
}

/// What a TLB invalidation must remove.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Cached {
    /// The translation a leaf of `size` gave.
    Translation,
    /// Walks cached through a table entry spanning `size` (a table freed).
    Walk,
}

/// One invalidation: where, of what size, of what.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Invalidation {
    pub va: VirtAddr,
    pub size: PageSize,
    pub cached: Cached,
}

/// Invalidates cached translations: the architecture's instructions in the
/// firmware (which record them in the update log), a record of what was
/// asked in tests.
pub trait Tlb {
    /// Invalidates `what` everywhere.
    fn invalidate(&self, what: Invalidation);
    /// Orders a store that made an entry valid before later accesses through
    /// it (arm64 DSB + ISB, radix ptesync); nothing where the walk snoops.
    fn made_valid(&self) {}
}

/// How a change to a live entry is carried out.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Sequence {
    /// As the architecture asks ([`Format::BREAK_BEFORE_MAKE`]).
    Architecture,
    /// One store, then the invalidation, whatever the architecture asks
    /// (knob `no-break-before-make`).
    SingleStore,
}

/// A new entry written only once the old translation is invalidated.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Make {
    slot: PhysAddr,
    raw: u64,
    big_endian: bool,
}

/// The rest of a page-table change: the invalidation it owes, and, after a
/// break, the new entry to write once that invalidation is done. Boot
/// mappings are made before the MMU uses the table, so they `ignore()` it;
/// changes to live tables (vmemmap optimization) must `flush()`.
#[must_use = "a page-table change is not complete until its TLB entry is flushed"]
#[derive(PartialEq, Eq, Debug)]
pub struct Flush {
    what: Invalidation,
    make: Option<Make>,
}

impl Flush {
    /// After a store that is already the new entry.
    fn stored(what: Invalidation) -> Flush {
        Flush { what, make: None }
    }

    /// What the change owes the TLB.
    pub fn invalidation(&self) -> Invalidation {
        self.what
    }

    /// Whether the entry is invalid until the flush writes the new one.
    pub fn breaks(&self) -> bool {
        self.make.is_some()
    }

    pub fn flush(self, tlb: &impl Tlb) {
        tlb.invalidate(self.what);
        if let Some(m) = self.make {
            store_entry(m.slot, m.raw, m.big_endian);
            tlb.made_valid();
        }
    }

    /// For changes made before the MMU uses this table, where no TLB entry
    /// can exist, and for the bug knob that forgets the flush on purpose: a
    /// broken entry is made at once, uninvalidated.
    pub fn ignore(self) {
        if let Some(m) = self.make {
            store_entry(m.slot, m.raw, m.big_endian);
        }
    }
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
            table = match F::decode(load::<F>(slot), l) {
                Entry::Table(next) => next,
                Entry::Leaf { .. } => return Err(MapError::AlreadyMapped),
                Entry::Empty => {
                    let next = frames.alloc_bytes(F::table_bytes(l + 1), Purpose::PageTable)?;
                    store::<F>(slot, F::encode_table(next, l));
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
        if F::decode(load::<F>(slot), level) != Entry::Empty {
            return Err(MapError::AlreadyMapped);
        }
        store::<F>(slot, F::encode_leaf(pa, level, prot));
        Ok(Flush::stored(Invalidation { va, size, cached: Cached::Translation }))
    }

    /// The slot holding the leaf for `va`, and its level.
    fn find_leaf(&self, va: VirtAddr) -> Option<(PhysAddr, usize)> {
        let mut table = self.root;
        for l in 0..F::LEVELS {
            let slot = Self::slot(table, l, va);
            match F::decode(load::<F>(slot), l) {
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
            match F::decode(load::<F>(Self::slot(table, l, va)), l) {
                Entry::Empty => return true,
                Entry::Leaf { .. } => return false,
                Entry::Table(next) => table = next,
            }
        }
        false
    }

    pub fn translate(&self, va: VirtAddr) -> Option<Translation> {
        let (slot, level) = self.find_leaf(va)?;
        let Entry::Leaf { pa, prot } = F::decode(load::<F>(slot), level) else {
            return None;
        };
        let size = level_size::<F>(level)?;
        Some(Translation { pa: pa.add(va.0 & (size.bytes() - 1)), size, prot })
    }

    /// Points the base-page leaf mapping `va` at `pa` with `prot`; returns the
    /// frame it mapped before.
    pub fn remap(
        &mut self,
        va: VirtAddr,
        pa: PhysAddr,
        prot: Prot,
        sequence: Sequence,
    ) -> Result<(PhysAddr, Flush), MapError> {
        let (slot, level) = self.find_leaf(va).ok_or(MapError::NotMapped)?;
        let old = load::<F>(slot);
        let Entry::Leaf { pa: old_pa, .. } = F::decode(old, level) else {
            return Err(MapError::NotMapped);
        };
        if level_size::<F>(level) != Some(F::BASE_PAGE) {
            return Err(MapError::SizeNotSupported);
        }
        let page = VirtAddr(va.0 & !(F::BASE_PAGE.bytes() - 1));
        let what = Invalidation { va: page, size: F::BASE_PAGE, cached: Cached::Translation };
        Ok((old_pa, Self::replace(slot, level, old, F::encode_leaf(pa, level, prot), what, sequence)))
    }

    /// Replaces the 2 MiB leaf covering `va` with a table of base pages (512
    /// of 4 KiB or 32 of 64 KiB) mapping the same frames with the same
    /// protection. A no-op when `va` is already mapped by base pages.
    pub fn split(
        &mut self,
        frames: &mut FrameAllocator,
        va: VirtAddr,
        sequence: Sequence,
    ) -> Result<Option<Flush>, MapError> {
        let (slot, level) = self.find_leaf(va).ok_or(MapError::NotMapped)?;
        let old = load::<F>(slot);
        let Entry::Leaf { pa, prot } = F::decode(old, level) else {
            return Err(MapError::NotMapped);
        };
        let base = F::BASE_PAGE;
        match level_size::<F>(level) {
            Some(size) if size == base => return Ok(None),
            Some(PageSize::Size2M) if level_size::<F>(level + 1) == Some(base) => {}
            _ => return Err(MapError::SizeNotSupported),
        }
        // Filled before it is linked: no MMU sees these stores.
        let table = frames.alloc_bytes(F::table_bytes(level + 1), Purpose::PageTable)?;
        let step = base.bytes();
        for i in 0..PageSize::Size2M.bytes() / step {
            store::<F>(table.add(i * 8), F::encode_leaf(pa.add(i * step), level + 1, prot));
        }
        let block = VirtAddr(va.0 & !(PageSize::Size2M.bytes() - 1));
        let what = Invalidation { va: block, size: PageSize::Size2M, cached: Cached::Translation };
        Ok(Some(Self::replace(slot, level, old, F::encode_table(table, level), what, sequence)))
    }

    /// Replaces the live entry `old` at `slot` (a `level` entry) by `new`.
    /// Where the architecture asks for break-before-make and the change
    /// needs it, the entry goes invalid now and the returned flush writes
    /// `new` after invalidating `what`; otherwise `new` is stored now and the
    /// flush invalidates after it.
    fn replace(slot: PhysAddr, level: usize, old: u64, new: u64, what: Invalidation, sequence: Sequence) -> Flush {
        let moves = match (F::decode(old, level), F::decode(new, level)) {
            (Entry::Leaf { pa: a, .. }, Entry::Leaf { pa: b, .. }) => a != b,
            (Entry::Table(a), Entry::Table(b)) => a != b,
            (Entry::Empty, _) | (_, Entry::Empty) => false,
            // A block by a table, or a table by a block.
            _ => true,
        };
        if F::BREAK_BEFORE_MAKE && sequence == Sequence::Architecture && moves {
            store::<F>(slot, 0);
            Flush { what, make: Some(Make { slot, raw: new, big_endian: F::BIG_ENDIAN }) }
        } else {
            store::<F>(slot, new);
            Flush::stored(what)
        }
    }

    /// Copies the root entries of `from` that cover `[start, end)` and that
    /// this root lacks: what sync_global_pgds does for a second root. Each
    /// root slot is visited once, however wide the range (the whole 64-bit
    /// space wraps a 512-entry root 65,536 times), and an empty source is
    /// not copied: storing nothing over nothing changes no table.
    pub fn copy_top_level(&mut self, from: &Self, start: VirtAddr, end: VirtAddr) {
        let span = 1u64 << F::SHIFTS[0];
        let first = start.0 & !(span - 1);
        if end.0 <= first {
            return;
        }
        let slots = (end.0 - first).div_ceil(span).min(1 << F::INDEX_BITS[0]);
        for i in 0..slots {
            let va = VirtAddr(first.wrapping_add(i * span));
            let (src, dst) = (Self::slot(from.root, 0, va), Self::slot(self.root, 0, va));
            let entry = load::<F>(src);
            if F::decode(load::<F>(dst), 0) == Entry::Empty && F::decode(entry, 0) != Entry::Empty {
                store::<F>(dst, entry);
            }
        }
    }

    /// Removes the leaf mapping `va`; returns the frame it mapped and its size.
    pub fn unmap(&mut self, va: VirtAddr) -> Result<(PhysAddr, PageSize, Flush), MapError> {
        let (slot, level) = self.find_leaf(va).ok_or(MapError::NotMapped)?;
        let Entry::Leaf { pa, .. } = F::decode(load::<F>(slot), level) else { return Err(MapError::NotMapped) };
        let size = level_size::<F>(level).ok_or(MapError::SizeNotSupported)?;
        store::<F>(slot, 0);
        let what = Invalidation { va: VirtAddr(va.0 & !(size.bytes() - 1)), size, cached: Cached::Translation };
        Ok((pa, size, Flush::stored(what)))
    }

    /// Frees the tables below the root's children over `[start, end)` that
    /// map nothing any more. Root entries stay: other roots point at the
    /// same next-level tables, as Linux keeps its top-level vmemmap entries.
    pub fn free_empty_tables(&mut self, frames: &mut FrameAllocator, tlb: &impl Tlb, start: VirtAddr, end: VirtAddr) {
        let mut va = start.0;
        while va < end.0 {
            let span = 1u64 << F::SHIFTS[0];
            if let Entry::Table(child) = F::decode(load::<F>(Self::slot(self.root, 0, VirtAddr(va))), 0) {
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
            match F::decode(load::<F>(slot), level) {
                Entry::Empty => {}
                Entry::Table(child) if inside && level + 1 < F::LEVELS => {
                    if Self::prune(frames, tlb, child, level + 1, VirtAddr(va), start, end) {
                        store::<F>(slot, 0);
                        // Walk caches may still hold the cleared entry.
                        let size = level_size::<F>(level).unwrap_or(PageSize::Size1G);
                        tlb.invalidate(Invalidation { va: VirtAddr(va), size, cached: Cached::Walk });
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
