//! Random scenarios: valid step sequences drawn from a seed, written as
//! scenario files, and the smaller variants a failing one shrinks through.
//!
//! Generation tracks what exists (regions, what each one is, hotplug slots
//! and memory) so every sequence is one the loader accepts and the guest can
//! carry out; the same seed always gives the same scenarios, on every
//! profile. It favours the interplay that differs between profiles: ranges
//! hot-added next to each other in either order (with 64 KiB pages one
//! 2 MiB vmemmap leaf holds the struct pages of 2 GiB, so neighbours share
//! it, and with 1 GiB of boot memory they share boot memory's), DAX with and
//! without an altmap beside memory, and removals in between.

mod toml;

use std::path::Path;

use hvo_abi::model::{Knob, Layout, Zone};

use crate::scenario::{Backend, DaxDevice, Scenario, ScenarioError, Step};

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

/// A random scenario: the machine is drawn once, then the steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuzzCase {
    pub seed: u64,
    pub index: u64,
    pub bug_knobs: Vec<Knob>,
    /// 2 GiB (room for a 1 GiB folio at boot) or 1 GiB (hot-added ranges
    /// then share boot memory's vmemmap leaf with 64 KiB pages).
    pub boot_memory: u64,
    pub boot_pmem: u64,
    pub steps: Vec<FuzzStep>,
}

/// Hotplug room: six DIMMs of up to 1 GiB, counted as the loader counts
/// them (every hot-add, removed or not), so they fit however QEMU places them.
const SLOTS: u64 = 6;
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

/// A scenario being drawn: what exists, and what room is left.
struct Drawer {
    rng: Rng,
    made: Vec<(String, Made)>,
    steps: Vec<FuzzStep>,
    boot_memory: u64,
    boot_pmem: u64,
    pmem_used: bool,
    /// Hot-adds made, and the bytes they plugged.
    slots: u64,
    plugged: u64,
    /// Boot memory lent to HugeTLB folios, and how much may be.
    boot_folios: u64,
    boot_folio_budget: u64,
    serial: u32,
}

/// Draws scenario `index` of `seed`: between 3 and 16 steps, a verify now and
/// then and always last.
pub fn generate(seed: u64, index: u64, bug_knobs: &[Knob]) -> FuzzCase {
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0xa076_1d64_78bd_642f));
    let boot_memory = if rng.chance(25) { GIB } else { 2 * GIB };
    let boot_pmem = if rng.chance(20) { BOOT_PMEM } else { 0 };
    let wanted = 3 + rng.below(14);
    let mut d = Drawer {
        rng,
        made: Vec::new(),
        steps: Vec::new(),
        boot_memory,
        boot_pmem,
        pmem_used: false,
        slots: 0,
        plugged: 0,
        boot_folios: 0,
        // One 1 GiB folio (its 1 GiB-aligned half of boot memory) at a time;
        // with 1 GiB of boot memory, a quarter of it in 2 MiB folios.
        boot_folio_budget: if boot_memory == 2 * GIB { GIB } else { 256 * MIB },
        serial: 0,
    };
    while (d.steps.len() as u64) < wanted {
        let drawn = match d.rng.below(12) {
            0 | 1 => d.hugetlb_alloc(),
            2 => d.optimize(),
            3 => d.restore(),
            4 => d.hugetlb_free(),
            5 | 6 => d.dax().map(|s| vec![s]),
            7 => d.memory().map(|s| vec![s]),
            8 | 9 => d.neighbours(),
            _ => d.hot_remove(),
        };
        for step in drawn.unwrap_or_default() {
            let sweep = d.rng.chance(10) && cheap_to_sweep(&step);
            d.steps.push(FuzzStep { step, sweep_failures: sweep });
            if d.rng.chance(35) {
                d.steps.push(FuzzStep { step: Step::Verify, sweep_failures: false });
            }
        }
    }
    let mut steps = d.steps;
    if steps.last().map(|s| &s.step) != Some(&Step::Verify) {
        steps.push(FuzzStep { step: Step::Verify, sweep_failures: false });
    }
    FuzzCase {
        seed,
        index,
        bug_knobs: bug_knobs.to_vec(),
        boot_memory,
        boot_pmem: if d.pmem_used { boot_pmem } else { 0 },
        steps,
    }
}

