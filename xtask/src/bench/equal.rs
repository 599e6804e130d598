//! `cargo xtask bench --equal-work`: the firmware against a real kernel
//! reaching the same state. The anchor boots the kernel on 4 GiB with
//! `hugepagesz=2M hugepages=64 hugepagesz=1G hugepages=1` to its initramfs,
//! whose agent reports both pools allocated (`boot-pools`), and powers off.
//! The firmware boots the same machine, reserves the same pages at boot
//! (populated already optimized, as HVO leaves them), verifies every
//! invariant and exits. Runs alternate, so that a drift in the host's
//! speed weighs on both alike; the ratio is of the medians.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use hvo_harness::report::{CheckStatus, Phases, ScenarioResult, Status};
use hvo_harness::runner::{run_scenario, KernelGuest};
use hvo_harness::scenario::{order_of, Scenario};
use hvo_harness::verify::vmemmap_pages_per_compound;
use hvo_images::{profile, Arch};
use serde::Serialize;
use serde_json::json;

use super::kernel::KernelScenarios;
use super::{
    describe_phases, machine_json, median_phases, print_header, print_note, print_row, spread, write_json, Bench,
    BenchArgs, Spread,
};

/// The kernel the anchor boots unless `--kernel` names another.
const DEFAULT_KERNEL: &str = "debian-6.12";

/// What the firmware must be at equal work, in anchor boots (medians):
/// shown beside the ratio, never enforced (a loaded host would fail it).
const TARGET: f64 = 15.0;

/// The firmware's side: the anchor's machine and boot-time pages, every
/// invariant verified, exit.
const FIRMWARE_EQUAL_WORK: &str = concat!(
    "description = \"equal work: 64 x 2M and 1 x 1G reserved at boot, optimized, verified, exit\"\n",
    kernel_machine!(),
    r#"
[[step]]
action = "verify"

[[step]]
action = "exit"
status = 0
"#
);

/// The two sides, parsed.
struct EqualWork {
    anchor: Scenario,
    firmware: Scenario,
}

impl EqualWork {
    fn parse() -> Result<EqualWork> {
        let anchor = KernelScenarios::parse()?.null;
        let firmware =
            Scenario::parse(Path::new("equal-work.toml"), FIRMWARE_EQUAL_WORK).map_err(|e| anyhow!("{e}"))?;
        Ok(EqualWork { anchor, firmware })
    }
}

/// Why the firmware cannot do the anchor's work on `arch`, if it cannot: a
/// page reserved at boot is populated optimized, which needs at least two
/// vmemmap pages per compound page (with 64 KiB pages a 2 MiB page has a
/// 32nd of one, and the firmware refuses it).
fn cannot_match(sides: &EqualWork, arch: Arch) -> Option<String> {
    let shift = profile(arch).page_shift;
    sides.firmware.boot_gigantic.iter().find_map(|g| {
        let pages = vmemmap_pages_per_compound(order_of(g.size, shift), 1 << shift);
        (pages < 2).then(|| {
            format!(
                "on {arch} the struct pages of a {} MiB page fill {pages} whole vmemmap pages, fewer than the 2 it takes to be reserved \
                 optimized: the firmware cannot reach the anchor's state",
                g.size >> 20
            )
        })
    })
}

/// One architecture's figures, as printed and as written to JSON.
#[derive(Clone, Debug, Serialize)]
struct Figures {
    /// `uname -r` of the anchor's kernel.
    release: String,
    kernel_ms: Spread,
    firmware_ms: Spread,
    /// Kernel over firmware, medians.
    ratio: f64,
    firmware_phases_median_ms: Phases,
    /// The firmware's boot vmemmap population and memmap init, median.
    firmware_boot_memmap_ms: u64,
    /// Struct pages the firmware's memmap init wrote.
    firmware_struct_pages_initialized: u64,
}

