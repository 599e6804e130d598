use hvo_abi::model::Layout;
use hvo_abi::Arch;

use super::*;
use crate::kernel::agent::HstateSize;
use crate::synth::kernel::KernelVmemmap;

pub(super) const TWO_M: u64 = 2 << 20;
pub(super) const ONE_G: u64 = 1 << 30;

/// Every format the kernels here run: x86_64 4-level, arm64 48-bit 4 KiB,
/// radix with 4 KiB and 64 KiB pages.
pub(super) const ARCHS: [Arch; 4] = [Arch::X86_64, Arch::Aarch64, Arch::Ppc64le, Arch::Ppc64le64k];

/// A kernel with 3 GiB of RAM, 4 x 2M folios in its first GiB and 2 x 1G
/// folios after, optimized as `layout` lays them out (with 64 KiB pages the
/// 2M folios' struct pages fill less than a page: never optimized).
fn kernel(arch: Arch, layout: Layout) -> KernelVmemmap {
    let mut k = KernelVmemmap::new(arch, 3 * ONE_G);
    let (start, page) = (k.ram_start(), k.page());
    for i in 0..4 {
        k.add_folio(start + (8 + i) * (TWO_M / page), TWO_M, layout);
    }
    for i in 1..3 {
        k.add_folio(start + i * (ONE_G / page), ONE_G, layout);
    }
    k
}

/// The first 1G folio's head pfn: optimizable in every format.
fn gigantic(k: &KernelVmemmap) -> Pfn {
    k.ram_start() + ONE_G / k.page()
}

pub(super) fn verdict_of(k: &KernelVmemmap, generation: Generation, report: &KernelReport) -> KernelVerdict {
    match verify_kernel(&k.view(), report, generation) {
        Ok(v) => v,
        Err(e) => panic!("verifying: {e}"),
    }
}

fn verdict(k: &KernelVmemmap, generation: Generation) -> KernelVerdict {
    let sysctl = match generation {
        Generation::NotOptimizing => HvoSysctl::Absent,
        _ => HvoSysctl::On,
    };
    verdict_of(k, generation, &k.report(sysctl))
}

/// A clean kernel of `generation` broken by `break_it` at its first 1G
/// folio, and the verdict on it.
fn broken(
    arch: Arch,
    generation: Generation,
    break_it: impl FnOnce(&mut KernelVmemmap, Pfn),
) -> (KernelVmemmap, Pfn, KernelVerdict) {
    let mut k = kernel(arch, generation.layout().unwrap_or(Layout::None));
    let head = gigantic(&k);
    break_it(&mut k, head);
    let v = verdict(&k, generation);
    (k, head, v)
}

pub(super) fn failing(v: &KernelVerdict) -> Vec<&str> {
    v.checks.iter().filter(|c| c.status == CheckStatus::Fail).map(|c| c.name.as_str()).collect()
}

pub(super) fn detail(v: &KernelVerdict, invariant: Invariant) -> &str {
    v.check(invariant).map(|c| c.detail.as_str()).unwrap_or_default()
}

#[test]
fn clean_kernels_of_every_generation_pass_in_every_format() {
    let cases = [
        (Generation::Legacy, Layout::LegacyHugetlb),
        (Generation::Unified, Layout::Unified),
        (Generation::NotOptimizing, Layout::None),
    ];
    for arch in ARCHS {
        for (generation, layout) in cases {
            let k = kernel(arch, layout);
            let v = verdict(&k, generation);
            assert!(v.passed(), "{arch:?} {}: {:#?}\n{}", generation.name(), v.checks, v.dump);
            // What optimizing saves: one private vmemmap page per compound
            // page, and under the unified layout one shared tail page per size.
            let region = |compound_bytes, count| FoundRegion {
                kind: CompoundKind::Hugetlb,
                compound_bytes,
                count,
                layout,
                private_vmemmap_bytes: k.page(),
                shared_tail_pages: u64::from(layout == Layout::Unified),
            };
            let mut expected = vec![region(ONE_G, 2)];
            if k.page() == 4096 {
                expected.push(region(TWO_M, 4));
            }
            if layout == Layout::None {
                expected.clear();
            }
            assert_eq!(v.found, expected, "{arch:?} {}", generation.name());
        }
    }
}

