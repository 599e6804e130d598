//! The host's page-table walkers: one per architecture, written from the
//! architecture manuals, sharing no code with the guest. They read the tables
//! through [`GuestMemory`], so they are tested on hand-built tables.
//!
//! Each architecture describes how it decodes one entry at one level; the
//! traversal, the accumulation of permissions through the levels and the
//! tree's shape are here. The shape comes from the tables themselves: the
//! root covers `va_bits`, and each level takes the index bits its parent
//! entry gives (fixed 9 on x86_64 and arm64, the NLS field on radix), so a
//! leaf's size is whatever bits are left below it.

mod aarch64;
mod ppc64;
mod select;
mod x86_64;

use std::fmt;

use hvo_abi::manifest::{Manifest, RootKind};
use hvo_images::{profile, Arch, Mmu};

use crate::addr::{PhysAddr, VirtAddr};
use crate::memory::{GuestMemory, MemoryError};

pub use aarch64::Aarch64;
pub use ppc64::Radix;
pub use select::{self_translating_format, PagingFormat};
pub use x86_64::X86_64;

/// Effective permissions of a translation: what every level allows together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms {
    pub write: bool,
    pub exec: bool,
}

impl Perms {
    /// What both allow: permissions narrow from the root down to the leaf.
    fn and(self, other: Perms) -> Perms {
        Perms { write: self.write && other.write, exec: self.exec && other.exec }
    }
}

/// One decoded entry, as an architecture reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Not valid: translation faults here.
    Invalid,
    /// A next-level table of `2^index_bits` entries, and what this level
    /// allows everything below it.
    Table { pa: PhysAddr, index_bits: u32, allows: Perms },
    /// A leaf mapping `2^shift` bytes.
    Leaf { pa: PhysAddr, perms: Perms },
}

/// A leaf the walker reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// First virtual address the leaf maps.
    pub va: VirtAddr,
    /// Physical address it maps to.
    pub pa: PhysAddr,
    /// log2 of the bytes it maps.
    pub shift: u32,
    /// Effective permissions through every level.
    pub perms: Perms,
    /// Level of the leaf (0 is the root).
    pub level: usize,
    /// Where the leaf entry lives, and its raw value (in the MMU's byte order).
    pub entry_pa: PhysAddr,
    pub raw: u64,
}

impl Leaf {
    pub fn size(&self) -> u64 {
        1 << self.shift
    }

    /// The physical address `va` (inside this leaf) translates to.
    pub fn translate(&self, va: VirtAddr) -> PhysAddr {
        PhysAddr(self.pa.0 + (va.0 - self.va.0))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("reading a page table: {0}")]
    Memory(#[from] MemoryError),
    #[error("{va} is outside the address space this root translates")]
    OutOfRange { va: VirtAddr },
    #[error("the manifest publishes no {0:?} root")]
    NoRoot(RootKind),
    #[error("{0}")]
    BadRoot(String),
}

/// One architecture's page-table format, from its manual.
pub trait Format: Send + Sync {
    /// log2 of the entries of the root table.
    fn root_index_bits(&self) -> u32;
    /// Decodes the raw entry at `level`, an entry spanning `2^shift` bytes.
    fn decode(&self, raw: u64, level: usize, shift: u32) -> Decoded;
    /// Entries are big-endian in memory (ppc64 radix) rather than little-endian.
    fn big_endian(&self) -> bool {
        false
    }
    /// Which bits of the virtual address the tables translate; the rest must
    /// be a sign extension (x86, arm64) or select a quadrant (ppc64).
    fn va_bits(&self) -> u32;
}

/// A walker: a format and a root.
pub struct Walker<'a> {
    format: &'a dyn Format,
    root: PhysAddr,
    root_index_bits: u32,
}

impl fmt::Debug for Walker<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Walker(root {})", self.root)
    }
}

const ALL: Perms = Perms { write: true, exec: true };

