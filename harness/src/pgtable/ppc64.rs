//! Power ISA v3.0B radix translation (Book III, 6.7.10): big-endian entries,
//! the root size and tree shape taken from the process table and from each
//! directory entry's NLS field, not assumed.

use super::{Decoded, Format, Perms, WalkError};
use crate::addr::PhysAddr;
use crate::memory::GuestMemory;

/// The radix format. Its shape is not fixed: the root's size comes from the
/// process table and every directory's from its NLS field, so one walker reads
/// the 4 KiB tree (13/9/9/9) and the 64 KiB one (13/9/9/5) alike.
pub struct Radix;

impl Radix {
    /// The root of process-table entry 0 (PID 0: the kernel's, and with PIDR 0
    /// also quadrant 0's) and its index bits.
    pub fn from_process_table(mem: &dyn GuestMemory, table: PhysAddr) -> Result<(PhysAddr, u32), WalkError> {
        let dw0 = mem.read_u64_be(table)?;
        // RTS = RTS1 (bits 62:61) || RTS2 (bits 7:5): the tree covers 2^(RTS+31) bytes.
        let rts = ((dw0 >> 61) & 3) << 3 | ((dw0 >> 5) & 7);
        let root_bits = (dw0 & 0x1f) as u32;
        let root = PhysAddr(dw0 & NEXT_LEVEL_BASE);
        if rts + 31 != 52 {
            return Err(WalkError::BadRoot(format!(
                "process table entry 0 describes a 2^{} byte tree, expected 2^52",
                rts + 31
            )));
        }
        if root_bits != 13 {
            return Err(WalkError::BadRoot(format!("process table entry 0 has a {root_bits}-bit root, expected 13")));
        }
        Ok((root, root_bits))
    }
}

const VALID: u64 = 1 << 63;
const LEAF: u64 = 1 << 62;
/// Next level base: ISA bits 4:55 of the entry, bits 59:8 counted from the right.
const NEXT_LEVEL_BASE: u64 = 0x0fff_ffff_ffff_ff00;
const NEXT_LEVEL_SIZE: u64 = 0x1f;
/// Real page number, bits 56:12.
const REAL_PAGE: u64 = 0x01ff_ffff_ffff_f000;
const READ_WRITE: u64 = 1 << 1;
const EXECUTE: u64 = 1 << 0;

/// Index bits a directory at `level` may give the table below it: the
/// layouts POWER9 and POWER10 walk (ISA v3.0B 6.7.10.2, Table 23), which are
/// the only ones QEMU accepts: 13/9/9/9 for 4 KiB pages, 13/9/9/5 for 64 KiB.
fn valid_next_level_size(level: usize, nls: u32) -> bool {
    match level {
        0 | 1 => nls == 9,
        2 => nls == 9 || nls == 5,
        _ => false,
    }
}

impl Format for Radix {
    fn root_index_bits(&self) -> u32 {
        13
    }

    fn big_endian(&self) -> bool {
        true
    }

    fn va_bits(&self) -> u32 {
        52
    }

    fn decode(&self, raw: u64, level: usize, shift: u32) -> Decoded {
        if raw & VALID == 0 {
            return Decoded::Invalid;
        }
        if raw & LEAF != 0 {
            // Leaves exist below the root only (Linux never maps 512 GiB).
            if level == 0 {
                return Decoded::Invalid;
            }
            let size_mask = (1u64 << shift) - 1;
            return Decoded::Leaf {
                pa: PhysAddr(raw & REAL_PAGE & !size_mask),
                perms: Perms { write: raw & READ_WRITE != 0, exec: raw & EXECUTE != 0 },
            };
        }
        // A directory with a size the MMU does not walk faults (the last
        // level holds only leaves).
        let nls = (raw & NEXT_LEVEL_SIZE) as u32;
        if !valid_next_level_size(level, nls) {
            return Decoded::Invalid;
        }
        // Directory entries carry no permissions: only leaves do.
        Decoded::Table {
            pa: PhysAddr(raw & NEXT_LEVEL_BASE),
            index_bits: nls,
            allows: Perms { write: true, exec: true },
        }
    }
}
