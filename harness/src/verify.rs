//! The verifier: docs/design.md's invariants, computed from the guest's page tables
//! (walked by the host's own walker), its memory and its manifest. Nothing
//! here trusts the guest's page-table code; the manifest only says what the
//! guest claims to have built, and every claim is checked against the tables.
//!
//! Each invariant the tables alone decide is one function in [`STATIC`], over
//! one shared [`Context`]; the live ones (translation-agrees, write-faults)
//! need QEMU and are the runner's.

mod aligned;
mod compound;
mod contents;
mod costs;
mod counts;
mod findings;
pub mod live;
mod map;
mod pfns;
mod plain;
mod presence;
pub mod probes;
mod tails;

use std::collections::HashMap;

use hvo_abi::manifest::{Manifest, Region};
use hvo_abi::model::{Layout, RegionKind, STRUCT_PAGE_SIZE};
use hvo_images::Arch;

use crate::invariant::Invariant;
use crate::memory::GuestMemory;
use crate::pgtable::WalkError;
use crate::report::Check;

pub(crate) use compound::CompoundView;
pub use costs::{compound_cost, dump, region_costs, size_name, CompoundCost, RegionCost};
pub(crate) use findings::Findings;
pub use map::{PageMapping, VmemmapMap};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("walking the vmemmap: {0}")]
    Walk(#[from] WalkError),
}

/// The layout the scenario last asked of each region, by region id: `none`
/// for HugeTLB folios never optimized or restored since.
pub type Requested = HashMap<u32, Layout>;

/// Vmemmap pages one compound page of `order` fills; 0 when its struct pages
/// take less than a page (2 MiB with 64 KiB pages: 2 KiB), and it shares its
/// one vmemmap page with its neighbours.
pub fn vmemmap_pages_per_compound(order: u32, page: u64) -> u64 {
    (1u64 << order) * STRUCT_PAGE_SIZE / page
}

/// Byte ranges the scenario hot-added as memory, removed ones too: a 2 MiB
/// vmemmap leaf their memmap populated outlives them while a device range
/// beside them keeps struct pages in it.
pub type HotAddedMemory = [std::ops::Range<u64>];

/// What every static check reads: the guest's claims, its memory, the
/// vmemmap as walked, and what the scenario asked of each region.
struct Context<'a> {
    arch: Arch,
    manifest: &'a Manifest,
    mem: &'a dyn GuestMemory,
    map: &'a VmemmapMap,
    requested: &'a Requested,
    compounds: Vec<compound::Compound<'a>>,
}

impl Context<'_> {
    /// Regions of compound pages: all but hot-added memory.
    fn compound_regions(&self) -> impl Iterator<Item = &Region> + '_ {
        compound_regions(self.manifest)
    }

    /// Every compound page of those regions, in order.
    fn compounds(&self) -> impl Iterator<Item = &compound::Compound<'_>> + '_ {
        self.compounds.iter()
    }
}

/// Regions of compound pages: all but hot-added memory, which holds plain
/// pages (accounting and no-leak cover its vmemmap).
fn compound_regions(manifest: &Manifest) -> impl Iterator<Item = &Region> + '_ {
    manifest.regions.iter().filter(|r| r.kind != RegionKind::Memory)
}

/// One invariant's check: pushes its findings, fails only when the tables
/// cannot be walked at all.
type CheckFn = fn(&Context, &mut Findings) -> Result<(), VerifyError>;

/// Every invariant the page tables decide, with its check, in report order.
const STATIC: [(Invariant, CheckFn); 11] = [
    (Invariant::HeadPrivate, compound::head_private),
    (Invariant::TailsShared, tails::tails_shared),
    (Invariant::TailsReadonly, compound::tails_readonly),
    (Invariant::PteGranularity, compound::pte_granularity),
    (Invariant::Contents, contents::contents),
    (Invariant::Accounting, counts::accounting),
    (Invariant::NoLeak, counts::no_leak),
    (Invariant::RootsInSync, presence::roots_in_sync),
    (Invariant::MemmapPresent, presence::memmap_present),
    (Invariant::AltmapUnoptimized, presence::altmap_unoptimized),
    (Invariant::CompoundAligned, aligned::compound_aligned),
];

/// Checks every static invariant (all but those needing the live guest).
/// Regions in `requested` must also be optimized exactly when the host's own
/// arithmetic says they can be; `memory` is where the scenario hot-added
/// memory.
pub fn check(
    arch: Arch,
    manifest: &Manifest,
    mem: &dyn GuestMemory,
    requested: &Requested,
    memory: &HotAddedMemory,
) -> Result<(Vec<Check>, VmemmapMap), VerifyError> {
    let map = VmemmapMap::walk(arch, manifest, mem)?;
    let compounds = compound::every_compound(manifest, &map, memory);
    let ctx = Context { arch, manifest, mem, map: &map, requested, compounds };
    let mut checks = Vec::with_capacity(STATIC.len());
    for (invariant, run) in STATIC {
        let mut findings = Findings::default();
        run(&ctx, &mut findings)?;
        checks.push(findings.into_check(invariant));
    }
    Ok((checks, map))
}

#[cfg(test)]
mod tests;
