//! x86_64's page-table entries.

use crate::mm::pagetable::{Entry, Format, Prot};
use crate::mm::{PageSize, PhysAddr};

/// 4-level paging (Intel SDM vol. 3, 4.5): PML4, PDPT, PD, PT.
pub enum X86PageTables {}

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
/// PS: a 1 GiB (PDPT) or 2 MiB (PD) leaf.
const HUGE: u64 = 1 << 7;
const NO_EXECUTE: u64 = 1 << 63;
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;

impl Format for X86PageTables {
    const LEVELS: usize = 4;
    const SHIFTS: [u32; 4] = [39, 30, 21, 12];
    const INDEX_BITS: [u32; 4] = [9, 9, 9, 9];
    const BASE_PAGE: PageSize = PageSize::Size4K;
    /// An entry may be rewritten in place, the old translation invalidated
    /// after (Intel SDM vol. 3A 4.10.4).
    const BREAK_BEFORE_MAKE: bool = false;

    fn leaf_allowed(level: usize) -> bool {
        level >= 1
    }

    fn decode(raw: u64, level: usize) -> Entry {
        if raw & PRESENT == 0 {
            return Entry::Empty;
        }
        let is_leaf = level == 3 || (level >= 1 && raw & HUGE != 0);
        if !is_leaf {
            return Entry::Table(PhysAddr(raw & ADDRESS));
        }
        // In a huge leaf, bit 12 is PAT, not an address bit.
        let size_mask = (1u64 << Self::SHIFTS[level]) - 1;
        Entry::Leaf {
            pa: PhysAddr(raw & ADDRESS & !size_mask),
            prot: Prot { write: raw & WRITABLE != 0, exec: raw & NO_EXECUTE == 0, device: raw & CACHE_DISABLE != 0 },
        }
    }

    fn encode_table(pa: PhysAddr, _level: usize) -> u64 {
        // Upper levels allow everything; the leaf decides.
        pa.0 | PRESENT | WRITABLE
    }

    fn encode_leaf(pa: PhysAddr, level: usize, prot: Prot) -> u64 {
        // Accessed and dirty preset, as Linux's PAGE_KERNEL does, so the MMU
        // never writes them back into the tables the host compares.
        let mut raw = pa.0 | PRESENT | ACCESSED | DIRTY;
        if level < 3 {
            raw |= HUGE;
        }
        if prot.write {
            raw |= WRITABLE;
        }
        if !prot.exec {
            raw |= NO_EXECUTE;
        }
        if prot.device {
            raw |= CACHE_DISABLE | WRITE_THROUGH;
        }
        raw
    }
}
