//! Device DAX ranges and hot-added memory on synthetic kernels: each
//! layout passes where the kernel's generation allows it, and each way of
//! breaking one fires its invariant, in every paging format.

use hvo_abi::model::Layout;
use hvo_abi::Arch;

use super::tests::{detail, failing, verdict_of, ARCHS, ONE_G, TWO_M};
use super::*;
use crate::kernel::agent::HvoSysctl;
use crate::synth::kernel::{DaxCounting, DaxMode, DaxSpec, KernelVmemmap};

/// dax0.0: 2 GiB of 2M compound pages; dax1.0: 2 GiB of 1G ones (a 1 GiB
/// info block, then 1 GiB of data), both in mode ram; dax2.0: 1 GiB of 2M
/// ones in mode pmem (struct pages on the device).
const DAX0: usize = 0;
const DAX1: usize = 1;
const DAX2: usize = 2;

/// A kernel with 1 GiB of boot RAM holding two 2M HugeTLB folios laid out
/// as `hugetlb`, 1 GiB hot-added, and the three DAX ranges laid out as
/// `dax` (where Linux can optimize them) and counted as `counting` says.
fn kernel(arch: Arch, hugetlb: Layout, dax: Layout, counting: DaxCounting) -> KernelVmemmap {
    let mut k = KernelVmemmap::new(arch, ONE_G);
    let (start, page) = (k.ram_start(), k.page());
    for i in 0..2 {
        k.add_folio(start + (8 + i) * (TWO_M / page), TWO_M, hugetlb);
    }
    k.hot_add_ram(ONE_G);
    let devices = [
        ("dax0.0", 2 * ONE_G, TWO_M, DaxMode::Ram),
        ("dax1.0", 2 * ONE_G, ONE_G, DaxMode::Ram),
        ("dax2.0", ONE_G, TWO_M, DaxMode::Pmem),
    ];
    for (name, bytes, compound, mode) in devices {
        k.add_dax(DaxSpec { mode, layout: dax, counting, ..DaxSpec::new(name, bytes, compound) });
    }
    k
}

fn legacy(arch: Arch) -> KernelVmemmap {
    kernel(arch, Layout::LegacyHugetlb, Layout::LegacyDax, DaxCounting::Fixed)
}

fn unified(arch: Arch) -> KernelVmemmap {
    kernel(arch, Layout::Unified, Layout::Unified, DaxCounting::Fixed)
}

fn verdict(k: &KernelVmemmap, generation: Generation) -> KernelVerdict {
    let sysctl = match generation {
        Generation::NotOptimizing => HvoSysctl::Absent,
        _ => HvoSysctl::On,
    };
    verdict_of(k, generation, &k.report(sysctl))
}

/// The first compound page of device `i` whose data it is (past the
/// namespace's info block).
fn first_data_head(k: &KernelVmemmap, i: usize) -> Pfn {
    k.dax(i).data.start
}

fn vmemmap_pages_of(k: &KernelVmemmap, compound: u64) -> u64 {
    compound / k.page() * 64 / k.page()
}

#[test]
fn clean_dax_ranges_and_hot_added_memory_pass_under_every_generation_that_allows_them() {
    let cases = [
        (Generation::Legacy, Layout::LegacyHugetlb, Layout::LegacyDax),
        // Debian's 7.2: HugeTLB unified, DAX still legacy.
        (Generation::Unified, Layout::Unified, Layout::LegacyDax),
        (Generation::Unified, Layout::Unified, Layout::Unified),
        // arm64 and ppc64 build no HugeTLB optimization; ppc64's radix does DAX's.
        (Generation::NotOptimizing, Layout::None, Layout::LegacyDax),
        (Generation::NotOptimizing, Layout::None, Layout::None),
    ];
    for arch in ARCHS {
        for (generation, hugetlb, dax) in cases {
            let k = kernel(arch, hugetlb, dax, DaxCounting::Fixed);
            let v = verdict(&k, generation);
            assert!(v.passed(), "{arch:?} {} {}: {:#?}\n{}", generation.name(), dax.name(), v.checks, v.dump);
        }
    }
}