#[test]
fn passing_checks_say_what_they_covered() {
    let v = verdict(&kernel(Arch::X86_64, Layout::LegacyHugetlb), Generation::Legacy);
    assert_eq!(
        detail(&v, Invariant::HeadPrivate),
        "4 x 2M + 2 x 1G compound pages, legacy-hugetlb layout: every head on a private writable frame"
    );
    assert!(detail(&v, Invariant::Accounting).contains("2M: 4 optimized = the kernel's 4"), "{v:#?}");
    assert!(v.dump.contains("found 4 x 2M compound pages, legacy-hugetlb layout"), "{}", v.dump);

    let v = verdict(&kernel(Arch::X86_64, Layout::Unified), Generation::Unified);
    assert_eq!(
        detail(&v, Invariant::TailsShared),
        "4 x 2M + 2 x 1G compound pages, unified layout on 2 shared tail pages"
    );
    assert!(detail(&v, Invariant::Accounting).contains("(2 shared tail pages not counted)"), "{v:#?}");

    let v = verdict(&kernel(Arch::Ppc64le64k, Layout::LegacyHugetlb), Generation::Legacy);
    assert!(detail(&v, Invariant::Accounting).contains("2M: not optimizable with 64 KiB pages"), "{v:#?}");
}

#[test]
fn a_writable_tail_fails_tails_readonly_with_its_diagram() {
    for arch in ARCHS {
        let (k, head, v) = broken(arch, Generation::Legacy, |k, head| {
            let head_frame = k.frame_at(k.vmemmap_page(head, 0)).unwrap_or_default();
            k.map(k.vmemmap_page(head, 2), head_frame, true);
        });
        let head_frame = k.frame_at(k.vmemmap_page(head, 0)).unwrap_or_default();
        assert_eq!(failing(&v), ["tails-readonly"], "{arch:?}");
        let d = detail(&v, Invariant::TailsReadonly);
        assert!(d.contains(&format!("1G compound page at pfn {head}, vmemmap[2]: tail")), "{d}");
        assert!(d.contains(&format!("vmemmap[2] {:#x} -> {head_frame:#x} RW\n", k.vmemmap_page(head, 2))), "{d}");
    }
}

#[test]
fn a_head_on_the_shared_tail_page_fails_head_private() {
    for arch in ARCHS {
        let (_, _, v) = broken(arch, Generation::Unified, |k, head| {
            let shared = k.shared_tail(ONE_G);
            k.map(k.vmemmap_page(head, 0), shared, true);
        });
        assert!(failing(&v).contains(&"head-private"), "{arch:?}: {:#?}", v.checks);
        assert!(detail(&v, Invariant::HeadPrivate).contains("expected a private writable frame"), "{v:#?}");
    }
}

#[test]
fn a_tail_on_a_foreign_frame_under_legacy_fails_tails_shared() {
    for arch in ARCHS {
        let mut foreign = 0;
        let (_, _, v) = broken(arch, Generation::Legacy, |k, head| {
            foreign = k.fresh_frame();
            k.map(k.vmemmap_page(head, 5), foreign, false);
        });
        assert_eq!(failing(&v), ["tails-shared"], "{arch:?}");
        let d = detail(&v, Invariant::TailsShared);
        assert!(d.contains(&format!("vmemmap[5]: maps {foreign:#x}, expected the head's frame")), "{d}");
    }
}

#[test]
fn a_layout_of_the_other_generation_fails_naming_the_generation_and_why() {
    let v = verdict(&kernel(Arch::X86_64, Layout::Unified), Generation::Legacy);
    assert_eq!(failing(&v), ["tails-shared"]);
    assert!(detail(&v, Invariant::TailsShared).contains(
        "the kernel is legacy (vm.hugetlb_optimize_vmemmap exists, the BTF has no vmemmap_tails), yet this compound page shows the unified layout"
    ));
    let v = verdict(&kernel(Arch::Aarch64, Layout::LegacyHugetlb), Generation::Unified);
    assert!(failing(&v).contains(&"tails-shared"));
    assert!(detail(&v, Invariant::TailsShared).contains(
        "the kernel is unified (the BTF has vmemmap_tails), yet this compound page shows the legacy-hugetlb layout"
    ));
}

