//! Random scenarios: valid step sequences drawn from a seed, written as
//! scenario files, and the smaller variants a failing one shrinks through.
//!
//! Generation tracks what exists (regions, what each one is, hotplug slots
//! and memory) so every sequence is one the loader accepts and the guest can
//! carry out; the same seed always gives the same scenarios.

use std::fmt::Write as _;
use std::path::Path;

use hvo_abi::model::{Knob, Layout, Zone};

use crate::scenario::{Backend, DaxDevice, Scenario, ScenarioError, Size, Step};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// SplitMix64: small, fast, and the same sequence everywhere for a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// One step of a random scenario, with its flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuzzStep {
    pub step: Step,
    pub sweep_failures: bool,
}

/// A random scenario: the machine is fixed, the steps are drawn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuzzCase {
    pub seed: u64,
    pub index: u64,
    pub bug_knobs: Vec<Knob>,
    pub boot_pmem: u64,
    pub steps: Vec<FuzzStep>,
}

/// The machine every random scenario gets: room for 1 GiB folios at boot and
/// for four DIMMs of up to 1 GiB.
const BOOT_MEMORY: u64 = 2 * GIB;
const SLOTS: u64 = 4;
const MAX_MEMORY: u64 = 8 * GIB;
const BOOT_PMEM: u64 = 8 * MIB;

/// What a region of a scenario being drawn is.
#[derive(Clone, PartialEq, Eq)]
enum Made {
    /// HugeTLB folios; `from`: the hot-added memory they were carved from.
    HugeTlb {
        optimized: bool,
        from: Option<String>,
        boot_bytes: u64,
    },
    Dax,
    Memory {
        free: u64,
        lending: u32,
    },
    Pmem,
}

/// Draws scenario `index` of `seed`: between 3 and 14 steps, a verify now and
/// then and always last.
pub fn generate(seed: u64, index: u64, bug_knobs: &[Knob]) -> FuzzCase {
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0xa076_1d64_78bd_642f));
    let mut made: Vec<(String, Made)> = Vec::new();
    let mut steps = Vec::new();
    let (mut slots, mut plugged) = (0u64, 0u64);
    let boot_pmem = if rng.chance(20) { BOOT_PMEM } else { 0 };
    let mut pmem_used = false;
    let wanted = 3 + rng.below(12);
    let mut serial = 0;
    // Boot memory lent to HugeTLB folios: kept well inside what is free.
    let mut boot_folios = 0u64;
    while (steps.len() as u64) < wanted {
        serial += 1;
        let name = format!("r{serial}");
        let sweep = rng.chance(10);
        let step = match rng.below(9) {
            0 | 1 => {
                let gigantic = rng.chance(15);
                let (folio_size, count) = if gigantic { (GIB, 1) } else { (2 * MIB, 1 + rng.below(16)) };
                let bytes = folio_size * count;
                let lender = made.iter().position(|(_, m)| matches!(m, Made::Memory { free, .. } if *free >= bytes));
                let from = match lender {
                    Some(i) if rng.chance(50) || boot_folios + bytes > GIB => {
                        if let Made::Memory { free, lending } = &mut made[i].1 {
                            *free -= bytes;
                            *lending += 1;
                        }
                        Some(made[i].0.clone())
                    }
                    // One 1 GiB folio (its 1 GiB-aligned half of boot memory) at a time.
                    _ if boot_folios + bytes > GIB => continue,
                    _ => None,
                };
                let boot_bytes = if from.is_none() { bytes } else { 0 };
                boot_folios += boot_bytes;
                let zone = rng.pick(&[Zone::Normal, Zone::Movable]);
                made.push((name.clone(), Made::HugeTlb { optimized: false, from: from.clone(), boot_bytes }));
                Step::HugetlbAlloc { region: name, folio_size, count, zone, from }
            }
            2 => {
                let Some(i) = made.iter().position(|(_, m)| matches!(m, Made::HugeTlb { optimized: false, .. })) else {
                    continue;
                };
                if let Made::HugeTlb { optimized, .. } = &mut made[i].1 {
                    *optimized = true;
                }
                let layout = rng.pick(&[Layout::Unified, Layout::Unified, Layout::LegacyHugetlb, Layout::LegacyDax]);
                Step::Optimize { region: made[i].0.clone(), layout }
            }
            3 => {
                let Some(i) = made.iter().position(|(_, m)| matches!(m, Made::HugeTlb { optimized: true, .. })) else {
                    continue;
                };
                if let Made::HugeTlb { optimized, .. } = &mut made[i].1 {
                    *optimized = false;
                }
                Step::Restore { region: made[i].0.clone() }
            }
            4 => {
                let Some(i) = made.iter().position(|(_, m)| matches!(m, Made::HugeTlb { .. })) else { continue };
                let (region, m) = made.remove(i);
                if let Made::HugeTlb { from, boot_bytes, .. } = m {
                    boot_folios -= boot_bytes;
                    // The memory it came from lends one folio run fewer.
                    if let Some((_, Made::Memory { lending, .. })) =
                        made.iter_mut().find(|(n, _)| Some(n) == from.as_ref())
                    {
                        *lending -= 1;
                    }
                }
                Step::HugetlbFree { region }
            }
            5 | 6 => {
                let pmem = boot_pmem > 0 && !pmem_used && rng.chance(30);
                let size = if pmem { boot_pmem } else { rng.pick(&[256 * MIB, 512 * MIB, GIB]) };
                if !pmem && (slots == SLOTS || BOOT_MEMORY + plugged + size > MAX_MEMORY) {
                    continue;
                }
                let compound = if size.is_multiple_of(GIB) && rng.chance(30) { GIB } else { 2 * MIB };
                let altmap = !pmem && compound == 2 * MIB && rng.chance(15);
                let layout = rng.pick(&[Layout::Unified, Layout::Unified, Layout::LegacyDax, Layout::None]);
                if pmem {
                    pmem_used = true;
                    made.push((name.clone(), Made::Pmem));
                } else {
                    slots += 1;
                    plugged += size;
                    made.push((name.clone(), Made::Dax));
                }
                Step::HotAdd {
                    region: name,
                    size,
                    compound_size: compound,
                    zone: Zone::Device,
                    layout,
                    device: if pmem { DaxDevice::Pmem } else { DaxDevice::Dimm },
                    altmap,
                    backend: if altmap { Backend::File } else { Backend::Ram },
                }
            }
            7 => {
                let size = rng.pick(&[256 * MIB, 512 * MIB]);
                if slots == SLOTS || BOOT_MEMORY + plugged + size > MAX_MEMORY {
                    continue;
                }
                slots += 1;
                plugged += size;
                made.push((name.clone(), Made::Memory { free: size, lending: 0 }));
                Step::HotAddMemory { region: name, size, zone: Zone::Movable, backend: Backend::Ram }
            }
            _ => {
                let Some(i) = made.iter().position(|(_, m)| {
                    matches!(m, Made::Dax | Made::Pmem) || matches!(m, Made::Memory { lending: 0, .. })
                }) else {
                    continue;
                };
                // A removed DIMM's slot stays taken: the scenario loader counts hot-adds.
                let (region, _) = made.remove(i);
                Step::HotRemove { region }
            }
        };
        let sweep = sweep && matches!(step, Step::HugetlbAlloc { .. } | Step::Optimize { .. } | Step::HotAdd { .. });
        steps.push(FuzzStep { step, sweep_failures: sweep });
        if rng.chance(35) {
            steps.push(FuzzStep { step: Step::Verify, sweep_failures: false });
        }
    }
    if steps.last().map(|s| &s.step) != Some(&Step::Verify) {
        steps.push(FuzzStep { step: Step::Verify, sweep_failures: false });
    }
    FuzzCase { seed, index, bug_knobs: bug_knobs.to_vec(), boot_pmem: if pmem_used { boot_pmem } else { 0 }, steps }
}