#[test]
fn dax_regions_are_reported_by_kind_with_what_their_vmemmap_costs() {
    for arch in ARCHS {
        for (dax, shared) in [(Layout::LegacyDax, 0), (Layout::Unified, 1)] {
            let k = kernel(arch, Layout::Unified, dax, DaxCounting::Fixed);
            let v = verdict(&k, Generation::Unified);
            let page = k.page();
            let region = |compound_bytes, count, layout, private_vmemmap_bytes, shared_tail_pages| FoundRegion {
                kind: CompoundKind::Dax,
                compound_bytes,
                count,
                layout,
                private_vmemmap_bytes,
                shared_tail_pages,
            };
            // Legacy DAX keeps two vmemmap pages, unified one.
            let private = page * Layout::private_pages(dax);
            let found: Vec<&FoundRegion> = v.found.iter().filter(|r| r.kind == CompoundKind::Dax).collect();
            let mut expected = match page {
                4096 => vec![
                    region(ONE_G, 2, dax, private, shared),
                    region(TWO_M, 1024, dax, private, shared),
                    // dax2.0: struct pages on the device, 8 vmemmap pages each.
                    region(TWO_M, 512, Layout::None, 8 * page, 0),
                ],
                // 2M compound pages have 2 KiB of struct pages: never optimized.
                _ => vec![region(ONE_G, 2, dax, private, shared), region(TWO_M, 1536, Layout::None, 2048, 0)],
            };
            expected.sort_by(|a, b| b.compound_bytes.cmp(&a.compound_bytes).then(a.layout.name().cmp(b.layout.name())));
            assert_eq!(found, expected.iter().collect::<Vec<_>>(), "{arch:?} {}", dax.name());
        }
    }
    let v = verdict(&legacy(Arch::X86_64), Generation::Legacy);
    assert!(v.dump.contains("found 1024 x 2M DAX compound pages, legacy-dax layout"), "{}", v.dump);
    assert!(v.dump.contains("DAX dax2.0 (2M compound pages, struct pages on the device at pfns"), "{}", v.dump);
    let d = detail(&v, Invariant::HeadPrivate);
    assert_eq!(
        d,
        "2 x 2M compound pages, legacy-hugetlb layout: every head on a private writable frame; DAX dax0.0: 1024 x 2M legacy-dax, dax1.0: 2 x 1G legacy-dax, dax2.0: 512 x 2M none"
    );
    let d = detail(&v, Invariant::AltmapUnoptimized);
    assert_eq!(d, "dax2.0: 4024 vmemmap pages, each its own writable frame in its altmap");
    let d = detail(&v, Invariant::Accounting);
    assert!(d.contains("dax0.0: 2048 for dax0.0's 2G of 2M compound pages"), "{d}");
    assert!(d.contains("dax1.0: 4 for dax1.0's 2G of 1G compound pages"), "{d}");
    assert!(d.contains("dax2.0: 4096 for dax2.0's 1G of 2M compound pages"), "{d}");
}

/// Debian's 6.12 counted a DAX range at its unoptimized size: 8192 for
/// 2 GiB of 2M compound pages whose vmemmap maps 2048 frames.
#[test]
fn the_unoptimized_dax_count_of_linux_before_the_fix_fails_accounting() {
    for arch in ARCHS {
        let k = kernel(arch, Layout::LegacyHugetlb, Layout::LegacyDax, DaxCounting::Unoptimized);
        let v = verdict(&k, Generation::Legacy);
        assert_eq!(failing(&v), ["accounting"], "{arch:?}");
        let d = detail(&v, Invariant::Accounting);
        assert!(d.contains("DAX counted at its unoptimized size"), "{arch:?}: {d}");
        // 1G compound pages are optimizable in every format: 2 frames each.
        let counted = match k.page() {
            4096 => 2 * ONE_G / 4096 * 64 / 4096,
            // 64 KiB pages: 16 MiB sections, each counted a whole page.
            _ => 2 * ONE_G / (16 << 20),
        };
        let words = format!(
            "nr_memmap_pages counts {counted} for dax1.0's 2G of 1G compound pages, whose vmemmap maps 4 frames"
        );
        assert!(d.contains(&words), "{arch:?}: {d}");
        // Struct pages on the device are counted at their size by both.
        assert!(!d.contains("for dax2.0"), "{arch:?}: {d}");
    }
    let k = kernel(Arch::X86_64, Layout::LegacyHugetlb, Layout::LegacyDax, DaxCounting::Unoptimized);
    let d = detail(&verdict(&k, Generation::Legacy), Invariant::Accounting).to_string();
    assert!(
        d.contains("nr_memmap_pages counts 8192 for dax0.0's 2G of 2M compound pages, whose vmemmap maps 2048 frames"),
        "{d}"
    );
    assert!(d.contains(", where the page tables make it "), "{d}");
}

