//! Host tests of the mapper over each format the firmware builds, reading
//! back the entries it wrote.

use std::cell::RefCell;

use super::*;
use crate::formats::aarch64::Vmsav8Descriptors;
use crate::formats::powerpc64::{Radix4K, Radix64K};
use crate::formats::x86_64::X86PageTables;
use crate::mm::frames::Purpose;
use crate::mm::test_memory::TestMemory;
use crate::mm::RangeList;

/// Remembers every invalidation asked for.
#[derive(Default)]
struct RecordingTlb(RefCell<Vec<VirtAddr>>);

impl Tlb for RecordingTlb {
    fn invalidate(&self, va: VirtAddr) {
        self.0.borrow_mut().push(va);
    }
}

const RAM: u64 = 0x4000_0000;
const VMEMMAP: VirtAddr = VirtAddr(0xffff_ea00_0020_0000);
/// Frames the tests map: never touched, outside the test memory on purpose.
const DATA: PhysAddr = PhysAddr(0x1_0000_0000);

fn setup<F: Format>() -> (TestMemory, FrameAllocator, PageTable<F>) {
    let memory = TestMemory::install(RAM, 16 << 20);
    let mut frames = FrameAllocator::new(&memory.ram(), &RangeList::new(), F::BASE_PAGE);
    let table = PageTable::new(&mut frames).unwrap();
    (memory, frames, table)
}

/// The raw entry and level of the leaf mapping `va`, walked by hand.
fn raw_leaf<F: Format>(table: &PageTable<F>, va: VirtAddr) -> Option<(u64, usize)> {
    let mut at = table.root();
    for level in 0..F::LEVELS {
        let raw = F::load(PageTable::<F>::slot(at, level, va));
        match F::decode(raw, level) {
            Entry::Empty => return None,
            Entry::Leaf { .. } => return Some((raw, level)),
            Entry::Table(next) => at = next,
        }
    }
    None
}

fn maps_and_reads_back<F: Format>() {
    let (_memory, mut frames, mut table) = setup::<F>();
    let base = F::BASE_PAGE;
    let flush = table.map(&mut frames, VMEMMAP, DATA, base, Prot::RW).unwrap();
    assert_eq!(flush, Flush(VMEMMAP));
    flush.ignore();
    let (raw, level) = raw_leaf(&table, VMEMMAP).unwrap();
    assert_eq!(level, F::LEVELS - 1);
    assert_eq!(F::decode(raw, level), Entry::Leaf { pa: DATA, prot: Prot::RW });
    let inside = VirtAddr(VMEMMAP.0 + base.bytes() - 8);
    assert_eq!(
        table.translate(inside),
        Some(Translation { pa: DATA.add(base.bytes() - 8), size: base, prot: Prot::RW })
    );
    assert_eq!(table.translate(VirtAddr(VMEMMAP.0 + base.bytes())), None);
    // Every protection round-trips through the encoding.
    for (i, prot) in [Prot::RO, Prot::RWX, Prot::MMIO].into_iter().enumerate() {
        let va = VirtAddr(VMEMMAP.0 + (i as u64 + 1) * base.bytes());
        table.map(&mut frames, va, DATA, base, prot).unwrap().ignore();
        assert_eq!(table.translate(va).map(|t| t.prot), Some(prot));
    }
    // A gigantic leaf sits one level above the 2 MiB one.
    let giant = VirtAddr(0xffff_ea00_4000_0000);
    table.map(&mut frames, giant, PhysAddr(1 << 30), PageSize::Size1G, Prot::RW).unwrap().ignore();
    assert_eq!(raw_leaf(&table, giant).map(|(_, level)| level), Some(1));
}

fn refuses_bad_maps<F: Format>() {
    let (_memory, mut frames, mut table) = setup::<F>();
    let base = F::BASE_PAGE;
    let odd = VirtAddr(VMEMMAP.0 + 0x800);
    assert_eq!(table.map(&mut frames, odd, DATA, base, Prot::RW), Err(MapError::Misaligned));
    table.map(&mut frames, VMEMMAP, DATA, base, Prot::RW).unwrap().ignore();
    assert_eq!(table.map(&mut frames, VMEMMAP, DATA, base, Prot::RO), Err(MapError::AlreadyMapped));
    // A 2 MiB leaf cannot go where base pages are mapped below it.
    assert_eq!(table.map(&mut frames, VMEMMAP, DATA, PageSize::Size2M, Prot::RW), Err(MapError::AlreadyMapped));
    let other = if base == PageSize::Size4K { PageSize::Size64K } else { PageSize::Size4K };
    assert!(!supports::<F>(other));
    assert_eq!(table.map(&mut frames, VMEMMAP, DATA, other, Prot::RW), Err(MapError::SizeNotSupported));
    // A failed table allocation leaves nothing mapped.
    let far = VirtAddr(VMEMMAP.0 + (8 << 30));
    frames.fail_nth(1);
    assert_eq!(table.map(&mut frames, far, DATA, base, Prot::RW), Err(MapError::Alloc(AllocError::Injected)));
    assert_eq!(table.translate(far), None);
}

