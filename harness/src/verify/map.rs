//! The vmemmap as the host's walker finds it: runs of vmemmap pages mapped
//! alike, and who maps each frame. Every invariant reads it; none changes it.

use std::collections::HashMap;
use std::ops::Range;

use hvo_abi::manifest::Manifest;
use hvo_images::Arch;

use super::pfns::PfnRange;
use crate::addr::{PhysAddr, VirtAddr};
use crate::memory::GuestMemory;
use crate::pgtable::{self, Leaf, Perms, WalkError, Walker};

/// How one vmemmap page is mapped: by a leaf of `shift` with `perms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageMapping {
    pub shift: u32,
    pub perms: Perms,
}

impl PageMapping {
    pub fn size(&self) -> u64 {
        1 << self.shift
    }
}

/// Consecutive vmemmap pages mapped alike: by one leaf (a 2 MiB leaf is one
/// run of 512 pages of 4 KiB, or 32 of 64 KiB), or by base-page PTEs that
/// all map one frame (a compound page's tails on the shared page) or
/// consecutive frames.
#[derive(Clone, Copy, Debug)]
struct Run {
    va: u64,
    pages: u64,
    /// The frame of page `i` is `pa + i * stride` (stride 0: all one frame).
    pa: u64,
    stride: u64,
    mapping: PageMapping,
    /// The base page size.
    page: u64,
}

impl Run {
    fn end(&self) -> u64 {
        self.va + self.pages * self.page
    }

    fn frame(&self, va: u64) -> PhysAddr {
        PhysAddr(self.pa + (va - self.va) / self.page * self.stride)
    }

    /// Extends the run by a base-page leaf if it continues it.
    fn absorb(&mut self, leaf: &Leaf) -> bool {
        let mapping = PageMapping { shift: leaf.shift, perms: leaf.perms };
        if leaf.size() != self.page || self.mapping != mapping || leaf.va.0 != self.end() {
            return false;
        }
        if self.pages == 1 && (leaf.pa.0 == self.pa || leaf.pa.0 == self.pa + self.page) {
            self.stride = leaf.pa.0 - self.pa;
        } else if leaf.pa.0 != self.pa + self.pages * self.stride {
            return false;
        }
        self.pages += 1;
        true
    }
}

/// The vmemmap as the page tables map it, as runs of pages in VA order, and
/// for every base-page frame mapped how many vmemmap pages map it and where.
pub struct VmemmapMap {
    /// The vmemmap range walked.
    pub start: VirtAddr,
    pub end: VirtAddr,
    /// The base page size the manifest states (the profile's, checked by
    /// `verify-manifest`): the unit of vmemmap pages and frames.
    pub page: u64,
    runs: Vec<Run>,
    /// Frame -> who maps it.
    frames: HashMap<u64, FrameSummary, BuildFrameHasher>,
}

/// Frame numbers hash well by themselves: a multiplicative hash is enough
/// and far cheaper than SipHash over millions of PTEs.
#[derive(Clone, Copy, Default)]
struct FrameHasher(u64);

impl std::hash::Hasher for FrameHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (n >> 12).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type BuildFrameHasher = std::hash::BuildHasherDefault<FrameHasher>;

#[derive(Clone, Copy)]
struct FrameSummary {
    /// Vmemmap pages mapping the frame.
    mappers: u64,
    lowest_va: u64,
    highest_va: u64,
    writable: bool,
}

/// Who maps one frame, for the cost report.
pub(crate) struct FrameUse {
    pub lowest_va: u64,
    pub highest_va: u64,
    pub writable: bool,
}

impl VmemmapMap {
    /// Walks the vmemmap of all RAM and of every region.
    pub fn walk(arch: Arch, manifest: &Manifest, mem: &dyn GuestMemory) -> Result<VmemmapMap, WalkError> {
        let page = manifest.page_size;
        let spans = manifest
            .ram()
            .map(|r| PfnRange::of_bytes(&r, page))
            .chain(manifest.regions.iter().map(PfnRange::with_altmap));
        let pfns = spans.reduce(PfnRange::hull).unwrap_or_default();
        let section = 1u64 << manifest.section_size_bits.min(40);
        // Whole vmemmap pages: with 64 KiB pages a section's struct pages
        // take a quarter of one.
        let (start, end) = pfns.to_sections(section, page).vmemmap(manifest, page);
        let walker = pgtable::walker_for(arch, mem, manifest, start)?;
        VmemmapMap::walk_spans(&walker, mem, &[start..end], page)
    }