#[test]
fn a_memmap_counter_off_by_one_with_dax_and_hot_added_memory_fails_accounting_with_each_share() {
    for arch in ARCHS {
        let k = legacy(arch);
        let mut report = k.report(HvoSysctl::On);
        report.nr_memmap_pages = report.nr_memmap_pages.map(|n| n + 1);
        let v = verdict_of(&k, Generation::Legacy, &report);
        assert_eq!(failing(&v), ["accounting"], "{arch:?}");
        let d = detail(&v, Invariant::Accounting);
        assert!(d.contains("distinct vmemmap frames mapped over RAM and DAX"), "{d}");
        assert!(d.contains("dax1.0: 4 for dax1.0's 2G of 1G compound pages"), "{d}");
    }
}

/// With 64 KiB pages four 16 MiB sections share a vmemmap page, and Linux
/// counts it once per section it activates, hot-added or device memory
/// alike: 1 GiB hot-added counts 64 pages for 16 mapped.
#[test]
fn hot_added_memory_is_held_to_linuxs_per_section_rounding() {
    let mut k = KernelVmemmap::new(Arch::Ppc64le64k, ONE_G);
    let before = k.report(HvoSysctl::Absent).nr_memmap_pages.unwrap_or(0);
    k.hot_add_ram(ONE_G);
    let report = k.report(HvoSysctl::Absent);
    assert_eq!(report.nr_memmap_pages, Some(before + 64));
    let v = verdict_of(&k, Generation::NotOptimizing, &report);
    assert!(v.passed(), "{:#?}", v.checks);
    assert!(detail(&v, Invariant::Accounting)
        .contains("32 distinct vmemmap frames mapped over RAM + 96 Linux counts again"));
    let mut frames_only = report.clone();
    frames_only.nr_memmap_pages = Some(before + 16);
    assert_eq!(failing(&verdict_of(&k, Generation::NotOptimizing, &frames_only)), ["accounting"]);
}

#[test]
fn a_layout_other_than_the_scenario_expects_fails_tails_shared_naming_both() {
    for arch in ARCHS {
        let mut k = legacy(arch);
        k.dax_mut(DAX1).expected = Some(Layout::Unified);
        let v = verdict(&k, Generation::Legacy);
        assert_eq!(failing(&v), ["tails-shared"], "{arch:?}");
        let d = detail(&v, Invariant::TailsShared);
        assert!(
            d.contains(
                "dax1.0: the scenario expects the unified layout, yet its compound pages show 2 x 1G legacy-dax"
            ),
            "{d}"
        );

        let mut k = unified(arch);
        k.dax_mut(DAX1).expected = Some(Layout::LegacyDax);
        let v = verdict(&k, Generation::Unified);
        assert_eq!(failing(&v), ["tails-shared"], "{arch:?}");
        let d = detail(&v, Invariant::TailsShared);
        assert!(
            d.contains(
                "dax1.0: the scenario expects the legacy-dax layout, yet its compound pages show 2 x 1G unified"
            ),
            "{d}"
        );

        let mut k = legacy(arch);
        k.dax_mut(DAX1).expected = Some(Layout::None);
        let v = verdict(&k, Generation::Legacy);
        assert_eq!(failing(&v), ["tails-shared"], "{arch:?}");
        assert!(detail(&v, Invariant::TailsShared)
            .contains("expects the none layout, yet its compound pages show 2 x 1G legacy-dax"));

        let mut k = legacy(arch);
        k.dax_mut(DAX2).expected = Some(Layout::LegacyDax);
        let v = verdict(&k, Generation::Legacy);
        assert_eq!(failing(&v), ["tails-shared"], "{arch:?}");
        assert!(detail(&v, Invariant::TailsShared).contains(
            "dax2.0: the scenario expects the legacy-dax layout, yet Linux never optimizes it: its struct pages live on the device (altmap)"
        ));

        // What it expects, it passes.
        let mut k = legacy(arch);
        k.dax_mut(DAX1).expected = Some(Layout::LegacyDax);
        k.dax_mut(DAX2).expected = Some(Layout::None);
        assert!(verdict(&k, Generation::Legacy).passed(), "{arch:?}");
    }
}

