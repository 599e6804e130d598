//! The step interpreter for real Linux kernels, beside the firmware's
//! (`steps`): the same [`Run`] (machine, console, verdicts, artifacts), the
//! kernel's own boot set-up and steps. Boot-time gigantic pages come from
//! the command line; run-time HugeTLB pages from the agent (sysfs); `verify`
//! is in `kernel_verify`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hvo_images::{profile, Arch, BootPmem, KernelSupport};

use super::interpreter::{Guest, Run, Timeouts};
use super::kernel_devices::KernelRanges;
use super::{Abort, Launch};
use crate::kernel::agent::{AgentCommand, HstateSize, KernelFacts, KernelReport};
use crate::kernel::symbols::KernelSymbols;
use crate::kernel::verify::{FoundRegion, Generation};
use crate::qemu::MachineSpec;
use crate::qemu::{describe_exit, BootPayload};
use crate::report::{Check, FoundLayout, KernelSummary};
use crate::scenario::{Scenario, Step};

/// A kernel boots to its initramfs in about 4 s under TCG here; the
/// firmware's 10 s default is too tight for a loaded machine.
const KERNEL_BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Run-time gigantic pages and a first look-up in /proc/kallsyms take
/// seconds under TCG.
const KERNEL_STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// A real kernel to run scenarios on, as the host found it.
#[derive(Clone, Debug)]
pub struct KernelGuest {
    /// How the user named it: a spec (`debian-6.12`) or the image's path.
    pub spec: String,
    pub image: PathBuf,
    /// The agent's initramfs for this architecture.
    pub initramfs: PathBuf,
    /// Symbols from files on the host (a real System.map, an ELF vmlinux).
    pub symbols: Option<Arc<KernelSymbols>>,
    /// A System.map-format file keeping symbols once looked up in the
    /// running kernel: with `nokaslr` they hold for every boot of the build.
    pub symbols_cache: Option<PathBuf>,
    /// The UEFI firmware file of the profile's [`BootPmem::AcpiNvdimm`],
    /// fetched where the profile has one.
    pub uefi: Option<PathBuf>,
}

/// What a kernel run keeps.
pub(super) struct KernelState {
    pub guest: KernelGuest,
    pub facts: Option<KernelFacts>,
    /// Whether the kernel's BTF has `vmemmap_tails`, once asked.
    pub btf_has_vmemmap_tails: Option<bool>,
    /// The symbols the host needs, once known.
    pub symbols: Option<KernelSymbols>,
    /// Scenario region name -> the HugeTLB pages it holds.
    pub pages: HashMap<String, (HstateSize, u64)>,
    /// What the last `verify` judged.
    pub generation: Option<(Generation, String)>,
    /// The optimized compound pages every `verify` found, each kind once.
    pub found: Vec<FoundRegion>,
    /// DAX devices, DIMMs and raw persistent memory beside boot RAM.
    pub ranges: KernelRanges,
}

impl KernelState {
    /// Fills in what the run learnt of the kernel.
    pub fn summarize(&self, summary: &mut KernelSummary) {
        if let Some(facts) = &self.facts {
            summary.release = facts.release.clone();
        }
        if let Some((generation, why)) = &self.generation {
            summary.generation = generation.name().to_string();
            summary.generation_reason = why.clone();
        }
        summary.regions = self
            .found
            .iter()
            .map(|f| FoundLayout {
                kind: f.kind.name().into(),
                compound_bytes: f.compound_bytes,
                count: f.count,
                layout: f.layout.name().into(),
                private_vmemmap_bytes: f.private_vmemmap_bytes,
                shared_tail_pages: f.shared_tail_pages,
            })
            .collect();
    }
}

