//! x86_64 paging (Intel SDM vol. 3A, 4.5; AMD APM vol. 2, 5.3): 4-level
//! (48-bit addresses) and, with CR4.LA57, 5-level (57-bit). The two differ
//! only in how many address bits the root covers; each entry is decoded
//! from the bytes it spans, so one decoder serves both.
//! Assumes EFER.NXE = 1 (the firmware and Linux enable it), so bit 63 is
//! execute-disable.

use super::{Decoded, Format, Perms};
use crate::addr::PhysAddr;

/// One x86_64 paging mode.
pub struct X86_64 {
    va_bits: u32,
}

impl X86_64 {
    /// PML4 root, 48-bit addresses: the firmware's mode, and Linux's
    /// without LA57.
    pub const FOUR_LEVEL: X86_64 = X86_64 { va_bits: 48 };
    /// PML5 root, 57-bit addresses (CR4.LA57): Linux with
    /// CONFIG_X86_5LEVEL on a CPU that has it.
    pub const FIVE_LEVEL: X86_64 = X86_64 { va_bits: 57 };
}

const PRESENT: u64 = 1 << 0;
const READ_WRITE: u64 = 1 << 1;
const PAGE_SIZE: u64 = 1 << 7;
const EXECUTE_DISABLE: u64 = 1 << 63;
/// Bits 51:12 (MAXPHYADDR 52).
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;
/// A PTE maps 4 KiB.
const PTE_SHIFT: u32 = 12;
/// PS makes a PDE a 2 MiB page and a PDPTE a 1 GiB page.
const LARGE_PAGE_SHIFTS: [u32; 2] = [21, 30];

impl Format for X86_64 {
    fn root_index_bits(&self) -> u32 {
        9
    }

    fn va_bits(&self) -> u32 {
        self.va_bits
    }

    fn decode(&self, raw: u64, _level: usize, shift: u32) -> Decoded {
        if raw & PRESENT == 0 {
            return Decoded::Invalid;
        }
        let perms = Perms { write: raw & READ_WRITE != 0, exec: raw & EXECUTE_DISABLE == 0 };
        // PS in a PML4E or PML5E is reserved (ignored here, as before); a PTE
        // is always a leaf.
        let leaf = shift == PTE_SHIFT || (LARGE_PAGE_SHIFTS.contains(&shift) && raw & PAGE_SIZE != 0);
        if leaf {
            // In large pages bit 12 is PAT and the frame is aligned to the size.
            let size_mask = (1u64 << shift) - 1;
            Decoded::Leaf { pa: PhysAddr(raw & ADDRESS & !size_mask), perms }
        } else {
            Decoded::Table { pa: PhysAddr(raw & ADDRESS), index_bits: 9, allows: perms }
        }
    }
}
