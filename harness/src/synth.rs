//! Hand-built guest memories for the verifier's unit tests and benchmarks:
//! x86_64 4-level page tables, written here from the architecture manual's
//! entry format (nothing of the guest's mapper), over a vmemmap laid out as
//! the guest lays it out, with the manifest that describes it.

use hvo_abi::manifest::{Manifest, RawManifest, RawRange, RawRegion, RawRoot, RawSharedTail, RootKind};
use hvo_abi::model::{Layout, RegionKind, StructPage, Zone};
use hvo_abi::Arch;

use crate::addr::PhysAddr;
use crate::memory::SparseMemory;

const PAGE: u64 = 4096;
const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const EXECUTE_DISABLE: u64 = 1 << 63;
/// Where the guest puts x86_64's vmemmap (Linux's VMEMMAP_START).
pub const VMEMMAP_BASE: u64 = 0xffff_ea00_0000_0000;

/// A vmemmap being built: page tables and frames in a sparse memory, and the
/// manifest counting them.
pub struct SynthVmemmap {
    pub mem: SparseMemory,
    raw: RawManifest,
    root: u64,
    next_frame: u64,
}

impl Default for SynthVmemmap {
    fn default() -> Self {
        Self::new()
    }
}

impl SynthVmemmap {
    /// An empty vmemmap over 2 MiB of boot RAM at 0, its 8 vmemmap pages mapped.
    pub fn new() -> SynthVmemmap {
        let mut raw = RawManifest::booting(Arch::X86_64);
        raw.state = hvo_abi::manifest::GuestState::Ready as u32;
        raw.page_size = PAGE;
        raw.linear_map_base = 0xffff_8880_0000_0000;
        raw.vmemmap_base = VMEMMAP_BASE;
        raw.section_size_bits = 27;
        raw.ram_count = 1;
        raw.ram[0] = RawRange { start: 0, size: 2 << 20 };
        // Frames come from 1 GiB up, far from the RAM and the regions.
        let mut s = SynthVmemmap { mem: SparseMemory::new(), raw, root: 0, next_frame: 1 << 30 };
        s.root = s.table();
        s.raw.root_count = 1;
        s.raw.roots[0] = RawRoot { kind: RootKind::Kernel as u32, _reserved: 0, pa: s.root };
        for i in 0..8 {
            let frame = s.vmemmap_frame(&[StructPage::free(Zone::Normal); 64]);
            s.map(VMEMMAP_BASE + i * PAGE, frame, true);
        }
        s
    }

    fn frame(&mut self) -> u64 {
        let f = self.next_frame;
        self.next_frame += PAGE;
        f
    }

    fn table(&mut self) -> u64 {
        let t = self.frame();
        self.mem.write(PhysAddr(t), &[0u8; PAGE as usize]);
        self.raw.counters.pagetable_allocated += 1;
        t
    }

    /// A vmemmap frame holding these 64 struct pages, counted as the guest counts.
    fn vmemmap_frame(&mut self, pages: &[StructPage; 64]) -> u64 {
        let f = self.frame();
        let mut bytes = Vec::with_capacity(PAGE as usize);
        for p in pages {
            for w in p.to_words() {
                bytes.extend_from_slice(&w.to_le_bytes());
            }
        }
        self.mem.write(PhysAddr(f), &bytes);
        self.raw.counters.vmemmap_allocated += 1;
        f
    }

    fn entry(&self, table: u64, va: u64, level: u32) -> u64 {
        table + ((va >> (39 - 9 * level)) & 511) * 8
    }

    fn read(&self, at: u64) -> u64 {
        use crate::memory::GuestMemory;
        self.mem.read_u64_le(PhysAddr(at)).unwrap_or(0)
    }

    /// Maps the 4 KiB page at `va` to `frame`, never executable.
    pub fn map(&mut self, va: u64, frame: u64, writable: bool) {
        let mut table = self.root;
        for level in 0..3 {
            let at = self.entry(table, va, level);
            let e = self.read(at);
            table = if e & PRESENT != 0 {
                e & 0x000f_ffff_ffff_f000
            } else {
                let next = self.table();
                self.mem.write_u64_le(PhysAddr(at), next | PRESENT | WRITABLE);
                next
            };
        }
        let leaf = frame | PRESENT | EXECUTE_DISABLE | if writable { WRITABLE } else { 0 };
        self.mem.write_u64_le(PhysAddr(self.entry(table, va, 3)), leaf);
    }

    /// Clears the 4 KiB leaf mapping `va` (its tables stay).
    pub fn unmap(&mut self, va: u64) {
        let mut table = self.root;
        for level in 0..3 {
            let e = self.read(self.entry(table, va, level));
            if e & PRESENT == 0 {
                return;
            }
            table = e & 0x000f_ffff_ffff_f000;
        }
        self.mem.write_u64_le(PhysAddr(self.entry(table, va, 3)), 0);
    }

    /// The struct page VA of `pfn`.
    pub fn va(pfn: u64) -> u64 {
        VMEMMAP_BASE + pfn * 64
    }

    /// A DAX region of `count` compound pages of `order` from `start_pfn`,
    /// populated under the unified layout: each head vmemmap page private,
    /// every tail on the region's shared tail page, read-only.
    pub fn add_unified_dax(&mut self, start_pfn: u64, count: u64, order: u32) -> usize {
        let zone = Zone::Device;
        let tail = StructPage::tail(zone, order);
        let shared = self.vmemmap_frame(&[tail; 64]);
        let per_compound = (1u64 << order) * 64 / PAGE;
        for c in 0..count {
            let head = start_pfn + (c << order);
            let mut pages = [tail; 64];
            pages[0] = StructPage::head(zone, order);
            let frame = self.vmemmap_frame(&pages);
            let base = Self::va(head);
            self.map(base, frame, true);
            for i in 1..per_compound {
                self.map(base + i * PAGE, shared, false);
            }
        }
        let n = self.raw.shared_tail_count as usize;
        self.raw.shared_tails[n] = RawSharedTail { pa: shared, zone: zone as u32, order, users: count };
        self.raw.shared_tail_count += 1;
        let id = self.raw.region_count as usize;
        self.raw.regions[id] = RawRegion {
            start_pfn,
            nr_pages: count << order,
            kind: RegionKind::Dax as u32,
            zone: zone as u32,
            order,
            layout: Layout::Unified as u32,
            optimized: 1,
            id: id as u32,
            pageblock_tags: 0,
            altmap_pfns: 0,
        };
        self.raw.region_count += 1;
        id
    }

    /// The counters, to be put out of step on purpose.
    pub fn counters(&mut self) -> &mut hvo_abi::manifest::Counters {
        &mut self.raw.counters
    }

    /// The manifest as the guest would publish it now.
    pub fn manifest(&self) -> Manifest {
        match Manifest::decode(self.raw.as_bytes()) {
            Ok(m) => m,
            Err(e) => panic!("the synthetic manifest does not decode: {e}"),
        }
    }
}
