//! Which scenarios a real Linux kernel can run, derived from what they ask:
//! boot-time gigantic pages (the kernel command line), HugeTLB allocation
//! and freeing of the sizes every profile's kernel offers (sysfs), `verify`,
//! `ping` and `exit` have Linux equivalents; on-demand optimize and restore,
//! bug knobs, injected allocation failures, hotplug, persistent memory and
//! the firmware's manifest have none, so they keep a scenario firmware-only.
//! `machine.hugetlb-free-vmemmap = false` (boot with the optimization off)
//! exists only for kernels, so it keeps a scenario kernel-only.

use hvo_abi::model::Zone;

use super::raw::Size;
use super::{Expect, Scenario, Step};

/// The HugeTLB page sizes the kernels of every profile offer (the 64 KiB
/// ppc64 kernel's too), in bytes.
pub const LINUX_HUGETLB_SIZES: [u64; 2] = [2 << 20, 1 << 30];

impl Scenario {
    /// Why a real kernel cannot run this scenario; `None` when it can.
    pub fn firmware_only_because(&self) -> Option<String> {
        if let Some(knob) = self.bug_knobs.first() {
            return Some(format!("bug knob `{}` is the firmware's", knob.name()));
        }
        if self.boot_pmem > 0 {
            return Some("persistent memory set aside at boot is the firmware's".into());
        }
        if let Expect::Fail { invariant, .. } = &self.expect {
            return Some(format!("it expects `{invariant}` to fail, which only the firmware's bugs make happen"));
        }
        for g in &self.boot_gigantic {
            if let Some(why) = linux_pages(g.size, g.zone) {
                return Some(format!("boot-gigantic `{}`: {why}", g.region));
            }
        }
        self.steps.iter().find_map(|placed| {
            let why = if placed.expect_failure || placed.sweep_failures {
                Some("injected allocation failures are the firmware's".to_string())
            } else {
                match &placed.step {
                    Step::Ping | Step::Verify | Step::HugetlbFree { .. } | Step::Exit { status: 0 } => None,
                    Step::Exit { status } => Some(format!("a kernel powers off with no status to give ({status})")),
                    Step::HugetlbAlloc { from: Some(from), .. } => {
                        Some(format!("allocating from the hot-added region `{from}`"))
                    }
                    Step::HugetlbAlloc { folio_size, zone, .. } => linux_pages(*folio_size, *zone),
                    other => Some(format!("`{}` has no Linux equivalent", other.name())),
                }
            };
            why.map(|w| format!("step {} (line {}): {w}", placed.step.name(), placed.line))
        })
    }

    /// Why the firmware cannot run this scenario; `None` when it can.
    pub fn kernel_only_because(&self) -> Option<String> {
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
