//! Regions of compound pages, laid out under each layout as the guest lays
//! them out, and the manifest entries describing them.

use hvo_abi::manifest::{Counters, Manifest, RawRegion, RawSharedTail};
use hvo_abi::model::{pageblock_pages, Layout, RegionKind, StructPage, Zone, MIGRATE_MOVABLE, STRUCT_PAGE_SIZE};

use super::format::BLOCK_LEVEL;
use super::{RegionSpec, SynthVmemmap};
use crate::addr::{Pfn, PhysAddr};

/// Where a built region's compound pages are.
#[derive(Clone, Copy, Debug)]
pub struct BuiltRegion {
    pub id: u32,
    pub start: Pfn,
    /// Pfns from one head to the next.
    pub stride: u64,
}

impl BuiltRegion {
    /// The head pfn of compound page `i`.
    pub fn head(&self, i: u64) -> Pfn {
        self.start + i * self.stride
    }
}

impl SynthVmemmap {
    /// Vmemmap pages one compound page of `order` fills (at least one: the
    /// builder lays out no compound pages smaller than a vmemmap page's worth).
    fn pages_per_compound(&self, order: u32) -> u64 {
        let n = (1u64 << order) * STRUCT_PAGE_SIZE / self.format.page;
        assert!(n >= 1, "order {order} compound pages share vmemmap pages, which the builder does not lay out");
        n
    }

    /// The next region's first pfn, aligned to `align` pfns then moved up
    /// by `skew`, leaving `below` pfns before it (an altmap).
    fn place(&mut self, pages: u64, below: u64, align: u64, skew: u64) -> Pfn {
        let start = (self.next_pfn + below).div_ceil(align) * align + skew;
        self.next_pfn = start + pages;
        Pfn(start)
    }

    /// Builds a region as `spec` says; returns where it is.
    pub fn add_region(&mut self, spec: RegionSpec) -> BuiltRegion {
        self.add_region_skewed(spec, 0)
    }

    /// Builds a region as `spec` says, but its compound pages start one
    /// vmemmap page's worth of pfns past their natural alignment (as an
    /// altmap reserve rounded to a page, not to the compound size, leaves
    /// them): laid out right otherwise.
    pub fn add_region_unaligned(&mut self, spec: RegionSpec) -> BuiltRegion {
        let skew = self.format.page / STRUCT_PAGE_SIZE;
        assert!(skew < 1 << spec.order, "order {} compound pages are aligned to a vmemmap page", spec.order);
        self.add_region_skewed(spec, skew)
    }

    fn add_region_skewed(&mut self, spec: RegionSpec, skew: u64) -> BuiltRegion {
        let n = self.pages_per_compound(spec.order);
        let private = match spec.layout {
            Layout::None => n,
            layout => layout.private_pages().min(n),
        };
        let altmap_pfns = if spec.altmap { spec.count * private } else { 0 };
        let stride = 1u64 << spec.order;
        let start = self.place(spec.count * stride, altmap_pfns, stride, skew);
        let mut device = start.0 - altmap_pfns;
        let (head, tail) = (StructPage::head(spec.zone, spec.order), StructPage::tail(spec.zone, spec.order));
        let shared = (spec.layout == Layout::Unified).then(|| self.shared_tail(spec.zone, spec.order, spec.count));
        for c in 0..spec.count {
            let base = self.va(start + c * stride);
            let mut private_frames = Vec::new();
            for i in 0..private {
                let contents: &[StructPage] = if i == 0 { &[head, tail] } else { &[tail] };
                let frame = if spec.altmap {
                    let frame = Pfn(device).addr(self.format.page).0;
                    device += 1;
                    let bytes = self.page_bytes(contents);
                    self.mem.write(PhysAddr(frame), &bytes);
                    frame
                } else {
                    self.vmemmap_frame(contents)
                };
                self.map(base + i * self.format.page, frame, true);
                private_frames.push(frame);
            }
            for i in private..n {
                let (frame, writable) = match spec.layout {
                    Layout::Unified => (shared.unwrap_or_default(), false),
                    Layout::LegacyHugetlb => (private_frames[0], false),
                    _ => (private_frames[private_frames.len() - 1], true),
                };
                self.map(base + i * self.format.page, frame, writable);
            }
        }
        self.describe(spec, start, altmap_pfns)
    }

    /// Hot-added memory of `pages` base pages (whole vmemmap pages' worth)
    /// onlined into `zone`: its vmemmap mapped by base pages, every struct
    /// page a free page of the zone.
    pub fn add_memory(&mut self, zone: Zone, pages: u64) -> BuiltRegion {
        let per_page = self.format.page / STRUCT_PAGE_SIZE;
        assert!(pages.is_multiple_of(per_page), "{pages} pages are not whole vmemmap pages");
        let start = self.place(pages, 0, per_page, 0);
        for i in 0..pages / per_page {
            let frame = self.vmemmap_frame(&[StructPage::free(zone)]);
            self.map(self.va(start + i * per_page), frame, true);
        }
        let spec =
            RegionSpec { kind: RegionKind::Memory, zone, order: 0, count: pages, layout: Layout::None, altmap: false };
        self.describe(spec, start, 0)
    }

