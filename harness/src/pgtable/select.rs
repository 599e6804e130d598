//! Which page-table format a tree is in. The firmware's is fixed per
//! architecture; a real kernel picks among the formats its MMU offers
//! (x86_64 LA57, arm64 LPA2) at boot, so the host picks by finding the one
//! under which the kernel's root table maps its own symbol back to itself.

use hvo_images::Mmu;

use super::{Aarch64, Format, Radix, WalkError, Walker, X86_64};
use crate::addr::{PhysAddr, VirtAddr};
use crate::memory::GuestMemory;

/// One page-table format, as a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingFormat {
    X86_64FourLevel,
    X86_64FiveLevel,
    Aarch64Va48,
    Aarch64Lpa2Va52,
    Radix,
}

impl PagingFormat {
    /// The formats a processor with this MMU may run, the firmware's first.
    pub fn of_mmu(mmu: Mmu) -> &'static [PagingFormat] {
        match mmu {
            Mmu::X86_64 => &[PagingFormat::X86_64FourLevel, PagingFormat::X86_64FiveLevel],
            Mmu::Aarch64 => &[PagingFormat::Aarch64Va48, PagingFormat::Aarch64Lpa2Va52],
            Mmu::Radix => &[PagingFormat::Radix],
        }
    }

    pub fn format(self) -> &'static dyn Format {
        match self {
            PagingFormat::X86_64FourLevel => &X86_64::FOUR_LEVEL,
            PagingFormat::X86_64FiveLevel => &X86_64::FIVE_LEVEL,
            PagingFormat::Aarch64Va48 => &Aarch64::VA48,
            PagingFormat::Aarch64Lpa2Va52 => &Aarch64::LPA2_VA52,
            PagingFormat::Radix => &Radix,
        }
    }

    /// The name reports use.
    pub fn name(self) -> &'static str {
        match self {
            PagingFormat::X86_64FourLevel => "x86_64 4-level",
            PagingFormat::X86_64FiveLevel => "x86_64 5-level (LA57)",
            PagingFormat::Aarch64Va48 => "arm64 48-bit 4-level",
            PagingFormat::Aarch64Lpa2Va52 => "arm64 52-bit LPA2 5-level",
            PagingFormat::Radix => "ppc64 radix",
        }
    }
}

/// The format, among those `mmu` offers, under which the tree at `root`
/// translates `root_va` (the root table's own virtual address, such as
/// Linux's `init_top_pgt` or `swapper_pg_dir`) back to `root`. A format that
/// reads outside guest memory on the way is not the one.
pub fn self_translating_format(
    mmu: Mmu,
    mem: &dyn GuestMemory,
    root: PhysAddr,
    root_va: VirtAddr,
) -> Result<PagingFormat, WalkError> {
    for &candidate in PagingFormat::of_mmu(mmu) {
        let walker = Walker::new(candidate.format(), root);
        if let Ok(Some(leaf)) = walker.translate(mem, root_va) {
            if leaf.translate(root_va) == root {
                return Ok(candidate);
            }
        }
    }
    let tried: Vec<&str> = PagingFormat::of_mmu(mmu).iter().map(|f| f.name()).collect();
    Err(WalkError::BadRoot(format!(
        "the table at {root} maps {root_va} back to itself in none of the formats {}",
        tried.join(", ")
    )))
}
