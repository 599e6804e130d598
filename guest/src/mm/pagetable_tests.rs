//! Host tests of the mapper over each format the firmware builds, reading
//! back the entries it wrote.

use std::cell::RefCell;

use super::*;
use crate::formats::aarch64::Vmsav8Descriptors;
use crate::formats::powerpc64::{Radix4K, Radix64K};
use crate::formats::x86_64::X86PageTables;
use crate::mm::frames::Purpose;
use crate::mm::test_memory::TestMemory;
use crate::mm::{update_log, RangeList};
use hvo_abi::update_log::{InvalidationForm, RecordKind};

/// Remembers every invalidation asked for, and logs it as the firmware's do.
#[derive(Default)]
struct RecordingTlb(RefCell<Vec<Invalidation>>);

impl Tlb for RecordingTlb {
    fn invalidate(&self, what: Invalidation) {
        self.0.borrow_mut().push(what);
        update_log::record_invalidation(InvalidationForm::X86Invlpg, what.va.0, 0, what.va, what.size.bytes());
    }
}

fn translation(va: VirtAddr, size: PageSize) -> Invalidation {
    Invalidation { va, size, cached: Cached::Translation }
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
        let raw = load::<F>(PageTable::<F>::slot(at, level, va));
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
    assert_eq!((flush.invalidation(), flush.breaks()), (translation(VMEMMAP, base), false));
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
    let flush = table.split(&mut frames, inside, Sequence::Architecture).unwrap().unwrap();
    assert_eq!(flush.invalidation(), translation(VMEMMAP, PageSize::Size2M));
    // Where the architecture asks for it, the block is invalid until the flush.
    assert_eq!(flush.breaks(), F::BREAK_BEFORE_MAKE);
    assert_eq!(table.translate(inside).is_none(), F::BREAK_BEFORE_MAKE);
    flush.flush(&RecordingTlb::default());
    assert_eq!(frames.counters.allocated(Purpose::PageTable) - before, F::table_bytes(3) / base.bytes());
    for i in 0..PageSize::Size2M.bytes() / base.bytes() {
        let va = VirtAddr(VMEMMAP.0 + i * base.bytes());
        let (raw, level) = raw_leaf(&table, va).unwrap();
        assert_eq!(level, F::LEVELS - 1);
        assert_eq!(F::decode(raw, level), Entry::Leaf { pa: DATA.add(i * base.bytes()), prot: Prot::RO });
    }
    // Already base pages: nothing to do.
    assert_eq!(table.split(&mut frames, inside, Sequence::Architecture), Ok(None));
    let elsewhere = VirtAddr(VMEMMAP.0 + (4 << 20));
    assert_eq!(table.split(&mut frames, elsewhere, Sequence::Architecture), Err(MapError::NotMapped));
}

fn remaps_and_unmaps_base_pages<F: Format>() {
    let (_memory, mut frames, mut table) = setup::<F>();
    let base = F::BASE_PAGE;
    let tail = VirtAddr(VMEMMAP.0 + base.bytes());
    table.map(&mut frames, tail, DATA, base, Prot::RW).unwrap().ignore();
    let shared = DATA.add(0x20_0000);
    let (old, flush) = table.remap(VirtAddr(tail.0 + 8), shared, Prot::RO, Sequence::Architecture).unwrap();
    assert_eq!((old, flush.invalidation()), (DATA, translation(tail, base)));
    flush.flush(&RecordingTlb::default());
    assert_eq!(table.translate(tail), Some(Translation { pa: shared, size: base, prot: Prot::RO }));
    let (pa, size, flush) = table.unmap(tail).unwrap();
    assert_eq!((pa, size, flush.invalidation(), flush.breaks()), (shared, base, translation(tail, base), false));
    flush.ignore();
    assert_eq!(table.translate(tail), None);
    assert_eq!(table.unmap(tail).map(|_| ()), Err(MapError::NotMapped));
    assert_eq!(table.remap(tail, DATA, Prot::RW, Sequence::Architecture).map(|_| ()), Err(MapError::NotMapped));
    // Only base pages are remapped.
    let big = VirtAddr(VMEMMAP.0 + (2 << 20));
    table.map(&mut frames, big, DATA, PageSize::Size2M, Prot::RW).unwrap().ignore();
    assert_eq!(table.remap(big, DATA, Prot::RO, Sequence::Architecture).map(|_| ()), Err(MapError::SizeNotSupported));
    let (_, size, flush) = table.unmap(VirtAddr(big.0 + 0x1000)).unwrap();
    assert_eq!((size, flush.invalidation()), (PageSize::Size2M, translation(big, PageSize::Size2M)));
    flush.ignore();
}

/// The stores and invalidations the log holds for the current command:
/// `(entry, old, new)` for each store, the invalidated address for each
/// invalidation.
fn logged() -> Vec<(u64, u64, u64)> {
    let (_, records) = update_log::current();
    let mut out = Vec::new();
    for r in records {
        if r.kind == RecordKind::Store as u32 {
            let [entry, old, new, step] = r.words;
            out.extend((0..u64::from(r.detail)).map(|i| (entry + 8 * i, old, new + i * step)));
        } else {
            out.push((r.words[0], u64::MAX, u64::MAX));
        }
    }
    out
}