    /// Walks the vmemmap pages of `spans` (in address order) through
    /// `walker`, with base pages of `page` bytes. A leaf reaching into two
    /// spans is taken once.
    pub fn walk_spans(
        walker: &Walker,
        mem: &dyn GuestMemory,
        spans: &[Range<VirtAddr>],
        page: u64,
    ) -> Result<VmemmapMap, WalkError> {
        let mut runs: Vec<Run> = Vec::new();
        for span in spans {
            walker.for_each_leaf(mem, span.start, span.end, &mut |leaf| {
                if runs.last().is_some_and(|r| leaf.va.0 < r.end()) {
                    return;
                }
                if runs.last_mut().is_some_and(|r| r.absorb(&leaf)) {
                    return;
                }
                runs.push(Run {
                    va: leaf.va.0,
                    pages: (leaf.size() / page).max(1),
                    pa: leaf.pa.0,
                    stride: page,
                    mapping: PageMapping { shift: leaf.shift, perms: leaf.perms },
                    page,
                });
            })?;
        }
        let mut frames: HashMap<u64, FrameSummary, BuildFrameHasher> = HashMap::default();
        let mut note = |frame: u64, mappers: u64, lowest_va: u64, highest_va: u64, writable: bool| {
            let s = frames.entry(frame).or_insert(FrameSummary { mappers: 0, lowest_va, highest_va, writable });
            s.mappers += mappers;
            s.lowest_va = s.lowest_va.min(lowest_va);
            s.highest_va = s.highest_va.max(highest_va);
            s.writable |= writable;
        };
        for r in &runs {
            let writable = r.mapping.perms.write;
            if r.stride == 0 {
                note(r.pa, r.pages, r.va, r.end() - page, writable);
            } else {
                for i in 0..r.pages {
                    note(r.pa + i * r.stride, 1, r.va + i * page, r.va + i * page, writable);
                }
            }
        }
        let start = spans.first().map(|s| s.start).unwrap_or_default();
        let end = spans.last().map(|s| s.end).unwrap_or_default();
        Ok(VmemmapMap { start, end, page, runs, frames })
    }

    /// How the vmemmap page at `va` is mapped, and the base-page frame it maps.
    pub fn lookup(&self, va: u64) -> Option<(PageMapping, PhysAddr)> {
        let after = self.runs.partition_point(|r| r.va <= va);
        let run = self.runs.get(after.checked_sub(1)?)?;
        (va < run.end()).then(|| (run.mapping, run.frame(va)))
    }

    /// The `n` vmemmap pages from `base`, each with how it is mapped: one
    /// search, then a walk along the runs.
    pub(crate) fn span(&self, base: u64, n: u64) -> Vec<(u64, Option<(PageMapping, PhysAddr)>)> {
        let mut run = self.runs.partition_point(|r| r.end() <= base);
        (0..n)
            .map(|i| {
                let va = base + i * self.page;
                while self.runs.get(run).is_some_and(|r| r.end() <= va) {
                    run += 1;
                }
                let mapped = self.runs.get(run).filter(|r| r.va <= va).map(|r| (r.mapping, r.frame(va)));
                (va, mapped)
            })
            .collect()
    }

    /// How many vmemmap pages map `frame`.
    pub(crate) fn mappers(&self, frame: PhysAddr) -> u64 {
        self.frames.get(&frame.0).map(|s| s.mappers).unwrap_or(0)
    }

    /// Which vmemmap pages map `frame`, and whether any maps it writable.
    pub(crate) fn frame_use(&self, frame: PhysAddr) -> Option<FrameUse> {
        let s = self.frames.get(&frame.0)?;
        Some(FrameUse { lowest_va: s.lowest_va, highest_va: s.highest_va, writable: s.writable })
    }

    /// Distinct base-page frames the vmemmap maps.
    pub fn frames(&self) -> u64 {
        self.frames.len() as u64
    }

    /// Vmemmap pages mapped (base pages; a 2 MiB leaf counts 512 of 4 KiB).
    pub fn ptes(&self) -> u64 {
        self.runs.iter().map(|r| r.pages).sum()
    }

    /// The vmemmap pages mapped in `[start, end)`, in order: VA, mapping, frame.
    pub(crate) fn pages_in(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, PageMapping, PhysAddr)> + '_ {
        let first = self.runs.partition_point(|r| r.end() <= start);
        self.runs[first..].iter().take_while(move |r| r.va < end).flat_map(move |r| {
            (0..r.pages)
                .map(move |i| r.va + i * r.page)
                .filter(move |va| *va >= start && *va < end)
                .map(move |va| (va, r.mapping, r.frame(va)))
        })
    }
}