#[test]
fn two_sizes_on_one_shared_tail_page_fail_tails_shared() {
    for arch in [Arch::X86_64, Arch::Aarch64, Arch::Ppc64le] {
        let mut k = kernel(arch, Layout::Unified);
        let shared = k.shared_tail(TWO_M);
        let n = ONE_G / k.page() * 64 / k.page();
        for head in [gigantic(&k), gigantic(&k) + ONE_G / k.page()] {
            for i in 1..n {
                k.map(k.vmemmap_page(head, i), shared, false);
            }
        }
        let v = verdict(&k, Generation::Unified);
        assert_eq!(failing(&v), ["tails-shared"], "{arch:?}");
        assert!(detail(&v, Invariant::TailsShared).contains(&format!("shared tail page {shared:#x} serves 2M and 1G")));
    }
}

#[test]
fn the_kernels_pool_disagreeing_with_the_pattern_fails_accounting() {
    for arch in ARCHS {
        let k = kernel(arch, Layout::LegacyHugetlb);
        let mut report = k.report(HvoSysctl::On);
        report.hstates.iter_mut().filter(|h| h.size == HstateSize::from_kib(1 << 20)).for_each(|h| h.pages += 1);
        let v = verdict_of(&k, Generation::Legacy, &report);
        assert_eq!(failing(&v), ["accounting"], "{arch:?}");
        assert!(detail(&v, Invariant::Accounting)
            .contains("1G: the kernel's pool holds 3 HugeTLB pages, the page tables show 2 optimized compound pages"));
    }
}

#[test]
fn memmap_counters_disagreeing_with_the_frames_mapped_fail_accounting() {
    for arch in ARCHS {
        let k = kernel(arch, Layout::Unified);
        let mut report = k.report(HvoSysctl::On);
        let (memmap, boot) = (report.nr_memmap_pages.unwrap_or(0), report.nr_memmap_boot_pages.unwrap_or(0));
        report.nr_memmap_pages = Some(memmap + 1);
        let v = verdict_of(&k, Generation::Unified, &report);
        assert_eq!(failing(&v), ["accounting"], "{arch:?}");
        let expected = format!(
            "nr_memmap_pages {} + nr_memmap_boot_pages {boot} = {}, where the page tables make it {}:",
            memmap + 1,
            memmap + boot + 1,
            memmap + boot
        );
        assert!(detail(&v, Invariant::Accounting).contains(&expected), "{}", detail(&v, Invariant::Accounting));
    }
}

/// With 64 KiB pages four 16 MiB sections share a vmemmap page, and Linux
/// counts it once per section: 3 GiB of RAM count 192 boot pages for 48
/// mapped. A kernel counting the frames it maps instead would be wrong.
#[test]
fn the_boot_memmap_counter_is_held_to_linuxs_per_section_rounding() {
    let k = KernelVmemmap::new(Arch::Ppc64le64k, 3 * ONE_G);
    let mut report = k.report(HvoSysctl::Absent);
    assert_eq!(report.nr_memmap_boot_pages, Some(192));
    let v = verdict_of(&k, Generation::NotOptimizing, &report);
    assert!(v.passed(), "{:#?}", v.checks);
    assert!(detail(&v, Invariant::Accounting)
        .contains("48 distinct vmemmap frames mapped over RAM + 144 Linux counts again"));
    report.nr_memmap_boot_pages = Some(48);
    let v = verdict_of(&k, Generation::NotOptimizing, &report);
    assert_eq!(failing(&v), ["accounting"]);
    for arch in [Arch::X86_64, Arch::Aarch64, Arch::Ppc64le] {
        let k = KernelVmemmap::new(arch, 3 * ONE_G);
        let v = verdict_of(&k, Generation::NotOptimizing, &k.report(HvoSysctl::Absent));
        assert!(!detail(&v, Invariant::Accounting).contains("counts again"), "{arch:?}");
    }
}