#[test]
fn unified_dax_on_a_kernel_not_of_the_series_fails_tails_shared_naming_the_generation() {
    for arch in ARCHS {
        let k = kernel(arch, Layout::LegacyHugetlb, Layout::Unified, DaxCounting::Fixed);
        let v = verdict(&k, Generation::Legacy);
        assert_eq!(failing(&v), ["tails-shared"], "{arch:?}");
        let d = detail(&v, Invariant::TailsShared);
        assert!(d.contains(
            "vmemmap[1]: the kernel is legacy (vm.hugetlb_optimize_vmemmap exists, the BTF has no vmemmap_tails), yet this compound page shows the unified layout"
        ), "{d}");
        assert!(d.starts_with("dax"), "{d}");
    }
}

/// A kernel whose DAX tails share one read-only page must keep them
/// read-only: writable ones on the shared page are not legacy DAX's.
#[test]
fn a_writable_unified_dax_tail_fails_tails_readonly() {
    for arch in ARCHS {
        let mut k = unified(arch);
        let head = k.dax(DAX1).namespace.start;
        let shared = k.dax_shared_tail(ONE_G);
        k.map(k.vmemmap_page(head, 1), shared, true);
        let v = verdict(&k, Generation::Unified);
        assert_eq!(failing(&v), ["tails-readonly"], "{arch:?}");
        let d = detail(&v, Invariant::TailsReadonly);
        assert!(d.contains(&format!("dax1.0: 1G compound page at pfn {head}, vmemmap[1]: tail")), "{d}");
        assert!(d.contains("is writable through the page tables"), "{d}");
    }
}

#[test]
fn a_legacy_dax_tail_off_page_one_fails_tails_shared() {
    for arch in ARCHS {
        let mut k = legacy(arch);
        let report = k.report(HvoSysctl::On);
        let head = first_data_head(&k, DAX1);
        let page1 = k.frame_at(k.vmemmap_page(head, 1)).unwrap_or_default();
        let foreign = k.fresh_frame();
        k.map(k.vmemmap_page(head, 5), foreign, true);
        let mut report = report;
        // The kernel counted the frame it mapped.
        report.nr_memmap_pages = report.nr_memmap_pages.map(|n| n + 1);
        let v = verdict_of(&k, Generation::Legacy, &report);
        assert_eq!(failing(&v), ["tails-shared"], "{arch:?}");
        let d = detail(&v, Invariant::TailsShared);
        assert!(d.contains(&format!("vmemmap[5]: maps {foreign:#x}, expected vmemmap[1]'s frame {page1:#x}")), "{d}");
    }
}

#[test]
fn dax_tails_on_the_heads_frame_fail_tails_shared() {
    for arch in ARCHS {
        let mut k = legacy(arch);
        let head = first_data_head(&k, DAX1);
        let head_frame = k.frame_at(k.vmemmap_page(head, 0)).unwrap_or_default();
        for i in 1..vmemmap_pages_of(&k, ONE_G) {
            k.map(k.vmemmap_page(head, i), head_frame, false);
        }
        let v = verdict(&k, Generation::Legacy);
        assert!(failing(&v).contains(&"tails-shared"), "{arch:?}: {:#?}", v.checks);
        let d = detail(&v, Invariant::TailsShared);
        assert!(d.contains("device DAX never lays tails on the head (the legacy-hugetlb layout)"), "{d}");
    }
}