/// The median of a metric over runs (0 when no run has it).
fn median_metric(runs: &[ScenarioResult], metric: &str) -> u64 {
    let mut v: Vec<u64> =
        runs.iter().filter_map(|r| r.metrics.get(metric).and_then(serde_json::Value::as_u64)).collect();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn figures(kernel: &[ScenarioResult], firmware: &[ScenarioResult]) -> Result<Figures> {
    if kernel.is_empty() || firmware.is_empty() {
        bail!("no runs to report on");
    }
    let times = |runs: &[ScenarioResult]| spread(runs.iter().map(|r| r.duration_ms as f64).collect());
    let (kernel_ms, firmware_ms) = (times(kernel), times(firmware));
    let release = kernel.iter().filter_map(|r| r.kernel.as_ref()).map(|k| k.release.clone()).find(|r| !r.is_empty());
    Ok(Figures {
        release: release.unwrap_or_default(),
        kernel_ms,
        firmware_ms,
        ratio: kernel_ms.median / firmware_ms.median,
        firmware_phases_median_ms: median_phases(&firmware.iter().map(|r| r.phases).collect::<Vec<_>>()),
        firmware_boot_memmap_ms: median_metric(firmware, "boot_memmap_ms"),
        firmware_struct_pages_initialized: median_metric(firmware, "struct_pages_initialized"),
    })
}

/// The anchor counts only if the kernel said both pools were allocated.
fn pools_checked(run: &ScenarioResult) -> Result<()> {
    match run.checks.iter().find(|c| c.name == "boot-pools") {
        Some(c) if c.status == CheckStatus::Pass => Ok(()),
        Some(c) => bail!("the anchor's kernel did not allocate its pools: {}", c.detail),
        None => bail!("the anchor's run has no boot-pools check: the pools were not looked at"),
    }
}

impl Bench {
    /// One firmware run that must pass.
    fn firmware_run(&self, scenario: &Scenario, arch: Arch, elf: &Path) -> Result<ScenarioResult> {
        let r = crate::unless_interrupted(&self.runtime, run_scenario(scenario, arch, elf, &self.config))
            .ok_or_else(|| anyhow!("interrupted"))?;
        if r.status != Status::Pass {
            bail!("{} on {arch}: {} {}", scenario.name, r.status.label(), r.message.as_deref().unwrap_or_default());
        }
        Ok(r)
    }
}

fn measure(
    bench: &Bench,
    sides: &EqualWork,
    arch: Arch,
    guest: &KernelGuest,
    elf: &Path,
    runs: usize,
) -> Result<Figures> {
    let (mut kernel, mut firmware) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let k = bench.kernel_run(&sides.anchor, arch, guest)?;
        pools_checked(&k)?;
        kernel.push(k);
        firmware.push(bench.firmware_run(&sides.firmware, arch, elf)?);
    }
    figures(&kernel, &firmware)
}

fn print_figures(arch: Arch, kernel: &str, f: &Figures) {
    let release = if f.release.is_empty() { kernel.to_string() } else { format!("{kernel} ({})", f.release) };
    print_note(arch, "anchor kernel", &release);
    print_row(arch, "kernel: initramfs, pools checked", &f.kernel_ms);
    print_row(arch, "firmware: optimized, verified", &f.firmware_ms);
    let verdict = if f.ratio >= TARGET { "meets" } else { "short of" };
    print_note(
        arch,
        "  kernel / firmware (medians)",
        &format!("{:>9.1}x ({verdict} the {TARGET:.0}x target)", f.ratio),
    );
    print_note(arch, "  firmware phases (medians)", &describe_phases(&f.firmware_phases_median_ms));
    print_note(
        arch,
        "  firmware boot memmap (median)",
        &format!("{} ms, {} struct pages written", f.firmware_boot_memmap_ms, f.firmware_struct_pages_initialized),
    );
}

