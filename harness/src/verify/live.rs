//! Checks on the live guest, beyond what the page tables say: writes the
//! guest probes through its own TLB, QEMU's MMU (`gva2gpa`) against the
//! host's walker, and the manifest read two ways and judged against what the
//! host knows of the machine it started.

use std::time::Duration;

use hvo_abi::manifest::{GuestState, Manifest, RootKind, MANIFEST_SIZE};
use hvo_abi::model::{Layout, RegionKind};
use hvo_abi::protocol::Command;
use hvo_images::{Arch, Profile};

use crate::addr::{PhysAddr, VirtAddr};
use crate::console::{Console, ConsoleError};
use crate::invariant::Invariant;
use crate::machine::Machine;
use crate::memory::GuestMemory;
use crate::pgtable;
use crate::qmp::QmpError;
use crate::report::Check;
use crate::verify::{vmemmap_pages_per_compound, VmemmapMap};

/// Why a live check could not be made (as opposed to finding a problem).
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("the QMP connection to QEMU is closed")]
    NoQmp,
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Console(#[from] ConsoleError),
}

/// What a write to each sampled vmemmap page must do under its layout:
/// heads are writable, read-only tails must fault (a missing TLB flush shows
/// here: the tables say read-only, the stale TLB entry lets it through).
pub async fn write_faults(
    console: &mut Console,
    timeout: Duration,
    manifest: &Manifest,
    map: &VmemmapMap,
) -> Result<Check, LiveError> {
    let mut wrong = Vec::new();
    let mut probed = 0;
    for region in manifest.regions.iter().filter(|r| r.kind != RegionKind::Memory) {
        let Some(head) = region.heads().next() else {
            continue;
        };
        let base = manifest.struct_page_va(head);
        let page = manifest.page_size;
        let pages = vmemmap_pages_per_compound(region.order, page).max(1);
        let read_only_tails = region.optimized && matches!(region.layout, Layout::Unified | Layout::LegacyHugetlb);
        // The head page, the first tail page and the last (one page when
        // compound pages are smaller than a vmemmap page's worth).
        let mut samples = vec![(0, false)];
        if pages > 1 {
            samples.extend([(1, read_only_tails), (pages - 1, read_only_tails)]);
            samples.dedup();
        }
        for (i, must_fault) in samples {
            let va = base + i * page + 8;
            // A device's tail left in a neighbour's 2 MiB leaf is an
            // ordinary writable struct page (verify::in_neighbours_leaf).
            let in_leaf = region.kind == RegionKind::Dax && map.lookup(va).is_some_and(|(m, _)| m.size() > page);
            let must_fault = must_fault && !in_leaf;
            let reply = console.request(Command::ProbeWrite { va }, timeout).await?;
            probed += 1;
            let faulted = reply == "faulted";
            if faulted != must_fault {
                wrong.push(format!(
                    "region {} pfn {head:#x} vmemmap[{i}] ({va:#x}): the write {}, it must {}",
                    region.id,
                    if faulted { "faulted" } else { "went through" },
                    if must_fault { "fault" } else { "succeed" }
                ));
            }
        }
    }
    let name = Invariant::WriteFaults.name();
    Ok(if wrong.is_empty() {
        Check::pass(name, format!("{probed} write probes behaved"))
    } else {
        Check::fail(name, wrong.join("; "))
    })
}

/// QEMU's MMU and the host walker agree on sampled vmemmap pages.
pub async fn vmemmap_translations(
    machine: &Machine,
    manifest: &Manifest,
    map: &VmemmapMap,
) -> Result<Check, LiveError> {
    let qmp = machine.qmp().ok_or(LiveError::NoQmp)?;
    let mut samples = Vec::new();
    for region in manifest.regions.iter().filter(|r| r.kind != RegionKind::Memory) {
        if let Some(head) = region.heads().next() {
            let base = manifest.struct_page_va(head);
            samples.push(base);
            if vmemmap_pages_per_compound(region.order, manifest.page_size) > 1 {
                samples.push(base + manifest.page_size);
            }
        }
    }
    let mut wrong = Vec::new();
    for va in &samples {
        let by_qemu = qmp.gva2gpa(VirtAddr(*va)).await?;
        // The walker gives the page's frame; QEMU the byte's address.
        let offset = va % manifest.page_size;
        let by_host = map.lookup(*va).map(|(_, frame)| PhysAddr(frame.0 + offset));
        if by_qemu != by_host {
            wrong.push(format!("vmemmap {va:#x}: host walker {}, QEMU {}", show(by_host), show(by_qemu)));
        }
    }
    let name = Invariant::TranslationAgrees.name();
    Ok(if wrong.is_empty() {
        Check::pass(name, format!("host walker and QEMU agree on {} vmemmap pages", samples.len()))
    } else {
        Check::fail(name, wrong.join("; "))
    })
}