#[test]
fn a_dax_head_on_the_shared_tail_page_fails_head_private() {
    for arch in ARCHS {
        let mut k = unified(arch);
        let head = first_data_head(&k, DAX1);
        let shared = k.dax_shared_tail(ONE_G);
        k.map(k.vmemmap_page(head, 0), shared, true);
        let v = verdict(&k, Generation::Unified);
        assert!(failing(&v).contains(&"head-private"), "{arch:?}: {:#?}", v.checks);
        let d = detail(&v, Invariant::HeadPrivate);
        assert!(d.contains(&format!("dax1.0: 1G compound page at pfn {head}, vmemmap[0]: head maps")), "{d}");
    }
}

#[test]
fn dax_tails_on_hugetlbs_shared_page_fail_tails_shared() {
    for arch in [Arch::X86_64, Arch::Aarch64, Arch::Ppc64le] {
        let mut k = unified(arch);
        let hugetlb = k.shared_tail(TWO_M);
        let n = vmemmap_pages_of(&k, TWO_M);
        let heads: Vec<Pfn> = k.dax(DAX0).heads(k.page()).collect();
        for head in heads {
            for i in 1..n {
                k.map(k.vmemmap_page(head, i), hugetlb, false);
            }
        }
        let v = verdict(&k, Generation::Unified);
        assert_eq!(failing(&v), ["tails-shared"], "{arch:?}");
        let d = detail(&v, Invariant::TailsShared);
        assert!(
            d.contains(&format!("shared tail page {hugetlb:#x} serves HugeTLB folios and device DAX alike")),
            "{d}"
        );
    }
}

#[test]
fn one_device_with_two_layouts_fails_tails_shared() {
    for arch in ARCHS {
        let mut k = legacy(arch);
        let head = first_data_head(&k, DAX1);
        let n = vmemmap_pages_of(&k, ONE_G);
        let mut report = k.report(HvoSysctl::On);
        for i in 2..n {
            let frame = k.fresh_frame();
            k.map(k.vmemmap_page(head, i), frame, true);
        }
        report.nr_memmap_pages = report.nr_memmap_pages.map(|c| c + n - 2);
        let v = verdict_of(&k, Generation::Legacy, &report);
        assert_eq!(failing(&v), ["tails-shared"], "{arch:?}");
        let d = detail(&v, Invariant::TailsShared);
        assert!(d.contains("dax1.0: its compound pages show 1 x 1G legacy-dax + 1 x 1G none"), "{d}");
    }
}

#[test]
fn struct_pages_on_the_device_optimized_or_off_it_fail_altmap_unoptimized() {
    for arch in ARCHS {
        // Optimized in place: pages 2.. of a compound page on page 1's frame.
        let mut k = legacy(arch);
        let head = first_data_head(&k, DAX2);
        let n = vmemmap_pages_of(&k, TWO_M);
        if n > 0 {
            let page1 = k.frame_at(k.vmemmap_page(head, 1)).unwrap_or_default();
            for i in 2..n {
                k.map(k.vmemmap_page(head, i), page1, true);
            }
            let v = verdict(&k, Generation::Legacy);
            assert!(failing(&v).contains(&"altmap-unoptimized"), "{arch:?}: {:#?}", v.checks);
            let d = detail(&v, Invariant::AltmapUnoptimized);
            assert!(d.contains("dax2.0 keeps its struct pages on the device (altmap), yet this compound page shows the legacy-dax layout"), "{d}");
        }
        // A vmemmap page on a frame of system memory.
        let mut k = legacy(arch);
        let report = k.report(HvoSysctl::On);
        let va = k.struct_page(first_data_head(&k, DAX2)) / k.page() * k.page();
        let frame = k.fresh_frame();
        k.map(va, frame, true);
        let v = verdict_of(&k, Generation::Legacy, &report);
        assert_eq!(failing(&v), ["altmap-unoptimized"], "{arch:?}");
        let d = detail(&v, Invariant::AltmapUnoptimized);
        assert!(
            d.contains(&format!("dax2.0: vmemmap page {va:#x} maps {frame:#x}, outside the device's altmap")),
            "{d}"
        );
    }
}

