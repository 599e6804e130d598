//! ppc64le on pseries: VOF boot, hypercall console, RTAS power-off, and the
//! radix MMU (Power ISA v3.0B Book III 6.7.10) with 4 KiB pages, or with
//! 64 KiB pages under the `page-64k` feature, as Linux runs by default.

mod boot;
mod libc;
mod platform;
mod traps;

use crate::mm::pagetable::{Entry, Format as PageTableFormat, Prot};
use crate::mm::{boot::Tables, PageSize, PhysAddr, Range, RangeList, VirtAddr};

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

pub type Format = RadixTree;

/// Radix tree, entries big-endian: 13/9/9/9 index bits with 4 KiB pages,
/// 13/9/9/5 with 64 KiB pages (the only two shapes POWER9 and QEMU walk).
pub enum RadixTree {}

/// Index bits of the last level: what is left of the 21 bits a PMD entry spans.
const PTE_INDEX_BITS: u32 = 21 - BASE_PAGE.shift();

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

impl PageTableFormat for RadixTree {
    const LEVELS: usize = 4;
    const SHIFTS: [u32; 4] = [39, 30, 21, BASE_PAGE.shift()];
    const INDEX_BITS: [u32; 4] = [13, 9, 9, PTE_INDEX_BITS];

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

    fn load(slot: *const u64) -> u64 {
        // SAFETY: callers pass a slot inside a live table.
        u64::from_be(unsafe { slot.read_volatile() })
    }

    fn store(slot: *mut u64, raw: u64) {
        // SAFETY: as for `load`.
        unsafe { slot.write_volatile(raw.to_be()) }
    }
}

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
    let entry = 2 << 61 | root | 5 << 5 | RadixTree::INDEX_BITS[0] as u64;
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
