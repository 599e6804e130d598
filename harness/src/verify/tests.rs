//! The verifier on hand-built vmemmaps in every format: a clean build of
//! every layout passes every static invariant, and each breakage fails its
//! invariant and nothing else (but what it cannot help breaking too).

use hvo_abi::model::{Layout, RegionKind, StructPage, Zone};

use super::*;
use crate::addr::Pfn;
use crate::invariant::CheckedBy;
use crate::report::CheckStatus;
use crate::synth::{BuiltRegion, RegionSpec, SynthVmemmap};
use Invariant::*;

/// The failing checks when the scenario asked `requested` of the regions:
/// (name, detail).
fn failing(s: &SynthVmemmap, requested: &Requested) -> Vec<(String, String)> {
    failing_beside(s, requested, &[])
}

/// The failing checks when the scenario also hot-added memory at `memory`.
fn failing_beside(s: &SynthVmemmap, requested: &Requested, memory: &HotAddedMemory) -> Vec<(String, String)> {
    let arch = s.manifest().arch;
    let (checks, _) = check(arch, &s.manifest(), &s.mem, requested, memory).unwrap();
    checks.into_iter().filter(|c| c.status == CheckStatus::Fail).map(|c| (c.name, c.detail)).collect()
}

fn names(failures: &[(String, String)]) -> Vec<&str> {
    failures.iter().map(|(n, _)| n.as_str()).collect()
}

/// One region of each layout, 4 compound pages each, of the order worth
/// optimizing with the format's page size, and what the scenario asked.
struct Standard {
    s: SynthVmemmap,
    unified: BuiltRegion,
    legacy_dax: BuiltRegion,
    requested: Requested,
}

fn spec(kind: RegionKind, zone: Zone, order: u32, layout: Layout, altmap: bool) -> RegionSpec {
    RegionSpec { kind, zone, order, count: 4, layout, altmap }
}

/// Every region the standard build has: each layout, and struct pages on the device.
fn standard_regions(order: u32) -> [RegionSpec; 5] {
    [
        spec(RegionKind::Dax, Zone::Device, order, Layout::Unified, false),
        spec(RegionKind::HugeTlb, Zone::Movable, order, Layout::LegacyHugetlb, false),
        spec(RegionKind::Dax, Zone::Device, order, Layout::LegacyDax, false),
        spec(RegionKind::HugeTlb, Zone::Normal, order, Layout::None, false),
        spec(RegionKind::Dax, Zone::Device, order, Layout::None, true),
    ]
}

fn standard(arch: Arch) -> Standard {
    let mut s = SynthVmemmap::new(arch);
    let mut requested = Requested::new();
    let mut built = Vec::new();
    for r in standard_regions(s.order()) {
        let b = s.add_region(r);
        requested.insert(b.id, r.layout);
        built.push(b);
    }
    Standard { s, unified: built[0], legacy_dax: built[2], requested }
}

impl Standard {
    /// The vmemmap address of page `i` of unified compound page `c`.
    fn unified_page(&self, c: u64, i: u64) -> u64 {
        self.s.va(self.unified.head(c)) + i * self.s.page()
    }

    /// The vmemmap address of page `i` of legacy-dax compound page `c`.
    fn legacy_dax_page(&self, c: u64, i: u64) -> u64 {
        self.s.va(self.legacy_dax.head(c)) + i * self.s.page()
    }
}

/// One way to break the vmemmap, what must catch it, and what else it
/// cannot help breaking.
struct Breakage {
    invariant: Invariant,
    also: &'static [Invariant],
    what: &'static str,
    apply: fn(&mut Standard),
}

impl Breakage {
    const fn only(invariant: Invariant, what: &'static str, apply: fn(&mut Standard)) -> Breakage {
        Breakage { invariant, also: &[], what, apply }
    }

    const fn with(
        invariant: Invariant,
        also: &'static [Invariant],
        what: &'static str,
        apply: fn(&mut Standard),
    ) -> Breakage {
        Breakage { invariant, also, what, apply }
    }
}

/// Every frame of the hand-built boot RAM (no region lies in it).
fn boot_ram_frames(s: &SynthVmemmap) -> Vec<Pfn> {
    let page = s.page();
    s.manifest().ram().flat_map(|r| (r.start / page..r.end() / page).map(Pfn)).collect()
}