fn step_toml(out: &mut String, s: &FuzzStep) {
    let _ = writeln!(out, "\n[[step]]");
    let mut kv = |k: &str, v: String| {
        let _ = writeln!(out, "{k} = {v}");
    };
    let q = |s: &str| format!("\"{s}\"");
    let size = |b: u64| q(&Size(b).to_string());
    match &s.step {
        Step::HugetlbAlloc { region, folio_size, count, zone, from } => {
            kv("action", q("hugetlb-alloc"));
            kv("region", q(region));
            kv("size", size(*folio_size));
            kv("count", count.to_string());
            kv("zone", q(zone.name()));
            if let Some(f) = from {
                kv("from", q(f));
            }
        }
        Step::Optimize { region, layout } => {
            kv("action", q("optimize"));
            kv("region", q(region));
            kv("layout", q(layout.name()));
        }
        Step::Restore { region } => {
            kv("action", q("restore"));
            kv("region", q(region));
        }
        Step::HugetlbFree { region } => {
            kv("action", q("hugetlb-free"));
            kv("region", q(region));
        }
        Step::HotAdd { region, size: bytes, compound_size, zone, layout, device, altmap, backend } => {
            kv("action", q("hot-add"));
            kv("region", q(region));
            kv("size", size(*bytes));
            kv("compound", size(*compound_size));
            kv("zone", q(zone.name()));
            kv("layout", q(layout.name()));
            match device {
                DaxDevice::Pmem => kv("device", q("pmem")),
                DaxDevice::Nvdimm => kv("device", q("nvdimm")),
                DaxDevice::Dimm => {}
            }
            if *altmap {
                kv("altmap", "true".into());
            } else if *backend == Backend::File && *device != DaxDevice::Pmem {
                kv("backend", q("file"));
            }
        }
        Step::HotAddMemory { region, size: bytes, zone, .. } => {
            kv("action", q("hot-add"));
            kv("kind", q("memory"));
            kv("region", q(region));
            kv("size", size(*bytes));
            kv("zone", q(zone.name()));
        }
        Step::HotRemove { region } => {
            kv("action", q("hot-remove"));
            kv("region", q(region));
        }
        Step::Verify => kv("action", q("verify")),
        Step::Ping => kv("action", q("ping")),
        Step::VerifyManifest => kv("action", q("verify-manifest")),
        Step::FailAllocation { nth } => {
            kv("action", q("fail-allocation"));
            kv("nth", nth.to_string());
        }
        Step::Exit { status } => {
            kv("action", q("exit"));
            kv("status", status.to_string());
        }
    }
    if s.sweep_failures {
        kv("sweep-failures", "true".into());
    }
}