/// The kernel command line for `scenario` on `arch`: the console, fixed
/// addresses (`nokaslr`, so symbols hold across boots), the optimization
/// on or off as the scenario says, its boot-time gigantic pages, and a
/// panic that ends QEMU at once (`-no-reboot`).
pub fn command_line(scenario: &Scenario, arch: Arch) -> String {
    let hvo = if scenario.hugetlb_free_vmemmap { "on" } else { "off" };
    let mut line = format!(
        "console={} nokaslr panic=-1 quiet loglevel=1 hugetlb_free_vmemmap={hvo}",
        profile(arch).kernel.console
    );
    let mut by_size: Vec<(u64, u64)> = Vec::new();
    for g in &scenario.boot_gigantic {
        match by_size.iter_mut().find(|(size, _)| *size == g.size) {
            Some((_, count)) => *count += g.count,
            None => by_size.push((g.size, g.count)),
        }
    }
    for (size, count) in by_size {
        line.push_str(&format!(" hugepagesz={} hugepages={count}", crate::scenario::Size(size)));
    }
    if let Some(pmem) = memmap_pmem_range(scenario, arch) {
        // Legacy persistent memory (nd_e820): what `memmap=nn!ss` takes out
        // of RAM, the nd and dax drivers make a DAX device of.
        line.push_str(&format!(" memmap={}!{:#x}", crate::scenario::Size(pmem.end - pmem.start), pmem.start));
    }
    if boot_nvdimm(scenario, arch).is_some() {
        // The nvdimm is in the NFIT only: the kernel must take ACPI over
        // the device tree UEFI passes too.
        line.push_str(" acpi=force");
    }
    if scenario.steps.iter().any(|p| matches!(p.step, Step::HotAddMemory { .. })) {
        // Hot-added DIMMs come online by themselves, movable so that they
        // can be removed again.
        line.push_str(" memhp_default_state=online_movable");
    }
    line
}

/// Why `arch`'s kernels (`kernel` among them) cannot run `scenario` (the
/// profile's facts about its machine and kernels), before anything boots.
pub fn unsupported_because(scenario: &Scenario, arch: Arch, kernel: &KernelGuest) -> Option<String> {
    let facts = &profile(arch).kernel;
    if scenario.boot_pmem > 0 {
        match facts.boot_pmem {
            BootPmem::No(why) => return Some(why.to_string()),
            BootPmem::AcpiNvdimm(firmware) if kernel.uefi.is_none() => {
                return Some(format!("the nvdimm needs UEFI firmware ({}), which was not fetched", firmware.package))
            }
            _ => {}
        }
    }
    let dax_align = scenario.steps.iter().find_map(|p| match p.step {
        Step::HotAdd { compound_size, .. } if !facts.dax_aligns.contains(&compound_size) => Some(compound_size),
        _ => None,
    });
    if let Some(align) = dax_align {
        let offered: Vec<String> = facts.dax_aligns.iter().map(|a| crate::scenario::Size(*a).to_string()).collect();
        return Some(format!(
            "device DAX aligns to {} here, not {}: dax_pmem offers a PUD size only where the architecture has \
             PUD-sized transparent huge pages",
            offered.join(" or "),
            crate::scenario::Size(align)
        ));
    }
    let needs_hotplug = scenario.steps.iter().any(|p| matches!(p.step, Step::HotAddMemory { .. }));
    match facts.dimm_hotplug {
        KernelSupport::No(why) if needs_hotplug => Some(why.to_string()),
        _ => None,
    }
}

/// The persistent memory `machine.boot-pmem` sets aside with `memmap=`
/// where the profile's kernels take it: the end of boot RAM, as the
/// firmware takes it.
pub fn memmap_pmem_range(scenario: &Scenario, arch: Arch) -> Option<std::ops::Range<u64>> {
    if scenario.boot_pmem == 0 || profile(arch).kernel.boot_pmem != BootPmem::Memmap {
        return None;
    }
    let last = profile(arch).boot_ram_pieces(scenario.machine.boot_memory).pop()?;
    let end = last.gpa + last.len;
    Some(end - scenario.boot_pmem..end)
}

/// The bytes of the nvdimm `machine.boot-pmem` becomes where the profile's
/// kernels see persistent memory only through ACPI.
fn boot_nvdimm(scenario: &Scenario, arch: Arch) -> Option<u64> {
    let acpi = matches!(profile(arch).kernel.boot_pmem, BootPmem::AcpiNvdimm(_));
    (acpi && scenario.boot_pmem > 0).then_some(scenario.boot_pmem)
}

/// The machine a kernel boots for `scenario`: the file's, except that
/// persistent memory a kernel sees only through ACPI is an nvdimm beside
/// the rest of boot memory, in a slot of its own.
fn kernel_machine(scenario: &Scenario, arch: Arch) -> MachineSpec {
    let mut machine = scenario.machine;
    if let Some(bytes) = boot_nvdimm(scenario, arch) {
        machine.boot_memory -= bytes;
        machine.boot_nvdimm = Some(bytes);
        machine.slots = machine.slots.max(1);
    }
    machine
}