fn remaps_in_the_architecture_sequence<F: Format>() {
    let (_memory, mut frames, mut table) = setup::<F>();
    let base = F::BASE_PAGE;
    table.map(&mut frames, VMEMMAP, DATA, base, Prot::RW).unwrap().ignore();
    let (slot, _) = table.find_leaf(VMEMMAP).unwrap();
    let before = load::<F>(slot);
    let shared = DATA.add(0x20_0000);
    update_log::begin_command();
    let (_, flush) = table.remap(VMEMMAP, shared, Prot::RO, Sequence::Architecture).unwrap();
    flush.flush(&RecordingTlb::default());
    let after = load::<F>(slot);
    let invalidated = (VMEMMAP.0, u64::MAX, u64::MAX);
    let expected = if F::BREAK_BEFORE_MAKE {
        vec![(slot.0, before, 0), invalidated, (slot.0, 0, after)]
    } else {
        vec![(slot.0, before, after), invalidated]
    };
    assert_eq!(logged(), expected);
    // The knob's single store, whatever the architecture asks.
    update_log::begin_command();
    let (_, flush) = table.remap(VMEMMAP, DATA, Prot::RW, Sequence::SingleStore).unwrap();
    assert!(!flush.breaks());
    flush.flush(&RecordingTlb::default());
    assert_eq!(logged(), vec![(slot.0, after, before), invalidated]);
    // A flush ignored after a break still writes the entry, uninvalidated.
    update_log::begin_command();
    let (_, flush) = table.remap(VMEMMAP, shared, Prot::RO, Sequence::Architecture).unwrap();
    flush.ignore();
    assert_eq!(table.translate(VMEMMAP).map(|t| t.pa), Some(shared));
    assert!(logged().iter().all(|&(_, old, _)| old != u64::MAX), "no invalidation logged");
    // A run: the split's fill of the new table is one record.
    update_log::begin_command();
    let block = VirtAddr(VMEMMAP.0 + (2 << 20));
    table.map(&mut frames, block, DATA, PageSize::Size2M, Prot::RW).unwrap().ignore();
    update_log::begin_command();
    table.split(&mut frames, block, Sequence::Architecture).unwrap().unwrap().flush(&RecordingTlb::default());
    let (_, records) = update_log::current();
    let fill = records[0];
    assert_eq!(fill.kind, RecordKind::Store as u32);
    assert_eq!(u64::from(fill.detail), PageSize::Size2M.bytes() / base.bytes());
    assert_eq!(fill.words[3], base.bytes(), "each entry maps the next base page");
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
    let asked = tlb.0.borrow().clone();
    assert_eq!(asked.len(), 2);
    assert!(asked.iter().all(|i| i.cached == Cached::Walk), "{asked:?}");
    assert!(table.block_is_empty(VMEMMAP, PageSize::Size2M));
    assert!(table.translate(kept).is_some());
    assert!(allocated > freed);
    // A second root copies the root entry and sees the kept mapping.
    let mut process = PageTable::<F>::new(&mut frames).unwrap();
    process.copy_top_level(&table, VMEMMAP, kept);
    assert_eq!(process.translate(kept), table.translate(kept));
}

/// Copying the whole address space's root entries stores each one the second
/// root lacks exactly once: the range wraps the root many times over, and
/// the empty entries are not stores at all.
fn copies_each_root_entry_once<F: Format>() {
    let (_memory, mut frames, mut table) = setup::<F>();
    table.map(&mut frames, VMEMMAP, DATA, F::BASE_PAGE, Prot::RW).unwrap().ignore();
    table.map(&mut frames, VirtAddr(0x4000_0000), DATA, F::BASE_PAGE, Prot::RW).unwrap().ignore();
    let mut process = PageTable::<F>::new(&mut frames).unwrap();
    update_log::begin_command();
    process.copy_top_level(&table, VirtAddr(0), VirtAddr(u64::MAX));
    let (len, records) = update_log::current();
    assert_eq!(len, 2, "{records:?}");
    assert!(records.iter().all(|r| r.kind == RecordKind::Store as u32 && r.detail == 1), "{records:?}");
    assert_eq!(process.translate(VMEMMAP), table.translate(VMEMMAP));
    // Nothing left to copy: nothing stored.
    update_log::begin_command();
    process.copy_top_level(&table, VirtAddr(0), VirtAddr(u64::MAX));
    assert_eq!(update_log::current().0, 0);
}

/// Every check above, on one format (each check installs its own memory).
fn every_check<F: Format>() {
    maps_and_reads_back::<F>();
    refuses_bad_maps::<F>();
    splits_a_2m_leaf_into_base_pages::<F>();
    remaps_and_unmaps_base_pages::<F>();
    remaps_in_the_architecture_sequence::<F>();
    frees_empty_tables_and_keeps_the_root_entries::<F>();
    copies_each_root_entry_once::<F>();
}

#[test]
fn every_format_the_firmware_builds() {
    every_check::<X86PageTables>();
    every_check::<Vmsav8Descriptors>();
    every_check::<Radix4K>();
    every_check::<Radix64K>();
}
