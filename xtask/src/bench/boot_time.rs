//! `cargo xtask bench --boot-time`: the series' boot-time claim, measured.
//! "All struct pages utilizing HVO skip initialization in memmap_init": with
//! gigantic pages reserved at boot and populated already optimized, the boot
//! memmap writes only what stays private (each page's head vmemmap page),
//! so its cost does not grow with the gigantic memory's size, where the same
//! memory as ordinary pages writes every struct page.
//!
//! Per profile and boot memory size, the same machine boots twice,
//! interleaved: all but 2 GiB of it as 1 GiB gigantic pages pre-optimized,
//! and all of it as ordinary pages. Each run ends in `verify`, so every
//! figure comes from a run the oracle passed. Measured: the boot memmap's
//! time (the guest's `boot-memmap` command: vmemmap population and memmap
//! init), the struct pages it wrote, and the vmemmap PTEs the host found.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use hvo_harness::report::{ScenarioResult, Status};
use hvo_harness::runner::run_scenario;
use hvo_harness::scenario::{Scenario, Size};
use hvo_images::{profile, workspace_root, Arch};
use serde::Serialize;
use serde_json::Value;

use super::{machine_json, write_json, Bench, BenchArgs};

const GIB: u64 = 1 << 30;
/// Boot memory left as ordinary pages beside the gigantic ones.
const ORDINARY_BESIDE: u64 = 2 * GIB;
/// The sizes measured on every profile; each profile's largest follows.
const SIZES: [u64; 3] = [16 * GIB, 64 * GIB, 256 * GIB];
/// The all-ordinary machine is measured while its struct pages fit this
/// (256 GiB of 4 KiB pages): beyond, the host would hold that much more
/// guest memory for each run.
const ORDINARY_STRUCT_PAGE_BUDGET: u64 = 4 * GIB;
/// A boot memmap of the largest machines takes tens of seconds under TCG.
const TIMEOUT_MS: u64 = 600_000;

/// One machine's figures, medians over the runs.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub(super) struct BootFigures {
    pub boot_memory: u64,
    /// 1 GiB pages reserved at boot, pre-optimized (0: all ordinary).
    pub gigantic_pages: u64,
    pub boot_memmap_ms: f64,
    pub struct_pages_written: u64,
    pub vmemmap_ptes: u64,
    pub runs: usize,
}

/// The scenario of one machine: `gigantic` 1 GiB pages reserved at boot.
fn scenario(arch: Arch, boot_memory: u64, gigantic: u64) -> Result<Scenario> {
    let reserved = match gigantic {
        0 => String::new(),
        n => format!("[[boot-gigantic]]\nregion = \"giant\"\nsize = \"1G\"\ncount = {n}\n"),
    };
    let what = match gigantic {
        0 => "all ordinary pages".to_string(),
        n => format!("{n} x 1G gigantic pages pre-optimized"),
    };
    let text = format!(
        "description = \"boot time: {size} of boot memory, {what}\"\narchitectures = [\"{arch}\"]\n\
         boot-timeout-ms = {TIMEOUT_MS}\nstep-timeout-ms = {TIMEOUT_MS}\n\
         [machine]\nboot-memory = \"{size}\"\nmax-memory = \"{size}\"\n{reserved}\
         [[step]]\naction = \"verify\"\n",
        size = Size(boot_memory),
    );
    let name = format!("boot-time-{}g-{}", boot_memory / GIB, if gigantic > 0 { "gigantic" } else { "ordinary" });
    Scenario::parse(Path::new(&format!("{name}.toml")), &text).map_err(|e| anyhow!("{e}"))
}

fn metric(r: &ScenarioResult, name: &str) -> Result<u64> {
    r.metrics.get(name).and_then(Value::as_u64).with_context(|| format!("{} reports no {name}", r.scenario))
}

/// Medians of the runs of one machine.
fn figures(boot_memory: u64, gigantic: u64, results: &[ScenarioResult]) -> Result<BootFigures> {
    let median = |name: &str| -> Result<u64> {
        let mut v = results.iter().map(|r| metric(r, name)).collect::<Result<Vec<u64>>>()?;
        v.sort_unstable();
        v.get(v.len() / 2).copied().context("no runs")
    };
    Ok(BootFigures {
        boot_memory,
        gigantic_pages: gigantic,
        boot_memmap_ms: median("boot_memmap_ms")? as f64,
        struct_pages_written: median("struct_pages_initialized")?,
        vmemmap_ptes: median("vmemmap_ptes")?,
        runs: results.len(),
    })
}

