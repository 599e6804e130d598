//! Device DAX ranges created at run time, as Linux creates them from a
//! pmem namespace: an info block, in mode pmem the memmap of the whole
//! namespace (the altmap), then the data aligned to the device's compound
//! pages; the namespace's vmemmap laid out as the kernel lays it out, and
//! `nr_memmap_pages` grown by the rule of a fixed kernel or by the
//! unoptimized size older kernels count.

use std::ops::Range;

use hvo_abi::model::{Layout, Zone, STRUCT_PAGE_SIZE};

use super::KernelVmemmap;
use crate::addr::Pfn;
use crate::kernel::verify::DaxRange;

/// The namespace's info block, ahead of everything (nd_pfn's `SZ_8K`).
const INFO_BLOCK: u64 = 8 << 10;

/// Where a device keeps its struct pages (ndctl's `--map`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaxMode {
    /// In system memory.
    Ram,
    /// On the device, between the info block and the data (the altmap).
    Pmem,
}

/// How the kernel counts a DAX range's memmap in `nr_memmap_pages`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaxCounting {
    /// What it maps: `VMEMMAP_RESERVE_NR` pages per optimized compound page
    /// (`section_nr_vmemmap_pages`), the memmap's size where not optimized.
    Fixed,
    /// The memmap's size, optimized or not (Linux before "mm/sparse-vmemmap:
    /// Fix DAX vmemmap accounting with optimization").
    Unoptimized,
}

/// A device DAX range to create.
#[derive(Clone, Debug)]
pub struct DaxSpec {
    pub name: String,
    pub namespace_bytes: u64,
    /// The device's `align`.
    pub compound_bytes: u64,
    pub mode: DaxMode,
    /// How the kernel lays optimizable compound pages out: `LegacyDax`,
    /// `Unified`, or `None` (a kernel not optimizing DAX). Devices Linux
    /// cannot optimize are left unoptimized whatever this says.
    pub layout: Layout,
    pub counting: DaxCounting,
}

impl DaxSpec {
    /// A device in mode ram, laid out as legacy DAX, counted as fixed kernels count.
    pub fn new(name: &str, namespace_bytes: u64, compound_bytes: u64) -> DaxSpec {
        DaxSpec {
            name: name.to_string(),
            namespace_bytes,
            compound_bytes,
            mode: DaxMode::Ram,
            layout: Layout::LegacyDax,
            counting: DaxCounting::Fixed,
        }
    }
}

impl KernelVmemmap {
    /// Creates a device DAX range and returns its index.
    pub fn add_dax(&mut self, spec: DaxSpec) -> usize {
        let page = self.format.page;
        let cp = spec.compound_bytes;
        let ns_pfns = spec.namespace_bytes / page;
        let memmap = match spec.mode {
            DaxMode::Ram => 0,
            DaxMode::Pmem => ns_pfns * STRUCT_PAGE_SIZE,
        };
        let offset = (INFO_BLOCK + memmap).div_ceil(cp) * cp;
        let start = self.place(spec.namespace_bytes);
        let namespace = start..start + ns_pfns;
        let data = start + offset / page..namespace.end;
        let altmap = (spec.mode == DaxMode::Pmem).then_some(namespace.start..data.start);
        let n = cp / page * STRUCT_PAGE_SIZE / page;
        let optimized = spec.layout != Layout::None && altmap.is_none() && n > 2;
        let heads: Vec<Pfn> = (namespace.start.0..namespace.end.0).step_by((cp / page) as usize).map(Pfn).collect();
        if !optimized {
            match &altmap {
                Some(a) => {
                    let mut next = a.start.0 + INFO_BLOCK.div_ceil(page);
                    self.map_runtime_memmap(&namespace, |_| {
                        next += 1;
                        (next - 1) * page
                    });
                }
                None => self.map_runtime_memmap(&namespace, |k| k.fresh_frame()),
            }
        } else {
            for &head in &heads {
                self.lay_out(head, n, cp, spec.layout);
            }
        }
        let private = if spec.layout == Layout::Unified { 1 } else { 2 };
        for chunk in self.section_chunks(&namespace) {
            let size = ((chunk.end.0 - chunk.start.0) * STRUCT_PAGE_SIZE).div_ceil(page);
            self.runtime_counted += match (spec.counting, optimized) {
                (DaxCounting::Fixed, true) => private * heads.iter().filter(|h| chunk.contains(h)).count() as u64,
                _ => size,
            };
        }
        self.dax.push(DaxRange { name: spec.name, namespace, data, compound_bytes: cp, altmap, expected: None });
        self.dax.len() - 1
    }

    /// One optimized compound page's vmemmap: a private head, then legacy
    /// DAX's private page 1 that the rest map writable, or unified's shared
    /// page of (device zone, order) read-only.
    fn lay_out(&mut self, head: Pfn, n: u64, cp: u64, layout: Layout) {
        let head_frame = self.fresh_frame();
        self.map(self.vmemmap_page(head, 0), head_frame, true);
        self.frames.runtime.insert(head_frame);
        let (tail, writable, first) = match layout {
            Layout::Unified => (self.dax_shared_tail(cp), false, 1),
            _ => {
                let page1 = self.fresh_frame();
                self.frames.runtime.insert(page1);
                (page1, true, 1)
            }
        };
        for i in first..n {
            self.map(self.vmemmap_page(head, i), tail, writable);
        }
    }

    /// `pfns` split at section boundaries: the pieces `section_activate`
    /// is called for.
    fn section_chunks(&self, pfns: &Range<Pfn>) -> Vec<Range<Pfn>> {
        let per = self.section() / self.format.page;
        let mut out = Vec::new();
        let mut at = pfns.start.0;
        while at < pfns.end.0 {
            let next = ((at / per + 1) * per).min(pfns.end.0);
            out.push(Pfn(at)..Pfn(next));
            at = next;
        }
        out
    }

    /// The shared tail page of device compound pages of `bytes`.
    pub fn dax_shared_tail(&mut self, bytes: u64) -> u64 {
        self.zone_shared_tail(Zone::Device, bytes)
    }

    /// The DAX range of index `i`, as the view will show it.
    pub fn dax(&self, i: usize) -> &DaxRange {
        &self.dax[i]
    }

    /// The DAX range of index `i`, to set what the scenario expects.
    pub fn dax_mut(&mut self, i: usize) -> &mut DaxRange {
        &mut self.dax[i]
    }
}
