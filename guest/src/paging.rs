//! The kernel-style layout the firmware runs in: RAM identity-mapped (the
//! firmware is linked there) and again at the architecture's linear-map base,
//! MMIO identity-mapped as device memory.

use crate::arch::{self, Platform};
use crate::mm::frames::FrameAllocator;
use crate::mm::pagetable::{self, MapError, PageTable, Prot};
use crate::mm::{PageSize, PhysAddr, Range, VirtAddr};

pub type Table = PageTable<arch::Format>;

/// The roots the MMU is turned on with.
pub struct Tables {
    /// Translates the kernel half: linear map and vmemmap (and, where the
    /// architecture has one root, everything).
    pub kernel: Table,
    /// arm64's TTBR0 tree for the identity half.
    pub identity: Option<Table>,
}

/// Maps `range` at `va_base + range.start` with the largest leaves that fit.
fn map_range(
    table: &mut Table,
    frames: &mut FrameAllocator,
    va_base: u64,
    range: Range,
    prot: Prot,
) -> Result<(), MapError> {
    let mut pa = range.start;
    while pa < range.end {
        let va = va_base.wrapping_add(pa);
        let size = PageSize::DESCENDING
            .into_iter()
            .filter(|s| pagetable::supports::<arch::Format>(*s))
            .find(|s| {
                let b = s.bytes();
                pa.is_multiple_of(b) && va.is_multiple_of(b) && pa + b <= range.end
            })
            .ok_or(MapError::Misaligned)?;
        table.map(frames, VirtAddr(va), PhysAddr(pa), size, prot)?.ignore();
        pa += size.bytes();
    }
    Ok(())
}

pub fn build(frames: &mut FrameAllocator, platform: &Platform) -> Result<Tables, MapError> {
    let mut kernel = Table::new(frames)?;
    let mut identity = if arch::SEPARATE_IDENTITY_ROOT { Some(Table::new(frames)?) } else { None };
    // Where the identity range is the linear map (ppc64le), the firmware's code
    // runs from the linear map and needs execute permission there.
    let linear_prot = if arch::IDENTITY_IS_LINEAR_MAP { Prot::RWX } else { Prot::RW };
    for r in platform.ram.iter() {
        map_range(&mut kernel, frames, arch::LINEAR_MAP_BASE, r, linear_prot)?;
        if !arch::IDENTITY_IS_LINEAR_MAP {
            let id = identity.as_mut().unwrap_or(&mut kernel);
            map_range(id, frames, 0, r, Prot::RWX)?;
        }
    }
    for r in platform.mmio.iter() {
        let id = identity.as_mut().unwrap_or(&mut kernel);
        map_range(id, frames, 0, r, Prot::MMIO)?;
    }
    Ok(Tables { kernel, identity })
}