const BREAKAGES: &[Breakage] = &[
    Breakage::only(HeadPrivate, "a head vmemmap page mapping another compound page's head frame", |t| {
        let other = t.s.frame_at(t.unified_page(0, 0)).unwrap();
        t.s.map(t.unified_page(1, 0), other, true);
    }),
    Breakage::only(HeadPrivate, "a read-only head vmemmap page", |t| {
        let own = t.s.frame_at(t.unified_page(0, 0)).unwrap();
        t.s.map(t.unified_page(0, 0), own, false);
    }),
    Breakage::only(TailsShared, "a tail mapping a frame of its own, not the shared page", |t| {
        let own = t.s.vmemmap_frame(&[StructPage::tail(Zone::Device, t.s.order())]);
        t.s.map(t.unified_page(0, 2), own, false);
    }),
    Breakage::only(TailsReadonly, "a writable tail", |t| {
        let shared = t.s.frame_at(t.unified_page(0, 1)).unwrap();
        t.s.map(t.unified_page(0, 3), shared, true);
    }),
    Breakage::only(TailsReadonly, "a read-only legacy-dax tail", |t| {
        let first_tail = t.s.frame_at(t.legacy_dax_page(1, 1)).unwrap();
        t.s.map(t.legacy_dax_page(1, 3), first_tail, false);
    }),
    // A block leaf maps consecutive frames, writable: the tails under it
    // cannot be on the shared page, nor read-only.
    Breakage::with(PteGranularity, &[TailsShared, TailsReadonly], "a 2 MiB leaf over a range marked optimized", |t| {
        let order = t.s.order();
        t.s.add_region_in_block(spec(RegionKind::Dax, Zone::Device, order, Layout::Unified, false));
    }),
    Breakage::only(Contents, "a tail struct page of the wrong order in a head page", |t| {
        let wrong = StructPage::tail(Zone::Device, t.s.order() + 1);
        t.s.write_struct_page(t.unified.head(2) + 1, wrong);
    }),
    Breakage::only(Contents, "a device pageblock not movable", |t| t.s.set_pageblock_tag(t.unified.id, 1, 0)),
    Breakage::only(Contents, "boot RAM's struct pages never initialized (memmap init skipped them)", |t| {
        for pfn in boot_ram_frames(&t.s) {
            t.s.write_struct_page(pfn, StructPage::POISONED);
        }
    }),
    Breakage::only(Contents, "the last struct page of boot RAM left as the raw frame held it", |t| {
        let last = *boot_ram_frames(&t.s).last().unwrap();
        t.s.write_struct_page(last, StructPage::default());
    }),
    Breakage::only(Accounting, "a vmemmap counter off by 7", |t| t.s.counters().vmemmap_allocated += 7),
    Breakage::only(Accounting, "a leaked page-table frame", |t| t.s.leak_table()),
    // Still counted live, and mapped by nothing: the counters disagree too.
    Breakage::with(NoLeak, &[Accounting], "a shared tail page kept with no users", |t| {
        let order = t.s.order();
        t.s.leak_shared_tail(Zone::Normal, order);
    }),
    Breakage::only(NoLeak, "an empty page-table page left linked over the vmemmap", |t| t.s.link_empty_table()),
    Breakage::only(RootsInSync, "a process root without the kernel's vmemmap entry", |t| {
        let va = t.unified_page(0, 0);
        t.s.desync_process_root(va);
    }),
    Breakage::only(MemmapPresent, "an unmapped boot memmap page", |t| {
        let ram = t.s.manifest().ram().next().unwrap();
        let va = t.s.va(Pfn::containing(crate::addr::PhysAddr(ram.start), t.s.page()));
        t.s.unmap(va + 2 * t.s.page());
    }),
    Breakage::only(CompoundAligned, "compound pages starting off their natural alignment", |t| {
        let order = t.s.order();
        t.s.add_region_unaligned(spec(RegionKind::HugeTlb, Zone::Normal, order, Layout::Unified, false));
    }),
    Breakage::only(AltmapUnoptimized, "a range with its struct pages on the device, optimized", |t| {
        let order = t.s.order();
        t.s.add_region(spec(RegionKind::Dax, Zone::Device, order, Layout::Unified, true));
    }),
];