/// The boot memory sizes measured on `arch`, with whether the all-ordinary
/// machine is measured at each.
fn sizes(arch: Arch) -> Vec<(u64, bool)> {
    let p = profile(arch);
    let struct_page_bytes = |m: u64| m / p.page_size() * hvo_abi::model::STRUCT_PAGE_SIZE;
    SIZES
        .iter()
        .copied()
        .chain([p.max_boot_memory])
        .map(|m| (m, struct_page_bytes(m) <= ORDINARY_STRUCT_PAGE_BUDGET))
        .collect()
}

pub(super) fn bench_boot_time(args: &BenchArgs) -> Result<ExitCode> {
    let root = workspace_root();
    let arches = args.arch.clone().unwrap_or(Arch::ALL.to_vec());
    let images: Vec<PathBuf> = crate::build_guests(&arches)?;
    let runs = args.runs.max(1);
    let bench = Bench::new()?;
    let mut table: Vec<(Arch, Vec<BootFigures>)> = Vec::new();
    println!(
        "{:<12} {:>7} {:>9} {:>12} {:>14} {:>12}",
        "arch", "memory", "gigantic", "memmap ms", "struct pages", "vmemmap PTEs"
    );
    for (&arch, elf) in arches.iter().zip(&images) {
        let mut rows = Vec::new();
        for (boot_memory, with_ordinary) in sizes(arch) {
            let gigantic = (boot_memory - ORDINARY_BESIDE) / GIB;
            let mut machines = vec![(gigantic, scenario(arch, boot_memory, gigantic)?)];
            if with_ordinary {
                machines.push((0, scenario(arch, boot_memory, 0)?));
            }
            // The two machines alternate, so a drift in the host's speed
            // weighs on both alike.
            let mut results: Vec<Vec<ScenarioResult>> = machines.iter().map(|_| Vec::new()).collect();
            for _ in 0..runs {
                for ((_, s), out) in machines.iter().zip(results.iter_mut()) {
                    let r = crate::unless_interrupted(&bench.runtime, run_scenario(s, arch, elf, &bench.config))
                        .ok_or_else(|| anyhow!("interrupted"))?;
                    if r.status != Status::Pass {
                        bail!("{} on {arch}: {} {}", s.name, r.status.label(), r.message.unwrap_or_default());
                    }
                    out.push(r);
                }
            }
            for ((gigantic, _), results) in machines.iter().zip(&results) {
                let f = figures(boot_memory, *gigantic, results)?;
                println!(
                    "{:<12} {:>7} {:>9} {:>12.0} {:>14} {:>12}",
                    arch.name(),
                    Size(f.boot_memory).to_string(),
                    f.gigantic_pages,
                    f.boot_memmap_ms,
                    f.struct_pages_written,
                    f.vmemmap_ptes
                );
                rows.push(f);
            }
        }
        table.push((arch, rows));
    }
    let report = serde_json::json!({
        "machine": machine_json(),
        "runs": runs,
        "architectures": table.iter().map(|(a, rows)| (a.name(), rows)).collect::<std::collections::BTreeMap<_, _>>(),
    });
    let json = args.json.clone().unwrap_or_else(|| root.join("target/bench/boot-time.json"));
    write_json(&json, &report)?;
    let svg_path = args.svg.clone().unwrap_or_else(|| root.join("target/bench/boot-time.svg"));
    std::fs::write(&svg_path, super::boot_time_chart::chart(&table))
        .with_context(|| format!("cannot write {}", svg_path.display()))?;
    println!("figures: {}\nchart: {}", json.display(), svg_path.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machines_reserve_all_but_two_gib_and_end_in_a_verdict() {
        let s = scenario(Arch::X86_64, 64 * GIB, 62).unwrap();
        assert_eq!(s.machine.boot_memory, 64 * GIB);
        assert_eq!(s.machine.max_memory, 64 * GIB, "no hotplug room: the largest machines need the address space");
        assert_eq!((s.boot_gigantic.len(), s.boot_gigantic[0].count, s.boot_gigantic[0].size), (1, 62, GIB));
        assert!(s.needs_vmemmap());
        let plain = scenario(Arch::X86_64, 64 * GIB, 0).unwrap();
        assert!(plain.boot_gigantic.is_empty() && plain.needs_vmemmap());
        assert_ne!(s.name, plain.name);
    }

    #[test]
    fn every_profile_measures_up_to_its_largest_machine_and_ordinary_pages_within_the_budget() {
        for arch in Arch::ALL {
            let sizes = sizes(arch);
            assert_eq!(sizes.last().map(|s| s.0), Some(profile(arch).max_boot_memory));
            assert!(sizes.iter().any(|&(m, o)| m == 64 * GIB && o), "{arch}: 64 GiB both ways");
        }
        assert!(!sizes(Arch::X86_64).last().unwrap().1, "970 GiB of 4 KiB pages is over the budget");
    }
}