    /// A region whose vmemmap lies under 2 MiB leaves, never split, however
    /// its manifest entry says it is laid out (as boot memmap is mapped, as
    /// the skip-split bug leaves an "optimized" range, and as a device range
    /// finds the leaf memory beside it populated). With `altmap`, device
    /// pages below it are its altmap, unused.
    pub fn add_region_in_block(&mut self, spec: RegionSpec) -> BuiltRegion {
        let page = self.format.page;
        let block = self.format.span(BLOCK_LEVEL);
        let stride = 1u64 << spec.order;
        let altmap_pfns = if spec.altmap { spec.count } else { 0 };
        // A block's worth of struct pages starts where a block of vmemmap does.
        let start = self.place(spec.count * stride, altmap_pfns, block / STRUCT_PAGE_SIZE, 0);
        let (head, tail) = (StructPage::head(spec.zone, spec.order), StructPage::tail(spec.zone, spec.order));
        let (head_page, tail_page) = ([head, tail], [tail]);
        let (first, end) = (self.va(start), self.va(start + spec.count * stride));
        for va in (first..end).step_by(block as usize) {
            self.next_frame = self.next_frame.div_ceil(block) * block;
            let frames = self.frames(block / page);
            for k in 0..block / page {
                let is_head = (va + k * page - first).is_multiple_of(stride * STRUCT_PAGE_SIZE);
                let bytes = self.page_bytes(if is_head { &head_page } else { &tail_page });
                self.mem.write(PhysAddr(frames + k * page), &bytes);
                self.raw.counters.vmemmap_allocated += 1;
                self.users.insert(frames + k * page, 1);
            }
            let table = self.table_for(va, BLOCK_LEVEL);
            let entry = self.format.leaf_entry(frames, BLOCK_LEVEL, true);
            self.write_entry(self.format.slot(table, va, BLOCK_LEVEL), entry);
        }
        if spec.layout == Layout::Unified {
            self.shared_tail(spec.zone, spec.order, spec.count);
        }
        self.describe(spec, start, altmap_pfns)
    }

    /// The manifest entry of a region just built, and its pageblock tags
    /// (device memory's, every one movable).
    fn describe(&mut self, spec: RegionSpec, start: Pfn, altmap_pfns: u64) -> BuiltRegion {
        let nr_pages = spec.count << spec.order;
        let pageblock_tags = if spec.kind == RegionKind::Dax {
            let count = nr_pages.div_ceil(pageblock_pages(self.format.page));
            let tags = self.frames(count.div_ceil(self.format.page));
            self.mem.write(PhysAddr(tags), &vec![MIGRATE_MOVABLE; count as usize]);
            tags
        } else {
            0
        };
        let id = self.raw.region_count;
        self.raw.regions[id as usize] = RawRegion {
            start_pfn: start.0,
            nr_pages,
            kind: spec.kind as u32,
            zone: spec.zone as u32,
            order: spec.order,
            layout: spec.layout as u32,
            optimized: u32::from(spec.layout != Layout::None),
            id,
            pageblock_tags,
            altmap_pfns,
        };
        self.raw.region_count += 1;
        BuiltRegion { id, start, stride: 1 << spec.order }
    }

    /// The shared tail page of (`zone`, `order`), made on first use, with
    /// `users` more compound pages counted on it.
    fn shared_tail(&mut self, zone: Zone, order: u32, users: u64) -> u64 {
        let count = self.raw.shared_tail_count as usize;
        let known = self.raw.shared_tails[..count].iter().position(|t| t.zone == zone as u32 && t.order == order);
        let index = match known {
            Some(i) => i,
            None => {
                let pa = self.vmemmap_frame(&[StructPage::tail(zone, order)]);
                self.raw.shared_tails[count] = RawSharedTail { pa, zone: zone as u32, order, users: 0 };
                self.raw.shared_tail_count += 1;
                count
            }
        };
        self.raw.shared_tails[index].users += users;
        self.raw.shared_tails[index].pa
    }

    /// A shared tail page for (`zone`, `order`) that no compound page uses,
    /// kept allocated and listed: the leak a last user's restore can leave.
    pub fn leak_shared_tail(&mut self, zone: Zone, order: u32) -> u64 {
        self.shared_tail(zone, order, 0)
    }

    /// Sets the migratetype of pageblock `index` of a device region.
    pub fn set_pageblock_tag(&mut self, id: u32, index: u64, migratetype: u8) {
        let tags = self.raw.regions[id as usize].pageblock_tags;
        self.mem.write(PhysAddr(tags + index), &[migratetype]);
    }

    /// The counters, to be put out of step on purpose.
    pub fn counters(&mut self) -> &mut Counters {
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