#[test]
fn the_table_checks_exactly_the_invariants_the_tables_decide_in_report_order() {
    let table: Vec<Invariant> = STATIC.iter().map(|(i, _)| *i).collect();
    let decided: Vec<Invariant> = Invariant::ALL.into_iter().filter(|i| i.checked_by() == CheckedBy::Tables).collect();
    assert_eq!(table, decided);
    let s = SynthVmemmap::new(Arch::X86_64);
    let (checks, _) = check(Arch::X86_64, &s.manifest(), &s.mem, &Requested::new(), &[]).unwrap();
    let reported: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(reported, decided.iter().map(|i| i.name()).collect::<Vec<_>>());
}

#[test]
fn every_layout_built_by_hand_passes_every_invariant_in_every_format() {
    for arch in Arch::ALL {
        let t = standard(arch);
        assert_eq!(failing(&t.s, &t.requested), vec![], "{arch:?}, all layouts");
        for r in standard_regions(t.s.order()) {
            let mut s = SynthVmemmap::new(arch);
            let b = s.add_region(r);
            let requested = Requested::from([(b.id, r.layout)]);
            assert_eq!(failing(&s, &requested), vec![], "{arch:?}, {} alone (altmap: {})", r.layout.name(), r.altmap);
        }
    }
}

#[test]
fn each_breakage_fails_its_invariant_and_no_other_in_every_format() {
    for arch in Arch::ALL {
        for b in BREAKAGES {
            let mut t = standard(arch);
            (b.apply)(&mut t);
            let failures = failing(&t.s, &t.requested);
            let mut expected: Vec<Invariant> = [b.invariant].into_iter().chain(b.also.iter().copied()).collect();
            expected.sort();
            let expected: Vec<&str> = expected.iter().map(|i| i.name()).collect();
            assert_eq!(names(&failures), expected, "{arch:?}: {}\n{failures:#?}", b.what);
        }
    }
}

#[test]
fn failures_name_the_page_and_picture_its_compound_page() {
    let mut t = standard(Arch::X86_64);
    let shared = t.s.frame_at(t.unified_page(0, 1)).unwrap();
    t.s.map(t.unified_page(0, 3), shared, true);
    let f = failing(&t.s, &t.requested);
    let head = t.unified.head(0);
    assert!(
        f[0].1.starts_with(&format!("region 0 compound page at pfn {head}, vmemmap[3]: tail is writable")),
        "{}",
        f[0].1
    );
    assert!(f[0].1.contains(&format!("\n  compound page at pfn {head}:\n    vmemmap[0] ")), "{}", f[0].1);
    // Eight vmemmap pages: the first three and the last are drawn.
    let drawn = format!("vmemmap[1] {:#x} -> {shared:#x} RO (shared tail)", t.unified_page(0, 1));
    assert!(f[0].1.contains(&drawn), "{}", f[0].1);
    assert!(f[0].1.contains("(shared tail)\n    ...\n    vmemmap[7] "), "{}", f[0].1);
}

#[test]
fn a_miscount_says_what_each_side_counted() {
    let mut t = standard(Arch::Aarch64);
    let live = t.s.manifest().counters.vmemmap_live();
    t.s.counters().vmemmap_allocated += 7;
    let f = failing(&t.s, &t.requested);
    let want = format!("the guest counts {} live vmemmap frames, the page tables map {live} distinct ones", live + 7);
    assert!(f[0].1.contains(&want), "{}", f[0].1);
}

#[test]
fn a_region_optimized_other_than_asked_is_caught_by_tails_shared() {
    let t = standard(Arch::Ppc64le64k);
    let id = t.unified.id;
    let asked = |layout| {
        let mut requested = t.requested.clone();
        requested.insert(id, layout);
        failing(&t.s, &requested)
    };
    let f = asked(Layout::LegacyDax);
    assert_eq!(names(&f), vec![Invariant::TailsShared.name()]);
    assert!(f[0].1.contains("region 0 is optimized under unified, but legacy-dax was asked for"), "{}", f[0].1);
    let f = asked(Layout::None);
    assert!(f[0].1.contains("claims to be optimized under unified, but it cannot be: no layout was asked for"));
}

#[test]
fn an_unmapped_boot_memmap_page_is_reported_with_its_first_pfn() {
    let mut s = SynthVmemmap::new(Arch::X86_64);
    s.unmap(s.va(Pfn(0)) + 2 * 4096);
    let f = failing(&s, &Requested::new());
    assert_eq!(names(&f), vec![Invariant::MemmapPresent.name()]);
    assert!(f[0].1.contains("boot memory: 1 of its 8 vmemmap pages are unmapped"), "{}", f[0].1);
    assert!(f[0].1.contains("(struct pages of pfn 0x80 on)"), "{}", f[0].1);
}

