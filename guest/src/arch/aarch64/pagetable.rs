//! arm64's page-table entries.

use crate::mm::pagetable::{Entry, Format, Prot};
use crate::mm::{PageSize, PhysAddr};

/// VMSAv8-64 stage 1 descriptors, 4 KiB granule, 4 levels (Arm ARM D8.3).
pub enum Vmsav8Descriptors {}

const VALID: u64 = 1 << 0;
/// At levels 0-2: a table, not a block. At level 3: required for a page.
const TABLE_OR_PAGE: u64 = 1 << 1;
/// AttrIndx: MAIR_EL1 attribute 0 is Device-nGnRnE, attribute 1 Normal WB.
const ATTR_NORMAL: u64 = 1 << 2;
const READ_ONLY: u64 = 1 << 7;
const INNER_SHAREABLE: u64 = 3 << 8;
const ACCESS_FLAG: u64 = 1 << 10;
const PRIVILEGED_NO_EXECUTE: u64 = 1 << 53;
const UNPRIVILEGED_NO_EXECUTE: u64 = 1 << 54;
const OUTPUT_ADDRESS: u64 = 0x0000_ffff_ffff_f000;
const ATTR_INDEX: u64 = 7 << 2;

impl Format for Vmsav8Descriptors {
    const LEVELS: usize = 4;
    const SHIFTS: [u32; 4] = [39, 30, 21, 12];
    const INDEX_BITS: [u32; 4] = [9, 9, 9, 9];
    const BASE_PAGE: PageSize = PageSize::Size4K;
    /// Arm ARM D8.16.1: changing the output address of a live entry, or a
    /// block into a table, goes through an invalid entry and a TLBI.
    const BREAK_BEFORE_MAKE: bool = true;

    fn leaf_allowed(level: usize) -> bool {
        // Level 0 blocks need 52-bit output addresses.
        level >= 1
    }

    fn decode(raw: u64, level: usize) -> Entry {
        if raw & VALID == 0 {
            return Entry::Empty;
        }
        let is_table = level < 3 && raw & TABLE_OR_PAGE != 0;
        if is_table {
            return Entry::Table(PhysAddr(raw & OUTPUT_ADDRESS));
        }
        if (level == 3 && raw & TABLE_OR_PAGE == 0) || level == 0 {
            // Reserved encodings: the MMU faults on them like on an empty entry.
            return Entry::Empty;
        }
        let size_mask = (1u64 << Self::SHIFTS[level]) - 1;
        Entry::Leaf {
            pa: PhysAddr(raw & OUTPUT_ADDRESS & !size_mask),
            prot: Prot {
                write: raw & READ_ONLY == 0,
                exec: raw & PRIVILEGED_NO_EXECUTE == 0,
                device: raw & ATTR_INDEX == 0,
            },
        }
    }

    fn encode_table(pa: PhysAddr, _level: usize) -> u64 {
        pa.0 | VALID | TABLE_OR_PAGE
    }

    fn encode_leaf(pa: PhysAddr, level: usize, prot: Prot) -> u64 {
        // The access flag is preset, as Linux does, so no access fault happens
        // and nothing is written back into the tables.
        let mut raw = pa.0 | VALID | ACCESS_FLAG | UNPRIVILEGED_NO_EXECUTE;
        if level == 3 {
            raw |= TABLE_OR_PAGE;
        }
        if !prot.device {
            raw |= ATTR_NORMAL | INNER_SHAREABLE;
        }
        if !prot.write {
            raw |= READ_ONLY;
        }
        if !prot.exec {
            raw |= PRIVILEGED_NO_EXECUTE;
        }
        raw
    }
}