fn splits_a_2m_leaf_into_base_pages<F: Format>() {
    let (_memory, mut frames, mut table) = setup::<F>();
    let base = F::BASE_PAGE;
    table.map(&mut frames, VMEMMAP, DATA, PageSize::Size2M, Prot::RO).unwrap().ignore();
    let before = frames.counters.allocated(Purpose::PageTable);
    let inside = VirtAddr(VMEMMAP.0 + 5 * base.bytes());
    let flush = table.split(&mut frames, inside).unwrap().unwrap();
    assert_eq!(flush, Flush(VMEMMAP));
    flush.ignore();
    assert_eq!(frames.counters.allocated(Purpose::PageTable) - before, F::table_bytes(3) / base.bytes());
    for i in 0..PageSize::Size2M.bytes() / base.bytes() {
        let va = VirtAddr(VMEMMAP.0 + i * base.bytes());
        let (raw, level) = raw_leaf(&table, va).unwrap();
        assert_eq!(level, F::LEVELS - 1);
        assert_eq!(F::decode(raw, level), Entry::Leaf { pa: DATA.add(i * base.bytes()), prot: Prot::RO });
    }
    // Already base pages: nothing to do.
    assert_eq!(table.split(&mut frames, inside), Ok(None));
    assert_eq!(table.split(&mut frames, VirtAddr(VMEMMAP.0 + (4 << 20))), Err(MapError::NotMapped));
}

fn remaps_and_unmaps_base_pages<F: Format>() {
    let (_memory, mut frames, mut table) = setup::<F>();
    let base = F::BASE_PAGE;
    let tail = VirtAddr(VMEMMAP.0 + base.bytes());
    table.map(&mut frames, tail, DATA, base, Prot::RW).unwrap().ignore();
    let shared = DATA.add(0x20_0000);
    let (old, flush) = table.remap(tail, shared, Prot::RO).unwrap();
    assert_eq!((old, flush), (DATA, Flush(tail)));
    assert_eq!(table.translate(tail), Some(Translation { pa: shared, size: base, prot: Prot::RO }));
    let (pa, size, flush) = table.unmap(tail).unwrap();
    assert_eq!((pa, size, flush), (shared, base, Flush(tail)));
    assert_eq!(table.translate(tail), None);
    assert_eq!(table.unmap(tail).map(|_| ()), Err(MapError::NotMapped));
    assert_eq!(table.remap(tail, DATA, Prot::RW).map(|_| ()), Err(MapError::NotMapped));
    // Only base pages are remapped.
    let big = VirtAddr(VMEMMAP.0 + (2 << 20));
    table.map(&mut frames, big, DATA, PageSize::Size2M, Prot::RW).unwrap().ignore();
    assert_eq!(table.remap(big, DATA, Prot::RO).map(|_| ()), Err(MapError::SizeNotSupported));
    let (_, size, flush) = table.unmap(VirtAddr(big.0 + 0x1000)).unwrap();
    assert_eq!((size, flush), (PageSize::Size2M, Flush(big)));
}

fn frees_empty_tables_and_keeps_the_root_entries<F: Format>() {
    let (_memory, mut frames, mut table) = setup::<F>();
    let base = F::BASE_PAGE;
    let kept = VirtAddr(VMEMMAP.0 + (1 << 30));
    table.map(&mut frames, VMEMMAP, DATA, base, Prot::RW).unwrap().ignore();
    table.map(&mut frames, kept, DATA, base, Prot::RW).unwrap().ignore();
    let allocated = frames.counters.allocated(Purpose::PageTable);
    table.unmap(VMEMMAP).unwrap().2.ignore();
    let tlb = RecordingTlb::default();
    table.free_empty_tables(&mut frames, &tlb, VMEMMAP, VirtAddr(VMEMMAP.0 + (2 << 20)));
    // The PMD table and the PTE table of the emptied block go; the PUD stays
    // for the other mapping, and the root entry always stays.
    let freed = frames.counters.freed(Purpose::PageTable);
    assert_eq!(freed, (F::table_bytes(2) + F::table_bytes(3)) / base.bytes());
    assert_eq!(tlb.0.borrow().len(), 2);
    assert!(table.block_is_empty(VMEMMAP, PageSize::Size2M));
    assert!(table.translate(kept).is_some());
    assert!(allocated > freed);
    // A second root copies the root entry and sees the kept mapping.
    let mut process = PageTable::<F>::new(&mut frames).unwrap();
    process.copy_top_level(&table, VMEMMAP, kept);
    assert_eq!(process.translate(kept), table.translate(kept));
}

/// Every check above, on one format (each check installs its own memory).
fn every_check<F: Format>() {
    maps_and_reads_back::<F>();
    refuses_bad_maps::<F>();
    splits_a_2m_leaf_into_base_pages::<F>();
    remaps_and_unmaps_base_pages::<F>();
    frees_empty_tables_and_keeps_the_root_entries::<F>();
}

#[test]
fn every_format_the_firmware_builds() {
    every_check::<X86PageTables>();
    every_check::<Vmsav8Descriptors>();
    every_check::<Radix4K>();
    every_check::<Radix64K>();
}
