//! Physical memory for host tests: a zeroed pool in a Vec standing for the
//! physical range `[start, start + bytes)`, installed for the test's thread
//! (tests run in parallel, each on its own thread with its own pool).

use std::cell::RefCell;

use super::{FrameAccess, PhysAddr, Range, RangeList};

thread_local! {
    static POOL: RefCell<Option<(u64, Vec<u64>)>> = const { RefCell::new(None) };
}

/// The running test's physical memory; dropping it takes the pool away.
pub struct TestMemory {
    range: Range,
}

impl TestMemory {
    pub fn install(start: u64, bytes: u64) -> TestMemory {
        POOL.with_borrow_mut(|pool| *pool = Some((start, vec![0; (bytes / 8) as usize])));
        TestMemory { range: Range::new(start, bytes) }
    }

    /// The pool as boot RAM.
    pub fn ram(&self) -> RangeList {
        let mut ram = RangeList::new();
        ram.push(self.range);
        ram
    }

    /// The word at `pa`.
    pub fn read(pa: PhysAddr) -> u64 {
        // SAFETY: `ptr` checked the address is inside the pool.
        unsafe { Self::ptr(pa).cast::<u64>().read() }
    }
}

impl Drop for TestMemory {
    fn drop(&mut self) {
        POOL.with_borrow_mut(|pool| *pool = None);
    }
}

impl FrameAccess for TestMemory {
    /// Panics on an address outside the pool: the code under test touched
    /// memory it does not own (a leaf's frame, say, which it must never write).
    fn ptr(pa: PhysAddr) -> *mut u8 {
        POOL.with_borrow_mut(|pool| {
            let (start, words) = pool.as_mut().expect("the test installed no TestMemory");
            let offset = pa.0.checked_sub(*start).filter(|o| *o < words.len() as u64 * 8);
            let offset = offset.unwrap_or_else(|| panic!("{pa:?} is outside the test memory"));
            words.as_mut_ptr().cast::<u8>().wrapping_add(offset as usize)
        })
    }
}
