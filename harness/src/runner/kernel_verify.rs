//! `verify` on a real kernel: the kernel's own account first (the agent,
//! while it runs), then with the machine stopped the host finds the
//! kernel's root table (QEMU's `gva2gpa` of the profile's root symbol), the
//! paging format under which it maps itself, and the vmemmap's start, and
//! hands the mapped RAM to the independent verifier; QEMU's MMU and the
//! host's walker must translate sampled struct pages alike. The machine
//! runs again afterwards, whatever was found.

use std::ops::Range;
use std::time::Instant;

use hvo_images::{BootPmem, Profile, VmemmapStart};

use super::interpreter::{Guest, Run};
use super::kernel::memmap_pmem_range;
use super::{qmp_abort, Abort, NO_QMP};
use crate::addr::{Pfn, PhysAddr, VirtAddr};
use crate::invariant::Invariant;
use crate::kernel::agent::{ksyms_commands, parse_btf_has, parse_ksyms, AgentCommand, KernelReport};
use crate::kernel::symbols::KernelSymbols;
use crate::kernel::verify::{detect_generation, verify_kernel, DaxRange, Generation, KernelVerdict, KernelView};
use crate::memory::GuestMemory;
use crate::pgtable::{self_translating_format, PagingFormat, Walker};
use crate::report::{Check, CheckStatus};

/// The BTF member only the unified series' kernels have.
const UNIFIED_BTF_MEMBER: &str = "vmemmap_tails";
/// Stops at which QEMU is asked to translate the root symbol.
const ROOT_ATTEMPTS: usize = 10;
/// Struct pages sampled per RAM range for the translation check.
const TRANSLATION_SAMPLES: u64 = 8;

