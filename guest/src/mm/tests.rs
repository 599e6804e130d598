//! Host tests of the range list and the frame allocator.

use super::frames::{AllocError, FrameAllocator, Purpose};
use super::test_memory::TestMemory;
use super::{PageSize, Pfn, PhysAddr, Range, RangeList};

fn list(ranges: &[(u64, u64)]) -> RangeList {
    let mut l = RangeList::new();
    for &(start, end) in ranges {
        l.push(Range { start, end });
    }
    l
}

fn ranges(l: &RangeList) -> Vec<(u64, u64)> {
    l.iter().map(|r| (r.start, r.end)).collect()
}

#[test]
fn range_list_merges_overlapping_and_touching_ranges_and_keeps_order() {
    let l = list(&[(0x5000, 0x6000), (0x1000, 0x2000), (0x2000, 0x3000), (0x8000, 0x9000), (0x5800, 0x7000)]);
    assert_eq!(ranges(&l), [(0x1000, 0x3000), (0x5000, 0x7000), (0x8000, 0x9000)]);
    // One range bridging two merges all three.
    let mut l = l;
    l.push(Range { start: 0x2800, end: 0x8000 });
    assert_eq!(ranges(&l), [(0x1000, 0x9000)]);
}

#[test]
fn range_list_ignores_empty_ranges() {
    let l = list(&[(0x1000, 0x1000), (0x3000, 0x2000)]);
    assert_eq!(l.len(), 0);
}

#[test]
fn range_list_remove_splits_and_trims() {
    let mut l = list(&[(0x1000, 0x9000), (0xa000, 0xc000)]);
    l.remove(Range { start: 0x3000, end: 0x4000 });
    assert_eq!(ranges(&l), [(0x1000, 0x3000), (0x4000, 0x9000), (0xa000, 0xc000)]);
    // Across a gap: the end of one and the start of the next go.
    l.remove(Range { start: 0x8000, end: 0xb000 });
    assert_eq!(ranges(&l), [(0x1000, 0x3000), (0x4000, 0x8000), (0xb000, 0xc000)]);
    // Outside everything: nothing changes.
    l.remove(Range { start: 0x10_0000, end: 0x20_0000 });
    assert_eq!(l.len(), 3);
}

#[test]
fn ranges_overlap_only_when_they_share_a_byte() {
    let r = Range::new(0x1000, 0x1000);
    assert!(r.overlaps(&Range::new(0x1fff, 1)));
    assert!(!r.overlaps(&Range::new(0x2000, 0x1000)));
    assert!(!r.overlaps(&Range::new(0, 0x1000)));
    assert!(r.contains(0x1000) && !r.contains(0x2000));
}

const RAM: u64 = 0x4000_0000;
const RAM_BYTES: u64 = 1 << 20;
/// The allocator keeps its recycled-frame stack in the first 64 KiB it bumps.
const STACK: u64 = 64 * 1024;

/// A test memory of `RAM_BYTES` at `RAM`, and an allocator over it with 4 KiB frames.
fn allocator(reserved: &[(u64, u64)]) -> (TestMemory, FrameAllocator) {
    let memory = TestMemory::install(RAM, RAM_BYTES);
    let frames = FrameAllocator::new(&memory.ram(), &list(reserved), PageSize::Size4K);
    (memory, frames)
}

#[test]
fn allocations_are_aligned_zeroed_outside_reservations_and_counted() {
    let reserved = Range::new(RAM + STACK, 0x3000);
    let (_memory, mut frames) = allocator(&[(reserved.start, reserved.end)]);
    let mut seen = Vec::new();
    for _ in 0..8 {
        let pa = frames.alloc(PageSize::Size4K, Purpose::PageTable).unwrap();
        assert!(pa.is_aligned(PageSize::Size4K));
        assert!(!reserved.contains(pa.0), "{pa:?} is reserved");
        assert_eq!(TestMemory::read(pa), 0);
        seen.push(pa);
    }
    let big = frames.alloc(PageSize::Size64K, Purpose::Vmemmap).unwrap();
    assert!(big.is_aligned(PageSize::Size64K));
    assert!(seen.iter().all(|pa| !Range::new(big.0, 0x10000).contains(pa.0)));
    assert_eq!(frames.counters.allocated(Purpose::PageTable), 8);
    assert_eq!(frames.counters.allocated(Purpose::Vmemmap), 16);
}

