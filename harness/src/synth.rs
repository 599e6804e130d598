//! Hand-built guest memories for the verifier's unit tests and benchmarks:
//! page tables in each format the host walks (x86_64 4-level, arm64 4 KiB
//! TTBR1, ppc64 radix with 4 KiB and 64 KiB pages), written from the
//! architecture manuals (nothing of the guest's mapper), over a vmemmap laid
//! out as the guest lays it out, with the manifest that describes it.
//!
//! The builder counts as a correct guest counts: every vmemmap frame it
//! allocates, every table, and every frame that no vmemmap page maps any
//! more as freed. A test breaks one thing on purpose and nothing else.

mod format;
pub mod kernel;
mod regions;

use std::collections::HashMap;

use hvo_abi::manifest::{GuestState, RawManifest, RawRange, RawRoot, RootKind};
use hvo_abi::model::{Layout, RegionKind, StructPage, Zone, STRUCT_PAGE_SIZE};
use hvo_abi::Arch;

use crate::addr::{Pfn, PhysAddr};
use crate::memory::SparseMemory;
use format::{Format, BLOCK_LEVEL};
pub use regions::BuiltRegion;

/// A region to build: `count` compound pages of `order`, laid out under
/// `layout` (`none`: not optimized), their private vmemmap pages on the
/// device when `altmap`.
#[derive(Clone, Copy, Debug)]
pub struct RegionSpec {
    pub kind: RegionKind,
    pub zone: Zone,
    pub order: u32,
    pub count: u64,
    pub layout: Layout,
    pub altmap: bool,
}

/// A vmemmap being built: page tables and frames in a sparse memory, and the
/// manifest counting them.
pub struct SynthVmemmap {
    pub mem: SparseMemory,
    format: Format,
    raw: RawManifest,
    root: u64,
    process_root: u64,
    next_frame: u64,
    /// Where the next region may start.
    next_pfn: u64,
    /// Entries pointing at a table the builder made: entry address -> table.
    tables: HashMap<u64, u64>,
    /// Base-page leaves: vmemmap address -> frame.
    leaves: HashMap<u64, u64>,
    /// System-memory vmemmap frames -> vmemmap pages mapping them.
    users: HashMap<u64, u64>,
}

impl SynthVmemmap {
    /// An empty vmemmap in `arch`'s format over boot RAM whose memmap fills
    /// 8 vmemmap pages (2 MiB of RAM with 4 KiB pages), all mapped; a
    /// process root carries the kernel's top-level entries.
    pub fn new(arch: Arch) -> SynthVmemmap {
        let format = Format::of(arch);
        let page = format.page;
        let mut raw = RawManifest::booting(arch);
        raw.state = GuestState::Ready as u32;
        raw.page_size = page;
        raw.linear_map_base = format.linear_map_base;
        raw.vmemmap_base = format.vmemmap_base;
        raw.section_size_bits = format.section_size_bits;
        raw.memstart_pfn = format.memstart_pfn;
        let ram_pages = 8 * page / STRUCT_PAGE_SIZE;
        raw.ram_count = 1;
        raw.ram[0] = RawRange { start: format.ram_base, size: ram_pages * page };
        let mut s = SynthVmemmap {
            mem: SparseMemory::new(),
            format,
            raw,
            root: 0,
            process_root: 0,
            // Frames come from 1 GiB above RAM's start, regions from 64 GiB:
            // far from each other and from boot RAM.
            next_frame: format.ram_base + (1 << 30),
            next_pfn: (format.ram_base + (64 << 30)) / page,
            tables: HashMap::new(),
            leaves: HashMap::new(),
            users: HashMap::new(),
        };
        s.root = s.table(0);
        s.process_root = s.table(0);
        s.add_root(RootKind::Kernel, s.root);
        s.add_root(RootKind::Process, s.process_root);
        if format.has_process_table() {
            // The process table is the hypervisor's to read, not a page table.
            let table = s.frames(1);
            s.write_entry(table, format.process_table_entry(s.root));
            s.add_root(RootKind::ProcessTable, table);
        }
        let first = Pfn::containing(PhysAddr(format.ram_base), page);
        for i in 0..8 {
            let frame = s.vmemmap_frame(&[StructPage::free(Zone::Normal)]);
            s.map(s.va(first) / page * page + i * page, frame, true);
        }
        s
    }

    /// The base page size.
    pub fn page(&self) -> u64 {
        self.format.page
    }

    /// The compound order worth optimizing with this page size (2 MiB or 1 GiB).
    pub fn order(&self) -> u32 {
        self.format.order
    }

    /// The struct page address of `pfn`.
    pub fn va(&self, pfn: Pfn) -> u64 {
        self.format.vmemmap_base + (pfn.0 - self.format.memstart_pfn) * STRUCT_PAGE_SIZE
    }

    fn add_root(&mut self, kind: RootKind, pa: u64) {
        let n = self.raw.root_count as usize;
        self.raw.roots[n] = RawRoot { kind: kind as u32, _reserved: 0, pa };
        self.raw.root_count += 1;
    }