impl<'a> Walker<'a> {
    pub fn new(format: &'a dyn Format, root: PhysAddr) -> Walker<'a> {
        Walker { format, root, root_index_bits: format.root_index_bits() }
    }

    /// What a root entry means, ignoring bits the MMU itself sets (accessed,
    /// referenced, changed) so two copies of one entry compare equal.
    pub fn decode_root_entry(&self, raw: u64) -> Decoded {
        self.format.decode(raw, 0, self.root_shift())
    }

    /// What one root entry spans: the address bits below the root's index.
    fn root_shift(&self) -> u32 {
        self.format.va_bits() - self.root_index_bits
    }

    /// Bytes one root entry spans.
    pub fn root_entry_span(&self) -> u64 {
        1 << self.root_shift()
    }

    /// A walker of another root of the same shape.
    pub fn like(other: &Walker<'a>, root: PhysAddr) -> Walker<'a> {
        Walker { format: other.format, root, root_index_bits: other.root_index_bits }
    }

    fn read_table(&self, mem: &dyn GuestMemory, pa: PhysAddr, entries: usize) -> Result<Vec<u64>, MemoryError> {
        let mut bytes = vec![0u8; entries * 8];
        mem.read(pa, &mut bytes)?;
        let big = self.format.big_endian();
        Ok(bytes
            .chunks_exact(8)
            .map(|c| {
                let b: [u8; 8] = c.try_into().unwrap_or_default();
                if big {
                    u64::from_be_bytes(b)
                } else {
                    u64::from_le_bytes(b)
                }
            })
            .collect())
    }

    fn index(va: VirtAddr, shift: u32, index_bits: u32) -> u64 {
        (va.0 >> shift) & ((1 << index_bits) - 1)
    }

    /// Translates one address; `None` when it is not mapped.
    pub fn translate(&self, mem: &dyn GuestMemory, va: VirtAddr) -> Result<Option<Leaf>, WalkError> {
        let mut table = self.root;
        let mut index_bits = self.root_index_bits;
        let mut shift = self.root_shift();
        let mut allows = ALL;
        for level in 0.. {
            let index = Self::index(va, shift, index_bits);
            let entry_pa = PhysAddr(table.0 + index * 8);
            let raw = self.read_table(mem, entry_pa, 1)?[0];
            match self.format.decode(raw, level, shift) {
                Decoded::Invalid => return Ok(None),
                Decoded::Table { pa, index_bits: next, allows: here } => {
                    table = pa;
                    index_bits = next;
                    shift -= next;
                    allows = allows.and(here);
                }
                Decoded::Leaf { pa, perms } => {
                    let base = VirtAddr(va.0 & !((1u64 << shift) - 1));
                    return Ok(Some(Leaf { va: base, pa, shift, perms: allows.and(perms), level, entry_pa, raw }));
                }
            }
        }
        Ok(None)
    }

    /// Every leaf mapping part of `[start, end)`, in address order, reading
    /// each table once.
    pub fn leaves(&self, mem: &dyn GuestMemory, start: VirtAddr, end: VirtAddr) -> Result<Vec<Leaf>, WalkError> {
        let mut out = Vec::new();
        self.for_each_leaf(mem, start, end, &mut |leaf| out.push(leaf))?;
        Ok(out)
    }

    /// Calls `visit` with every leaf mapping part of `[start, end)`, in
    /// address order, reading each table once and keeping none: millions of
    /// leaves need no memory of their own.
    pub fn for_each_leaf(
        &self,
        mem: &dyn GuestMemory,
        start: VirtAddr,
        end: VirtAddr,
        visit: &mut dyn FnMut(Leaf),
    ) -> Result<(), WalkError> {
        let va_mask = if self.format.va_bits() >= 64 { u64::MAX } else { (1u64 << self.format.va_bits()) - 1 };
        // The bits above the translated ones are carried into every leaf's VA.
        let high = start.0 & !va_mask;
        let top = Level { table: self.root, index_bits: self.root_index_bits, level: 0, shift: self.root_shift() };
        self.collect(mem, top, high, start, end, ALL, visit)
    }

    /// The raw root entries whose span meets `[start, end)`, by index.
    pub fn root_entries(
        &self,
        mem: &dyn GuestMemory,
        start: VirtAddr,
        end: VirtAddr,
    ) -> Result<Vec<(u64, u64)>, WalkError> {
        let entries = self.read_table(mem, self.root, 1 << self.root_index_bits)?;
        let first = Self::index(start, self.root_shift(), self.root_index_bits);
        let last = Self::index(VirtAddr(end.0.saturating_sub(1)), self.root_shift(), self.root_index_bits);
        Ok((first..=last).map(|i| (i, entries[i as usize])).collect())
    }

    /// Every table of the tree (the root included): its address and size in bytes.
    pub fn tables(&self, mem: &dyn GuestMemory) -> Result<Vec<(PhysAddr, u64)>, WalkError> {
        Ok(self.visit_tables(mem)?.into_iter().map(|t| (t.pa, 8 << t.index_bits)).collect())
    }

    /// Every table of the tree (the root included), where it sits and what
    /// it holds, children before their parents; a table two entries point at
    /// is visited twice.
    pub fn visit_tables(&self, mem: &dyn GuestMemory) -> Result<Vec<TableVisit>, WalkError> {
        let mut out = Vec::new();
        let top = Level { table: self.root, index_bits: self.root_index_bits, level: 0, shift: self.root_shift() };
        self.collect_tables(mem, top, 0, &mut out)?;
        Ok(out)
    }

    /// The walker's format, to decode what [`Walker::visit_tables`] read.
    pub fn format(&self) -> &'a dyn Format {
        self.format
    }

    fn collect_tables(
        &self,
        mem: &dyn GuestMemory,
        at: Level,
        va: u64,
        out: &mut Vec<TableVisit>,
    ) -> Result<(), WalkError> {
        let entries = self.read_table(mem, at.table, 1 << at.index_bits)?;
        for (i, &raw) in entries.iter().enumerate() {
            if let Decoded::Table { pa, index_bits, .. } = self.format.decode(raw, at.level, at.shift) {
                let below = va | ((i as u64) << at.shift);
                self.collect_tables(mem, at.below(pa, index_bits), below, out)?;
            }
        }
        let visit =
            TableVisit { pa: at.table, level: at.level, va, shift: at.shift, index_bits: at.index_bits, entries };
        out.push(visit);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn collect(
        &self,
        mem: &dyn GuestMemory,
        at: Level,
        prefix: u64,
        start: VirtAddr,
        end: VirtAddr,
        allows: Perms,
        visit: &mut dyn FnMut(Leaf),
    ) -> Result<(), WalkError> {
        let (shift, level) = (at.shift, at.level);
        let span = 1u64 << shift;
        let entries = self.read_table(mem, at.table, 1 << at.index_bits)?;
        for (i, &raw) in entries.iter().enumerate() {
            let va = prefix | ((i as u64) << shift);
            let last = va.wrapping_add(span - 1);
            if last < start.0 || va >= end.0 {
                continue;
            }
            let entry_pa = PhysAddr(at.table.0 + i as u64 * 8);
            match self.format.decode(raw, level, shift) {
                Decoded::Invalid => {}
                Decoded::Table { pa, index_bits, allows: here } => {
                    let allows = allows.and(here);
                    self.collect(mem, at.below(pa, index_bits), va, start, end, allows, visit)?;
                }
                Decoded::Leaf { pa, perms } => {
                    visit(Leaf { va: VirtAddr(va), pa, shift, perms: allows.and(perms), level, entry_pa, raw })
                }
            }
        }
        Ok(())
    }
}

/// A table [`Walker::visit_tables`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableVisit {
    pub pa: PhysAddr,
    pub level: usize,
    /// The first address it translates, within the bits the tree translates
    /// (no sign extension, no quadrant).
    pub va: u64,
    /// log2 of the bytes one of its entries spans.
    pub shift: u32,
    pub index_bits: u32,
    /// Its raw entries, in the MMU's byte order decoded.
    pub entries: Vec<u64>,
}

/// One table on the way down: where it is, its index bits, its level, and
/// the address bits one of its entries spans.
#[derive(Clone, Copy)]
struct Level {
    table: PhysAddr,
    index_bits: u32,
    level: usize,
    shift: u32,
}

impl Level {
    /// The table an entry of this one points at, with `index_bits` entries.
    fn below(&self, table: PhysAddr, index_bits: u32) -> Level {
        Level { table, index_bits, level: self.level + 1, shift: self.shift.saturating_sub(index_bits) }
    }
}

/// The format of the firmware's tables on an architecture.
pub fn format(arch: Arch) -> &'static dyn Format {
    PagingFormat::of_mmu(profile(arch).mmu)[0].format()
}

