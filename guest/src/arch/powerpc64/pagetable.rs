//! ppc64's radix page-table entries, in both shapes Linux uses.

use crate::mm::pagetable::{Entry, Format, Prot};
use crate::mm::{PageSize, PhysAddr};

/// Radix tree, entries big-endian, with base pages of `1 << PAGE_SHIFT`
/// bytes: 13/9/9/9 index bits with 4 KiB pages, 13/9/9/5 with 64 KiB pages
/// (the only two shapes POWER9 and QEMU walk).
pub enum RadixTree<const PAGE_SHIFT: u32> {}

/// The shape Linux uses with 4 KiB pages.
pub type Radix4K = RadixTree<12>;
/// The shape Linux uses with 64 KiB pages (CONFIG_PPC_64K_PAGES).
pub type Radix64K = RadixTree<16>;

/// Bytes a PMD entry spans: the last level indexes what is left of them.
const PMD_SHIFT: u32 = 21;

const VALID: u64 = 1 << 63;
const LEAF: u64 = 1 << 62;
/// Referenced and changed, preset so TCG never writes them back.
const REFERENCED: u64 = 1 << 8;
const CHANGED: u64 = 1 << 7;
/// Cache-inhibited, guarded (ATT = 0b11 in bits 5:4).
const NON_IDEMPOTENT_IO: u64 = 3 << 4;
const PRIVILEGED: u64 = 1 << 3;
const READ: u64 = 1 << 2;
const READ_WRITE: u64 = 1 << 1;
const EXECUTE: u64 = 1 << 0;
/// Next-level base, ISA bits 4:55.
const NEXT_LEVEL_BASE: u64 = 0x0fff_ffff_ffff_ff00;
/// Real page number, ISA bits 7:51.
const REAL_PAGE: u64 = 0x01ff_ffff_ffff_f000;

impl<const PAGE_SHIFT: u32> Format for RadixTree<PAGE_SHIFT> {
    const LEVELS: usize = 4;
    const SHIFTS: [u32; 4] = [39, 30, PMD_SHIFT, PAGE_SHIFT];
    const INDEX_BITS: [u32; 4] = [13, 9, 9, PMD_SHIFT - PAGE_SHIFT];
    const BASE_PAGE: PageSize = match PAGE_SHIFT {
        16 => PageSize::Size64K,
        _ => PageSize::Size4K,
    };
    const BIG_ENDIAN: bool = true;
    /// A valid entry given another real page, or a leaf turned into a
    /// directory, goes invalid and has its translation invalidated (tlbie)
    /// before the new value is written, as Linux does on radix (a PMD leaf
    /// is marked invalid while it is split, see book3s/64/pgtable.h).
    const BREAK_BEFORE_MAKE: bool = true;

    fn leaf_allowed(level: usize) -> bool {
        level >= 1
    }

    fn decode(raw: u64, level: usize) -> Entry {
        if raw & VALID == 0 {
            return Entry::Empty;
        }
        if raw & LEAF == 0 {
            return Entry::Table(PhysAddr(raw & NEXT_LEVEL_BASE));
        }
        let size_mask = (1u64 << Self::SHIFTS[level]) - 1;
        Entry::Leaf {
            pa: PhysAddr(raw & REAL_PAGE & !size_mask),
            prot: Prot { write: raw & READ_WRITE != 0, exec: raw & EXECUTE != 0, device: raw & NON_IDEMPOTENT_IO != 0 },
        }
    }

    fn encode_table(pa: PhysAddr, level: usize) -> u64 {
        // NLS: log2 of the next table's entries.
        VALID | pa.0 | Self::INDEX_BITS[level + 1] as u64
    }

    fn encode_leaf(pa: PhysAddr, _level: usize, prot: Prot) -> u64 {
        let mut raw = VALID | LEAF | pa.0 | REFERENCED | CHANGED | PRIVILEGED | READ;
        if prot.write {
            raw |= READ_WRITE;
        }
        if prot.exec {
            raw |= EXECUTE;
        }
        if prot.device {
            raw |= NON_IDEMPOTENT_IO;
        }
        raw
    }
}
