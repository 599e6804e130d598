//! arm64 on virt: stub-firmware boot at EL1, PL011 console, semihosting exit,
//! 4 KiB granule 48-bit translation with TTBR0 (identity) and TTBR1 (kernel).

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

pub const ARCH: hvo_abi::Arch = hvo_abi::Arch::Aarch64;
/// Linux's PAGE_OFFSET with 48-bit virtual addresses.
pub const LINEAR_MAP_BASE: u64 = 0xffff_0000_0000_0000;
/// Linux's VMEMMAP_START with 48-bit virtual addresses and 4 KiB pages.
pub const VMEMMAP_BASE: u64 = 0xffff_fdff_c000_0000;
/// Linux's SECTION_SIZE_BITS.
pub const SECTION_SIZE_BITS: u32 = 27;
/// arm64 indexes the vmemmap from memstart_addr: the start of RAM rounded
/// down to ARM64_MEMSTART_ALIGN (1 GiB with 4 KiB pages and 48-bit VAs).
pub const MEMSTART_ALIGN: Option<u64> = Some(1 << 30);
/// The base page size.
pub const BASE_PAGE: PageSize = PageSize::Size4K;
pub const IDENTITY_IS_LINEAR_MAP: bool = false;
pub const SEPARATE_IDENTITY_ROOT: bool = true;

/// Its entry format (pagetable.rs) is built into the library, see formats.rs.
pub type Format = hvo_guest::formats::aarch64::Vmsav8Descriptors;

/// MAIR_EL1: attribute 0 Device-nGnRnE (0x00), attribute 1 Normal write-back (0xff).
const MAIR: u64 = 0xff << 8;

pub fn enable_mmu(tables: &Tables) {
    let identity = tables.identity.as_ref().map(|t| t.root()).unwrap_or(tables.kernel.root());
    let pa_range: u64;
    // SAFETY: reading an ID register.
    unsafe { core::arch::asm!("mrs {}, id_aa64mmfr0_el1", out(reg) pa_range, options(nomem, nostack)) };
    const T0SZ_48: u64 = 16;
    const T1SZ_48: u64 = 16 << 16;
    const WALKS_CACHED_SHARED_0: u64 = (1 << 8) | (1 << 10) | (3 << 12); // IRGN0, ORGN0 WB; SH0 inner
    const WALKS_CACHED_SHARED_1: u64 = (1 << 24) | (1 << 26) | (3 << 28);
    const TG1_4K: u64 = 2 << 30; // TG0 = 0 is 4 KiB already
    let tcr = T0SZ_48 | T1SZ_48 | WALKS_CACHED_SHARED_0 | WALKS_CACHED_SHARED_1 | TG1_4K | ((pa_range & 7) << 32);
    const MMU_ON: u64 = 1 << 0;
    const DATA_CACHE: u64 = 1 << 2;
    const INSTRUCTION_CACHE: u64 = 1 << 12;
    const WRITE_IMPLIES_XN: u64 = 1 << 19;
    // SAFETY: the identity map covers the firmware, so execution continues at
    // the next instruction with translation on.
    unsafe {
        core::arch::asm!(
            "msr mair_el1, {mair}",
            "msr tcr_el1, {tcr}",
            "msr ttbr0_el1, {ttbr0}",
            "msr ttbr1_el1, {ttbr1}",
            "isb",
            "tlbi vmalle1",
            "dsb ish",
            "isb",
            "mrs {sctlr}, sctlr_el1",
            "orr {sctlr}, {sctlr}, {on}",
            "bic {sctlr}, {sctlr}, {wxn}",
            "msr sctlr_el1, {sctlr}",
            "isb",
            mair = in(reg) MAIR,
            tcr = in(reg) tcr,
            ttbr0 = in(reg) identity.0,
            ttbr1 = in(reg) tables.kernel.root().0,
            on = in(reg) MMU_ON | DATA_CACHE | INSTRUCTION_CACHE,
            wxn = in(reg) WRITE_IMPLIES_XN,
            sctlr = out(reg) _,
            options(nostack),
        );
    }
}

/// TLBI VAAE1IS: every ASID, every level of the walk (so the walk caches
/// of a freed table too), inner shareable. Its operand is VA[55:12] with no
/// TTL hint (bits 47:44 zero): it removes a translation of any size, so
/// there is no size to encode.
pub fn flush_tlb(what: Invalidation, _encoding: Encoding) {
    let operand = (what.va.0 >> 12) & ((1 << 44) - 1);
    // SAFETY: invalidating a translation has no other effect.
    unsafe { core::arch::asm!("dsb ishst", "tlbi vaae1is, {}", "dsb ish", "isb", in(reg) operand, options(nostack)) };
    update_log::record_invalidation(InvalidationForm::Arm64TlbiVaae1is, operand, 0, what.va, what.size.bytes());
}

/// After break-before-make's new entry: complete the store before the
/// accesses through it (as Linux's set_pte for kernel mappings).
pub fn made_valid() {
    // SAFETY: barriers only.
    unsafe { core::arch::asm!("dsb ishst", "isb", options(nostack)) };
}

pub fn process_table() -> Option<PhysAddr> {
    None
}

#[no_mangle]
extern "C" fn aarch64_entry() -> ! {
    platform::gic_init();
    let (ram, device_tree) = platform::ram_from_device_tree();
    let mut reserved = RangeList::new();
    reserved.push(device_tree);
    let mut mmio = RangeList::new();
    mmio.push(platform::DEVICES);
    crate::main(crate::arch::Platform { ram, reserved, mmio })
}