/// How a kernel run starts, and the summary its result carries.
pub(super) fn launch(scenario: &Scenario, arch: Arch, kernel: &KernelGuest, start: Instant) -> (Launch, KernelSummary) {
    let machine = kernel_machine(scenario, arch);
    let payload = BootPayload::Kernel {
        image: kernel.image.clone(),
        initramfs: kernel.initramfs.clone(),
        append: command_line(scenario, arch),
        uefi: machine.boot_nvdimm.and(kernel.uefi.clone()),
    };
    let boot = Duration::from_millis(scenario.boot_timeout_ms).max(KERNEL_BOOT_TIMEOUT);
    let step = Duration::from_millis(scenario.step_timeout_ms).max(KERNEL_STEP_TIMEOUT);
    // The deadline grows by what the kernel's boot may take beyond the file's.
    let deadline = Duration::from_millis(scenario.deadline_ms)
        + boot.saturating_sub(Duration::from_millis(scenario.boot_timeout_ms));
    let mut pages = HashMap::new();
    for g in &scenario.boot_gigantic {
        pages.insert(g.region.clone(), (HstateSize::from_kib(g.size >> 10), g.count));
    }
    let state = KernelState {
        guest: kernel.clone(),
        facts: None,
        btf_has_vmemmap_tails: None,
        symbols: None,
        pages,
        generation: None,
        found: Vec::new(),
        ranges: KernelRanges {
            boot_pmem: memmap_pmem_range(scenario, arch),
            raw_pmem: memmap_pmem_range(scenario, arch),
            ..KernelRanges::default()
        },
    };
    let guest = Guest::Kernel(Box::new(state));
    let launch = Launch { machine, payload, guest, timeouts: Timeouts { boot, step }, deadline, start };
    (launch, KernelSummary { spec: kernel.spec.clone(), ..KernelSummary::default() })
}

/// `boot-pools`: the kernel holds, right after boot, the HugeTLB pages its
/// command line reserved (`asked`: per size, every reservation of it summed).
fn boot_pools(asked: impl Iterator<Item = (HstateSize, u64)>, report: &KernelReport) -> Check {
    let mut wanted: Vec<(HstateSize, u64)> = Vec::new();
    for (size, count) in asked {
        match wanted.iter_mut().find(|(s, _)| *s == size) {
            Some((_, total)) => *total += count,
            None => wanted.push((size, count)),
        }
    }
    let mut found = Vec::new();
    let mut wrong = Vec::new();
    for (size, count) in wanted {
        let pages = report.hstate(size).map_or(0, |h| h.pages);
        found.push(format!("{pages} x {size}"));
        if pages != count {
            wrong.push(format!("{count} x {size} reserved on the command line, the pool holds {pages}"));
        }
    }
    if wrong.is_empty() {
        Check::pass("boot-pools", format!("the kernel allocated {} at boot", found.join(" and ")))
    } else {
        Check::fail("boot-pools", wrong.join("; "))
    }
}