    /// `n` consecutive fresh frames, zeroed.
    fn frames(&mut self, n: u64) -> u64 {
        let f = self.next_frame;
        self.next_frame += n * self.format.page;
        self.mem.write(PhysAddr(f), &vec![0u8; (n * self.format.page) as usize]);
        f
    }

    /// A table for `level`, counted in frames as the guest counts them
    /// (every table takes whole frames: a radix root of 64 KiB takes 16 of 4 KiB).
    fn table(&mut self, level: usize) -> u64 {
        let n = self.format.table_bytes(level).div_ceil(self.format.page);
        self.raw.counters.pagetable_allocated += n;
        self.frames(n)
    }

    /// A table frame allocated and counted, but reachable from no root.
    pub fn leak_table(&mut self) {
        self.table(BLOCK_LEVEL);
    }

    /// A page-table page linked over the vmemmap past every region, mapping
    /// nothing: what a teardown that forgets to free empty tables leaves.
    pub fn link_empty_table(&mut self) {
        let block = self.format.span(BLOCK_LEVEL);
        let va = (self.va(Pfn(self.next_pfn)) / block + 1) * block;
        self.table_for(va, self.format.levels.len() - 1);
    }

    /// The bytes of a vmemmap page of these struct pages, the last repeated
    /// to fill it.
    fn page_bytes(&self, pages: &[StructPage]) -> Vec<u8> {
        let per_page = (self.format.page / STRUCT_PAGE_SIZE) as usize;
        let last = pages.last().copied().unwrap_or_default();
        (0..per_page)
            .flat_map(|i| pages.get(i).copied().unwrap_or(last).to_words())
            .flat_map(u64::to_le_bytes)
            .collect()
    }

    /// A system-memory vmemmap frame holding `pages`, counted as the guest counts.
    pub fn vmemmap_frame(&mut self, pages: &[StructPage]) -> u64 {
        let f = self.frames(1);
        let bytes = self.page_bytes(pages);
        self.mem.write(PhysAddr(f), &bytes);
        self.raw.counters.vmemmap_allocated += 1;
        self.users.insert(f, 0);
        f
    }

    fn write_entry(&mut self, at: u64, raw: u64) {
        if self.format.big_endian() {
            self.mem.write_u64_be(PhysAddr(at), raw)
        } else {
            self.mem.write_u64_le(PhysAddr(at), raw)
        }
    }

    /// The table at `level` on the way to `va`, made (and linked into every
    /// root, as the kernel syncs its top-level entries) where missing.
    fn table_for(&mut self, va: u64, level: usize) -> u64 {
        let mut table = self.root;
        for l in 0..level {
            let at = self.format.slot(table, va, l);
            table = match self.tables.get(&at) {
                Some(&next) => next,
                None => {
                    let next = self.table(l + 1);
                    let entry = self.format.table_entry(next, l);
                    self.write_entry(at, entry);
                    if l == 0 {
                        let theirs = self.format.slot(self.process_root, va, 0);
                        self.write_entry(theirs, entry);
                    }
                    self.tables.insert(at, next);
                    next
                }
            };
        }
        table
    }

    /// One vmemmap page fewer maps `frame`: the last one gone frees it.
    fn release(&mut self, frame: u64) {
        if let Some(n) = self.users.get_mut(&frame) {
            *n -= 1;
            if *n == 0 {
                self.raw.counters.vmemmap_freed += 1;
                self.users.remove(&frame);
            }
        }
    }

    /// Maps the base page at `va` to `frame`, never executable (a frame it
    /// mapped before is released).
    pub fn map(&mut self, va: u64, frame: u64, writable: bool) {
        let last = self.format.levels.len() - 1;
        let table = self.table_for(va, last);
        let entry = self.format.leaf_entry(frame, last, writable);
        self.write_entry(self.format.slot(table, va, last), entry);
        if let Some(n) = self.users.get_mut(&frame) {
            *n += 1;
        }
        if let Some(old) = self.leaves.insert(va, frame) {
            self.release(old);
        }
    }

    /// Clears the base-page leaf mapping `va` (its tables stay).
    pub fn unmap(&mut self, va: u64) {
        let last = self.format.levels.len() - 1;
        let table = self.table_for(va, last);
        self.write_entry(self.format.slot(table, va, last), 0);
        if let Some(old) = self.leaves.remove(&va) {
            self.release(old);
        }
    }

    /// The frame the base page at `va` maps.
    pub fn frame_at(&self, va: u64) -> Option<u64> {
        self.leaves.get(&va).copied()
    }

    /// Writes `page` as the struct page of `pfn`, into whatever frame maps it.
    pub fn write_struct_page(&mut self, pfn: Pfn, page: StructPage) {
        let va = self.va(pfn);
        let base = va / self.format.page * self.format.page;
        let Some(frame) = self.frame_at(base) else { panic!("the struct page of {pfn:?} is not mapped") };
        let bytes: Vec<u8> = page.to_words().into_iter().flat_map(u64::to_le_bytes).collect();
        self.mem.write(PhysAddr(frame + va - base), &bytes);
    }

    /// Clears the process root's top-level entry over `va`: it no longer
    /// carries the kernel's.
    pub fn desync_process_root(&mut self, va: u64) {
        let at = self.format.slot(self.process_root, va, 0);
        self.write_entry(at, 0);
    }
}
