//! Hand-built vmemmaps laid out as real Linux kernels lay them out, for the
//! real-kernel verifier's tests: boot memmap under 2 MiB leaves at the
//! kernel's vmemmap address, HugeTLB folios optimized in place (their leaves
//! split into base pages, the head moved to a fresh frame, the tails remapped
//! read-only), memory hot-added and device DAX ranges created at run time
//! (the dax submodule), and the memmap counters the kernel keeps, counted
//! as Linux counts them. The entry encodings are synth's, written from the
//! manuals.

mod dax;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use hvo_abi::model::{Layout, Zone, STRUCT_PAGE_SIZE};
use hvo_abi::Arch;

pub use dax::{DaxCounting, DaxMode, DaxSpec};

use super::format::{Format, BLOCK_LEVEL};
use crate::addr::{Pfn, PhysAddr, VirtAddr};
use crate::kernel::agent::{Hstate, HstateSize, HvoSysctl, KernelReport};
use crate::kernel::verify::{DaxRange, KernelView};
use crate::memory::SparseMemory;
use crate::pgtable::{PagingFormat, Walker};

/// Where a kernel of each architecture puts things, as measured on the
/// Debian kernels the harness boots (nokaslr).
struct Placement {
    paging: PagingFormat,
    /// The VA of pfn 0's struct page.
    vmemmap_start: u64,
    ram_start: u64,
    /// Linux's `SECTION_SIZE_BITS`.
    section_shift: u32,
}

fn placement(arch: Arch) -> Placement {
    match arch {
        Arch::X86_64 => Placement {
            paging: PagingFormat::X86_64FourLevel,
            vmemmap_start: 0xffff_ea00_0000_0000,
            ram_start: 0,
            section_shift: 27,
        },
        // VMEMMAP_START less memstart_addr's struct pages, on a 48-bit CPU.
        Arch::Aarch64 => Placement {
            paging: PagingFormat::Aarch64Va48,
            vmemmap_start: 0xffff_fdff_bf00_0000,
            ram_start: 0x4000_0000,
            section_shift: 27,
        },
        Arch::Ppc64le | Arch::Ppc64le64k => Placement {
            paging: PagingFormat::Radix,
            vmemmap_start: 0xc00c_0000_0000_0000,
            ram_start: 0,
            section_shift: 24,
        },
    }
}

/// Page-table frames come from here up, vmemmap frames from `DATA_FRAMES`:
/// apart, so 2 MiB leaves stay aligned.
const TABLE_FRAMES: u64 = 32 << 30;
const DATA_FRAMES: u64 = 64 << 30;

/// Who maps which vmemmap frame, and which frames the boot memmap took.
#[derive(Default)]
struct FrameUse {
    /// Frame -> vmemmap pages mapping it (a block's frames count one each).
    users: HashMap<u64, u64>,
    boot: HashSet<u64>,
    /// Frames the memmaps of memory added at run time took (hot-added RAM,
    /// DAX): Linux counts those by its own rule, kept in `runtime_counted`.
    runtime: HashSet<u64>,
}

impl FrameUse {
    fn mapped(&mut self, frame: u64) {
        *self.users.entry(frame).or_insert(0) += 1;
    }

    /// One vmemmap page fewer maps `frame`.
    fn released(&mut self, frame: u64) {
        if let Some(n) = self.users.get_mut(&frame) {
            *n -= 1;
            if *n == 0 {
                self.users.remove(&frame);
            }
        }
    }
}

/// A kernel's vmemmap being built.
pub struct KernelVmemmap {
    pub mem: SparseMemory,
    format: Format,
    placement: Placement,
    /// Boot RAM first, then hot-added ranges.
    ram: Vec<Range<Pfn>>,
    /// HugeTLB pool sizes, by compound size.
    pools: BTreeMap<u64, u64>,
    /// The unified layout's shared tail pages, by zone and compound size.
    shared_tails: BTreeMap<(Zone, u64), u64>,
    /// The device DAX ranges created.
    dax: Vec<DaxRange>,
    /// What Linux added to `nr_memmap_pages` for memory added at run time.
    runtime_counted: u64,
    /// Where the next hot-added or device range goes (a physical address).
    next_device: u64,
    /// 2 MiB leaves not yet split: their VA -> first frame.
    blocks: BTreeMap<u64, u64>,
    /// Base-page leaves: VA -> frame.
    leaves: HashMap<u64, u64>,
    frames: FrameUse,
    root: u64,
    /// Entries pointing at a table the builder made: entry address -> table.
    tables: HashMap<u64, u64>,
    /// Where the next table and the next vmemmap frames are allocated.
    next_table: u64,
    next_data: u64,
}