#[test]
fn an_unmapped_memmap_page_fails_memmap_present() {
    for arch in ARCHS {
        let mut k = kernel(arch, Layout::LegacyHugetlb);
        let va = k.struct_page(k.ram_start() + 3 * (TWO_M / k.page())) / k.page() * k.page();
        k.unmap(va);
        let v = verdict(&k, Generation::Legacy);
        assert_eq!(failing(&v), ["memmap-present"], "{arch:?}");
        assert!(detail(&v, Invariant::MemmapPresent).contains(&format!("vmemmap pages {va:#x}..")), "{v:#?}");
    }
}

#[test]
fn an_optimized_page_on_a_kernel_that_does_not_optimize_fails_tails_shared() {
    for arch in ARCHS {
        let k = kernel(arch, Layout::LegacyHugetlb);
        let v = verdict(&k, Generation::NotOptimizing);
        assert_eq!(failing(&v), ["tails-shared"], "{arch:?}");
        let d = detail(&v, Invariant::TailsShared);
        assert!(d.starts_with("the kernel does not optimize (vm.hugetlb_optimize_vmemmap is absent), yet the "), "{d}");
        assert!(d.contains("shows the legacy-hugetlb layout"), "{d}");
    }
}

#[test]
fn the_generation_comes_from_the_sysctl_and_the_btf() {
    let (g, why) = detect_generation(&HvoSysctl::Absent, false);
    assert_eq!(g, Generation::NotOptimizing);
    assert_eq!(
        why,
        "not-optimizing: vm.hugetlb_optimize_vmemmap is absent and the BTF has no vmemmap_tails, so HugeTLB vmemmap optimization is not built"
    );
    let (g, why) = detect_generation(&HvoSysctl::On, false);
    assert_eq!((g, g.name()), (Generation::Legacy, "legacy"));
    assert!(why.contains("is present (1) and the BTF has no vmemmap_tails"), "{why}");
    let (g, why) = detect_generation(&HvoSysctl::Off, true);
    assert_eq!((g, g.name()), (Generation::Unified, "unified"));
    assert!(why.ends_with("with per-(zone, order) shared tail pages"), "{why}");
    assert_eq!(detect_generation(&HvoSysctl::Absent, true).0, Generation::NotOptimizing);
}

/// Memory removed with its vmemmap still mapped fails no-leak; nothing
/// removed, or removed with its vmemmap gone, passes.
#[test]
fn vmemmap_left_mapped_over_removed_memory_fails_no_leak() {
    for arch in ARCHS {
        let mut k = KernelVmemmap::new(arch, 3 * ONE_G);
        let report = k.report(HvoSysctl::Absent);
        let verdict = |view: &KernelView| match verify_kernel(view, &report, Generation::NotOptimizing) {
            Ok(v) => v,
            Err(e) => panic!("verifying: {e}"),
        };
        let (start, page) = (k.ram_start(), k.page());
        let last = start + 2 * (ONE_G / page)..start + 3 * (ONE_G / page);
        let mut view = k.view();
        view.ram = vec![start..last.start];
        view.removed = vec![last.clone()];
        let v = verdict(&view);
        assert!(failing(&v).contains(&"no-leak"), "{arch:?}: {:#?}", v.checks);
        assert!(detail(&v, Invariant::NoLeak).contains("vmemmap pages are still mapped"), "{arch:?}");
        // Unmapped page by page: only what shares a leaf with present RAM stays.
        let first = k.struct_page(last.start) / page * page;
        for va in (first..k.struct_page(last.end)).step_by(page as usize) {
            k.unmap(va);
        }
        let mut view = k.view();
        view.ram = vec![start..last.start];
        view.removed = vec![last.clone()];
        let v = verdict(&view);
        assert!(!failing(&v).contains(&"no-leak"), "{arch:?}: {}", detail(&v, Invariant::NoLeak));
    }
}
