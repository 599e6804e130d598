//! The manifest the host reads from guest memory (layout in `hvo_abi::manifest`).

use hvo_abi::manifest::{
    Counters, GuestState, RawManifest, RawRange, RawRegion, RawRoot, RawSharedTail, RootKind, MAX_RAM_RANGES, MAX_ROOTS,
};

use crate::mm::frames::Purpose;
use crate::mm::Range;
use crate::{arch, Kernel};

/// The host finds this through the ELF symbol table; the firmware is linked at
/// its physical load address, so the symbol's value is its guest-physical address.
#[no_mangle]
#[used]
pub static mut HVO_MANIFEST: RawManifest = RawManifest::booting(arch::ARCH);

fn raw_range(r: Range) -> RawRange {
    RawRange { start: r.start, size: r.size() }
}

/// Rewrites the manifest from the firmware's state, marks it ready and bumps
/// its generation; returns the generation.
pub fn publish(kernel: &Kernel) -> u64 {
    let (tables, ram, image) = (&kernel.tables, &kernel.ram, kernel.image);
    let mut m = RawManifest::booting(arch::ARCH);
    m.page_size = arch::BASE_PAGE.bytes();
    m.linear_map_base = arch::LINEAR_MAP_BASE;
    m.vmemmap_base = arch::VMEMMAP_BASE;
    m.image = raw_range(image);

    let mut roots = [RawRoot::default(); MAX_ROOTS];
    let mut n = 0;
    let mut add = |kind: RootKind, pa: u64| {
        roots[n] = RawRoot { kind: kind as u32, _reserved: 0, pa };
        n += 1;
    };
    add(RootKind::Kernel, tables.kernel.root().0);
    add(RootKind::Process, kernel.process.root().0);
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

    let vm = &kernel.vmemmap;
    m.section_size_bits = arch::SECTION_SIZE_BITS;
    m.memstart_pfn = vm.memstart_pfn().0;
    let c = &kernel.frames.counters;
    m.counters = Counters {
        vmemmap_allocated: c.allocated(Purpose::Vmemmap),
        vmemmap_freed: c.freed(Purpose::Vmemmap),
        pagetable_allocated: c.allocated(Purpose::PageTable),
        pagetable_freed: c.freed(Purpose::PageTable),
        struct_pages_initialized: vm.struct_pages_initialized,
    };
    let mut n = 0;
    for (id, slot) in vm.slots.iter().enumerate() {
        if let Some(r) = slot.region {
            m.regions[n] = RawRegion {
                start_pfn: r.start_pfn.0,
                nr_pages: r.nr_pages,
                kind: r.kind as u32,
                zone: r.zone as u32,
                order: r.order,
                layout: r.layout as u32,
                optimized: r.optimized as u32,
                id: id as u32,
                pageblock_tags: slot.pageblock_tags.map(|(pa, _)| pa.0).unwrap_or(0),
                altmap_pfns: r.altmap_pfns,
            };
            n += 1;
        }
    }
    m.region_count = n as u32;
    m.knobs = vm.knobs;
    let mut n = 0;
    for t in vm.shared_tails.iter() {
        m.shared_tails[n] = RawSharedTail { pa: t.pa.0, zone: t.zone as u32, order: t.order, users: t.users };
        n += 1;
    }
    m.shared_tail_count = n as u32;
    m.update_log = crate::mm::update_log::address();

    m.state = GuestState::Ready as u32;
    m.generation = read().generation + 1;
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