impl KernelVmemmap {
    /// A kernel of `arch` with `ram_bytes` of RAM, its memmap under 2 MiB
    /// leaves of boot frames, and empty 2 MiB and 1 GiB pools.
    pub fn new(arch: Arch, ram_bytes: u64) -> KernelVmemmap {
        let format = Format::of(arch);
        let placement = placement(arch);
        let page = format.page;
        let start = Pfn::containing(PhysAddr(placement.ram_start), page);
        let ram = start..start + ram_bytes / page;
        let mut k = KernelVmemmap {
            mem: SparseMemory::new(),
            format,
            placement,
            next_device: ram.end.addr(page).0,
            ram: vec![ram],
            dax: Vec::new(),
            runtime_counted: 0,
            root: 0,
            next_table: TABLE_FRAMES,
            next_data: DATA_FRAMES,
            tables: HashMap::new(),
            blocks: BTreeMap::new(),
            leaves: HashMap::new(),
            frames: FrameUse::default(),
            shared_tails: BTreeMap::new(),
            pools: [(2 << 20, 0), (1 << 30, 0)].into(),
        };
        k.root = k.table(0);
        let block = format.span(BLOCK_LEVEL);
        let first = k.struct_page(k.ram[0].start) / block * block;
        let end = k.struct_page(k.ram[0].end).div_ceil(block) * block;
        for va in (first..end).step_by(block as usize) {
            let frames = k.data_frames(block / page);
            let table = k.table_for(va, BLOCK_LEVEL);
            k.write_entry(format.slot(table, va, BLOCK_LEVEL), format.leaf_entry(frames, BLOCK_LEVEL, true));
            k.blocks.insert(va, frames);
            for i in 0..block / page {
                k.frames.mapped(frames + i * page);
                k.frames.boot.insert(frames + i * page);
            }
        }
        k
    }

    pub fn page(&self) -> u64 {
        self.format.page
    }

    /// The boot RAM's first pfn.
    pub fn ram_start(&self) -> Pfn {
        self.ram[0].start
    }

    /// Linux's section size here.
    pub fn section(&self) -> u64 {
        1 << self.placement.section_shift
    }

    /// The struct page address of `pfn`.
    pub fn struct_page(&self, pfn: Pfn) -> u64 {
        self.placement.vmemmap_start.wrapping_add(pfn.0 * STRUCT_PAGE_SIZE)
    }

    /// The VA of vmemmap page `i` of the compound page headed at `head`.
    pub fn vmemmap_page(&self, head: Pfn, i: u64) -> u64 {
        self.struct_page(head) + i * self.format.page
    }

