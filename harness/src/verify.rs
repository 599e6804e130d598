//! The verifier: DESIGN.md's invariants, computed from the guest's page tables
//! (walked by the host's own walker), its memory and its manifest. Nothing
//! here trusts the guest's page-table code; the manifest only says what the
//! guest claims to have built, and every claim is checked against the tables.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use hvo_abi::manifest::{Manifest, Region};
use hvo_abi::model::{pageblock_pages, Layout, RegionKind, StructPage, MIGRATE_MOVABLE, STRUCT_PAGE_SIZE};
use hvo_images::Arch;

use crate::addr::{PhysAddr, VirtAddr};
use crate::invariant::Invariant;
use crate::memory::GuestMemory;
use crate::pgtable::{self, Leaf, Perms, WalkError};
use crate::report::Check;

pub mod live;

/// The invariants' names, as the verifier reports them.
pub const HEAD_PRIVATE: &str = Invariant::HeadPrivate.name();
pub const TAILS_SHARED: &str = Invariant::TailsShared.name();
pub const TAILS_READONLY: &str = Invariant::TailsReadonly.name();
pub const PTE_GRANULARITY: &str = Invariant::PteGranularity.name();
pub const CONTENTS: &str = Invariant::Contents.name();
pub const ACCOUNTING: &str = Invariant::Accounting.name();
pub const NO_LEAK: &str = Invariant::NoLeak.name();
pub const TRANSLATION_AGREES: &str = Invariant::TranslationAgrees.name();
pub const WRITE_FAULTS: &str = Invariant::WriteFaults.name();
pub const ROOTS_IN_SYNC: &str = Invariant::RootsInSync.name();
pub const MEMMAP_PRESENT: &str = Invariant::MemmapPresent.name();
pub const ALTMAP_UNOPTIMIZED: &str = Invariant::AltmapUnoptimized.name();

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("walking the vmemmap: {0}")]
    Walk(#[from] WalkError),
}

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

