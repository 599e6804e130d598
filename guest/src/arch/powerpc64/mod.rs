//! ppc64le on pseries: VOF boot, hypercall console, RTAS power-off, and the
//! radix MMU (Power ISA v3.0B Book III 6.7.10) with 4 KiB pages, or with
//! 64 KiB pages under the `page-64k` feature, as Linux runs by default.

mod boot;
mod libc;
mod platform;
mod traps;

use hvo_abi::update_log::InvalidationForm;
use hvo_guest::mm::pagetable::{Cached, Invalidation};

use super::Encoding;
use crate::mm::{update_log, PageSize, PhysAddr, Range, RangeList};
use crate::paging::Tables;

pub use platform::{console_read, console_write, eject_memory_slot, exit};
pub use traps::{probe_read, probe_write};

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

/// tlbie's AP field (RB bits 56:58 in ISA numbering, 7:5 counted from the
/// right) for a radix page size (ISA v3.0 tlbie; QEMU's TLBIE_R_AP_*).
const fn actual_page_size(size: PageSize) -> u64 {
    match size {
        PageSize::Size4K => 0b000,
        PageSize::Size64K => 0b101,
        PageSize::Size2M => 0b001,
        PageSize::Size1G => 0b010,
    }
}

/// RB's IS field (bits 52:53 in ISA numbering): 1 selects everything of the
/// PID in RS.
const IS_PID: u64 = 0b01 << 10;

/// A translation: `tlbie RB,RS,RIC=0,PRS=1,R=1`, the TLB only, process
/// scoped, radix, by address: RB holds the page's effective address and its
/// actual page size (AP), RS the PID (0, the kernel's). A TLB entry goes
/// only if its page size is AP's (ISA v3.0 tlbie), so AP must be the size
/// of the translation removed. A freed table: `RIC=2` with IS=1, everything
/// of PID 0 including the page walk cache (RIC 1 and 2 are invalid forms by
/// address), as Linux's radix__flush_tlb_kernel_range does.
pub fn flush_tlb(what: Invalidation, encoding: Encoding) {
    let rs = 0u64;
    match what.cached {
        Cached::Translation => {
            // Knob `tlbie-base-size`: the base page's AP whatever the size.
            let size = if encoding == Encoding::BasePageSize { BASE_PAGE } else { what.size };
            let rb = (what.va.0 & !(size.bytes() - 1)) | actual_page_size(size) << 5;
            // SAFETY: invalidating a translation has no other effect.
            unsafe {
                core::arch::asm!(
                    "ptesync",
                    "tlbie {rb}, {rs}, 0, 1, 1",
                    "eieio",
                    "tlbsync",
                    "ptesync",
                    rb = in(reg) rb,
                    rs = in(reg) rs,
                    options(nostack),
                )
            };
            let form = InvalidationForm::Ppc64Tlbie { ric: 0, prs: true, r: true };
            update_log::record_invalidation(form, rb, rs, what.va, what.size.bytes());
        }
        Cached::Walk => {
            let rb = IS_PID;
            // SAFETY: as above.
            unsafe {
                core::arch::asm!(
                    "ptesync",
                    "tlbie {rb}, {rs}, 2, 1, 1",
                    "eieio",
                    "tlbsync",
                    "ptesync",
                    rb = in(reg) rb,
                    rs = in(reg) rs,
                    options(nostack),
                )
            };
            let form = InvalidationForm::Ppc64Tlbie { ric: 2, prs: true, r: true };
            update_log::record_invalidation(form, rb, rs, what.va, what.size.bytes());
        }
    }
}

/// After break-before-make's new entry: order the store before accesses
/// through it.
pub fn made_valid() {
    // SAFETY: a barrier only.
    unsafe { core::arch::asm!("ptesync", options(nostack)) };
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

/// pseries keeps polling: QEMU's vty raises no interrupt (its device has no
/// signal mask for H_VIO_SIGNAL), and ceding the CPU on a decrementer nap
/// (tried at 20, 100 and 500 us) made the suite no faster (2026-12-01:
/// 36 s either way at `-j 2`, against 18.3 s instead of 16.8 s for the
/// pseries runs alone).
pub fn wait_for_console() {
    core::hint::spin_loop()
}