    /// The host's view of it, as the integration supplies a real kernel's.
    pub fn view(&self) -> KernelView<'_> {
        KernelView {
            mem: &self.mem,
            walker: Walker::new(self.placement.paging.format(), PhysAddr(self.root)),
            vmemmap_start: VirtAddr(self.placement.vmemmap_start),
            ram: self.ram.clone(),
            page_size: self.format.page,
            section_size: 1 << self.placement.section_shift,
            dax: self.dax.clone(),
            removed: Vec::new(),
        }
    }

    /// A zeroed table for `level`, in whole frames aligned to its size.
    fn table(&mut self, level: usize) -> u64 {
        let bytes = self.format.table_bytes(level).div_ceil(self.format.page) * self.format.page;
        let at = self.next_table.div_ceil(bytes) * bytes;
        self.next_table = at + bytes;
        self.mem.write(PhysAddr(at), &vec![0u8; bytes as usize]);
        at
    }

    /// `n` consecutive vmemmap frames, aligned to their size (their
    /// contents are not read: the oracle judges mappings).
    fn data_frames(&mut self, n: u64) -> u64 {
        let bytes = n * self.format.page;
        let at = self.next_data.div_ceil(bytes) * bytes;
        self.next_data = at + bytes;
        at
    }

    /// A fresh vmemmap frame, as the kernel allocates one for a head page.
    pub fn fresh_frame(&mut self) -> u64 {
        self.data_frames(1)
    }

    fn write_entry(&mut self, at: u64, raw: u64) {
        match self.format.big_endian() {
            true => self.mem.write_u64_be(PhysAddr(at), raw),
            false => self.mem.write_u64_le(PhysAddr(at), raw),
        }
    }

    /// The table at `level` on the way to `va`, made where missing.
    fn table_for(&mut self, va: u64, level: usize) -> u64 {
        (0..level).fold(self.root, |table, l| {
            let at = self.format.slot(table, va, l);
            if let Some(&next) = self.tables.get(&at) {
                return next;
            }
            let next = self.table(l + 1);
            let entry = self.format.table_entry(next, l);
            self.write_entry(at, entry);
            self.tables.insert(at, next);
            next
        })
    }

    /// Splits the 2 MiB leaf over `va` (if one is) into base pages mapping
    /// the same frames, writable, as the kernel does before remapping.
    fn split(&mut self, va: u64) {
        let block = self.format.span(BLOCK_LEVEL);
        let base = va / block * block;
        let Some(frames) = self.blocks.remove(&base) else { return };
        let last = BLOCK_LEVEL + 1;
        let page = self.format.page;
        let ptes = self.table(last);
        for i in 0..block / page {
            let entry = self.format.leaf_entry(frames + i * page, last, true);
            self.write_entry(self.format.slot(ptes, base + i * page, last), entry);
            self.leaves.insert(base + i * page, frames + i * page);
        }
        let pmd = self.table_for(base, BLOCK_LEVEL);
        let at = self.format.slot(pmd, base, BLOCK_LEVEL);
        self.write_entry(at, self.format.table_entry(ptes, BLOCK_LEVEL));
        self.tables.insert(at, ptes);
    }

    /// Maps the vmemmap page at `va` to `frame` by a base-page entry,
    /// splitting the leaf over it first; the frame it mapped is released.
    pub fn map(&mut self, va: u64, frame: u64, writable: bool) {
        self.set_base_entry(va, Some((frame, writable)));
    }

    /// Clears the vmemmap page at `va`.
    pub fn unmap(&mut self, va: u64) {
        self.set_base_entry(va, None);
    }

    /// Points the base-page entry over `va` at a frame (writable or not) or
    /// at nothing, counting who maps which frame.
    fn set_base_entry(&mut self, va: u64, to: Option<(u64, bool)>) {
        self.split(va);
        let last = BLOCK_LEVEL + 1;
        let table = self.table_for(va, last);
        let raw = to.map(|(frame, writable)| self.format.leaf_entry(frame, last, writable)).unwrap_or(0);
        self.write_entry(self.format.slot(table, va, last), raw);
        let old = match to {
            Some((frame, _)) => {
                self.frames.mapped(frame);
                self.leaves.insert(va, frame)
            }
            None => self.leaves.remove(&va),
        };
        if let Some(old) = old {
            self.frames.released(old);
        }
    }

    /// The kernel's boot memmap counter, kept as Linux keeps it: at boot
    /// each section of RAM adds its memmap rounded up to whole pages, and
    /// every boot frame freed since takes one off.
    fn boot_memmap_pages(&self) -> u64 {
        let page = self.format.page;
        let section_pfns = (1u64 << self.placement.section_shift) / page;
        let boot = &self.ram[0];
        let sections = boot.end.0.div_ceil(section_pfns) - boot.start.0 / section_pfns;
        let at_boot = sections * (section_pfns * STRUCT_PAGE_SIZE).div_ceil(page);
        let freed = self.frames.boot.iter().filter(|f| !self.frames.users.contains_key(f)).count() as u64;
        at_boot - freed
    }

    /// The frame the vmemmap page at `va` maps by a base-page entry.
    pub fn frame_at(&self, va: u64) -> Option<u64> {
        self.leaves.get(&va).copied()
    }

    /// The shared tail page of HugeTLB compound pages of `bytes`, made on
    /// first use (RAM is one zone here, so one per size).
    pub fn shared_tail(&mut self, bytes: u64) -> u64 {
        self.zone_shared_tail(Zone::Normal, bytes)
    }

    /// The shared tail page of (`zone`, `bytes`), made on first use.
    fn zone_shared_tail(&mut self, zone: Zone, bytes: u64) -> u64 {
        if let Some(&frame) = self.shared_tails.get(&(zone, bytes)) {
            return frame;
        }
        let frame = self.fresh_frame();
        self.shared_tails.insert((zone, bytes), frame);
        frame
    }

    /// Where the next range added at run time goes: after everything so
    /// far, aligned to 1 GiB and to the memory one vmemmap granule
    /// describes (so no two ranges' vmemmaps share a leaf).
    fn place(&mut self, bytes: u64) -> Pfn {
        let page = self.format.page;
        let granule = self.format.span(BLOCK_LEVEL) / STRUCT_PAGE_SIZE * page;
        let align = granule.max(1 << 30);
        let at = self.next_device.div_ceil(align) * align + align;
        self.next_device = at + bytes;
        Pfn::containing(PhysAddr(at), page)
    }

    /// Maps each vmemmap page holding struct pages of `pfns` to a frame of
    /// its own, writable, from `frames` (system memory, or the device's
    /// altmap), as memory added at run time is; the frames are the
    /// run-time counter's.
    fn map_runtime_memmap(&mut self, pfns: &Range<Pfn>, mut frames: impl FnMut(&mut Self) -> u64) {
        let page = self.format.page;
        let first = self.struct_page(pfns.start) / page * page;
        let end = self.struct_page(pfns.end).div_ceil(page) * page;
        for va in (first..end).step_by(page as usize) {
            let frame = frames(self);
            self.map(va, frame, true);
            self.frames.runtime.insert(frame);
        }
    }

    /// Hot-adds `bytes` of RAM (whole sections): its memmap mapped by base
    /// pages of fresh frames, and `nr_memmap_pages` grown as
    /// `section_activate` grows it, each section's memmap rounded up to
    /// whole pages.
    pub fn hot_add_ram(&mut self, bytes: u64) -> Range<Pfn> {
        let page = self.format.page;
        let start = self.place(bytes);
        let range = start..start + bytes / page;
        self.map_runtime_memmap(&range, |k| k.fresh_frame());
        let section_pfns = self.section() / page;
        let sections = bytes / self.section();
        self.runtime_counted += sections * (section_pfns * STRUCT_PAGE_SIZE).div_ceil(page);
        self.ram.push(range.clone());
        range
    }

    /// A HugeTLB folio of `bytes` at `head` joins the pool, its vmemmap
    /// optimized as `layout` lays it out (`Layout::None`: left alone).
    pub fn add_folio(&mut self, head: Pfn, bytes: u64, layout: Layout) {
        *self.pools.entry(bytes).or_insert(0) += 1;
        let n = bytes / self.format.page * STRUCT_PAGE_SIZE / self.format.page;
        if layout == Layout::None || n < 2 {
            return;
        }
        let head_frame = self.fresh_frame();
        self.map(self.vmemmap_page(head, 0), head_frame, true);
        let (tail_frame, writable) = match layout {
            Layout::Unified => (self.shared_tail(bytes), false),
            Layout::LegacyHugetlb => (head_frame, false),
            _ => {
                let second = self.fresh_frame();
                self.map(self.vmemmap_page(head, 1), second, true);
                (second, true)
            }
        };
        let first_tail = if layout == Layout::LegacyDax { 2 } else { 1 };
        for i in first_tail..n {
            self.map(self.vmemmap_page(head, i), tail_frame, writable);
        }
    }

    /// What the kernel would report: its pools, and its memmap counters
    /// (boot frames as Linux counts them; HugeTLB's head pages, every frame
    /// mapped but boot's, run time memory's and the shared tail pages,
    /// which the kernel does not count; and what Linux counted for memory
    /// added at run time).
    pub fn report(&self, hvo_sysctl: HvoSysctl) -> KernelReport {
        let shared: HashSet<u64> = self.shared_tails.values().copied().collect();
        let FrameUse { users, boot, runtime } = &self.frames;
        let heads = users.keys().filter(|f| !boot.contains(f) && !runtime.contains(f) && !shared.contains(f)).count();
        let other = heads as u64 + self.runtime_counted;
        let boot = self.boot_memmap_pages();
        let hstates = self
            .pools
            .iter()
            .map(|(&bytes, &pages)| Hstate { size: HstateSize::from_kib(bytes >> 10), pages, free: pages })
            .collect();
        KernelReport { hvo_sysctl, nr_memmap_pages: Some(other), nr_memmap_boot_pages: Some(boot), hstates }
    }
}
