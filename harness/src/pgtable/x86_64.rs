//! x86_64 4-level paging (Intel SDM vol. 3A, 4.5; AMD APM vol. 2, 5.3).
//! Assumes EFER.NXE = 1 (the guest enables it), so bit 63 is execute-disable.

use super::{Decoded, Format, Perms};
use crate::addr::PhysAddr;

pub struct X86_64;

const PRESENT: u64 = 1 << 0;
const READ_WRITE: u64 = 1 << 1;
const PAGE_SIZE: u64 = 1 << 7;
const EXECUTE_DISABLE: u64 = 1 << 63;
/// Bits 51:12 (MAXPHYADDR 52).
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;

impl Format for X86_64 {
    fn root_index_bits(&self) -> u32 {
        9
    }

    fn va_bits(&self) -> u32 {
        48
    }

    fn decode(&self, raw: u64, level: usize, shift: u32) -> Decoded {
        if raw & PRESENT == 0 {
            return Decoded::Invalid;
        }
        let perms = Perms { write: raw & READ_WRITE != 0, exec: raw & EXECUTE_DISABLE == 0 };
        // PS makes a PDPTE a 1 GiB page and a PDE a 2 MiB page; in the PML4E it
        // is reserved, and a PTE is always a leaf.
        let leaf = level == 3 || (matches!(level, 1 | 2) && raw & PAGE_SIZE != 0);
        if leaf {
            // In large pages bit 12 is PAT and the frame is aligned to the size.
            let size_mask = (1u64 << shift) - 1;
            Decoded::Leaf { pa: PhysAddr(raw & ADDRESS & !size_mask), perms }
        } else {
            Decoded::Table { pa: PhysAddr(raw & ADDRESS), index_bits: 9, allows: perms }
        }
    }
}
