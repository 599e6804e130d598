//! AArch64 VMSAv8-64 stage 1, 4 KiB granule, 48-bit input addresses
//! (Arm ARM D8.3: descriptor formats; D8.4: hierarchical permissions).

use super::{Decoded, Format, Perms};
use crate::addr::PhysAddr;

pub struct Aarch64;

const VALID: u64 = 1 << 0;
/// Table at levels 0-2, page at level 3 (0 there is reserved).
const TABLE_OR_PAGE: u64 = 1 << 1;
/// AP[2]: read-only.
const AP_READ_ONLY: u64 = 1 << 7;
const PXN: u64 = 1 << 53;
/// Table descriptors: PXNTable, APTable[1] (no writes below).
const PXN_TABLE: u64 = 1 << 59;
const AP_TABLE_NO_WRITE: u64 = 1 << 62;
/// Output address bits 47:12.
const OUTPUT_ADDRESS: u64 = 0x0000_ffff_ffff_f000;

impl Format for Aarch64 {
    fn root_index_bits(&self) -> u32 {
        9
    }

    fn va_bits(&self) -> u32 {
        48
    }

    fn decode(&self, raw: u64, level: usize, shift: u32) -> Decoded {
        if raw & VALID == 0 {
            return Decoded::Invalid;
        }
        let table_bit = raw & TABLE_OR_PAGE != 0;
        match (level, table_bit) {
            (0..=2, true) => Decoded::Table {
                pa: PhysAddr(raw & OUTPUT_ADDRESS),
                index_bits: 9,
                allows: Perms { write: raw & AP_TABLE_NO_WRITE == 0, exec: raw & PXN_TABLE == 0 },
            },
            // A level 0 block needs 52-bit addresses; a level 3 "block" is reserved.
            (0, false) | (3, false) => Decoded::Invalid,
            _ => {
                let size_mask = (1u64 << shift) - 1;
                Decoded::Leaf {
                    pa: PhysAddr(raw & OUTPUT_ADDRESS & !size_mask),
                    perms: Perms { write: raw & AP_READ_ONLY == 0, exec: raw & PXN == 0 },
                }
            }
        }
    }
}