/// The machine a manifest is judged against.
#[derive(Clone, Copy)]
pub struct Expected<'a> {
    pub arch: Arch,
    pub profile: &'a Profile,
    pub boot_memory: u64,
    /// Where the guest image says its manifest lies.
    pub at: PhysAddr,
}

/// The manifest read through QMP `pmemsave` and through the shared RAM
/// mapping must agree and be sound; then the host's walker and QEMU's MMU
/// must both translate the linear and identity maps as it says.
pub async fn manifest_checks(machine: &Machine, expected: Expected<'_>) -> Result<Vec<Check>, LiveError> {
    let qmp = machine.qmp().ok_or(LiveError::NoQmp)?;
    let at = expected.at;
    let scratch = machine.paths().dir.join("pmemsave.bin");
    let through_qmp = qmp.pmemsave(at, MANIFEST_SIZE, &scratch).await?;
    let mut through_map = vec![0u8; MANIFEST_SIZE];
    if let Err(e) = machine.memory().read(at, &mut through_map) {
        return Ok(vec![Check::fail("manifest", format!("manifest at {at} not in mapped boot RAM: {e}"))]);
    }
    if through_qmp != through_map {
        return Ok(vec![Check::fail("manifest", "pmemsave and the shared RAM mapping read different manifests")]);
    }
    let manifest = match Manifest::decode(&through_qmp) {
        Ok(m) => m,
        Err(e) => return Ok(vec![Check::fail("manifest", format!("at {at}: {e}"))]),
    };
    let problems = manifest_problems(&manifest, expected);
    if !problems.is_empty() {
        return Ok(vec![Check::fail("manifest", problems.join("; "))]);
    }
    let sound = Check::pass(
        "manifest",
        format!(
            "{} roots, {} RAM ranges, generation {}",
            manifest.roots().count(),
            manifest.ram().count(),
            manifest.generation
        ),
    );
    Ok(vec![sound, translations(machine, &manifest, expected).await?])
}

/// The host's own walker and QEMU's MMU must both translate the linear map
/// and the identity map the way the manifest says the guest built them.
async fn translations(machine: &Machine, manifest: &Manifest, expected: Expected<'_>) -> Result<Check, LiveError> {
    let qmp = machine.qmp().ok_or(LiveError::NoQmp)?;
    let memory = machine.memory();
    let mut samples: Vec<PhysAddr> = vec![expected.at];
    samples.extend(manifest.roots().map(|r| PhysAddr(r.pa)));
    for r in manifest.ram() {
        samples.push(PhysAddr(r.start));
        samples.push(PhysAddr(r.end() - 8));
    }
    let mut wrong = Vec::new();
    let mut compared = 0;
    for pa in &samples {
        for (what, va) in
            [("linear map", VirtAddr(manifest.linear_map_base.wrapping_add(pa.0))), ("identity map", VirtAddr(pa.0))]
        {
            let by_qemu = qmp.gva2gpa(va).await?;
            let by_host = pgtable::walker_for(expected.arch, memory, manifest, va)
                .and_then(|w| w.translate(memory, va))
                .map(|leaf| leaf.map(|l| l.translate(va)));
            match by_host {
                Err(e) => wrong.push(format!("{what} {va}: host walker: {e}")),
                Ok(host) if host != Some(*pa) || by_qemu != Some(*pa) => wrong.push(format!(
                    "{what} {va}: expected {pa}, host walker {}, QEMU {}",
                    show(host),
                    show(by_qemu)
                )),
                Ok(_) => compared += 1,
            }
        }
    }
    let name = Invariant::TranslationAgrees.name();
    Ok(if wrong.is_empty() {
        Check::pass(name, format!("host walker and QEMU's MMU agree on {compared} addresses"))
    } else {
        Check::fail(name, wrong.join("; "))
    })
}