/// Every root the manifest publishes that the MMU walks (the ppc64 process
/// table is a table of roots, not a tree).
pub fn published_trees<'a>(
    arch: Arch,
    mem: &dyn GuestMemory,
    manifest: &Manifest,
) -> Result<Vec<Walker<'a>>, WalkError> {
    let mut trees = vec![walker_for(arch, mem, manifest, VirtAddr(manifest.vmemmap_base))?];
    for kind in [RootKind::Identity, RootKind::Process] {
        if let Some(root) = manifest.root(kind) {
            let mut w = Walker::new(format(arch), PhysAddr(root.pa));
            w.root_index_bits = trees[0].root_index_bits;
            trees.push(w);
        }
    }
    Ok(trees)
}

/// The root that translates `va`, from the manifest: arm64 splits the address
/// space between TTBR0 (low half) and TTBR1 (high half); x86_64 has one root;
/// ppc64 radix walks one tree for quadrants 0 and 3 with PIDR 0, found through
/// the registered process table.
pub fn walker_for<'a>(
    arch: Arch,
    mem: &dyn GuestMemory,
    manifest: &Manifest,
    va: VirtAddr,
) -> Result<Walker<'a>, WalkError> {
    let root = |kind| manifest.root(kind).map(|r| PhysAddr(r.pa)).ok_or(WalkError::NoRoot(kind));
    match profile(arch).mmu {
        Mmu::X86_64 => Ok(Walker::new(format(arch), root(RootKind::Kernel)?)),
        Mmu::Aarch64 => {
            let kind = if va.0 >> 63 == 1 { RootKind::Kernel } else { RootKind::Identity };
            Ok(Walker::new(format(arch), root(kind)?))
        }
        Mmu::Radix => {
            let (tree, root_bits) = Radix::from_process_table(mem, root(RootKind::ProcessTable)?)?;
            let published = root(RootKind::Kernel)?;
            if tree != published {
                return Err(WalkError::BadRoot(format!(
                    "process table entry 0 points at {tree}, the manifest says the kernel root is {published}"
                )));
            }
            let mut w = Walker::new(&Radix, tree);
            w.root_index_bits = root_bits;
            Ok(w)
        }
    }
}

#[cfg(test)]
mod tests;
