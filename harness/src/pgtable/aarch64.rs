//! AArch64 VMSAv8-64 stage 1 with the 4 KiB granule (Arm ARM D8.3:
//! descriptor formats; D8.4: hierarchical permissions), in the two shapes
//! Linux runs: 48-bit input addresses (4 levels, 9 bits each) and, with
//! FEAT_LPA2 and TCR_ELx.DS = 1, 52-bit ones (5 levels: a 16-entry level -1
//! table at VA bits 51:48 on top). Under LPA2 output-address bits 51:50
//! move into descriptor bits 9:8, where the shareability field was.
//! Entries are decoded from the bytes they span, so the shapes share the
//! decoder and differ only in the facts of their table.

use super::{Decoded, Format, Perms};
use crate::addr::PhysAddr;

/// One translation regime shape.
pub struct Aarch64 {
    va_bits: u32,
    root_index_bits: u32,
    /// Descriptor bits holding output-address bits 47:12 (48-bit) or 49:12 (LPA2).
    address_bits: u64,
    /// Output-address bits 51:50 sit in descriptor bits 9:8 (LPA2).
    high_address_in_bits_9_8: bool,
    /// Sizes (log2) a block descriptor may map.
    block_shifts: &'static [u32],
}

impl Aarch64 {
    /// 48-bit, 4 levels: the firmware's shape, and Linux's on CPUs
    /// without LPA2 (cortex-a57).
    pub const VA48: Aarch64 = Aarch64 {
        va_bits: 48,
        root_index_bits: 9,
        address_bits: 0x0000_ffff_ffff_f000,
        high_address_in_bits_9_8: false,
        block_shifts: &[21, 30],
    };
    /// 52-bit with LPA2, 5 levels: Linux built for 52-bit VA on a CPU with
    /// LPA2 (`-cpu max`). Level 0 may then hold 512 GiB blocks.
    pub const LPA2_VA52: Aarch64 = Aarch64 {
        va_bits: 52,
        root_index_bits: 4,
        address_bits: 0x0003_ffff_ffff_f000,
        high_address_in_bits_9_8: true,
        block_shifts: &[21, 30, 39],
    };

    fn output_address(&self, raw: u64) -> u64 {
        let high = if self.high_address_in_bits_9_8 { (raw >> 8 & 3) << 50 } else { 0 };
        raw & self.address_bits | high
    }
}

const VALID: u64 = 1 << 0;
/// Table above the last level, page at the last level (0 there is reserved).
const TABLE_OR_PAGE: u64 = 1 << 1;
/// AP[2]: read-only.
const AP_READ_ONLY: u64 = 1 << 7;
const PXN: u64 = 1 << 53;
/// Table descriptors: PXNTable, APTable[1] (no writes below).
const PXN_TABLE: u64 = 1 << 59;
const AP_TABLE_NO_WRITE: u64 = 1 << 62;
/// The last level maps 4 KiB pages.
const PAGE_SHIFT: u32 = 12;

impl Format for Aarch64 {
    fn root_index_bits(&self) -> u32 {
        self.root_index_bits
    }

    fn va_bits(&self) -> u32 {
        self.va_bits
    }

    fn decode(&self, raw: u64, _level: usize, shift: u32) -> Decoded {
        if raw & VALID == 0 {
            return Decoded::Invalid;
        }
        let pa = self.output_address(raw);
        let leaf = |size_shift: u32| Decoded::Leaf {
            pa: PhysAddr(pa & !((1u64 << size_shift) - 1)),
            perms: Perms { write: raw & AP_READ_ONLY == 0, exec: raw & PXN == 0 },
        };
        match (raw & TABLE_OR_PAGE != 0, shift) {
            (true, PAGE_SHIFT) => leaf(shift),
            (true, _) => Decoded::Table {
                pa: PhysAddr(pa),
                index_bits: 9,
                allows: Perms { write: raw & AP_TABLE_NO_WRITE == 0, exec: raw & PXN_TABLE == 0 },
            },
            (false, _) if self.block_shifts.contains(&shift) => leaf(shift),
            // A block where this shape allows none (the root, the last level).
            (false, _) => Decoded::Invalid,
        }
    }
}
