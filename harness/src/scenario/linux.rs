//! Which scenarios a real Linux kernel can run, derived from what they ask:
//! boot-time gigantic pages (the kernel command line), HugeTLB allocation
//! and freeing of the sizes every profile's kernel offers (sysfs), device
//! DAX on the persistent memory set aside at boot (`memmap=` and the nd/dax
//! sysfs), DIMMs hot-added as memory and removed again, `verify`, `ping` and
//! `exit` have Linux equivalents; on-demand optimize and restore, bug knobs,
//! injected allocation failures, DAX on hot-plugged DIMMs and the firmware's
//! manifest have none, so they keep a scenario firmware-only.
//! `machine.hugetlb-free-vmemmap = false` (boot with the optimization off)
//! exists only for kernels, so it keeps a scenario kernel-only.

use hvo_abi::model::Zone;
use hvo_abi::refusal::Refusal;

use super::raw::Size;
use super::{DaxDevice, Expect, Scenario, Step};

/// The HugeTLB page sizes the kernels of every profile offer (the 64 KiB
/// ppc64 kernel's too), in bytes.
pub const LINUX_HUGETLB_SIZES: [u64; 2] = [2 << 20, 1 << 30];

impl Scenario {
    /// Why a real kernel cannot run this scenario; `None` when it can.
    pub fn firmware_only_because(&self) -> Option<String> {
        if let Some(knob) = self.bug_knobs.first() {
            return Some(format!("bug knob `{}` is the firmware's", knob.name()));
        }
        if let (Expect::Fail { invariant, .. }, None) = (&self.expect, &self.fixed_in) {
            return Some(format!(
                "it expects `{invariant}` to fail, which only the firmware's bugs make happen (a Linux bug names `expect.fixed-in`)"
            ));
        }
        for g in &self.boot_gigantic {
            if let Some(why) = linux_pages(g.size, g.zone) {
                return Some(format!("boot-gigantic `{}`: {why}", g.region));
            }
        }
        self.steps.iter().find_map(|placed| {
            let why = if placed.sweep_failures || placed.expect_refusal == Some(Refusal::InjectedFailure) {
                Some("injected allocation failures are the firmware's".to_string())
            } else if let Some(reason) = placed.expect_refusal {
                Some(format!("the refusals the firmware names ({reason}) are the firmware's"))
            } else {
                match &placed.step {
                    Step::Ping | Step::Verify | Step::HugetlbFree { .. } | Step::Exit { status: 0 } => None,
                    Step::Exit { status } => Some(format!("a kernel powers off with no status to give ({status})")),
                    Step::HugetlbAlloc { from: Some(from), .. } => {
                        Some(format!("allocating from the hot-added region `{from}`"))
                    }
                    Step::HugetlbAlloc { folio_size, zone, .. } => linux_pages(*folio_size, *zone),
                    Step::HotAdd { device, compound_size, .. } => linux_dax(*device, *compound_size),
                    Step::HotAddMemory { zone, .. } => (*zone != Zone::Movable)
                        .then(|| format!("zone {}: Linux onlines hot-added DIMMs movable here", zone.name())),
                    Step::HotRemove { .. } => None,
                    other => Some(format!("`{}` has no Linux equivalent", other.name())),
                }
            };
            why.map(|w| format!("step {} (line {}): {w}", placed.step.name(), placed.line))
        })
    }

    /// Why the firmware cannot run this scenario; `None` when it can.
    pub fn kernel_only_because(&self) -> Option<String> {
        if let Some(fixed_in) = &self.fixed_in {
            return Some(format!("it reproduces a Linux bug fixed in {fixed_in}"));
        }
        if self.steps.iter().any(|p| matches!(p.step, Step::HotAdd { device: DaxDevice::Pmem, altmap: true, .. })) {
            return Some(
                "an altmap on boot persistent memory: the firmware keeps its struct pages in the boot memmap".into(),
            );
        }
        (!self.hugetlb_free_vmemmap)
            .then(|| "it boots a kernel with hugetlb_free_vmemmap=off, which the firmware has no equivalent of".into())
    }
}

/// Why HugeTLB pages of `size` in `zone` have no Linux equivalent here.
fn linux_pages(size: u64, zone: Zone) -> Option<String> {
    if !LINUX_HUGETLB_SIZES.contains(&size) {
        return Some(format!("{} pages: Linux's HugeTLB sizes here are 2M and 1G", Size(size)));
    }
    (zone != Zone::Normal).then(|| format!("zone {}: HugeTLB pages come from the normal zone", zone.name()))
}

