//! Boot: gigantic folios reserved early, the vmemmap of boot memory
//! populated (mm/sparse-vmemmap.c), persistent memory set aside, and memmap
//! init (mm/mm_init.c).

use hvo_abi::model::{Knob, Layout, RegionKind, StructPage, Zone};
use hvo_guest::sparse::SUBSECTION;

use super::{pfn_of, BootState, Mm, Region, Vmemmap, VmemmapError, BOOT_ZONE, STRUCT_PAGES_PER_PAGE};
use crate::arch::{self, PAGE};
use crate::mm::frames::{align_down, align_up, FrameAllocator, Purpose};
use crate::mm::pagetable::Prot;
use crate::mm::{PageSize, Pfn, PhysAddr, Range, RangeList, VirtAddr};

/// The sections holding any of `ram`, merged into ranges.
fn present_sections(ram: &RangeList) -> RangeList {
    let section = 1u64 << arch::SECTION_SIZE_BITS;
    let mut out = RangeList::new();
    let mut current: Option<Range> = None;
    for r in ram.iter() {
        let s = Range { start: align_down(r.start, section), end: align_up(r.end, section) };
        current = match current {
            Some(c) if s.start <= c.end => Some(Range { start: c.start, end: c.end.max(s.end) }),
            Some(c) => {
                out.push(c);
                Some(s)
            }
            None => Some(s),
        };
    }
    if let Some(c) = current {
        out.push(c);
    }
    out
}

impl Vmemmap {
    /// Reserves gigantic folios before memmap init (as boot-time HugeTLB does):
    /// `populate_boot` maps their vmemmap already optimized.
    pub fn reserve_gigantic(
        &mut self,
        frames: &mut FrameAllocator,
        order: u32,
        count: u64,
        zone: Zone,
    ) -> Result<usize, VmemmapError> {
        if self.state != BootState::Early {
            return Err(VmemmapError::TooLate);
        }
        if (1u64 << order) / STRUCT_PAGES_PER_PAGE < 2 {
            return Err(VmemmapError::TooSmallToOptimize);
        }
        let id = self.free_slot()?;
        let folio = PAGE << order;
        let start = frames.alloc_data(folio * count, folio, Purpose::HugeTlb)?;
        self.slots[id].region = Some(Region {
            kind: RegionKind::HugeTlb,
            start_pfn: Pfn::containing(start, arch::BASE_PAGE),
            nr_pages: count << order,
            zone,
            order,
            layout: Layout::Unified,
            optimized: true,
            altmap_pfns: 0,
        });
        Ok(id)
    }

    /// Which reserved compound page's vmemmap page `va` is, if any: (zone,
    /// order, index of the page in that compound page's vmemmap). Only
    /// regions optimized before the vmemmap existed are reserved ones.
    fn boot_gigantic_page(&self, va: u64) -> Option<(Zone, u32, u64)> {
        self.regions().filter(|r| r.optimized).find_map(|r| {
            let first = self.va(r.start_pfn).0;
            let last = self.va(r.end_pfn()).0;
            if va < first || va >= last {
                return None;
            }
            let per_folio = r.vmemmap_pages() * PAGE;
            Some((r.zone, r.order, (va - first) % per_folio / PAGE))
        })
    }

    /// Whether any reserved compound page's vmemmap lies in `[start, end)`.
    fn overlaps_boot_gigantic(&self, start: u64, end: u64) -> bool {
        self.regions().filter(|r| r.optimized).any(|r| {
            let first = self.va(r.start_pfn).0;
            let last = self.va(r.end_pfn()).0;
            first < end && start < last
        })
    }

    /// Maps the vmemmap of every present section (vmemmap_populate): 2 MiB
    /// leaves where a whole 2 MiB of vmemmap is covered, base pages otherwise.
    /// Reserved gigantic pages get their head page only; their tails map the
    /// shared tail page straight away, read-only.
    pub fn populate_boot(&mut self, mm: &mut Mm, ram: &RangeList) -> Result<(), VmemmapError> {
        if self.state != BootState::Early {
            return Err(VmemmapError::TooLate);
        }
        // Boot memory's subsections, partial ones included (subsection_map_init).
        let mut present = RangeList::new();
        for r in ram.iter() {
            present.push(Range { start: align_down(r.start, SUBSECTION), end: align_up(r.end, SUBSECTION) });
        }
        for r in present.iter() {
            self.sections.activate(mm.frames, r.start, r.end, true)?;
        }
        let big = PageSize::Size2M.bytes();
        for sections in present_sections(ram).iter() {
            let start = self.va(pfn_of(sections.start)).0;
            let end = self.va(pfn_of(sections.end)).0;
            let mut va = start;
            while va < end {
                // Raw frames: memmap init or the poison below writes every
                // struct page they hold.
                if va.is_multiple_of(big) && va + big <= end && !self.overlaps_boot_gigantic(va, va + big) {
                    let frame = mm.frames.alloc_raw(PageSize::Size2M, Purpose::Vmemmap)?;
                    // Empty entries are never cached: nothing to flush.
                    mm.table.map(mm.frames, VirtAddr(va), frame, PageSize::Size2M, Prot::RW)?.ignore();
                    va += big;
                    continue;
                }
                let (frame, prot) = match self.boot_gigantic_page(va) {
                    Some((zone, order, index)) if index > 0 => {
                        // One user per compound page, counted at its first tail page.
                        let shared = if index == 1 {
                            self.get_shared_tail(mm.frames, zone, order)?
                        } else {
                            self.shared_tail_pa(zone, order)?
                        };
                        // Knob `tails-writable`: the tails keep write permission.
                        let prot = if self.knob(Knob::TailsWritable) { Prot::RW } else { Prot::RO };
                        (shared, prot)
                    }
                    _ => (mm.frames.alloc_raw(arch::BASE_PAGE, Purpose::Vmemmap)?, Prot::RW),
                };
                mm.table.map(mm.frames, VirtAddr(va), frame, arch::BASE_PAGE, prot)?.ignore();
                va += PAGE;
            }
            // The memmap of a section's absent part is raw boot memory:
            // poisoned, as CONFIG_DEBUG_VM leaves it, never initialized.
            let mut pfn = pfn_of(sections.start);
            for r in ram.iter().filter(|r| r.end > sections.start && r.start < sections.end) {
                self.poison(pfn, pfn_of(r.start));
                pfn = pfn_of(align_up(r.end, PAGE));
            }
            self.poison(pfn, pfn_of(sections.end));
        }
        self.state = BootState::Populated;
        Ok(())
    }