impl Run<'_> {
    pub(super) fn kernel_state(&mut self) -> Result<&mut KernelState, Abort> {
        match &mut self.guest {
            Guest::Kernel(state) => Ok(state),
            Guest::Firmware(_) => Err(Abort::Infra("the firmware has no kernel agent".into())),
        }
    }

    /// One request to the agent; its reply's payload.
    pub(super) async fn agent(&mut self, command: AgentCommand<'_>) -> Result<String, Abort> {
        let timeout = self.step_timeout();
        let Some(console) = self.machine.console() else { return Err(Abort::Infra("no console".into())) };
        match console.request_line(|seq| command.line(seq), timeout).await {
            Ok(payload) => Ok(payload),
            Err(e) => Err(self.console_abort(e).await),
        }
    }

    /// What the kernel says it is: asked once, right after `ready`.
    pub(super) async fn kernel_boot_setup(&mut self) -> Result<(), Abort> {
        let reply = self.agent(AgentCommand::Kernel).await?;
        let facts = KernelFacts::parse(&reply).map_err(|e| Abort::Fail(e.to_string()))?;
        self.findings.checks.push(Check::pass(
            "kernel",
            format!(
                "Linux {} ({}, {} KiB pages, hstates {:?})",
                facts.release,
                facts.machine,
                facts.page_kib,
                facts.hstates.iter().map(|h| h.to_string()).collect::<Vec<_>>()
            ),
        ));
        self.kernel_state()?.facts = Some(facts);
        if let Some(bytes) = self.machine.spec().boot_nvdimm {
            let range = crate::hotplug::map_boot_nvdimm(&mut self.machine, bytes).await.map_err(Run::hotplug_abort)?;
            self.kernel_state()?.ranges.boot_pmem = Some(range);
        }
        if !self.scenario.boot_gigantic.is_empty() {
            let reply = self.agent(AgentCommand::Report).await?;
            let report = KernelReport::parse(&reply).map_err(|e| Abort::Fail(e.to_string()))?;
            let asked = self.scenario.boot_gigantic.iter().map(|g| (HstateSize::from_kib(g.size >> 10), g.count));
            self.findings.checks.push(boot_pools(asked, &report));
        }
        Ok(())
    }

    pub(super) async fn kernel_step(&mut self, step: &Step) -> Result<(), Abort> {
        match step {
            Step::Ping => {
                let token = format!("t{}", self.elapsed_ms());
                let reply = self.agent(AgentCommand::Ping { token: Some(&token) }).await?;
                let expected = format!("pong {token}");
                self.findings.checks.push(if reply == expected {
                    Check::pass("ping", "the kernel's agent answered")
                } else {
                    Check::fail("ping", format!("expected `{expected}`, got `{reply}`"))
                });
                Ok(())
            }
            Step::HugetlbAlloc { region, folio_size, count, .. } => {
                let size = HstateSize::from_kib(folio_size >> 10);
                self.agent(AgentCommand::HugetlbAlloc { size, count: *count }).await?;
                self.kernel_state()?.pages.insert(region.clone(), (size, *count));
                Ok(())
            }
            Step::HugetlbFree { region } => {
                let (size, count) = self
                    .kernel_state()?
                    .pages
                    .remove(region)
                    .ok_or_else(|| Abort::Fail(format!("region `{region}` was freed or never allocated")))?;
                self.agent(AgentCommand::HugetlbFree { size, count }).await.map(drop)
            }
            Step::Verify => self.kernel_verify().await,
            Step::HotAdd { region, compound_size, altmap, layout, .. } => {
                self.kernel_dax_add(region, *compound_size, *altmap, *layout).await
            }
            Step::HotAddMemory { region, size, backend, .. } => self.kernel_memory_add(region, *size, *backend).await,
            Step::HotRemove { region } => self.kernel_remove(region).await,
            Step::Exit { .. } => self.kernel_exit().await,
            other => Err(Abort::Infra(format!("`{}` has no Linux equivalent", other.name()))),
        }
    }

    /// The agent powers the machine off: QEMU must end by itself, with 0.
    async fn kernel_exit(&mut self) -> Result<(), Abort> {
        self.agent(AgentCommand::Exit).await?;
        let exit = self.machine.wait_exit(self.step_timeout()).await;
        self.findings.checks.push(match exit.and_then(|s| s.code()) {
            Some(0) => {
                Check::pass("exit-status", format!("the kernel powered off: QEMU exited with {}", describe_exit(exit)))
            }
            _ => Check::fail(
                "exit-status",
                format!("the kernel was asked to power off, QEMU ended with {}", describe_exit(exit)),
            ),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::kernel::agent::Hstate;
    use crate::report::CheckStatus;

    const DAX_2M: &str = r#"
description = "d"
[machine]
boot-memory = "4G"
boot-pmem = "2G"
[[step]]
action = "hot-add"
region = "dax"
device = "pmem"
size = "2G"
compound = "2M"
"#;

    fn scenario(source: &str) -> Scenario {
        Scenario::parse(Path::new("s.toml"), source).unwrap()
    }

    fn guest(uefi: Option<&str>) -> KernelGuest {
        KernelGuest {
            spec: "debian-6.12".into(),
            image: "/k/vmlinuz".into(),
            initramfs: "/k/initramfs.cpio".into(),
            symbols: None,
            symbols_cache: None,
            uefi: uefi.map(PathBuf::from),
        }
    }

    #[test]
    fn x86_sets_persistent_memory_aside_from_boot_ram_with_memmap() {
        let s = scenario(DAX_2M);
        assert!(command_line(&s, Arch::X86_64).ends_with(" memmap=2G!0x100000000"));
        assert_eq!(memmap_pmem_range(&s, Arch::X86_64), Some(0x1_0000_0000..0x1_8000_0000));
        assert_eq!(kernel_machine(&s, Arch::X86_64), s.machine, "the file's machine");
    }

    #[test]
    fn arm64_gets_an_nvdimm_beside_the_rest_of_boot_memory_and_takes_acpi() {
        let s = scenario(DAX_2M);
        let line = command_line(&s, Arch::Aarch64);
        assert!(line.ends_with(" acpi=force") && !line.contains(" memmap="), "{line}");
        assert_eq!(memmap_pmem_range(&s, Arch::Aarch64), None);
        let m = kernel_machine(&s, Arch::Aarch64);
        assert_eq!((m.boot_memory, m.boot_nvdimm), (2 << 30, Some(2 << 30)));
        assert!(m.slots >= 1 && m.max_memory >= 4 << 30);
        let (launch, _) = launch(&s, Arch::Aarch64, &guest(Some("/fw/QEMU_EFI.fd")), Instant::now());
        assert!(matches!(launch.payload, BootPayload::Kernel { uefi: Some(_), .. }), "booted by UEFI");
    }

    #[test]
    fn a_kernel_is_not_booted_for_what_its_architecture_cannot_do() {
        let s = scenario(DAX_2M);
        assert_eq!(unsupported_because(&s, Arch::X86_64, &guest(None)), None);
        assert_eq!(unsupported_because(&s, Arch::Aarch64, &guest(Some("/fw"))), None);
        let no_firmware = unsupported_because(&s, Arch::Aarch64, &guest(None)).unwrap();
        assert!(no_firmware.contains("qemu-efi-aarch64"), "{no_firmware}");
        assert!(unsupported_because(&s, Arch::Ppc64le, &guest(None)).unwrap().contains("LIBNVDIMM"));
        let gigantic = scenario(&DAX_2M.replace("compound = \"2M\"", "compound = \"1G\""));
        assert_eq!(unsupported_because(&gigantic, Arch::X86_64, &guest(None)), None);
        let why = unsupported_because(&gigantic, Arch::Aarch64, &guest(Some("/fw"))).unwrap();
        assert!(why.starts_with("device DAX aligns to 2M here, not 1G"), "{why}");
    }

    fn report(hstates: &[(u64, u64)]) -> KernelReport {
        let mut text = String::from("hvo=1 nr_memmap_pages=0 nr_memmap_boot_pages=0 hstates=");
        let items: Vec<String> = hstates.iter().map(|(kib, pages)| format!("{kib}:{pages}:{pages}")).collect();
        text.push_str(&items.join(","));
        KernelReport::parse(&text).unwrap()
    }

    #[test]
    fn boot_pools_sum_the_reservations_of_a_size_and_name_a_short_pool() {
        let (m2, g1) = (HstateSize::from_kib(2048), HstateSize::from_kib(1 << 20));
        let full = report(&[(2048, 64), (1 << 20, 1)]);
        assert_eq!(full.hstate(m2), Some(&Hstate { size: m2, pages: 64, free: 64 }));
        let c = boot_pools([(m2, 60), (g1, 1), (m2, 4)].into_iter(), &full);
        assert_eq!(c.status, CheckStatus::Pass, "{}", c.detail);
        assert_eq!(c.detail, "the kernel allocated 64 x 2048kB and 1 x 1048576kB at boot");
        let short = report(&[(2048, 64), (1 << 20, 0)]);
        let c = boot_pools([(m2, 64), (g1, 1)].into_iter(), &short);
        assert_eq!(c.status, CheckStatus::Fail);
        assert_eq!(c.detail, "1 x 1048576kB reserved on the command line, the pool holds 0");
        let c = boot_pools([(g1, 1)].into_iter(), &report(&[(2048, 0)]));
        assert_eq!(
            (c.status, c.detail.as_str()),
            (CheckStatus::Fail, "1 x 1048576kB reserved on the command line, the pool holds 0")
        );
    }
}