/// `bench --equal-work`: per architecture (default x86_64), the anchor and
/// the firmware, interleaved.
pub(super) fn bench_equal_work(args: &BenchArgs) -> Result<ExitCode> {
    let kernel = args.kernel.as_deref().unwrap_or(DEFAULT_KERNEL);
    let arches = match (&args.arch, Path::new(kernel).is_file()) {
        (Some(a), true) if a.len() != 1 => {
            bail!("a kernel image given by path boots one architecture: name it with --arch")
        }
        (Some(a), _) => a.clone(),
        (None, true) => bail!("a kernel image given by path boots one architecture: name it with --arch"),
        (None, false) => vec![Arch::X86_64],
    };
    let sides = EqualWork::parse()?;
    if let Some(why) = arches.iter().find_map(|&arch| cannot_match(&sides, arch)) {
        bail!("{why}");
    }
    // Kernels fetched and images built before anything is timed.
    let guests = arches
        .iter()
        .map(|&arch| crate::kernels::kernel_guest(kernel, args.system_map.as_deref(), arch))
        .collect::<Result<Vec<_>>>()?;
    let images: Vec<PathBuf> = crate::build_guests(&arches)?;
    let runs = args.runs.max(1);
    let bench = Bench::new()?;
    print_header();
    let mut per_arch = BTreeMap::new();
    for ((&arch, guest), elf) in arches.iter().zip(&guests).zip(&images) {
        eprintln!("bench: {kernel} against the firmware on {arch}, {runs} runs of each, interleaved");
        let f = measure(&bench, &sides, arch, guest, elf, runs)?;
        print_figures(arch, kernel, &f);
        per_arch.insert(arch.name().to_string(), serde_json::to_value(&f).context("cannot encode the figures")?);
    }
    if let Some(path) = &args.json {
        let equal = json!({ "kernel": kernel, "runs": runs, "target": TARGET, "architectures": per_arch });
        write_json(path, &json!({ "machine": machine_json(), "equal_work": equal }))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use hvo_harness::report::Check;
    use hvo_harness::scenario::Step;

    use super::*;

    #[test]
    fn both_sides_boot_the_same_machine_with_the_same_pages_reserved() {
        let EqualWork { anchor, firmware } = EqualWork::parse().unwrap();
        assert_eq!(anchor.machine, firmware.machine);
        assert_eq!(anchor.boot_gigantic, firmware.boot_gigantic);
        assert_eq!(firmware.machine.boot_memory, 4 << 30);
        let reserved: Vec<(u64, u64)> = firmware.boot_gigantic.iter().map(|g| (g.size, g.count)).collect();
        assert_eq!(reserved, [(2 << 20, 64), (1 << 30, 1)]);
        let steps = |s: &Scenario| s.steps.iter().map(|p| p.step.clone()).collect::<Vec<_>>();
        assert_eq!(steps(&anchor), [Step::Exit { status: 0 }]);
        assert_eq!(steps(&firmware), [Step::Verify, Step::Exit { status: 0 }]);
        assert!(firmware.bug_knobs.is_empty());
    }

    #[test]
    fn the_firmware_matches_the_anchor_wherever_the_pages_can_be_reserved_optimized() {
        let sides = EqualWork::parse().unwrap();
        for arch in [Arch::X86_64, Arch::Aarch64, Arch::Ppc64le] {
            assert_eq!(cannot_match(&sides, arch), None, "{arch}");
        }
        let why = cannot_match(&sides, Arch::Ppc64le64k).unwrap();
        assert!(why.contains("a 2 MiB page fill 0 whole vmemmap pages"), "{why}");
    }

    fn run(duration_ms: u64, boot_memmap_ms: Option<u64>) -> ScenarioResult {
        let mut r = ScenarioResult::started("s", PathBuf::from("s.toml"), "x86_64");
        r.status = Status::Pass;
        r.duration_ms = duration_ms;
        if let Some(ms) = boot_memmap_ms {
            r.metrics.insert("boot_memmap_ms".into(), ms.into());
        }
        r
    }

    #[test]
    fn the_ratio_is_of_the_medians_kernel_over_firmware() {
        let kernel = [run(4000, None), run(4400, None), run(3800, None)];
        let firmware = [run(200, Some(40)), run(160, Some(30)), run(250, Some(50))];
        let f = figures(&kernel, &firmware).unwrap();
        assert_eq!((f.kernel_ms.median, f.firmware_ms.median), (4000.0, 200.0));
        assert_eq!(f.ratio, 20.0);
        assert_eq!(f.firmware_boot_memmap_ms, 40);
        assert!(figures(&[], &firmware).is_err());
    }

    #[test]
    fn an_anchor_whose_pools_were_not_checked_or_not_allocated_does_not_count() {
        let mut r = run(4000, None);
        assert!(pools_checked(&r).unwrap_err().to_string().contains("no boot-pools check"));
        r.checks.push(Check::fail("boot-pools", "1 x 1048576kB reserved on the command line, the pool holds 0"));
        assert!(pools_checked(&r).unwrap_err().to_string().contains("the pool holds 0"));
        r.checks[0] = Check::pass("boot-pools", "the kernel allocated 64 x 2048kB and 1 x 1048576kB at boot");
        assert!(pools_checked(&r).is_ok());
    }
}
