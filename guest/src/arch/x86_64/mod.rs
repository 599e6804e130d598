//! x86_64 on q35: PVH boot, 16550 console, isa-debug-exit, 4-level paging.

mod boot;
mod platform;
mod traps;

use crate::mm::pagetable::{Entry, Format as PageTableFormat, Prot};
use crate::mm::{boot::Tables, PageSize, PhysAddr, RangeList, VirtAddr};

pub use platform::{console_read, console_write, eject_memory_slot, exit};
pub use traps::probe_write;

pub const ARCH: hvo_abi::Arch = hvo_abi::Arch::X86_64;
/// Linux's PAGE_OFFSET with 4-level paging.
pub const LINEAR_MAP_BASE: u64 = 0xffff_8880_0000_0000;
/// Linux's VMEMMAP_START with 4-level paging.
pub const VMEMMAP_BASE: u64 = 0xffff_ea00_0000_0000;
/// Linux's SECTION_SIZE_BITS.
pub const SECTION_SIZE_BITS: u32 = 27;
/// The vmemmap is indexed by pfn from 0.
pub const MEMSTART_ALIGN: Option<u64> = None;
/// The base page size.
pub const BASE_PAGE: PageSize = PageSize::Size4K;
pub const IDENTITY_IS_LINEAR_MAP: bool = false;
pub const SEPARATE_IDENTITY_ROOT: bool = false;

pub type Format = X86PageTables;

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

impl PageTableFormat for X86PageTables {
    const LEVELS: usize = 4;
    const SHIFTS: [u32; 4] = [39, 30, 21, 12];
    const INDEX_BITS: [u32; 4] = [9, 9, 9, 9];

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

pub fn enable_mmu(tables: &Tables) {
    // Long mode already has paging on (the boot trampoline's identity map);
    // switching CR3 moves to the firmware's own tables and flushes the TLB.
    // SAFETY: the new tables identity-map all RAM, where the firmware runs.
    unsafe {
        core::arch::asm!("mov cr3, {}", in(reg) tables.kernel.root().0, options(nostack, preserves_flags));
    }
}

pub fn flush_tlb_va(va: VirtAddr) {
    // SAFETY: invalidating a translation has no other effect.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) va.0, options(nostack, preserves_flags)) };
}

pub fn process_table() -> Option<PhysAddr> {
    None
}

#[no_mangle]
extern "C" fn x86_64_entry(start_info: u32) -> ! {
    platform::serial_init();
    traps::install();
    let ram = platform::ram_from_start_info(start_info);
    crate::main(crate::arch::Platform { ram, reserved: RangeList::new(), mmio: RangeList::new() })
}