impl FuzzCase {
    /// The case as a scenario file expecting a pass; `header` becomes its
    /// leading comment.
    pub fn to_toml(&self, architectures: &[&str], header: &str) -> String {
        let mut out = String::new();
        for line in header.lines() {
            let _ = writeln!(out, "# {line}");
        }
        let _ = writeln!(out, "description = \"random scenario {} of seed {}\"", self.index, self.seed);
        let arches: Vec<String> = architectures.iter().map(|a| format!("\"{a}\"")).collect();
        let _ = writeln!(out, "architectures = [{}]", arches.join(", "));
        if !self.bug_knobs.is_empty() {
            let knobs: Vec<String> = self.bug_knobs.iter().map(|k| format!("\"{}\"", k.name())).collect();
            let _ = writeln!(out, "bug-knobs = [{}]", knobs.join(", "));
        }
        let _ = writeln!(out, "\n[machine]");
        let _ = writeln!(out, "boot-memory = \"{}\"", Size(BOOT_MEMORY));
        let _ = writeln!(out, "slots = {SLOTS}");
        let _ = writeln!(out, "max-memory = \"{}\"", Size(MAX_MEMORY));
        if self.boot_pmem > 0 {
            let _ = writeln!(out, "boot-pmem = \"{}\"", Size(self.boot_pmem));
        }
        for s in &self.steps {
            step_toml(&mut out, s);
        }
        out
    }

    /// The case as a loaded scenario, named `name`, checked by the same loader
    /// as every file.
    pub fn scenario(&self, name: &str, architectures: &[&str]) -> Result<Scenario, ScenarioError> {
        let mut s = Scenario::parse(Path::new(&format!("{name}.toml")), &self.to_toml(architectures, ""))?;
        s.name = name.to_string();
        Ok(s)
    }

    /// Smaller variants, most promising first: each without one step (and
    /// without the later steps that need what that step made), then with one
    /// step's sweep dropped or its folio count halved. Variants the loader
    /// would refuse are left out.
    pub fn shrink_candidates(&self, architectures: &[&str]) -> Vec<FuzzCase> {
        let mut out = Vec::new();
        for i in (0..self.steps.len()).rev() {
            let mut c = self.clone();
            let removed = c.steps.remove(i);
            if let Some(name) = created(&removed.step) {
                c.steps.retain(|s| !uses(&s.step, &name));
            }
            out.push(c);
        }
        for i in 0..self.steps.len() {
            if self.steps[i].sweep_failures {
                let mut c = self.clone();
                c.steps[i].sweep_failures = false;
                out.push(c);
            }
            if let Step::HugetlbAlloc { from: Some(_), .. } = &self.steps[i].step {
                let mut c = self.clone();
                if let Step::HugetlbAlloc { from, .. } = &mut c.steps[i].step {
                    *from = None;
                }
                out.push(c);
            }
            if let Step::HugetlbAlloc { count, .. } = &self.steps[i].step {
                if *count > 1 {
                    let mut c = self.clone();
                    if let Step::HugetlbAlloc { count, .. } = &mut c.steps[i].step {
                        *count /= 2;
                    }
                    out.push(c);
                }
            }
        }
        if self.boot_pmem > 0
            && !self.steps.iter().any(|s| matches!(s.step, Step::HotAdd { device: DaxDevice::Pmem, .. }))
        {
            let mut c = self.clone();
            c.boot_pmem = 0;
            out.push(c);
        }
        out.retain(|c| !c.steps.is_empty() && c.scenario("candidate", architectures).is_ok());
        out
    }
}

fn created(step: &Step) -> Option<String> {
    match step {
        Step::HugetlbAlloc { region, .. } | Step::HotAdd { region, .. } | Step::HotAddMemory { region, .. } => {
            Some(region.clone())
        }
        _ => None,
    }
}

fn uses(step: &Step, name: &str) -> bool {
    match step {
        Step::Optimize { region, .. }
        | Step::Restore { region }
        | Step::HugetlbFree { region }
        | Step::HotRemove { region } => region == name,
        Step::HugetlbAlloc { from, .. } => from.as_deref() == Some(name),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
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
                FuzzStep {
                    step: Step::Optimize { region: "a".into(), layout: Layout::Unified },
                    sweep_failures: false,
                },
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
}
