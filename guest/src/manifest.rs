//! The manifest the host reads from guest memory (layout in `hvo_abi::manifest`).

use hvo_abi::manifest::{
    GuestState, RawManifest, RawRange, RawRoot, RootKind, MAX_RAM_RANGES, MAX_ROOTS,
};

use crate::arch;
use crate::mm::boot::Tables;
use crate::mm::{PageSize, Range, RangeList};

/// The host finds this through the ELF symbol table; the firmware is linked at
/// its physical load address, so the symbol's value is its guest-physical address.
#[no_mangle]
#[used]
pub static mut HVO_MANIFEST: RawManifest = RawManifest::booting(arch::ARCH);

fn raw_range(r: Range) -> RawRange {
    RawRange {
        start: r.start,
        size: r.size(),
    }
}

/// Fills the manifest in from what the firmware built and marks it ready.
pub fn publish(tables: &Tables, ram: &RangeList, image: Range) {
    let mut m = RawManifest::booting(arch::ARCH);
    m.page_size = PageSize::Size4K.bytes();
    m.linear_map_base = arch::LINEAR_MAP_BASE;
    m.vmemmap_base = arch::VMEMMAP_BASE;
    m.image = raw_range(image);

    let mut roots = [RawRoot::default(); MAX_ROOTS];
    let mut n = 0;
    let mut add = |kind: RootKind, pa: u64| {
        roots[n] = RawRoot {
            kind: kind as u32,
            _reserved: 0,
            pa,
        };
        n += 1;
    };
    add(RootKind::Kernel, tables.kernel.root().0);
    if let Some(id) = &tables.identity {
        add(RootKind::Identity, id.root().0);
    }
    if let Some(pa) = arch::process_table() {
        add(RootKind::ProcessTable, pa.0);
    }
    m.roots = roots;
    m.root_count = n as u32;

    for (slot, r) in m.ram.iter_mut().zip(ram.iter()).take(MAX_RAM_RANGES) {
        *slot = raw_range(r);
    }
    m.ram_count = ram.len().min(MAX_RAM_RANGES) as u32;
    m.state = GuestState::Ready as u32;
    write(m);
}

/// Rewrites the manifest with a new generation number; returns it.
pub fn bump_generation() -> u64 {
    let mut m = read();
    m.generation += 1;
    write(m);
    m.generation
}

fn read() -> RawManifest {
    // SAFETY: single-threaded firmware; the host only reads this memory.
    unsafe { core::ptr::addr_of!(HVO_MANIFEST).read_volatile() }
}

fn write(m: RawManifest) {
    // SAFETY: as for `read`.
    unsafe { core::ptr::addr_of_mut!(HVO_MANIFEST).write_volatile(m) }
}
