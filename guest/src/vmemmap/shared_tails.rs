//! The shared tail pages: under the unified layout all tails of a
//! (zone, order) map one read-only page of tail struct pages. Each page
//! counts its users (one per compound page mapping it) and goes back to
//! the allocator with its last user.

use hvo_abi::model::{StructPage, Zone};

use super::{VmemmapError, STRUCT_PAGES_PER_PAGE};
use crate::arch::{self, PAGE};
use crate::mm::frames::{FrameAllocator, Purpose};
use crate::mm::PhysAddr;

pub const MAX_SHARED_TAILS: usize = hvo_abi::manifest::MAX_SHARED_TAILS;

/// The page all tails of a (zone, order) map under the unified layout.
#[derive(Clone, Copy, Debug)]
pub struct SharedTail {
    pub pa: PhysAddr,
    pub zone: Zone,
    pub order: u32,
    pub users: u64,
}

pub struct SharedTails {
    tails: [Option<SharedTail>; MAX_SHARED_TAILS],
}

impl SharedTails {
    pub const fn new() -> SharedTails {
        SharedTails { tails: [None; MAX_SHARED_TAILS] }
    }

    pub fn iter(&self) -> impl Iterator<Item = &SharedTail> {
        self.tails.iter().flatten()
    }

    /// The page of (zone, order), of any zone when `any_zone`.
    pub fn find(&self, zone: Zone, order: u32, any_zone: bool) -> Option<PhysAddr> {
        self.iter().find(|t| (any_zone || t.zone == zone) && t.order == order).map(|t| t.pa)
    }

    /// The page of (zone, order) (of any zone when `any_zone`) with one more
    /// user; a new one when there is none, filled for the next order up
    /// when `stale` (the bug knob).
    pub fn get(
        &mut self,
        frames: &mut FrameAllocator,
        zone: Zone,
        order: u32,
        any_zone: bool,
        stale: bool,
    ) -> Result<PhysAddr, VmemmapError> {
        if let Some(t) = self.tails.iter_mut().flatten().find(|t| (any_zone || t.zone == zone) && t.order == order) {
            t.users += 1;
            return Ok(t.pa);
        }
        let slot = self.tails.iter().position(Option::is_none).ok_or(VmemmapError::TooManySharedTails)?;
        let filled_order = if stale { order + 1 } else { order };
        let pa = tail_page(frames, zone, filled_order)?;
        self.tails[slot] = Some(SharedTail { pa, zone, order, users: 1 });
        Ok(pa)
    }

    /// One user fewer for the page of (zone, order); the last user frees it,
    /// unless `leak` (the bug knob) keeps it.
    pub fn put(&mut self, frames: &mut FrameAllocator, zone: Zone, order: u32, leak: bool) {
        for slot in self.tails.iter_mut() {
            if let Some(t) = slot.as_mut().filter(|t| t.zone == zone && t.order == order) {
                t.users -= 1;
                if t.users == 0 && !leak {
                    frames.free(t.pa, PAGE, Purpose::Vmemmap);
                    *slot = None;
                }
                return;
            }
        }
    }
}

/// A fresh vmemmap page holding only tail struct pages of (zone, order).
pub(super) fn tail_page(frames: &mut FrameAllocator, zone: Zone, order: u32) -> Result<PhysAddr, VmemmapError> {
    let pa = frames.alloc(arch::BASE_PAGE, Purpose::Vmemmap)?;
    let words = StructPage::tail(zone, order).to_words();
    let ptr = pa.as_mut_ptr::<u64>();
    for i in 0..STRUCT_PAGES_PER_PAGE as usize {
        for (w, word) in words.iter().enumerate() {
            // SAFETY: a fresh frame of ours, identity-mapped.
            unsafe { ptr.add(i * 8 + w).write_volatile(*word) };
        }
    }
    Ok(pa)
}