#[test]
fn a_freed_frame_is_handed_out_again_zeroed() {
    let (_memory, mut frames) = allocator(&[]);
    let pa = frames.alloc(PageSize::Size4K, Purpose::Vmemmap).unwrap();
    // SAFETY: the frame is ours, inside the test memory.
    unsafe { pa.as_mut_ptr::<u64>().write(0xdead) };
    frames.free(pa, 0x1000, Purpose::Vmemmap);
    assert_eq!(frames.alloc(PageSize::Size4K, Purpose::Vmemmap), Ok(pa));
    assert_eq!(TestMemory::read(pa), 0);
    assert_eq!(frames.counters.freed(Purpose::Vmemmap), 1);
}

#[test]
fn a_freed_block_goes_back_whole() {
    let (_memory, mut frames) = allocator(&[]);
    let block = frames.alloc_data(0x40000, 0x40000, Purpose::HugeTlb).unwrap();
    frames.free(block, 0x40000, Purpose::HugeTlb);
    assert_eq!(frames.counters.freed(Purpose::HugeTlb), 0x40);
    assert_eq!(frames.alloc_data(0x40000, 0x40000, Purpose::HugeTlb), Ok(block));
}

#[test]
fn the_allocator_runs_out_after_every_free_frame() {
    let (_memory, mut frames) = allocator(&[(RAM + RAM_BYTES - 0x2000, RAM + RAM_BYTES)]);
    let expected = (RAM_BYTES - STACK - 0x2000) / 0x1000;
    let mut handed_out = 0;
    while frames.alloc(PageSize::Size4K, Purpose::PageTable).is_ok() {
        handed_out += 1;
    }
    assert_eq!(handed_out, expected);
    assert_eq!(frames.alloc(PageSize::Size4K, Purpose::PageTable), Err(AllocError::OutOfMemory));
}

#[test]
fn injected_failure_hits_the_nth_allocation_once() {
    let (_memory, mut frames) = allocator(&[]);
    frames.fail_nth(2);
    assert!(frames.alloc(PageSize::Size4K, Purpose::Vmemmap).is_ok());
    assert_eq!(frames.alloc(PageSize::Size4K, Purpose::Vmemmap), Err(AllocError::Injected));
    assert!(frames.alloc(PageSize::Size4K, Purpose::Vmemmap).is_ok());
    assert_eq!(frames.counters.allocated(Purpose::Vmemmap), 2);
    frames.fail_nth(1);
    frames.fail_nth(0);
    assert!(frames.alloc_data(0x2000, 0x1000, Purpose::HugeTlb).is_ok());
}

#[test]
fn the_counter_knob_forgets_only_vmemmap_frees() {
    let (_memory, mut frames) = allocator(&[]);
    frames.forget_vmemmap_frees = true;
    let a = frames.alloc(PageSize::Size4K, Purpose::Vmemmap).unwrap();
    let b = frames.alloc(PageSize::Size4K, Purpose::PageTable).unwrap();
    frames.free(a, 0x1000, Purpose::Vmemmap);
    frames.free(b, 0x1000, Purpose::PageTable);
    assert_eq!(frames.counters.freed(Purpose::Vmemmap), 0);
    assert_eq!(frames.counters.freed(Purpose::PageTable), 1);
}

#[test]
fn taking_memory_needs_all_of_it_free() {
    let (_memory, mut frames) = allocator(&[]);
    let tail = Range::new(RAM + RAM_BYTES - 0x10000, 0x10000);
    assert_eq!(frames.take(tail), Ok(()));
    assert_eq!(frames.take(tail), Err(AllocError::OutOfMemory));
    // What was taken is never handed out.
    while let Ok(pa) = frames.alloc(PageSize::Size4K, Purpose::PageTable) {
        assert!(!tail.contains(pa.0));
    }
    assert_eq!(frames.take(Range::new(PhysAddr(RAM).0, 0x1000)), Err(AllocError::OutOfMemory));
}

#[test]
fn frame_numbers_convert_in_the_page_size_they_name() {
    let pa = PhysAddr(0x4_0001_2345);
    assert_eq!(Pfn::containing(pa, PageSize::Size4K), Pfn(0x40_0012));
    assert_eq!(Pfn::containing(pa, PageSize::Size64K), Pfn(0x4_0001));
    assert_eq!(Pfn(0x4_0001).start(PageSize::Size64K), PhysAddr(0x4_0001_0000));
    assert_eq!(Pfn(7).add(3).pages_since(Pfn(7)), 3);
    assert_eq!(Pfn(7).sub(3), Pfn(4));
    assert_eq!(Pfn(2).up_to(Pfn(5)).collect::<Vec<_>>(), [Pfn(2), Pfn(3), Pfn(4)]);
}