impl Run<'_> {
    pub(super) async fn kernel_verify(&mut self) -> Result<(), Abort> {
        let started = Instant::now();
        let report =
            KernelReport::parse(&self.agent(AgentCommand::Report).await?).map_err(|e| Abort::Fail(e.to_string()))?;
        let tails = self.btf_has_vmemmap_tails().await?;
        let symbols = self.needed_symbols().await?;
        let (mut generation, mut why) = detect_generation(&report.hvo_sysctl, tails);
        if !self.scenario.hugetlb_free_vmemmap && generation != Generation::NotOptimizing {
            why = format!(
                "not-optimizing: booted with hugetlb_free_vmemmap=off, it must optimize nothing (it can: {why})"
            );
            generation = Generation::NotOptimizing;
        }
        let qmp = self.machine.qmp().ok_or_else(|| Abort::Infra(NO_QMP.into()))?;
        qmp.execute(qapi::qmp::stop {}).await.map_err(qmp_abort)?;
        let judged = self.judge_stopped(&symbols, &report, generation).await;
        let qmp = self.machine.qmp().ok_or_else(|| Abort::Infra(NO_QMP.into()))?;
        qmp.execute(qapi::qmp::cont {}).await.map_err(qmp_abort)?;
        let (verdict, translations) = judged?;

        let optimizes = Check::pass("hvo-generation", &why);
        self.findings.checks.push(optimizes);
        self.findings.checks.extend(verdict.checks.iter().cloned());
        self.findings.checks.push(translations);
        if verdict.checks.iter().any(|c| c.status == CheckStatus::Fail) || self.findings.last_vmemmap.is_none() {
            self.findings.last_vmemmap = Some(verdict.dump.clone());
        }
        let state = self.kernel_state()?;
        state.generation = Some((generation, why));
        // Every verify's finds: a later one (after freeing) finds fewer.
        for found in verdict.found {
            if !state.found.contains(&found) {
                state.found.push(found);
            }
        }
        let took = started.elapsed().as_millis() as u64;
        self.findings.metrics.verify_ms = Some(took);
        self.findings.verify_ms += took;
        Ok(())
    }

    /// With the machine stopped: the tables, the verdict, and QEMU's MMU
    /// against the host's walker.
    async fn judge_stopped(
        &self,
        symbols: &KernelSymbols,
        report: &KernelReport,
        generation: Generation,
    ) -> Result<(KernelVerdict, Check), Abort> {
        let kernel = &self.profile.kernel;
        let qmp = self.machine.qmp().ok_or_else(|| Abort::Infra(NO_QMP.into()))?;
        let mem = self.machine.memory();
        let root_va = symbol(symbols, kernel.root_symbol)?;
        // QEMU translates with the stopped CPU's current regime: stopped in
        // user mode where the kernel is unmapped there (arm64's E0PD, KPTI),
        // it cannot; run a moment and stop again.
        let mut root = None;
        for _ in 0..ROOT_ATTEMPTS {
            root = qmp.gva2gpa(root_va).await.map_err(qmp_abort)?;
            if root.is_some() {
                break;
            }
            qmp.execute(qapi::qmp::cont {}).await.map_err(qmp_abort)?;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            qmp.execute(qapi::qmp::stop {}).await.map_err(qmp_abort)?;
        }
        let root =
            root.ok_or_else(|| Abort::Fail(format!("QEMU cannot translate {} ({root_va})", kernel.root_symbol)))?;
        let memory = self.kernel_memory()?;
        let (verdict, format, samples) = tokio::task::block_in_place(|| {
            judge_tables(self.profile, memory, symbols, mem, root, root_va, report, generation)
        })?;
        let mut wrong = Vec::new();
        let mut compared = 0;
        for (pfn, va, by_host) in samples {
            let by_qemu = qmp.gva2gpa(va).await.map_err(qmp_abort)?;
            if by_qemu == by_host {
                compared += 1;
            } else {
                wrong.push(format!("struct page of pfn {pfn} at {va}: host walker {by_host:?}, QEMU {by_qemu:?}"));
            }
        }
        let name = Invariant::TranslationAgrees.name();
        let check = if wrong.is_empty() {
            Check::pass(name, format!("host walker ({}) and QEMU agree on {compared} struct pages", format.name()))
        } else {
            Check::fail(name, wrong.join("; "))
        };
        Ok((verdict, check))
    }

    /// The kernel's memory as the host set it up: boot RAM (less the
    /// persistent memory set aside), onlined DIMMs, raw persistent memory,
    /// and DAX devices.
    fn kernel_memory(&self) -> Result<KernelMemory, Abort> {
        let page = self.profile.page_size();
        let Guest::Kernel(state) = &self.guest else {
            return Err(Abort::Infra("the firmware has no kernel memory".into()));
        };
        let pmem = memmap_pmem_range(self.scenario, self.arch);
        let mut ram: Vec<Range<Pfn>> = Vec::new();
        for piece in self.profile.boot_ram_pieces(self.machine.spec().boot_memory) {
            let mut end = piece.gpa + piece.len;
            if let Some(pmem) = pmem.as_ref().filter(|p| p.start >= piece.gpa && p.end == end) {
                end = pmem.start;
            }
            ram.push(Pfn::containing(PhysAddr(piece.gpa), page)..Pfn::containing(PhysAddr(end), page));
        }
        ram.extend(state.ranges.extra_ram(page));
        if let (Some(_), BootPmem::AcpiNvdimm(firmware)) =
            (self.machine.spec().boot_nvdimm, self.profile.kernel.boot_pmem)
        {
            // Booted by UEFI: its memory map gives Linux more than RAM.
            let beside = firmware.memory_beside_ram.iter().map(|&(start, len)| {
                Pfn::containing(PhysAddr(start), page)..Pfn::containing(PhysAddr(start + len), page)
            });
            ram.extend(beside);
            ram.sort_by_key(|r| r.start);
        }
        Ok(KernelMemory { ram, dax: state.ranges.dax_ranges(page), removed: state.ranges.removed(page) })
    }

    /// Whether the kernel is of the unified series (its BTF tells), asked once.
    async fn btf_has_vmemmap_tails(&mut self) -> Result<bool, Abort> {
        let state = self.kernel_state()?;
        if let Some(known) = state.btf_has_vmemmap_tails {
            return Ok(known);
        }
        let has_btf = state.facts.as_ref().is_some_and(|f| f.btf);
        let known = if has_btf {
            let reply = self.agent(AgentCommand::BtfHas(UNIFIED_BTF_MEMBER)).await?;
            parse_btf_has(UNIFIED_BTF_MEMBER, &reply).map_err(|e| Abort::Fail(e.to_string()))?
        } else {
            false
        };
        self.kernel_state()?.btf_has_vmemmap_tails = Some(known);
        Ok(known)
    }

    /// The symbols the host needs: from the host's files, else the cache of
    /// an earlier look-up, else /proc/kallsyms through the agent (cached).
    async fn needed_symbols(&mut self) -> Result<KernelSymbols, Abort> {
        let kernel = &self.profile.kernel;
        let names: Vec<&'static str> = match kernel.vmemmap {
            VmemmapStart::Variable(name) | VmemmapStart::Arm64MemstartAddr { symbol: name, .. } => {
                vec![kernel.root_symbol, name]
            }
        };
        let state = self.kernel_state()?;
        if let Some(known) = &state.symbols {
            return Ok(known.clone());
        }
        let complete = |s: &KernelSymbols| names.iter().all(|n| s.contains(n));
        let from_host = state.guest.symbols.as_deref().filter(|s| complete(s)).cloned();
        let cache = state.guest.symbols_cache.clone();
        let cached = cache.as_deref().and_then(|c| KernelSymbols::load(c).ok()).filter(complete);
        let symbols = match from_host.or(cached) {
            Some(s) => s,
            None => {
                let mut found = Vec::new();
                for command in ksyms_commands(&names) {
                    let reply = self.agent(command).await?;
                    found.extend(parse_ksyms(&reply).map_err(|e| Abort::Fail(e.to_string()))?);
                }
                if let Some(cache) = &cache {
                    let map: String = found.iter().map(|(n, a)| format!("{:016x} D {n}\n", a.0)).collect();
                    // A cache that cannot be written costs the next run a look-up, nothing more.
                    let _ = std::fs::write(cache, map);
                }
                KernelSymbols::from_lookups(found)
            }
        };
        self.kernel_state()?.symbols = Some(symbols.clone());
        Ok(symbols)
    }
}