/// What is wrong with a manifest, judged against the host's own knowledge of
/// the architecture and of the machine it started.
fn manifest_problems(m: &Manifest, expected: Expected<'_>) -> Vec<String> {
    let Expected { arch, profile, boot_memory, at } = expected;
    let mut problems = Vec::new();
    if m.state != GuestState::Ready {
        problems.push(format!("guest state is {:?}, not ready", m.state));
    }
    if m.arch != arch {
        problems.push(format!("architecture {} instead of {arch}", m.arch));
    }
    if m.page_size != profile.page_size() {
        problems.push(format!("page size {:#x}, expected {} KiB", m.page_size, profile.page_size() >> 10));
    }
    if m.linear_map_base != profile.linear_map_base {
        problems.push(format!("linear map at {:#x}, expected {:#x}", m.linear_map_base, profile.linear_map_base));
    }
    if m.vmemmap_base != profile.vmemmap_base {
        problems.push(format!("vmemmap at {:#x}, expected {:#x}", m.vmemmap_base, profile.vmemmap_base));
    }
    let pieces = profile.boot_ram_pieces(boot_memory);
    let in_boot_ram = |pa: u64, len: u64| pieces.iter().any(|p| pa >= p.gpa && pa + len <= p.gpa + p.len);
    match m.root(RootKind::Kernel) {
        Some(root) if !in_boot_ram(root.pa, 4096) => {
            problems.push(format!("kernel root {:#x} is outside boot RAM", root.pa))
        }
        Some(_) => {}
        None => problems.push("no kernel page-table root".into()),
    }
    let mut ram_total = 0;
    for r in m.ram() {
        if !in_boot_ram(r.start, r.size) {
            problems.push(format!("RAM range {:#x}+{:#x} is outside the machine's boot RAM", r.start, r.size));
        }
        ram_total += r.size;
    }
    // Firmware keeps a little low memory for itself (x86's BIOS area below 1 MiB).
    if ram_total > boot_memory || ram_total + (2 << 20) < boot_memory {
        problems.push(format!("guest sees {ram_total:#x} bytes of RAM, the machine has {boot_memory:#x}"));
    }
    if !(at.0 >= m.image.start && at.0 + MANIFEST_SIZE as u64 <= m.image.end()) {
        problems.push(format!("manifest {at} lies outside the image range {:#x}+{:#x}", m.image.start, m.image.size));
    }
    problems
}

fn show(pa: Option<PhysAddr>) -> String {
    pa.map(|p| p.to_string()).unwrap_or_else(|| "unmapped".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvo_images::profile;

    #[test]
    fn manifest_problems_are_specific() {
        use hvo_abi::manifest::{Range, Root};
        let p = profile(Arch::Aarch64);
        let mut m = Manifest {
            arch: Arch::Aarch64,
            state: GuestState::Ready,
            page_size: 4096,
            linear_map_base: p.linear_map_base,
            vmemmap_base: p.vmemmap_base,
            image: Range { start: 0x4020_0000, size: 0x10_0000 },
            roots: [Some(Root { kind: RootKind::Kernel, pa: 0x4040_0000 }), None, None, None],
            ram: [Some(Range { start: 0x4000_0000, size: 512 << 20 }), None, None, None, None, None, None, None],
            generation: 0,
            section_size_bits: 27,
            memstart_pfn: 0x40000,
            counters: Default::default(),
            knobs: 0,
            regions: Default::default(),
            shared_tails: Default::default(),
            update_log: 0,
        };
        let expected = Expected { arch: Arch::Aarch64, profile: p, boot_memory: 512 << 20, at: PhysAddr(0x4020_1000) };
        assert!(manifest_problems(&m, expected).is_empty());
        m.vmemmap_base = 0;
        m.roots[0] = Some(Root { kind: RootKind::Kernel, pa: 0x1000 });
        let problems = manifest_problems(&m, expected);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("vmemmap"));
        assert!(problems[1].contains("outside boot RAM"));
    }
}