impl VmemmapMap {
    /// Walks the vmemmap of all RAM and of every region.
    pub fn walk(arch: Arch, manifest: &Manifest, mem: &dyn GuestMemory) -> Result<VmemmapMap, WalkError> {
        let page = manifest.page_size;
        let mut lo = u64::MAX;
        let mut hi = 0;
        for r in manifest.ram() {
            lo = lo.min(r.start / page);
            hi = hi.max(r.end() / page);
        }
        for r in manifest.regions.iter() {
            lo = lo.min(r.start_pfn - r.altmap_pfns.min(r.start_pfn));
            hi = hi.max(r.start_pfn + r.nr_pages);
        }
        let section = 1u64 << manifest.section_size_bits.min(40);
        let lo = (lo * page / section * section) / page;
        let hi = (hi * page).div_ceil(section) * section / page;
        // Whole vmemmap pages: with 64 KiB pages a section's struct pages
        // take a quarter of one.
        let start = VirtAddr(manifest.struct_page_va(lo) / page * page);
        let end = VirtAddr(manifest.struct_page_va(hi).div_ceil(page) * page);
        let walker = pgtable::walker_for(arch, mem, manifest, start)?;
        let mut runs: Vec<Run> = Vec::new();
        walker.for_each_leaf(mem, start, end, &mut |leaf| {
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
    fn span(&self, base: u64, n: u64) -> Vec<(u64, Option<(PageMapping, PhysAddr)>)> {
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
    fn mappers(&self, frame: PhysAddr) -> u64 {
        self.frames.get(&frame.0).map(|s| s.mappers).unwrap_or(0)
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
    fn pages_in(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, PageMapping, PhysAddr)> + '_ {
        let first = self.runs.partition_point(|r| r.end() <= start);
        self.runs[first..].iter().take_while(move |r| r.va < end).flat_map(move |r| {
            (0..r.pages)
                .map(move |i| r.va + i * r.page)
                .filter(move |va| *va >= start && *va < end)
                .map(move |va| (va, r.mapping, r.frame(va)))
        })
    }
}

/// Vmemmap pages one compound page of `order` fills; 0 when its struct pages
/// take less than a page (2 MiB with 64 KiB pages: 2 KiB), and it shares its
/// one vmemmap page with its neighbours.
pub fn vmemmap_pages_per_compound(order: u32, page: u64) -> u64 {
    (1u64 << order) * STRUCT_PAGE_SIZE / page
}

/// One compound page's vmemmap pages as the tables map them.
struct CompoundView {
    head_pfn: u64,
    /// Where its head struct page is in the first vmemmap page, counted in
    /// struct pages (0 unless compound pages share vmemmap pages).
    first: usize,
    /// Its struct pages in the first vmemmap page.
    in_first: usize,
    pages: Vec<(u64, Option<(PageMapping, PhysAddr)>)>,
    /// The base page size.
    page: u64,
}

impl CompoundView {
    fn new(manifest: &Manifest, map: &VmemmapMap, region: &Region, head_pfn: u64) -> CompoundView {
        let n = vmemmap_pages_per_compound(region.order, map.page).max(1);
        let head_va = manifest.struct_page_va(head_pfn);
        let base = head_va / map.page * map.page;
        let per_page = map.page / STRUCT_PAGE_SIZE;
        let first = ((head_va - base) / STRUCT_PAGE_SIZE) as usize;
        let in_first = (1u64 << region.order).min(per_page) as usize;
        CompoundView { head_pfn, first, in_first, pages: map.span(base, n), page: map.page }
    }

    /// This compound page's struct pages among those of its first vmemmap page.
    fn own<'p>(&self, page: &'p [StructPage]) -> &'p [StructPage] {
        page.get(self.first..self.first + self.in_first).unwrap_or(&[])
    }

    /// A small picture of the layout, in the style of vmemmap_dedup.rst: each
    /// vmemmap page, the frame it maps and how.
    fn diagram(&self, shared: Option<PhysAddr>) -> String {
        let mut out = format!("\n  compound page at pfn {:#x}:", self.head_pfn);
        let shown: Vec<usize> =
            if self.pages.len() <= 6 { (0..self.pages.len()).collect() } else { vec![0, 1, 2, self.pages.len() - 1] };
        for (k, &i) in shown.iter().enumerate() {
            if k > 0 && i != shown[k - 1] + 1 {
                let _ = write!(out, "\n    ...");
            }
            let (va, mapping) = &self.pages[i];
            let _ = match mapping {
                None => write!(out, "\n    vmemmap[{i}] {va:#x} -> unmapped"),
                Some((leaf, frame)) => write!(
                    out,
                    "\n    vmemmap[{i}] {va:#x} -> {frame} {}{}{}",
                    if leaf.perms.write { "RW" } else { "RO" },
                    if leaf.size() > self.page {
                        format!(" in a {} KiB leaf", leaf.size() >> 10)
                    } else {
                        String::new()
                    },
                    if Some(*frame) == shared { " (shared tail)" } else { "" },
                ),
            };
        }
        out
    }
}

fn read_page(mem: &dyn GuestMemory, frame: PhysAddr, page: u64) -> Option<Vec<StructPage>> {
    let mut bytes = vec![0u8; page as usize];
    mem.read(frame, &mut bytes).ok()?;
    Some(bytes.chunks_exact(64).map(|c| StructPage::from_le_bytes(c.try_into().unwrap_or(&[0; 64]))).collect())
}

/// Collects failures per invariant; a passing invariant reports what it covered.
#[derive(Default)]
struct Findings {
    failures: BTreeMap<&'static str, Vec<String>>,
    covered: BTreeMap<&'static str, u64>,
    /// (invariant, head pfn) already reported with its diagram.
    pictured: std::collections::HashSet<(&'static str, u64)>,
}

impl Findings {
    fn fail(&mut self, invariant: &'static str, what: String) {
        self.failures.entry(invariant).or_default().push(what);
    }

    /// A failure inside one compound page: the first for this invariant
    /// carries the page's diagram; later ones only say where.
    fn fail_in(&mut self, invariant: &'static str, view: &CompoundView, shared: Option<PhysAddr>, what: String) {
        if self.pictured.insert((invariant, view.head_pfn)) {
            self.fail(invariant, format!("{what}{}", view.diagram(shared)));
        } else {
            self.fail(invariant, what);
        }
    }
    fn cover(&mut self, invariant: &'static str, n: u64) {
        *self.covered.entry(invariant).or_default() += n;
    }
    fn into_checks(self, names: &[&'static str]) -> Vec<Check> {
        names
            .iter()
            .map(|name| match self.failures.get(name) {
                Some(f) => {
                    let more = if f.len() > 3 { format!(" (and {} more)", f.len() - 3) } else { String::new() };
                    Check::fail(name, format!("{}{more}", f[..f.len().min(3)].join("; ")))
                }
                None => Check::pass(name, format!("{} checked", self.covered.get(name).copied().unwrap_or(0))),
            })
            .collect()
    }
}

/// The layout the scenario last asked of each region, by region id: `none`
/// for HugeTLB folios never optimized or restored since.
pub type Requested = HashMap<u32, Layout>;

/// Checks every static invariant (all but those needing the live guest).
/// Regions in `requested` must also be optimized exactly when the host's own
/// arithmetic says they can be.
pub fn check(
    arch: Arch,
    manifest: &Manifest,
    mem: &dyn GuestMemory,
    requested: &Requested,
) -> Result<(Vec<Check>, VmemmapMap), VerifyError> {
    let map = VmemmapMap::walk(arch, manifest, mem)?;
    let page = map.page;
    let mut f = Findings::default();

    // Optimized exactly when it can be: the layout asked for, room to share,
    // struct pages in system memory (altmap-unoptimized judges the others)
    // and not in a boot section's memmap.
    for region in manifest.regions.iter().filter(|r| r.kind != RegionKind::Memory && r.altmap_pfns == 0) {
        let Some(&asked) = requested.get(&region.id) else { continue };
        f.cover(TAILS_SHARED, 1);
        let reason = why_not_optimizable(manifest, region, asked, page);
        let problem = match (&reason, region.optimized) {
            (None, false) => Some(format!(
                "region {} was to be optimized under {}, its {} compound pages spanning {} vmemmap pages of {} KiB, but the guest left it unoptimized",
                region.id,
                asked.name(),
                size_name(page << region.order),
                vmemmap_pages_per_compound(region.order, page),
                page >> 10
            )),
            (Some(why), true) => Some(format!(
                "region {} claims to be optimized under {}, but it cannot be: {why}",
                region.id,
                region.layout.name()
            )),
            (None, true) if region.layout != asked => Some(format!(
                "region {} is optimized under {}, but {} was asked for",
                region.id,
                region.layout.name(),
                asked.name()
            )),
            _ => None,
        };
        if let Some(p) = problem {
            f.fail(TAILS_SHARED, p);
        }
    }

    // Distinct (zone, order) pairs never share a frame.
    let tails: Vec<_> = manifest.shared_tails.iter().collect();
    for (i, a) in tails.iter().enumerate() {
        for b in &tails[i + 1..] {
            if a.pa == b.pa {
                f.fail(
                    TAILS_SHARED,
                    format!(
                        "zones {}/order {} and {}/order {} share the tail page {:#x}",
                        a.zone.name(),
                        a.order,
                        b.zone.name(),
                        b.order,
                        a.pa
                    ),
                );
            }
        }
    }

    // Hot-added memory holds plain pages, no compound pages: its vmemmap is
    // covered by accounting and no-leak.
    for region in manifest.regions.iter().filter(|r| r.kind != RegionKind::Memory) {
        let shared = manifest.shared_tails.find(region.zone, region.order).map(|t| PhysAddr(t.pa));
        let mut compound_pages = 0;
        for head in region.heads() {
            compound_pages += 1;
            let view = CompoundView::new(manifest, &map, region, head);
            check_compound(&mut f, mem, &map, region, &view, shared);
        }
        // The shared page counts its users (a missing page is tails-shared's finding).
        let shared_entry = manifest.shared_tails.find(region.zone, region.order);
        if let (true, Layout::Unified, Some(t)) = (region.optimized, region.layout, shared_entry) {
            f.cover(ACCOUNTING, 1);
            if t.users < compound_pages {
                f.fail(ACCOUNTING, format!(
                    "the {}/order {} shared tail page counts {} users, region {} alone has {compound_pages} optimized compound pages",
                    region.zone.name(), region.order, t.users, region.id
                ));
            }
        }
    }

    // Device ranges: every pageblock tagged movable, 1 GiB compound pages too.
    for region in manifest.regions.iter().filter(|r| r.kind == RegionKind::Dax && r.pageblock_tags != 0) {
        let pageblock = pageblock_pages(page);
        let count = region.nr_pages.div_ceil(pageblock) as usize;
        let mut tags = vec![0u8; count];
        f.cover(CONTENTS, count as u64);
        if mem.read(PhysAddr(region.pageblock_tags), &mut tags).is_err() {
            f.fail(
                CONTENTS,
                format!("region {}: pageblock tags at {:#x} unreadable", region.id, region.pageblock_tags),
            );
            continue;
        }
        let wrong: Vec<usize> = (0..count).filter(|&i| tags[i] != MIGRATE_MOVABLE).collect();
        if let Some(&first) = wrong.first() {
            f.fail(CONTENTS, format!(
                "region {}: {} of {count} pageblocks are not movable, the first pageblock {first} (pfn {:#x}) has migratetype {}",
                region.id,
                wrong.len(),
                region.start_pfn + first as u64 * pageblock,
                tags[first]
            ));
        }
    }

    // Struct pages on the device (altmap) are never optimized.
    for region in manifest.regions.iter().filter(|r| r.altmap_pfns > 0) {
        check_altmap(&mut f, manifest, &map, region);
    }

    // Every present page has its struct page mapped: boot memory and
    // hot-added memory (device ranges are checked page by page above).
    let present = manifest.ram().map(|r| (r.start / page, r.end().div_ceil(page), "boot memory".to_string())).chain(
        manifest
            .regions
            .iter()
            .filter(|r| r.kind == RegionKind::Memory)
            .map(|r| (r.start_pfn, r.start_pfn + r.nr_pages, format!("hot-added memory region {}", r.id))),
    );
    for (first_pfn, end_pfn, what) in present {
        let first = manifest.struct_page_va(first_pfn) / page * page;
        let end = manifest.struct_page_va(end_pfn).div_ceil(page) * page;
        let unmapped: Vec<u64> = (first..end).step_by(page as usize).filter(|va| map.lookup(*va).is_none()).collect();
        f.cover(MEMMAP_PRESENT, (end - first) / page);
        if let Some(va) = unmapped.first() {
            let pfn = (va - manifest.vmemmap_base) / STRUCT_PAGE_SIZE + manifest.memstart_pfn;
            f.fail(
                MEMMAP_PRESENT,
                format!(
                    "{what}: {} of its {} vmemmap pages are unmapped, the first at {va:#x} (struct pages of pfn {pfn:#x} on)",
                    unmapped.len(),
                    (end - first) / page
                ),
            );
        }
    }

    // Accounting: what the guest counted, recounted from the tables. Frames
    // on the device (altmap) are the device's, not system memory.
    let counted = manifest.counters.vmemmap_live();
    let altmap_frames = manifest
        .regions
        .iter()
        .map(|r| r.altmap().filter(|pfn| map.mappers(PhysAddr(pfn * page)) > 0).count() as u64)
        .sum::<u64>();
    let system_frames = map.frames() - altmap_frames;
    f.cover(ACCOUNTING, 2);
    if counted != system_frames {
        f.fail(
            ACCOUNTING,
            format!(
                "the guest counts {counted} live vmemmap frames, the page tables map {system_frames} distinct ones in system memory"
            ),
        );
    }
    // Roots share their lower tables: count each table once.
    let trees = pgtable::published_trees(arch, mem, manifest)?;
    let mut tables = HashMap::new();
    for t in &trees {
        tables.extend(t.tables(mem)?);
    }
    // The guest gives every table at least a frame of its own (a 64 KiB-page
    // radix PTE table is 256 bytes).
    let table_frames: u64 = tables.values().map(|bytes| bytes.div_ceil(page)).sum();
    if manifest.counters.pagetable_live() != table_frames {
        f.fail(
            ACCOUNTING,
            format!(
                "the guest counts {} live page-table frames, the roots reach {table_frames}",
                manifest.counters.pagetable_live()
            ),
        );
    }

    // No leak: every shared tail page has users and is mapped by the vmemmap.
    for t in manifest.shared_tails.iter() {
        f.cover(NO_LEAK, 1);
        if t.users == 0 {
            f.fail(
                NO_LEAK,
                format!(
                    "shared tail page {:#x} ({}/order {}) has no users but was not freed",
                    t.pa,
                    t.zone.name(),
                    t.order
                ),
            );
        } else if map.mappers(PhysAddr(t.pa)) == 0 {
            f.fail(
                NO_LEAK,
                format!(
                    "shared tail page {:#x} ({}/order {}) is mapped by no vmemmap page",
                    t.pa,
                    t.zone.name(),
                    t.order
                ),
            );
        }
    }

    // Every root carries the kernel's entries over the vmemmap.
    if let Some(process) = manifest.root(hvo_abi::manifest::RootKind::Process) {
        let kernel = pgtable::walker_for(arch, mem, manifest, map.start)?;
        let other = pgtable::Walker::like(&kernel, PhysAddr(process.pa));
        let theirs = other.root_entries(mem, map.start, map.end)?;
        for ((index, ours), (_, raw)) in kernel.root_entries(mem, map.start, map.end)?.into_iter().zip(theirs) {
            f.cover(ROOTS_IN_SYNC, 1);
            if kernel.decode_root_entry(ours) != other.decode_root_entry(raw) {
                f.fail(ROOTS_IN_SYNC, format!(
                    "top-level entry {index} over the vmemmap is {ours:#x} in the kernel root but {raw:#x} in the process root at {:#x}",
                    process.pa
                ));
            }
        }
    }

    Ok((
        f.into_checks(&[
            HEAD_PRIVATE,
            TAILS_SHARED,
            TAILS_READONLY,
            PTE_GRANULARITY,
            CONTENTS,
            ACCOUNTING,
            NO_LEAK,
            ROOTS_IN_SYNC,
            MEMMAP_PRESENT,
            ALTMAP_UNOPTIMIZED,
        ]),
        map,
    ))
}

/// Why a region asked to take `asked` cannot be optimized, by the host's own
/// arithmetic; `None` when it can and must be.
fn why_not_optimizable(manifest: &Manifest, region: &Region, asked: Layout, page: u64) -> Option<String> {
    let n = vmemmap_pages_per_compound(region.order, page);
    // Pages each compound page keeps private (VMEMMAP_RESERVE_NR).
    let private = if asked == Layout::LegacyDax { 2 } else { 1 };
    if asked == Layout::None {
        return Some("no layout was asked for".into());
    }
    if n <= private {
        return Some(format!(
            "its {} compound pages have {} of struct pages, {} of {} KiB, and {} stays private under {}: nothing is left to share",
            size_name(page << region.order),
            size_name((1u64 << region.order) * STRUCT_PAGE_SIZE),
            match n {
                0 => "less than one vmemmap page".to_string(),
                1 => "one vmemmap page".to_string(),
                n => format!("{n} vmemmap pages"),
            },
            page >> 10,
            private,
            asked.name()
        ));
    }
    if region.kind == RegionKind::Dax {
        // A range starting in a section boot RAM shares reuses that
        // section's memmap, populated whole at boot (section_activate).
        let section = 1u64 << manifest.section_size_bits.min(40);
        let start = region.start_pfn * page / section * section;
        if manifest.ram().any(|r| r.start < start + section && r.end() > start) {
            return Some(format!("it starts in the boot memory section at {start:#x}, whose memmap it reuses"));
        }
    }
    None
}

/// "2M", "1G", "2K": a size for messages.
pub fn size_name(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}K", b >> 10),
        b => format!("{b}B"),
    }
}

/// A region whose struct pages live on the device: every vmemmap page its
/// own writable frame, inside the device's altmap, nothing shared.
fn check_altmap(f: &mut Findings, manifest: &Manifest, map: &VmemmapMap, region: &Region) {
    f.cover(ALTMAP_UNOPTIMIZED, 1);
    if region.optimized {
        f.fail(
            ALTMAP_UNOPTIMIZED,
            format!(
                "region {} keeps its struct pages on the device (altmap), yet it is optimized under {}",
                region.id,
                region.layout.name()
            ),
        );
    }
    let altmap = region.altmap();
    for head in region.heads() {
        let view = CompoundView::new(manifest, map, region, head);
        for (i, (_, m)) in view.pages.iter().enumerate() {
            f.cover(ALTMAP_UNOPTIMIZED, 1);
            let where_ = format!("region {} compound page at pfn {head:#x}, vmemmap[{i}]", region.id);
            match m {
                None => f.fail_in(ALTMAP_UNOPTIMIZED, &view, None, format!("{where_}: unmapped")),
                Some((leaf, frame)) => {
                    let problem = if !altmap.contains(&(frame.0 / map.page)) {
                        Some(format!(
                            "maps {frame}, outside the device's altmap (pfns {:#x}..{:#x})",
                            altmap.start, altmap.end
                        ))
                    } else if map.mappers(*frame) != 1 {
                        Some(format!("maps {frame}, shared by {} vmemmap pages", map.mappers(*frame)))
                    } else if !leaf.perms.write {
                        Some(format!("maps {frame} read-only"))
                    } else {
                        None
                    };
                    if let Some(p) = problem {
                        f.fail_in(ALTMAP_UNOPTIMIZED, &view, None, format!("{where_}: {p}"));
                    }
                }
            }
        }
    }
}

fn check_compound(
    f: &mut Findings,
    mem: &dyn GuestMemory,
    map: &VmemmapMap,
    region: &Region,
    view: &CompoundView,
    shared: Option<PhysAddr>,
) {
    let where_ = |i: usize| format!("region {} compound page at pfn {:#x}, vmemmap[{i}]", region.id, view.head_pfn);
    let Some((head_leaf, head_frame)) = view.pages[0].1 else {
        f.fail_in(HEAD_PRIVATE, view, shared, format!("{}: head vmemmap page unmapped", where_(0)));
        return;
    };

    // Contents of the head page: the head struct page then its tails.
    f.cover(CONTENTS, 1);
    match read_page(mem, head_frame, view.page) {
        None => f.fail(CONTENTS, format!("{}: head page {head_frame} unreadable", where_(0))),
        Some(page) => {
            let pages = view.own(&page);
            let expect_tail = StructPage::tail(region.zone, region.order);
            if pages.first() != Some(&StructPage::head(region.zone, region.order)) {
                f.fail(CONTENTS, format!("{}: head struct page is {:?}", where_(0), pages.first()));
            } else if let Some(k) = pages[1..].iter().position(|p| *p != expect_tail) {
                f.fail(
                    CONTENTS,
                    format!(
                        "{}: struct page {} of the head page is {:?}, expected a tail",
                        where_(0),
                        k + 1,
                        pages[k + 1]
                    ),
                );
            }
        }
    }

    if !region.optimized {
        // Unoptimized: every struct page initialized, every vmemmap page
        // private and writable.
        check_unoptimized_contents(f, mem, region, view);
        for (i, (_, m)) in view.pages.iter().enumerate() {
            f.cover(HEAD_PRIVATE, 1);
            match m {
                Some((leaf, frame)) if leaf.perms.write && map.mappers(*frame) == 1 => {}
                Some((leaf, frame)) => f.fail_in(
                    HEAD_PRIVATE,
                    view,
                    shared,
                    format!(
                        "{}: not optimized, yet it maps {frame} {} shared by {} vmemmap pages",
                        where_(i),
                        if leaf.perms.write { "RW" } else { "RO" },
                        map.mappers(*frame)
                    ),
                ),
                None => f.fail_in(HEAD_PRIVATE, view, shared, format!("{}: unmapped", where_(i))),
            }
        }
        return;
    }

    // Optimized: base-page PTEs only.
    for (i, (_, m)) in view.pages.iter().enumerate() {
        f.cover(PTE_GRANULARITY, 1);
        if let Some((leaf, _)) = m {
            if leaf.size() != view.page {
                f.fail_in(
                    PTE_GRANULARITY,
                    view,
                    shared,
                    format!("{}: mapped by a {} KiB leaf, not a base page", where_(i), leaf.size() >> 10),
                );
            }
        }
    }

    // The head page: private and writable.
    f.cover(HEAD_PRIVATE, 1);
    let head_users = map.mappers(head_frame);
    let private_ok = match region.layout {
        // Legacy HugeTLB maps the tails onto the head's own frame.
        Layout::LegacyHugetlb => head_users == view.pages.len() as u64,
        _ => head_users == 1,
    };
    if !head_leaf.perms.write || !private_ok || Some(head_frame) == shared {
        f.fail_in(
            HEAD_PRIVATE,
            view,
            shared,
            format!(
                "{}: head page {head_frame} is {} and mapped by {} vmemmap pages{}",
                where_(0),
                if head_leaf.perms.write { "writable" } else { "read-only" },
                head_users,
                if Some(head_frame) == shared { ", and it is the shared tail page" } else { "" }
            ),
        );
    }

    // Tails: the layout's frame, read-only unless the layout says otherwise.
    let (first_tail, expected, writable) = match region.layout {
        Layout::Unified => (1, shared, false),
        Layout::LegacyHugetlb => (1, Some(head_frame), false),
        Layout::LegacyDax => (2, view.pages.get(1).and_then(|p| p.1).map(|(_, fr)| fr), true),
        Layout::None => (view.pages.len(), None, true),
    };
    if region.layout == Layout::Unified && shared.is_none() {
        f.fail(
            TAILS_SHARED,
            format!(
                "{}: optimized under unified, but the manifest has no {}/order {} shared tail page",
                where_(1),
                region.zone.name(),
                region.order
            ),
        );
    }
    for (i, (_, m)) in view.pages.iter().enumerate().skip(first_tail) {
        f.cover(TAILS_SHARED, 1);
        f.cover(TAILS_READONLY, 1);
        let Some((leaf, frame)) = m else {
            f.fail_in(TAILS_SHARED, view, shared, format!("{}: tail page unmapped", where_(i)));
            continue;
        };
        if Some(*frame) != expected {
            f.fail_in(
                TAILS_SHARED,
                view,
                shared,
                format!(
                    "{}: tail maps {frame}, expected {} under {}",
                    where_(i),
                    expected.map(|e| e.to_string()).unwrap_or_else(|| "a shared page".into()),
                    region.layout.name()
                ),
            );
        }
        if !writable && (leaf.perms.write || leaf.perms.exec) {
            f.fail_in(
                TAILS_READONLY,
                view,
                shared,
                format!(
                    "{}: tail is {}{} through the page tables",
                    where_(i),
                    if leaf.perms.write { "writable" } else { "" },
                    if leaf.perms.exec { " executable" } else { "" }
                ),
            );
        }
    }
    // The shared page itself holds identical tails of this zone and order.
    if let (Layout::Unified, Some(page)) = (region.layout, shared) {
        f.cover(CONTENTS, 1);
        let expect = StructPage::tail(region.zone, region.order);
        match read_page(mem, page, view.page) {
            Some(pages) if pages.iter().all(|p| *p == expect) => {}
            Some(pages) => {
                let k = pages.iter().position(|p| *p != expect).unwrap_or(0);
                f.fail(
                    CONTENTS,
                    format!(
                        "shared tail page {page} ({}/order {}): struct page {k} is {:?}",
                        region.zone.name(),
                        region.order,
                        pages[k]
                    ),
                );
            }
            None => f.fail(CONTENTS, format!("shared tail page {page} unreadable")),
        }
    }
}

/// Every tail struct page of an unoptimized compound page past its head
/// vmemmap page (the head page is checked for all): each is this zone and
/// order's tail, not poison nor anything else.
fn check_unoptimized_contents(f: &mut Findings, mem: &dyn GuestMemory, region: &Region, view: &CompoundView) {
    let expect_tail = StructPage::tail(region.zone, region.order);
    let per_page = view.page / STRUCT_PAGE_SIZE;
    let mut wrong = 0u64;
    let mut first = None;
    for (i, (_, m)) in view.pages.iter().enumerate().skip(1) {
        let Some((_, frame)) = m else { continue };
        f.cover(CONTENTS, 1);
        match read_page(mem, *frame, view.page) {
            None => {
                f.fail(
                    CONTENTS,
                    format!(
                        "region {} compound page at pfn {:#x}, vmemmap[{i}]: {frame} unreadable",
                        region.id, view.head_pfn
                    ),
                );
                return;
            }
            Some(pages) => {
                for (k, p) in pages.iter().enumerate().filter(|(_, p)| **p != expect_tail) {
                    wrong += 1;
                    first.get_or_insert((i as u64 * per_page + k as u64, *p));
                }
            }
        }
    }
    if let Some((index, page)) = first {
        let what = if page == StructPage::POISONED { "still poisoned".to_string() } else { format!("{page:?}") };
        f.fail(
            CONTENTS,
            format!(
                "region {} compound page at pfn {:#x}: {wrong} of its {} tail struct pages are not initialized tails; struct page {index} (pfn {:#x}) is {what}",
                region.id,
                view.head_pfn,
                (1u64 << region.order) - 1,
                view.head_pfn + index
            ),
        );
    }
}

/// At most this many vmemmap pages are listed in a dump.
const MAX_DUMP_PAGES: usize = 20_000;

/// A text picture of the vmemmap for a failure's artifacts: the guest's
/// counters, shared tail pages and regions as its manifest states them, then
/// every region's vmemmap pages as the host's walker found them.
pub fn dump(manifest: &Manifest, map: &VmemmapMap) -> String {
    let mut out = String::new();
    let c = &manifest.counters;
    let _ = writeln!(
        out,
        "counters: vmemmap {} allocated {} freed, page tables {} allocated {} freed, {} struct pages initialized",
        c.vmemmap_allocated, c.vmemmap_freed, c.pagetable_allocated, c.pagetable_freed, c.struct_pages_initialized
    );
    for t in manifest.shared_tails.iter() {
        let _ = writeln!(out, "shared tail {}/order {}: {:#x}, {} users", t.zone.name(), t.order, t.pa, t.users);
    }
    let mut listed = 0;
    for r in manifest.regions.iter() {
        let _ = writeln!(
            out,
            "\nregion {} {:?}: pfns {:#x}..{:#x} {}/order {} layout {} {}{}",
            r.id,
            r.kind,
            r.start_pfn,
            r.start_pfn + r.nr_pages,
            r.zone.name(),
            r.order,
            r.layout.name(),
            if r.optimized { "optimized" } else { "not optimized" },
            if r.altmap_pfns > 0 { format!(", altmap of {} pages", r.altmap_pfns) } else { String::new() },
        );
        let start = manifest.struct_page_va(r.start_pfn) / map.page * map.page;
        let end = manifest.struct_page_va(r.start_pfn + r.nr_pages).div_ceil(map.page) * map.page;
        for (va, leaf, frame) in map.pages_in(start, end) {
            if listed == MAX_DUMP_PAGES {
                let _ = writeln!(out, "  ... (the rest left out: {MAX_DUMP_PAGES} pages listed)");
                return out;
            }
            listed += 1;
            let _ = writeln!(
                out,
                "  {va:#x} -> {} {}{} {} KiB leaf",
                frame,
                if leaf.perms.write { "RW" } else { "RO" },
                if leaf.perms.exec { "X" } else { "" },
                leaf.size() >> 10
            );
        }
    }
    out
}

/// What one region's vmemmap costs, measured from the page tables.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RegionCost {
    /// `dax` for device-zone regions, `hugetlb` otherwise.
    pub kind: &'static str,
    pub zone: &'static str,
    pub order: u32,
    /// The compound page's size in bytes (`page_size << order`).
    pub compound_bytes: u64,
    /// The base page size it was measured with.
    pub page_size: u64,
    pub layout: &'static str,
    pub optimized: bool,
    pub compound_pages: u64,
    /// Writable frames mapped only by one compound page's own vmemmap, per compound page.
    pub private_vmemmap_bytes: u64,
    /// Read-only or cross-compound-page frames (the shared tail pages).
    pub shared_tail_pages: u64,
    /// What one compound page's vmemmap takes unoptimized.
    pub unoptimized_vmemmap_bytes: u64,
}

/// Per region: private vmemmap bytes per compound page and shared pages,
/// counted from which vmemmap pages map which frames (not from a formula).
pub fn region_costs(manifest: &Manifest, map: &VmemmapMap) -> Vec<RegionCost> {
    let page = map.page;
    let mut out = Vec::new();
    for region in manifest.regions.iter().filter(|r| r.kind != RegionKind::Memory) {
        let struct_bytes = (1u64 << region.order) * STRUCT_PAGE_SIZE;
        let pages = vmemmap_pages_per_compound(region.order, page);
        let mut private_bytes = 0;
        let mut shared = std::collections::BTreeSet::new();
        let mut compound_pages = 0;
        for head in region.heads() {
            compound_pages += 1;
            let base = manifest.struct_page_va(head);
            if pages == 0 {
                // Less than a page of struct pages: neighbours share the
                // vmemmap page, and each owns its part of it, if the page is
                // private and writable.
                match map.lookup(base) {
                    Some((leaf, frame)) if leaf.perms.write && map.mappers(frame) == 1 => private_bytes += struct_bytes,
                    Some((_, frame)) => {
                        shared.insert(frame.0);
                    }
                    None => {}
                }
                continue;
            }
            let own = base..base + pages * page;
            let mut frames: Vec<u64> =
                map.span(base, pages).into_iter().filter_map(|(_, m)| m.map(|(_, f)| f.0)).collect();
            frames.sort_unstable();
            frames.dedup();
            for frame in frames {
                // Private: this compound page's alone, and writable (legacy
                // layouts map tails onto a private page). A frame mapped only
                // read-only is a shared tail page, even with one user so far.
                let Some(summary) = map.frames.get(&frame) else { continue };
                let exclusive = own.contains(&summary.lowest_va) && own.contains(&summary.highest_va);
                if exclusive && summary.writable {
                    private_bytes += page;
                } else {
                    shared.insert(frame);
                }
            }
        }
        out.push(RegionCost {
            kind: if region.zone == hvo_abi::model::Zone::Device { "dax" } else { "hugetlb" },
            zone: region.zone.name(),
            order: region.order,
            compound_bytes: page << region.order,
            page_size: page,
            layout: if region.optimized { region.layout.name() } else { Layout::None.name() },
            optimized: region.optimized,
            compound_pages,
            private_vmemmap_bytes: private_bytes.checked_div(compound_pages).unwrap_or(0),
            shared_tail_pages: shared.len() as u64,
            unoptimized_vmemmap_bytes: struct_bytes,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::CheckStatus;
    use crate::synth::SynthVmemmap;

    fn failing(s: &SynthVmemmap) -> Vec<(String, String)> {
        failing_asked(s, &Requested::new())
    }

    /// The failing checks when the scenario asked `requested` of the regions.
    fn failing_asked(s: &SynthVmemmap, requested: &Requested) -> Vec<(String, String)> {
        let (checks, _) = check(Arch::X86_64, &s.manifest(), &s.mem, requested).unwrap();
        checks.into_iter().filter(|c| c.status == CheckStatus::Fail).map(|c| (c.name, c.detail)).collect()
    }

    #[test]
    fn a_unified_dax_range_built_by_hand_passes_every_invariant() {
        let mut s = SynthVmemmap::new();
        s.add_unified_dax(0x10_0000, 16, 9);
        s.add_unified_dax(0x14_0000, 1, 18);
        assert_eq!(failing(&s), vec![]);
        let (_, map) = check(Arch::X86_64, &s.manifest(), &s.mem, &Requested::new()).unwrap();
        assert_eq!(map.ptes(), 8 + 16 * 8 + 4096);
    }

    #[test]
    fn a_writable_tail_is_caught_by_tails_readonly_naming_the_page() {
        let mut s = SynthVmemmap::new();
        s.add_unified_dax(0x10_0000, 4, 9);
        let shared = s.manifest().shared_tails.iter().next().unwrap().pa;
        s.map(SynthVmemmap::va(0x10_0200) + 3 * 4096, shared, true);
        let f = failing(&s);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].0, TAILS_READONLY);
        assert!(f[0].1.contains("compound page at pfn 0x100200, vmemmap[3]: tail is writable"), "{}", f[0].1);
    }

    #[test]
    fn a_head_on_the_shared_page_and_a_miscount_are_caught() {
        let mut s = SynthVmemmap::new();
        s.add_unified_dax(0x10_0000, 4, 9);
        let shared = s.manifest().shared_tails.iter().next().unwrap().pa;
        s.map(SynthVmemmap::va(0x10_0400), shared, true);
        let names: Vec<String> = failing(&s).into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&HEAD_PRIVATE.to_string()), "{names:?}");

        let mut s = SynthVmemmap::new();
        s.add_unified_dax(0x10_0000, 4, 9);
        s.counters().vmemmap_allocated += 7;
        let f = failing(&s);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].0, ACCOUNTING);
        assert!(f[0].1.contains("the guest counts 20 live vmemmap frames, the page tables map 13"), "{}", f[0].1);
    }

    #[test]
    fn a_region_optimized_other_than_asked_is_caught_by_tails_shared() {
        let mut s = SynthVmemmap::new();
        s.add_unified_dax(0x10_0000, 4, 9);
        let id = s.manifest().regions.iter().next().unwrap().id;
        let checks = |layout| failing_asked(&s, &Requested::from([(id, layout)]));
        assert_eq!(checks(Layout::Unified), vec![]);
        let f = checks(Layout::LegacyDax);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].0, TAILS_SHARED);
        assert!(f[0].1.contains("is optimized under unified, but legacy-dax was asked for"), "{}", f[0].1);
        let f = checks(Layout::None);
        assert!(f[0].1.contains("claims to be optimized under unified, but it cannot be: no layout was asked for"));
    }

    #[test]
    fn an_unmapped_boot_memmap_page_is_caught_by_memmap_present() {
        let mut s = SynthVmemmap::new();
        s.unmap(SynthVmemmap::va(0) + 2 * 4096);
        s.counters().vmemmap_freed += 1;
        let f = failing(&s);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].0, MEMMAP_PRESENT);
        assert!(f[0].1.contains("boot memory: 1 of its 8 vmemmap pages are unmapped"), "{}", f[0].1);
    }
}
