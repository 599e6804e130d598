//! ppc64le on pseries: VOF boot, hypercall console, RTAS power-off, and the
//! radix MMU (Power ISA v3.0B Book III 6.7.10) with 4 KiB pages, or with
//! 64 KiB pages under the `page-64k` feature, as Linux runs by default.

mod boot;
mod libc;
mod platform;
mod traps;

use crate::mm::{PageSize, PhysAddr, Range, RangeList, VirtAddr};
use crate::paging::Tables;

pub use platform::{console_read, console_write, eject_memory_slot, exit};
pub use traps::probe_write;

#[cfg(not(feature = "page-64k"))]
pub const ARCH: hvo_abi::Arch = hvo_abi::Arch::Ppc64le;
#[cfg(feature = "page-64k")]
pub const ARCH: hvo_abi::Arch = hvo_abi::Arch::Ppc64le64k;
/// The base page size.
#[cfg(not(feature = "page-64k"))]
pub const BASE_PAGE: PageSize = PageSize::Size4K;
#[cfg(feature = "page-64k")]
pub const BASE_PAGE: PageSize = PageSize::Size64K;
/// Linux's PAGE_OFFSET on ppc64 (quadrant 3).
pub const LINEAR_MAP_BASE: u64 = 0xc000_0000_0000_0000;
/// Linux's radix vmemmap base.
pub const VMEMMAP_BASE: u64 = 0xc00c_0000_0000_0000;
/// Linux's SECTION_SIZE_BITS.
pub const SECTION_SIZE_BITS: u32 = 24;
/// The vmemmap is indexed by pfn from 0.
pub const MEMSTART_ALIGN: Option<u64> = None;
/// With PIDR 0, quadrants 0 and 3 walk the same tree: the linear map is also
/// the identity map the firmware runs in.
pub const IDENTITY_IS_LINEAR_MAP: bool = true;
pub const SEPARATE_IDENTITY_ROOT: bool = false;

/// Its entry format (pagetable.rs) is built into the library, see formats.rs.
pub type Format = hvo_guest::formats::powerpc64::RadixTree<{ BASE_PAGE.shift() }>;

/// The process table registered with the hypervisor: 4 KiB, entry 0 (PID 0).
#[repr(C, align(4096))]
struct ProcessTable([u64; 512]);

static mut PROCESS_TABLE: ProcessTable = ProcessTable([0; 512]);

pub fn flush_tlb_va(va: VirtAddr) {
    // tlbie RB, RS, RIC=0 (TLB only), PRS=1 (process scoped), R=1 (radix):
    // RB holds the page's effective address and its actual page size (AP,
    // bits 58:56 in ISA numbering), RS the PID (0).
    let actual_page_size: u64 = match BASE_PAGE {
        PageSize::Size64K => 0b101,
        _ => 0b000,
    };
    let rb = (va.0 & !(BASE_PAGE.bytes() - 1)) | actual_page_size << 5;
    // SAFETY: invalidating a translation has no other effect.
    unsafe {
        core::arch::asm!(
            "ptesync",
            "tlbie {rb}, {rs}, 0, 1, 1",
            "eieio",
            "tlbsync",
            "ptesync",
            rb = in(reg) rb,
            rs = in(reg) 0u64,
            options(nostack),
        )
    };
}

pub fn process_table() -> Option<PhysAddr> {
    Some(PhysAddr(core::ptr::addr_of!(PROCESS_TABLE) as u64))
}

pub fn enable_mmu(tables: &Tables) {
    // Entry 0, doubleword 0: RTS = 0b10_101 (a 2^52-byte tree, split as
    // RTS1 in bits 62:61 and RTS2 in bits 7:5), the root, RPDS = 13.
    let root = tables.kernel.root().0;
    let entry = 2 << 61 | root | 5 << 5 | <Format as hvo_guest::mm::pagetable::Format>::INDEX_BITS[0] as u64;
    // SAFETY: single-threaded boot, before the table is registered.
    unsafe { (*core::ptr::addr_of_mut!(PROCESS_TABLE)).0[0] = entry.to_be() };
    // Flags: new table, radix, guest translation shootdown enabled.
    const REGISTER_RADIX_GTSE: u64 = 0x18 | 0x04 | 0x01;
    let table = core::ptr::addr_of!(PROCESS_TABLE) as u64;
    let [status, ..] = platform::hcall(platform::H_REGISTER_PROC_TBL, [REGISTER_RADIX_GTSE, table, 0, 0]);
    assert!(status == 0, "H_REGISTER_PROC_TBL failed: {status}");
    // MSR[IR] | MSR[DR].
    const TRANSLATION_ON: u64 = (1 << 5) | (1 << 4);
    // SAFETY: the tree maps all RAM at quadrant 0 too, where the firmware runs.
    unsafe {
        core::arch::asm!(
            "mfmsr {msr}",
            "or {msr}, {msr}, {on}",
            "mtmsrd {msr}",
            "isync",
            msr = out(reg) _,
            on = in(reg) TRANSLATION_ON,
            options(nostack),
        );
    }
}

/// Everything below the image: VOF, its stack, and the interrupt vectors.
const FIRMWARE_AREA_END: u64 = 0x40_0000;

#[no_mangle]
extern "C" fn ppc64_entry() -> ! {
    platform::little_endian_interrupts();
    let ram = platform::ram_from_firmware();
    traps::install();
    let mut reserved = RangeList::new();
    reserved.push(Range { start: 0, end: FIRMWARE_AREA_END });
    crate::main(crate::arch::Platform { ram, reserved, mmio: RangeList::new() })
}
