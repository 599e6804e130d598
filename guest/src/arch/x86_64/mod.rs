//! x86_64 on q35: PVH boot, 16550 console, isa-debug-exit, 4-level paging.

mod boot;
mod platform;
mod traps;

use hvo_abi::update_log::InvalidationForm;
use hvo_guest::mm::pagetable::Invalidation;

use super::Encoding;
use crate::mm::{update_log, PageSize, PhysAddr, RangeList};
use crate::paging::Tables;

pub use platform::{console_read, console_write, eject_memory_slot, exit, wait_for_console};
pub use traps::{probe_read, probe_write};

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

/// Its entry format (pagetable.rs) is built into the library, see formats.rs.
pub type Format = hvo_guest::formats::x86_64::X86PageTables;

pub fn enable_mmu(tables: &Tables) {
    // Long mode already has paging on (the boot trampoline's identity map);
    // switching CR3 moves to the firmware's own tables and flushes the TLB.
    // SAFETY: the new tables identity-map all RAM, where the firmware runs.
    unsafe {
        core::arch::asm!("mov cr3, {}", in(reg) tables.kernel.root().0, options(nostack, preserves_flags));
    }
}

/// INVLPG drops the TLB entries for the page holding the address, whatever
/// their size, and the paging-structure caches (Intel SDM vol. 3A 4.10.4.1):
/// there is no size to encode, and freed tables need nothing more.
pub fn flush_tlb(what: Invalidation, _encoding: Encoding) {
    // SAFETY: invalidating a translation has no other effect.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) what.va.0, options(nostack, preserves_flags)) };
    update_log::record_invalidation(InvalidationForm::X86Invlpg, what.va.0, 0, what.va, what.size.bytes());
}

/// The walk sees stores to the tables without a barrier.
pub fn made_valid() {}

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
