//! What differs between the page-table formats the synthetic vmemmaps are
//! built in: one row per architecture, and one `match` per entry encoding.
//! The encodings are written here from each architecture's manual (Intel
//! SDM 4.5, Arm ARM D8.3, Power ISA 6.7.10), not taken from the host's
//! walkers or the guest's mapper: the verifier's tests must not share their
//! mistakes.

use hvo_abi::Arch;
use hvo_images::{profile, Mmu};

/// One architecture's facts, as the synthetic builder needs them.
#[derive(Clone, Copy, Debug)]
pub(super) struct Format {
    pub page: u64,
    /// Index bits of each level's table, the root's first.
    pub levels: [u32; 4],
    /// Virtual address bits the tables translate.
    va_bits: u32,
    pub section_size_bits: u32,
    /// Boot RAM's first byte, and the vmemmap's base and the linear map's.
    pub ram_base: u64,
    pub vmemmap_base: u64,
    pub linear_map_base: u64,
    /// The pfn the vmemmap is indexed from (arm64: RAM's start rounded down to 1 GiB).
    pub memstart_pfn: u64,
    /// The compound order whose vmemmap is worth optimizing: 2 MiB with
    /// 4 KiB pages (8 vmemmap pages), 1 GiB with 64 KiB pages (16; a 2 MiB
    /// page's 2 KiB of struct pages fit in less than one).
    pub order: u32,
    /// How entries are encoded.
    mmu: Mmu,
}

/// The level whose entries map 2 MiB: where a block (huge) leaf goes.
pub(super) const BLOCK_LEVEL: usize = 2;

impl Format {
    pub fn of(arch: Arch) -> Format {
        let p = profile(arch);
        let (levels, va_bits, section_size_bits, memstart_align, order) = match arch {
            Arch::X86_64 => ([9, 9, 9, 9], 48, 27, None, 9),
            Arch::Aarch64 => ([9, 9, 9, 9], 48, 27, Some(1u64 << 30), 9),
            Arch::Ppc64le => ([13, 9, 9, 9], 52, 24, None, 9),
            Arch::Ppc64le64k => ([13, 9, 9, 5], 52, 24, None, 14),
        };
        let page = p.page_size();
        let memstart = memstart_align.map(|a| p.ram_base / a * a).unwrap_or(0);
        Format {
            page,
            levels,
            va_bits,
            section_size_bits,
            ram_base: p.ram_base,
            vmemmap_base: p.vmemmap_base,
            linear_map_base: p.linear_map_base,
            memstart_pfn: memstart / page,
            order,
            mmu: p.mmu,
        }
    }

    /// The address bits below the index of a table at `level`.
    fn shift(&self, level: usize) -> u32 {
        self.va_bits - self.levels[..=level].iter().sum::<u32>()
    }

    /// Where in the table at `level` the entry translating `va` is.
    pub fn slot(&self, table: u64, va: u64, level: usize) -> u64 {
        table + ((va >> self.shift(level)) & ((1 << self.levels[level]) - 1)) * 8
    }

    /// Bytes of a table at `level`.
    pub fn table_bytes(&self, level: usize) -> u64 {
        8 << self.levels[level]
    }

    /// Bytes one entry at `level` maps.
    pub fn span(&self, level: usize) -> u64 {
        1 << self.shift(level)
    }

    pub fn big_endian(&self) -> bool {
        self.mmu == Mmu::Radix
    }

    /// Whether the kernel root is found through a process table (radix).
    pub fn has_process_table(&self) -> bool {
        self.mmu == Mmu::Radix
    }

    /// A pointer from a table at `level` to the table below it.
    pub fn table_entry(&self, next: u64, level: usize) -> u64 {
        match self.mmu {
            // Present, writable: permissions narrow at the leaves.
            Mmu::X86_64 => next | 1 | 1 << 1,
            // Valid, table.
            Mmu::Aarch64 => next | 0b11,
            // Valid, and the next level's size (NLS) in index bits.
            Mmu::Radix => 1 << 63 | next | u64::from(self.levels[level + 1]),
        }
    }

    /// A leaf at `level` mapping `frame`, never executable.
    pub fn leaf_entry(&self, frame: u64, level: usize, writable: bool) -> u64 {
        let last = level == self.levels.len() - 1;
        match self.mmu {
            // Present, R/W, PS above the last level, execute-disable.
            Mmu::X86_64 => frame | 1 | u64::from(writable) << 1 | u64::from(!last) << 7 | 1 << 63,
            // Valid, page (bit 1) at level 3 and block below, AttrIndx 1,
            // inner shareable, access flag, AP[2] read-only, PXN and UXN.
            Mmu::Aarch64 => {
                frame | 1 | u64::from(last) << 1 | 1 << 2 | 3 << 8 | 1 << 10 | u64::from(!writable) << 7 | 3 << 53
            }
            // Valid, leaf, privileged, read, and read-write when writable.
            Mmu::Radix => 1 << 63 | 1 << 62 | frame | 1 << 3 | 1 << 2 | u64::from(writable) << 1,
        }
    }

    /// Process-table entry 0 for a radix tree rooted at `root`: a 2^52-byte
    /// tree (RTS = 52 - 31, split over RTS1 and RTS2) and the root's index bits.
    pub fn process_table_entry(&self, root: u64) -> u64 {
        let rts = u64::from(self.va_bits - 31);
        (rts >> 3) << 61 | root | (rts & 7) << 5 | u64::from(self.levels[0])
    }
}
