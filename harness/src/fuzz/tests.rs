//! The generator's promises: reproducible, always loadable, shrinkable.

use super::*;

const ALL: [&str; 4] = ["x86_64", "aarch64", "ppc64le", "ppc64le-64k"];

#[test]
fn a_seed_always_gives_the_same_scenarios_and_seeds_differ() {
    for i in 0..20 {
        assert_eq!(generate(7, i, &[]), generate(7, i, &[]));
    }
    let differ = (0..20).filter(|&i| generate(7, i, &[]).steps != generate(8, i, &[]).steps).count();
    assert!(differ > 15, "only {differ} of 20 differ");
}

#[test]
fn every_generated_scenario_is_one_the_loader_accepts_as_written() {
    for seed in 0..10 {
        for i in 0..40 {
            let case = generate(seed, i, &[Knob::TailsWritable]);
            let s = case
                .scenario("fuzz", &ALL)
                .unwrap_or_else(|e| panic!("seed {seed} #{i}: {e}\n{}", case.to_toml(&ALL, "")));
            let steps: Vec<&Step> = s.steps.iter().map(|p| &p.step).collect();
            let drawn: Vec<&Step> = case.steps.iter().map(|p| &p.step).collect();
            assert_eq!(steps, drawn, "seed {seed} #{i}");
            assert_eq!(s.bug_knobs, vec![Knob::TailsWritable]);
            assert_eq!(s.steps.last().map(|p| &p.step), Some(&Step::Verify));
        }
    }
}

#[test]
fn shrinking_drops_a_region_with_every_step_that_needs_it() {
    let case = FuzzCase {
        seed: 0,
        index: 0,
        bug_knobs: vec![],
        boot_memory: 2 * GIB,
        boot_pmem: 0,
        steps: vec![
            FuzzStep {
                step: Step::HugetlbAlloc {
                    region: "a".into(),
                    folio_size: 2 * MIB,
                    count: 8,
                    zone: Zone::Normal,
                    from: None,
                },
                sweep_failures: true,
            },
            FuzzStep { step: Step::Optimize { region: "a".into(), layout: Layout::Unified }, sweep_failures: false },
            FuzzStep { step: Step::Verify, sweep_failures: false },
        ],
    };
    let candidates = case.shrink_candidates(&ALL);
    assert!(candidates.iter().all(|c| c.steps.len() < 3 || c.steps != case.steps));
    // Without the allocation, nothing but the verify is left.
    assert!(candidates.iter().any(|c| c.steps.len() == 1 && c.steps[0].step == Step::Verify));
    assert!(candidates.iter().any(|c| c.steps.len() == 3 && !c.steps[0].sweep_failures));
    assert!(candidates.iter().any(|c| matches!(c.steps[0].step, Step::HugetlbAlloc { count: 4, .. })));
}

/// What a drawn step is, for counting the interplay the generator favours.
fn kind(step: &Step) -> &'static str {
    match step {
        Step::HotAddMemory { .. } => "memory",
        Step::HotAdd { altmap: true, .. } => "dax-altmap",
        Step::HotAdd { compound_size, device: DaxDevice::Dimm, .. } if *compound_size == GIB => "dax-1g",
        Step::HotAdd { device: DaxDevice::Dimm, .. } => "dax",
        Step::HotRemove { .. } => "remove",
        _ => "other",
    }
}

#[test]
fn ranges_are_drawn_side_by_side_in_either_order_with_removals_between() {
    let mut seen = std::collections::HashSet::new();
    let mut small_boot = 0;
    for i in 0..400 {
        let case = generate(11, i, &[]);
        small_boot += u32::from(case.boot_memory == GIB);
        let plugs: Vec<&str> = case.steps.iter().map(|s| kind(&s.step)).filter(|k| *k != "other").collect();
        for pair in plugs.windows(2) {
            seen.insert((pair[0], pair[1]));
        }
        for three in plugs.windows(3) {
            if three[1] == "remove" && three[2] != "remove" {
                seen.insert(("remove-then", three[2]));
            }
        }
    }
    for want in [
        ("memory", "dax"),
        ("dax", "memory"),
        ("memory", "dax-altmap"),
        ("dax-altmap", "memory"),
        ("memory", "dax-1g"),
        ("dax-1g", "memory"),
        ("remove-then", "memory"),
        ("remove-then", "dax"),
    ] {
        assert!(seen.contains(&want), "never drew {want:?} in 400 scenarios");
    }
    assert!((50..150).contains(&small_boot), "{small_boot} of 400 with 1 GiB of boot memory");
}

#[test]
fn no_gigantic_boot_folio_is_drawn_beside_boot_persistent_memory() {
    // Persistent memory set aside at the end of boot memory breaks the
    // 1 GiB-aligned upper half a boot folio of 1 GiB needs (found by fuzzing
    // as a refusal on every profile).
    for i in 0..400 {
        let case = generate(20_261_201, i, &[]);
        let gigantic_from_boot = case
            .steps
            .iter()
            .any(|s| matches!(&s.step, Step::HugetlbAlloc { folio_size, from: None, .. } if *folio_size == GIB));
        assert!(!(gigantic_from_boot && case.boot_pmem > 0), "scenario {i}");
        assert!(!(gigantic_from_boot && case.boot_memory < 2 * GIB), "scenario {i}");
    }
}