/// A struct page sampled for the translation check: its pfn, its address,
/// and where the host's walker puts it.
type Sample = (Pfn, VirtAddr, Option<PhysAddr>);

/// The tables' side of `verify`, all on the host: the paging format, the
/// vmemmap's start, the verdict, and the host's translation of sampled
/// struct pages.
/// What memory a kernel has, for the verifier: RAM (boot and hot-added) and
/// DAX devices.
struct KernelMemory {
    ram: Vec<Range<Pfn>>,
    dax: Vec<DaxRange>,
    removed: Vec<Range<Pfn>>,
}

#[allow(clippy::too_many_arguments)]
fn judge_tables(
    profile: &Profile,
    memory: KernelMemory,
    symbols: &KernelSymbols,
    mem: &dyn GuestMemory,
    root: PhysAddr,
    root_va: VirtAddr,
    report: &KernelReport,
    generation: Generation,
) -> Result<(KernelVerdict, PagingFormat, Vec<Sample>), Abort> {
    let format = self_translating_format(profile.mmu, mem, root, root_va)
        .map_err(|e| Abort::Fail(format!("the kernel's root table {root}: {e}")))?;
    let walker = Walker::new(format.format(), root);
    let page_size = profile.page_size();
    let KernelMemory { ram, dax, removed } = memory;
    let vmemmap_start = vmemmap_start(profile.kernel.vmemmap, symbols, &walker, mem, &ram, page_size)?;
    let section_size = 1 << profile.kernel.section_shift;
    let view = KernelView { mem, walker, vmemmap_start, ram, page_size, section_size, dax, removed };
    let verdict = verify_kernel(&view, report, generation)
        .map_err(|e| Abort::Fail(format!("the kernel's vmemmap cannot be verified: {e}")))?;
    let mut samples = Vec::new();
    for range in &view.ram {
        let step = ((range.end.0 - range.start.0) / TRANSLATION_SAMPLES).max(1);
        for pfn in (range.start.0..range.end.0).step_by(step as usize) {
            let va = VirtAddr(view.struct_page(Pfn(pfn)));
            let by_host = view.walker.translate(mem, va).ok().flatten().map(|leaf| leaf.translate(va));
            samples.push((Pfn(pfn), va, by_host));
        }
    }
    Ok((verdict, format, samples))
}

fn symbol(symbols: &KernelSymbols, name: &str) -> Result<VirtAddr, Abort> {
    symbols.address(name).map_err(|e| Abort::Fail(e.to_string()))
}

/// A kernel variable's 64-bit value (every profile is little-endian).
fn read_variable(walker: &Walker, mem: &dyn GuestMemory, va: VirtAddr) -> Option<u64> {
    let pa = walker.translate(mem, va).ok()??.translate(va);
    mem.read_u64_le(pa).ok()
}

/// The VA of pfn 0's struct page, found as the profile says.
fn vmemmap_start(
    how: VmemmapStart,
    symbols: &KernelSymbols,
    walker: &Walker,
    mem: &dyn GuestMemory,
    ram: &[Range<Pfn>],
    page_size: u64,
) -> Result<VirtAddr, Abort> {
    let unreadable = |name: &str| Abort::Fail(format!("the kernel variable {name} cannot be read"));
    match how {
        VmemmapStart::Variable(name) => {
            read_variable(walker, mem, symbol(symbols, name)?).map(VirtAddr).ok_or_else(|| unreadable(name))
        }
        VmemmapStart::Arm64MemstartAddr { symbol: name, vmemmap_starts } => {
            let memstart = read_variable(walker, mem, symbol(symbols, name)?).ok_or_else(|| unreadable(name))? as i64;
            let first_ram = ram.first().map_or(0, |r| r.start.0);
            let struct_page = hvo_abi::model::STRUCT_PAGE_SIZE as i64;
            let shift = page_size.trailing_zeros();
            let candidates: Vec<VirtAddr> = vmemmap_starts
                .iter()
                .map(|&start| {
                    VirtAddr((start as i64).wrapping_sub((memstart >> shift).wrapping_mul(struct_page)) as u64)
                })
                .collect();
            candidates
                .iter()
                .copied()
                .find(|pfn0| {
                    let va = VirtAddr(pfn0.0.wrapping_add(first_ram * struct_page as u64));
                    matches!(walker.translate(mem, va), Ok(Some(_)))
                })
                .ok_or_else(|| {
                    Abort::Fail(format!(
                        "with {name} = {memstart:#x}, no vmemmap start ({candidates:?}) maps RAM's first struct page"
                    ))
                })
        }
    }
}