/// Why device DAX from `device` with compound pages of `compound_size` has
/// no Linux equivalent here.
fn linux_dax(device: DaxDevice, compound_size: u64) -> Option<String> {
    if device != DaxDevice::Pmem {
        return Some(format!(
            "DAX on a hot-plugged {}: Linux makes device DAX of persistent memory (set `machine.boot-pmem`, add it with device = \"pmem\")",
            device.name()
        ));
    }
    (!LINUX_HUGETLB_SIZES.contains(&compound_size))
        .then(|| format!("{} compound pages: device DAX aligns to 2M or 1G", Size(compound_size)))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(source: &str) -> Result<Scenario, crate::scenario::ScenarioError> {
        Scenario::parse(Path::new("s.toml"), source)
    }

    #[test]
    fn a_scenario_runs_on_a_kernel_exactly_when_every_step_has_a_linux_equivalent() {
        let linux = "[machine]\nboot-memory = \"2G\"\n[[boot-gigantic]]\nregion = \"b\"\nsize = \"1G\"\n\
                     [[step]]\naction = \"hugetlb-alloc\"\nregion = \"r\"\nsize = \"2M\"\ncount = 4\n\
                     [[step]]\naction = \"verify\"\n[[step]]\naction = \"hugetlb-free\"\nregion = \"r\"\n";
        let s = parse(linux).unwrap();
        assert_eq!(s.firmware_only_because(), None);
        assert_eq!(s.kernel_only_because(), None);
        let optimize = format!("{linux}[[step]]\naction = \"optimize\"\nregion = \"b\"\nlayout = \"unified\"\n");
        let why = parse(&optimize).unwrap().firmware_only_because().unwrap();
        assert!(why.contains("`optimize` has no Linux equivalent"), "{why}");
        let odd = "[[step]]\naction = \"hugetlb-alloc\"\nregion = \"r\"\nsize = \"4M\"\ncount = 1\n";
        assert!(parse(odd).unwrap().firmware_only_because().unwrap().contains("2M and 1G"));
    }

    #[test]
    fn dax_of_boot_pmem_and_movable_dimms_run_on_a_kernel_dax_of_hot_plugged_dimms_does_not() {
        let pmem = "[machine]\nboot-memory = \"4G\"\nboot-pmem = \"2G\"\n\
                    [[step]]\naction = \"hot-add\"\nregion = \"d\"\nsize = \"2G\"\ndevice = \"pmem\"\n\
                    [[step]]\naction = \"verify\"\n[[step]]\naction = \"hot-remove\"\nregion = \"d\"\n";
        assert_eq!(parse(pmem).unwrap().firmware_only_because(), None);
        let altmap = pmem.replace("device = \"pmem\"\n", "device = \"pmem\"\naltmap = true\n");
        let why = parse(&altmap).unwrap().kernel_only_because().unwrap();
        assert!(why.contains("altmap on boot persistent memory"), "{why}");
        let memory = "[machine]\nboot-memory = \"1G\"\nslots = 2\nmax-memory = \"4G\"\n\
                      [[step]]\naction = \"hot-add\"\nregion = \"m\"\nkind = \"memory\"\nsize = \"1G\"\n\
                      [[step]]\naction = \"hot-remove\"\nregion = \"m\"\n";
        assert_eq!(parse(memory).unwrap().firmware_only_because(), None);
        let dimm = "[machine]\nboot-memory = \"1G\"\nslots = 2\nmax-memory = \"4G\"\n\
                    [[step]]\naction = \"hot-add\"\nregion = \"d\"\nsize = \"1G\"\n";
        let why = parse(dimm).unwrap().firmware_only_because().unwrap();
        assert!(why.contains("DAX on a hot-plugged dimm"), "{why}");
    }

    #[test]
    fn booting_with_the_optimization_off_is_kernel_only_and_allocates_nothing_at_run_time() {
        let off = "[machine]\nhugetlb-free-vmemmap = false\n[[step]]\naction = \"verify\"\n";
        let s = parse(off).unwrap();
        assert!(!s.hugetlb_free_vmemmap);
        assert!(s.kernel_only_because().unwrap().contains("hugetlb_free_vmemmap=off"));
        let alloc = format!("{off}[[step]]\naction = \"hugetlb-alloc\"\nregion = \"r\"\nsize = \"2M\"\ncount = 1\n");
        let e = parse(&alloc).unwrap_err();
        assert!(e.message.contains("turns the optimization on"), "{e}");
    }
}