/// Whether sweeping `step`'s allocation failures stays cheap: every
/// allocation it makes is failed once and verified, so only steps of a few
/// dozen allocations (on any profile) are swept. A 1 GiB range of 2 MiB
/// compound pages makes hundreds, of 1 GiB unoptimized ones with 4 KiB
/// pages thousands, and would run for minutes.
fn cheap_to_sweep(step: &Step) -> bool {
    match step {
        Step::HugetlbAlloc { .. } | Step::Optimize { .. } => true,
        Step::HotAdd { device: DaxDevice::Pmem, .. } => true,
        Step::HotAdd { compound_size, layout, altmap, .. } => {
            *compound_size == GIB && !*altmap && matches!(layout, Layout::Unified | Layout::LegacyDax)
        }
        _ => false,
    }
}

impl Drawer {
    fn name(&mut self) -> String {
        self.serial += 1;
        format!("r{}", self.serial)
    }

    fn find(&self, f: impl Fn(&Made) -> bool) -> Option<usize> {
        self.made.iter().position(|(_, m)| f(m))
    }

    fn hugetlb_alloc(&mut self) -> Option<Vec<Step>> {
        let gigantic = self.rng.chance(15);
        let (folio_size, count) = if gigantic { (GIB, 1) } else { (2 * MIB, 1 + self.rng.below(16)) };
        let bytes = folio_size * count;
        let lender = self.find(|m| matches!(m, Made::Memory { free, .. } if *free >= bytes));
        // A 1 GiB folio takes the upper half of 2 GiB of boot memory whole:
        // persistent memory set aside at its end leaves no room for one.
        let over_budget = self.boot_folios + bytes > self.boot_folio_budget || (gigantic && self.boot_pmem > 0);
        let from = match lender {
            Some(i) if self.rng.chance(50) || over_budget => {
                if let Made::Memory { free, lending } = &mut self.made[i].1 {
                    *free -= bytes;
                    *lending += 1;
                }
                Some(self.made[i].0.clone())
            }
            _ if over_budget => return None,
            _ => None,
        };
        let boot_bytes = if from.is_none() { bytes } else { 0 };
        self.boot_folios += boot_bytes;
        let zone = self.rng.pick(&[Zone::Normal, Zone::Movable]);
        let region = self.name();
        self.made.push((region.clone(), Made::HugeTlb { optimized: false, from: from.clone(), boot_bytes }));
        Some(vec![Step::HugetlbAlloc { region, folio_size, count, zone, from }])
    }

    fn optimize(&mut self) -> Option<Vec<Step>> {
        let i = self.find(|m| matches!(m, Made::HugeTlb { optimized: false, .. }))?;
        if let Made::HugeTlb { optimized, .. } = &mut self.made[i].1 {
            *optimized = true;
        }
        let layout = self.rng.pick(&[Layout::Unified, Layout::Unified, Layout::LegacyHugetlb, Layout::LegacyDax]);
        Some(vec![Step::Optimize { region: self.made[i].0.clone(), layout }])
    }

    fn restore(&mut self) -> Option<Vec<Step>> {
        let i = self.find(|m| matches!(m, Made::HugeTlb { optimized: true, .. }))?;
        if let Made::HugeTlb { optimized, .. } = &mut self.made[i].1 {
            *optimized = false;
        }
        Some(vec![Step::Restore { region: self.made[i].0.clone() }])
    }