/// One compound page of the order worth optimizing laid in a 2 MiB leaf it
/// does not fill, and the byte range of the rest of the leaf's struct pages:
/// where memory hot-added beside it would be.
fn in_a_leaf(
    arch: Arch,
    kind: RegionKind,
    layout: Layout,
    altmap: bool,
) -> (SynthVmemmap, BuiltRegion, Vec<std::ops::Range<u64>>) {
    let mut s = SynthVmemmap::new(arch);
    let order = s.order();
    let b = s.add_region_in_block(RegionSpec { kind, zone: Zone::Device, order, count: 1, layout, altmap });
    let page = s.page();
    let leaf_pfns = (2 << 20) / 64;
    let (end, leaf_end) = (b.start.0 + (1 << order), b.start.0 + leaf_pfns);
    assert!(end < leaf_end, "{arch:?}: the region fills its leaf");
    (s, b, vec![std::ops::Range { start: end * page, end: leaf_end * page }])
}

#[test]
fn a_device_range_in_the_leaf_of_memory_beside_it_stays_unoptimized_in_every_format() {
    for arch in Arch::ALL {
        let (s, b, memory) = in_a_leaf(arch, RegionKind::Dax, Layout::None, false);
        let requested = Requested::from([(b.id, Layout::Unified)]);
        assert_eq!(failing_beside(&s, &requested, &memory), vec![], "{arch:?}");
        // A leaf holding nobody else's struct pages is the range's own.
        let f = failing(&s, &requested);
        assert_eq!(names(&f), vec![TailsShared.name()], "{arch:?}");
        assert!(f[0].1.contains("but the guest left it unoptimized"), "{arch:?}: {}", f[0].1);
    }
}

#[test]
fn a_device_range_in_a_neighbours_leaf_cannot_claim_to_be_optimized() {
    let (s, b, memory) = in_a_leaf(Arch::Ppc64le64k, RegionKind::Dax, Layout::Unified, false);
    let requested = Requested::from([(b.id, Layout::Unified)]);
    let f = failing_beside(&s, &requested, &memory);
    // The shared tail page it counts a user of is mapped by nothing, yet
    // counted live.
    assert_eq!(names(&f), vec![TailsShared.name(), Accounting.name(), NoLeak.name()], "{f:#?}");
    assert!(f[0].1.contains("cannot be: every compound page's vmemmap lies in a 2 MiB leaf"), "{}", f[0].1);
}

#[test]
fn hugetlb_never_borrows_a_leaf_it_must_split() {
    let (s, b, memory) = in_a_leaf(Arch::X86_64, RegionKind::HugeTlb, Layout::Unified, false);
    let requested = Requested::from([(b.id, Layout::Unified)]);
    let f = failing_beside(&s, &requested, &memory);
    assert!(names(&f).contains(&PteGranularity.name()), "{f:#?}");
}

#[test]
fn an_altmap_range_may_find_its_struct_pages_in_a_neighbours_leaf() {
    for arch in Arch::ALL {
        let (s, b, memory) = in_a_leaf(arch, RegionKind::Dax, Layout::None, true);
        let requested = Requested::from([(b.id, Layout::None)]);
        assert_eq!(failing_beside(&s, &requested, &memory), vec![], "{arch:?}");
        let f = failing(&s, &requested);
        assert_eq!(names(&f), vec![AltmapUnoptimized.name()], "{arch:?}");
        assert!(f[0].1.contains("outside the device's altmap"), "{arch:?}: {}", f[0].1);
    }
}

#[test]
fn a_free_page_of_hot_added_memory_outside_its_zone_fails_contents_in_every_format() {
    for arch in Arch::ALL {
        let mut s = SynthVmemmap::new(arch);
        let per_page = s.page() / 64;
        let memory = s.add_memory(Zone::Movable, 4 * per_page);
        assert_eq!(failing(&s, &Requested::new()), vec![], "{arch:?}");
        // A HugeTLB folio freed back into it reset to the normal zone.
        s.write_struct_page(memory.head(per_page + 3), StructPage::free(Zone::Normal));
        let f = failing(&s, &Requested::new());
        assert_eq!(names(&f), vec![Contents.name()], "{arch:?}");
        let want = format!("1 of its {} free struct pages are not free movable pages", 4 * per_page);
        assert!(f[0].1.contains(&want), "{arch:?}: {}", f[0].1);
    }
}
