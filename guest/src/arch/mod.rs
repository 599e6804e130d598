//! The per-architecture half of the guest, behind one small interface.
//!
//! Each architecture module provides exactly these items, and nothing outside
//! `arch/` knows which architecture it runs on:
//!
//! - `ARCH: hvo_abi::Arch`, `BASE_PAGE: mm::PageSize`, `LINEAR_MAP_BASE`,
//!   `VMEMMAP_BASE`, `SECTION_SIZE_BITS`, `MEMSTART_ALIGN` (docs/design.md section 3),
//!   `IDENTITY_IS_LINEAR_MAP` (ppc64le radix: quadrants 0 and 3 walk one tree, so
//!   mapping the linear map also maps the identity range), and
//!   `SEPARATE_IDENTITY_ROOT` (arm64: TTBR0 holds the identity half).
//! - `type Format: mm::pagetable::Format`: the page-table entry encoding, one
//!   of the library's `formats` (its source is the architecture's pagetable.rs).
//! - `console_write(&[u8])`, `console_read() -> Option<u8>` (never blocks),
//!   `wait_for_console()`: idle until console input may have arrived (x86_64
//!   halts on the UART's interrupt, arm64 waits in `wfi` for it, pseries
//!   polls), so that a guest waiting on the host costs the host no CPU.
//! - `exit(status: u8) -> !`: ends the VM; 0 means success.
//! - `enable_mmu(&paging::Tables)`: load the roots and turn translation on
//!   (the identity range stays mapped, so execution carries on).
//! - `flush_tlb(Invalidation, Encoding)`: invalidate a translation of the
//!   given size (or the walks cached through a freed table) everywhere, and
//!   record the instruction and its operands in the update log (the
//!   page-table code reaches it as [`Tlb`]); `made_valid()`: the barrier
//!   after a store that makes an entry valid.
//! - `process_table() -> Option<PhysAddr>`: ppc64le's registered process table.
//! - `eject_memory_slot(slot)`: complete the platform's removal of a DIMM.
//! - `probe_write(VirtAddr) -> bool`: read the byte there and write it back;
//!   true when the write faulted (the trap handler recovers that one store).
//! - `probe_read(VirtAddr) -> Option<u64>`: the word there, `None` when the
//!   read faulted (the trap handler recovers that one load).
//! - the entry point, which sets up a stack, traps and the platform, then calls
//!   `crate::main(Platform)`; unexpected traps call `crate::crash` with a
//!   description and a closure printing the registers.
//! - every linker script (images/<arch>/link.ld) defines `__image_start` and
//!   `__image_end` around everything loaded or zeroed, and a `.noinit`
//!   section inside them that boot leaves as it finds it.

#[cfg(target_arch = "x86_64")]
#[path = "x86_64/mod.rs"]
mod imp;

#[cfg(target_arch = "aarch64")]
#[path = "aarch64/mod.rs"]
mod imp;

#[cfg(target_arch = "powerpc64")]
#[path = "powerpc64/mod.rs"]
mod imp;

pub use imp::*;

use hvo_guest::mm::pagetable::Invalidation;

/// The base page: the frame allocator's unit and the vmemmap's page.
pub const PAGE: u64 = BASE_PAGE.bytes();

/// How an invalidation instruction is encoded.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Encoding {
    /// With the size of the translation it removes, where the instruction
    /// carries one (ppc64 `tlbie` AP).
    Right,
    /// Knob `tlbie-base-size`: always the base page's size.
    BasePageSize,
}

/// This machine's TLB, for the page-table code.
pub struct Tlb {
    pub encoding: Encoding,
}

impl hvo_guest::mm::pagetable::Tlb for Tlb {
    fn invalidate(&self, what: Invalidation) {
        flush_tlb(what, self.encoding);
    }

    fn made_valid(&self) {
        made_valid();
    }
}

/// What the platform told the architecture code at boot.
pub struct Platform {
    /// Usable boot RAM, in ascending order.
    pub ram: crate::mm::RangeList,
    /// Ranges inside `ram` the frame allocator must never hand out (firmware
    /// data, the device tree; the image itself is added by `main`).
    pub reserved: crate::mm::RangeList,
    /// Device registers the firmware reaches with the MMU on (identity-mapped).
    pub mmio: crate::mm::RangeList,
}