    fn hugetlb_free(&mut self) -> Option<Vec<Step>> {
        let i = self.find(|m| matches!(m, Made::HugeTlb { .. }))?;
        let (region, m) = self.made.remove(i);
        if let Made::HugeTlb { from, boot_bytes, .. } = m {
            self.boot_folios -= boot_bytes;
            // The memory it came from lends one folio run fewer.
            if let Some((_, Made::Memory { lending, .. })) =
                self.made.iter_mut().find(|(n, _)| Some(n) == from.as_ref())
            {
                *lending -= 1;
            }
        }
        Some(vec![Step::HugetlbFree { region }])
    }

    /// Whether `n` more DIMMs of `bytes` in all still fit.
    fn room(&self, n: u64, bytes: u64) -> bool {
        self.slots + n <= SLOTS && self.boot_memory + self.plugged + bytes <= MAX_MEMORY
    }

    fn plug(&mut self, bytes: u64) {
        self.slots += 1;
        self.plugged += bytes;
    }

    /// A DAX range: on a DIMM (2 MiB or 1 GiB compound pages, an altmap now
    /// and then) or on the persistent memory set aside at boot.
    fn dax(&mut self) -> Option<Step> {
        let pmem = self.boot_pmem > 0 && !self.pmem_used && self.rng.chance(30);
        let size = if pmem { self.boot_pmem } else { self.rng.pick(&[256 * MIB, 512 * MIB, GIB]) };
        if !pmem && !self.room(1, size) {
            return None;
        }
        let compound = if size.is_multiple_of(GIB) && self.rng.chance(40) { GIB } else { 2 * MIB };
        // An altmap rounds the struct pages up to whole compound pages: with
        // 1 GiB ones it would fill a 1 GiB DIMM.
        let altmap = !pmem && compound == 2 * MIB && self.rng.chance(25);
        let layout = self.rng.pick(&[Layout::Unified, Layout::Unified, Layout::LegacyDax, Layout::None]);
        let region = self.name();
        if pmem {
            self.pmem_used = true;
            self.made.push((region.clone(), Made::Pmem));
        } else {
            self.plug(size);
            self.made.push((region.clone(), Made::Dax));
        }
        Some(Step::HotAdd {
            region,
            size,
            compound_size: compound,
            zone: Zone::Device,
            layout,
            device: if pmem { DaxDevice::Pmem } else { DaxDevice::Dimm },
            altmap,
            backend: if altmap { Backend::File } else { Backend::Ram },
            address: None,
        })
    }

    fn memory(&mut self) -> Option<Step> {
        let size = self.rng.pick(&[256 * MIB, 512 * MIB]);
        if !self.room(1, size) {
            return None;
        }
        self.plug(size);
        let region = self.name();
        self.made.push((region.clone(), Made::Memory { free: size, lending: 0 }));
        Some(Step::HotAddMemory { region, size, zone: Zone::Movable, backend: Backend::Ram })
    }

    /// Memory and a DAX range hot-added one right after the other, in either
    /// order: QEMU places them side by side.
    fn neighbours(&mut self) -> Option<Vec<Step>> {
        // Room for the largest of each, so neither draw below comes back empty.
        if !self.room(2, 512 * MIB + GIB) {
            return None;
        }
        let memory_first = self.rng.chance(50);
        let (a, b) = if memory_first { (self.memory()?, self.dax()?) } else { (self.dax()?, self.memory()?) };
        Some(vec![a, b])
    }

    fn hot_remove(&mut self) -> Option<Vec<Step>> {
        // Any removable range, not only the oldest: removals leave gaps that
        // later DIMMs fill, next to whatever is left.
        let removable: Vec<usize> = (0..self.made.len())
            .filter(|&i| match &self.made[i].1 {
                Made::Dax | Made::Pmem => true,
                Made::Memory { lending, .. } => *lending == 0,
                Made::HugeTlb { .. } => false,
            })
            .collect();
        if removable.is_empty() {
            return None;
        }
        let i = removable[self.rng.below(removable.len() as u64) as usize];
        // A removed DIMM's slot stays taken: the scenario loader counts hot-adds.
        let (region, _) = self.made.remove(i);
        Some(vec![Step::HotRemove { region }])
    }
}

impl FuzzCase {
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
mod tests;