/// 2M compound pages with 64 KiB pages have 2 KiB of struct pages: Linux
/// never optimizes them, so no vmemmap page of theirs may be shared.
#[test]
fn small_compound_pages_shown_optimized_fail_tails_shared() {
    let mut k = legacy(Arch::Ppc64le64k);
    let va = k.struct_page(first_data_head(&k, DAX0)) / k.page() * k.page();
    let frame = k.frame_at(va).unwrap_or_default();
    k.map(va + k.page(), frame, true);
    let v = verdict(&k, Generation::Legacy);
    assert!(failing(&v).contains(&"tails-shared"), "{:#?}", v.checks);
    let d = detail(&v, Invariant::TailsShared);
    assert!(
        d.contains(&format!("dax0.0: vmemmap page {:#x} maps {frame:#x} RW, shared by 2 vmemmap pages", va + k.page())),
        "{d}"
    );
    assert!(d.contains("its 2M compound pages have 2K of struct pages, less than one vmemmap page of 64 KiB"), "{d}");
}

#[test]
fn an_unmapped_dax_or_hot_added_struct_page_fails_memmap_present() {
    for arch in ARCHS {
        let mut k = legacy(arch);
        let head = first_data_head(&k, DAX1);
        let va = k.vmemmap_page(head, 7);
        k.unmap(va);
        let v = verdict(&k, Generation::Legacy);
        assert_eq!(failing(&v), ["memmap-present"], "{arch:?}");
        let d = detail(&v, Invariant::MemmapPresent);
        assert!(d.contains(&format!("dax1.0 pfns {}..", k.dax(DAX1).data.start)), "{d}");
        assert!(d.contains(&format!("vmemmap pages {va:#x}..")), "{d}");

        let mut k = legacy(arch);
        let hot = k.view().ram[1].clone();
        let va = k.struct_page(hot.start + 1000) / k.page() * k.page();
        k.unmap(va);
        let v = verdict(&k, Generation::Legacy);
        assert!(failing(&v).contains(&"memmap-present"), "{arch:?}");
        let d = detail(&v, Invariant::MemmapPresent);
        assert!(d.contains(&format!("RAM pfns {}..{}: vmemmap pages {va:#x}..", hot.start, hot.end)), "{d}");
    }
}

#[test]
fn a_dax_range_no_device_has_is_refused() {
    let mut k = legacy(Arch::X86_64);
    k.dax_mut(DAX0).data.end = k.dax(DAX0).namespace.end + 1;
    let Err(e) = verify_kernel(&k.view(), &k.report(HvoSysctl::On), Generation::Legacy) else {
        panic!("a DAX range reaching past its namespace was verified");
    };
    assert!(e.to_string().starts_with("DAX range dax0.0: its data (pfns"), "{e}");
}

/// A DAX range starting in a section boot RAM is present in reuses that
/// section's memmap, populated whole and unoptimized at boot.
#[test]
fn dax_compound_pages_optimized_in_a_boot_section_fail_tails_shared() {
    let k = legacy(Arch::X86_64);
    let mut view = k.view();
    let first = view.dax[DAX0].namespace.start;
    // RAM present in the device's first section, as if boot memory reached it.
    view.ram.push(first..first + 1);
    let v = match verify_kernel(&view, &k.report(HvoSysctl::On), Generation::Legacy) {
        Ok(v) => v,
        Err(e) => panic!("verifying: {e}"),
    };
    assert_eq!(failing(&v), ["tails-shared"], "{:#?}", v.checks);
    let d = detail(&v, Invariant::TailsShared);
    assert!(
        d.contains(&format!("dax0.0: 2M compound page at pfn {first}, vmemmap[1]: in a section boot RAM shares")),
        "{d}"
    );
}