    fn poison(&self, start: Pfn, end: Pfn) {
        self.fill_struct_pages(start, end, StructPage::POISONED);
    }

    /// Sets the last `size` bytes of boot memory aside as persistent memory
    /// (Linux's `memmap=nn!ss`): out of the allocator and of boot memory, so
    /// memmap init leaves its struct pages alone. A section it shares with
    /// RAM stays early, its memmap populated whole, as Linux does.
    pub fn reserve_pmem(
        &mut self,
        frames: &mut FrameAllocator,
        ram: &mut RangeList,
        size: u64,
    ) -> Result<PhysAddr, VmemmapError> {
        if self.state != BootState::Early {
            return Err(VmemmapError::TooLate);
        }
        let last = ram.iter().last().ok_or(VmemmapError::BadPmemSize)?;
        if size == 0 || !size.is_multiple_of(SUBSECTION) || !last.end.is_multiple_of(SUBSECTION) || size >= last.size()
        {
            return Err(VmemmapError::BadPmemSize);
        }
        let pmem = Range { start: last.end - size, end: last.end };
        frames.take(pmem)?;
        ram.remove(pmem);
        Ok(PhysAddr(pmem.start))
    }

    /// The vmemmap of all boot RAM, section aligned.
    pub fn range(&self, ram: &RangeList) -> (VirtAddr, VirtAddr) {
        let sections = present_sections(ram);
        let first = sections.iter().next().map(|r| r.start).unwrap_or(0);
        let last = sections.iter().last().map(|r| r.end).unwrap_or(0);
        (self.va(pfn_of(first)), self.va(pfn_of(last)))
    }

    /// memmap_init: every RAM page's struct page. A reserved gigantic page's
    /// head and the tails in its head vmemmap page are written; its other
    /// tails live in the shared tail page and are skipped, not counted. Knob
    /// `skip-boot-memmap-init`: the RAM outside them is left as the raw
    /// vmemmap frames hold it.
    pub fn memmap_init(&mut self, ram: &RangeList) {
        for r in ram.iter() {
            let (mut pfn, end) = (pfn_of(r.start), pfn_of(r.end));
            while pfn < end {
                let next = self.next_boot_gigantic(pfn, end);
                let plain_end = next.map_or(end, |g| g.start_pfn.max(pfn));
                self.init_plain(pfn, plain_end);
                let Some(g) = next else { break };
                let folios_end = g.end_pfn().min(end);
                self.init_boot_gigantic(&g, plain_end, folios_end);
                pfn = folios_end;
            }
        }
    }

    /// The reserved gigantic region that starts first among those ending
    /// past `pfn` and starting before `end`.
    fn next_boot_gigantic(&self, pfn: Pfn, end: Pfn) -> Option<Region> {
        self.regions()
            .filter(|g| g.optimized && g.end_pfn() > pfn && g.start_pfn < end)
            .min_by_key(|g| g.start_pfn)
            .copied()
    }

    /// Plain boot RAM: free struct pages of the normal zone.
    fn init_plain(&mut self, start: Pfn, end: Pfn) {
        if end <= start || self.knob(Knob::SkipBootMemmapInit) {
            return;
        }
        self.fill_struct_pages(start, end, StructPage::free(BOOT_ZONE));
        self.struct_pages_initialized += end.pages_since(start);
    }

    /// The struct pages of `g`'s folios in `[start, end)` that live in their
    /// head vmemmap pages.
    fn init_boot_gigantic(&mut self, g: &Region, start: Pfn, end: Pfn) {
        let folio = 1u64 << g.order;
        let in_head_page = STRUCT_PAGES_PER_PAGE.min(folio);
        for head in g.heads().filter(|h| *h >= start && *h < end) {
            self.write_struct_page(head, StructPage::head(g.zone, g.order));
            self.fill_struct_pages(head.add(1), head.add(in_head_page).min(end), StructPage::tail(g.zone, g.order));
            self.struct_pages_initialized += head.add(in_head_page).min(end).pages_since(head);
        }
    }
}
