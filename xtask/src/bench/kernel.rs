//! `cargo xtask bench --kernel`: what a verdict on a real kernel costs
//! against booting that kernel to its initramfs. Two scenarios share one
//! machine and one boot-time HugeTLB reservation, so that their boots do the
//! same work: a null one (the agent's `ready`, then exit) and a verdict
//! (ping, verify, exit). What they differ by is the verdict's price.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use hvo_harness::report::{Phases, ScenarioResult, Status};
use hvo_harness::runner::{run_kernel_scenario, KernelGuest};
use hvo_harness::scenario::Scenario;
use hvo_images::Arch;
use serde::Serialize;
use serde_json::json;

use super::{
    describe_phases, machine_json, median_phases, print_header, print_note, print_row, spread, write_json, Bench,
    BenchArgs, Spread,
};

/// The baseline: booting the kernel to its initramfs, the agent's
/// `ready` and its account of the pools reserved at boot (`boot-pools`),
/// then power-off.
const KERNEL_NULL: &str = concat!(
    "description = \"kernel null: 64 x 2M and 1 x 1G reserved at boot, ready, exit\"\n",
    kernel_machine!(),
    r#"
[[step]]
action = "exit"
status = 0
"#
);

/// scenarios/linux/hugetlb-boot.toml trimmed to its first verdict: the
/// same machine as `KERNEL_NULL`, plus a ping and one `verify`.
const KERNEL_VERDICT: &str = concat!(
    "description = \"kernel verdict: 64 x 2M and 1 x 1G reserved at boot, ping, verify, exit\"\n",
    kernel_machine!(),
    r#"
[[step]]
action = "ping"

[[step]]
action = "verify"

[[step]]
action = "exit"
status = 0
"#
);

/// What the issue allows a verdict to cost, in null boots (medians); shown
/// beside the ratio, never enforced: a loaded host would fail it spuriously.
const VERDICT_BUDGET: f64 = 1.5;

/// The two scenarios measured, parsed and known to run on a kernel.
pub(super) struct KernelScenarios {
    pub(super) null: Scenario,
    verdict: Scenario,
}

impl KernelScenarios {
    pub(super) fn parse() -> Result<KernelScenarios> {
        let parse = |file: &str, source: &str| -> Result<Scenario> {
            let s = Scenario::parse(Path::new(file), source).map_err(|e| anyhow!("{e}"))?;
            // run_kernel_scenario skips a firmware-only scenario: better said now than as a skip.
            if let Some(why) = s.firmware_only_because() {
                bail!("the bench's {} scenario cannot run on a kernel: {why}", s.name);
            }
            Ok(s)
        };
        Ok(KernelScenarios {
            null: parse("kernel-null.toml", KERNEL_NULL)?,
            verdict: parse("kernel-verdict.toml", KERNEL_VERDICT)?,
        })
    }
}

/// The architectures to measure: those named, else all four for a spec. A
/// kernel image given by path is built for one architecture, which must be
/// named (as `run-scenarios --kernel` asks).
fn kernel_arches(kernel_is_file: bool, named: Option<&[Arch]>) -> Result<Vec<Arch>> {
    match (kernel_is_file, named) {
        (true, Some([arch])) => Ok(vec![*arch]),
        (true, _) => bail!("a kernel image given by path boots one architecture: name it with --arch"),
        (false, Some(arches)) => Ok(arches.to_vec()),
        (false, None) => Ok(Arch::ALL.to_vec()),
    }
}

/// One architecture's figures, as printed and as written to JSON.
#[derive(Clone, Debug, Serialize)]
struct KernelFigures {
    /// `uname -r`, as the runs' kernel summary has it.
    release: String,
    /// The verdict's judgement of the kernel (`legacy`, `not-optimizing`, ...).
    generation: String,
    /// The kernel summary's one line, for the table.
    #[serde(skip)]
    described: String,
    null_ms: Spread,
    verdict_ms: Spread,
    /// Ratio of the medians.
    verdict_over_null: f64,
    null_phases_median_ms: Phases,
    verdict_phases_median_ms: Phases,
}

/// The figures of interleaved passing runs of the two scenarios.
fn figures(nulls: &[ScenarioResult], verdicts: &[ScenarioResult]) -> Result<KernelFigures> {
    if nulls.is_empty() || verdicts.is_empty() {
        bail!("no runs to report on");
    }
    let times = |runs: &[ScenarioResult]| spread(runs.iter().map(|r| r.duration_ms as f64).collect());
    let phases = |runs: &[ScenarioResult]| median_phases(&runs.iter().map(|r| r.phases).collect::<Vec<_>>());
    let (null_ms, verdict_ms) = (times(nulls), times(verdicts));
    // Only the verdict says what the kernel does; the release is the same in every run.
    let summary = verdicts.iter().rev().find_map(|r| r.kernel.as_ref());
    let release = verdicts.iter().chain(nulls).filter_map(|r| r.kernel.as_ref()).find(|k| !k.release.is_empty());
    Ok(KernelFigures {
        release: release.map(|k| k.release.clone()).unwrap_or_default(),
        generation: summary.map(|k| k.generation.clone()).unwrap_or_default(),
        described: summary.map(|k| k.describe()).unwrap_or_default(),
        null_ms,
        verdict_ms,
        verdict_over_null: verdict_ms.median / null_ms.median,
        null_phases_median_ms: phases(nulls),
        verdict_phases_median_ms: phases(verdicts),
    })
}

impl Bench {
    /// One run that must pass: a failing one stops the bench, with why.
    pub(super) fn kernel_run(&self, scenario: &Scenario, arch: Arch, guest: &KernelGuest) -> Result<ScenarioResult> {
        let r = crate::unless_interrupted(&self.runtime, run_kernel_scenario(scenario, arch, guest, &self.config))
            .ok_or_else(|| anyhow!("interrupted"))?;
        if r.status != Status::Pass {
            let artifacts = r.artifacts.as_ref().map(|a| format!(" (artifacts: {})", a.display())).unwrap_or_default();
            bail!(
                "{} on {arch} ({}): {} {}{artifacts}",
                scenario.name,
                guest.spec,
                r.status.label(),
                r.message.as_deref().unwrap_or_default()
            );
        }
        Ok(r)
    }
}

/// Whether a verify will look the kernel's symbols up in the running
/// kernel (seconds under TCG) rather than read them from the host's files
/// or the cache that look-up leaves.
fn symbols_unknown(guest: &KernelGuest) -> bool {
    guest.symbols.is_none() && !guest.symbols_cache.as_ref().is_some_and(|cache| cache.exists())
}

fn measure(
    bench: &Bench,
    scenarios: &KernelScenarios,
    arch: Arch,
    guest: &KernelGuest,
    runs: usize,
) -> Result<KernelFigures> {
    if symbols_unknown(guest) {
        // Only the first verdict of a build pays the look-up: left out, it
        // would skew a few runs' figures.
        eprintln!("bench: one untimed verdict on {arch} first, to cache the kernel's symbols");
        bench.kernel_run(&scenarios.verdict, arch, guest)?;
    }
    let (mut nulls, mut verdicts) = (Vec::new(), Vec::new());
    // Interleaved, so that a drift in the host's speed weighs on both alike.
    for _ in 0..runs {
        nulls.push(bench.kernel_run(&scenarios.null, arch, guest)?);
        verdicts.push(bench.kernel_run(&scenarios.verdict, arch, guest)?);
    }
    figures(&nulls, &verdicts)
}

fn print_figures(arch: Arch, kernel: &str, f: &KernelFigures) {
    let described = if f.described.is_empty() { kernel } else { &f.described };
    print_note(arch, "kernel", described);
    print_row(arch, "null: boot to initramfs, exit", &f.null_ms);
    print_row(arch, "verdict: ping, verify, exit", &f.verdict_ms);
    let within = if f.verdict_over_null <= VERDICT_BUDGET { "within" } else { "over" };
    print_note(
        arch,
        "  verdict / null (medians)",
        &format!("{:>9.2}x ({within} the {VERDICT_BUDGET:.1}x budget)", f.verdict_over_null),
    );
    print_note(arch, "  verdict phases (medians)", &describe_phases(&f.verdict_phases_median_ms));
}

/// `bench --kernel`: the kernel measurements only, per architecture.
pub(super) fn bench_kernel(kernel: &str, args: &BenchArgs) -> Result<ExitCode> {
    let arches = kernel_arches(Path::new(kernel).is_file(), args.arch.as_deref())?;
    let scenarios = KernelScenarios::parse()?;
    // Every kernel is fetched or found before anything is timed: a download
    // weighs on no figure, and a kernel that cannot be had stops the bench first.
    let guests = arches
        .iter()
        .map(|&arch| crate::kernels::kernel_guest(kernel, args.system_map.as_deref(), arch))
        .collect::<Result<Vec<_>>>()?;
    let runs = args.runs.max(1);
    let bench = Bench::new()?;
    print_header();
    let mut per_arch = BTreeMap::new();
    for (&arch, guest) in arches.iter().zip(&guests) {
        eprintln!("bench: {kernel} on {arch}, {runs} runs of each scenario, interleaved");
        let f = measure(&bench, &scenarios, arch, guest, runs)?;
        print_figures(arch, kernel, &f);
        per_arch.insert(arch.name().to_string(), serde_json::to_value(&f).context("cannot encode the figures")?);
    }
    if let Some(path) = &args.json {
        let kernel = json!({ "spec": kernel, "runs": runs, "budget": VERDICT_BUDGET, "architectures": per_arch });
        write_json(path, &json!({ "machine": machine_json(), "kernel": kernel }))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use hvo_harness::report::KernelSummary;
    use hvo_harness::scenario::Step;

    use super::*;

    #[test]
    fn the_two_scenarios_run_on_a_kernel_and_differ_only_in_their_steps() {
        let KernelScenarios { null, verdict } = KernelScenarios::parse().unwrap();
        let everything_but_steps = |s: &Scenario| {
            (
                s.architectures.clone(),
                s.machine,
                (s.step_timeout_ms, s.boot_timeout_ms, s.deadline_ms),
                s.expect.clone(),
                s.bug_knobs.clone(),
                s.boot_gigantic.clone(),
                s.boot_pmem,
                s.hugetlb_free_vmemmap,
            )
        };
        assert_eq!(everything_but_steps(&null), everything_but_steps(&verdict));
        let steps = |s: &Scenario| s.steps.iter().map(|p| p.step.clone()).collect::<Vec<_>>();
        assert_eq!(steps(&null), [Step::Exit { status: 0 }]);
        assert_eq!(steps(&verdict), [Step::Ping, Step::Verify, Step::Exit { status: 0 }]);
    }

    #[test]
    fn the_machine_is_the_issues_4g_with_64_x_2m_and_1_x_1g_reserved_at_boot() {
        let KernelScenarios { verdict, .. } = KernelScenarios::parse().unwrap();
        assert_eq!(verdict.machine.boot_memory, 4 << 30);
        assert!(verdict.hugetlb_free_vmemmap);
        let reserved: Vec<(u64, u64)> = verdict.boot_gigantic.iter().map(|g| (g.size, g.count)).collect();
        assert_eq!(reserved, [(2 << 20, 64), (1 << 30, 1)]);
    }

    #[test]
    fn a_spec_measures_every_architecture_and_a_path_exactly_the_one_named() {
        assert_eq!(kernel_arches(false, None).unwrap(), Arch::ALL.to_vec());
        assert_eq!(kernel_arches(false, Some(&[Arch::Aarch64])).unwrap(), [Arch::Aarch64]);
        assert_eq!(kernel_arches(true, Some(&[Arch::X86_64])).unwrap(), [Arch::X86_64]);
        for named in [None, Some(&[Arch::X86_64, Arch::Aarch64][..])] {
            let e = kernel_arches(true, named).unwrap_err().to_string();
            assert!(e.contains("name it with --arch"), "{e}");
        }
    }

    fn run(duration_ms: u64, boot_ms: u64, verify_ms: u64, release: &str) -> ScenarioResult {
        let mut r = ScenarioResult::started("s", PathBuf::from("s.toml"), "x86_64");
        r.status = Status::Pass;
        r.duration_ms = duration_ms;
        r.phases = Phases { boot_ms, verify_ms, ..Phases::default() };
        let summary = KernelSummary { spec: "debian-6.12".into(), release: release.into(), ..KernelSummary::default() };
        r.kernel = Some(summary);
        r
    }

    #[test]
    fn figures_are_spreads_their_medians_ratio_and_the_verdicts_median_phases() {
        let nulls = [run(4000, 3000, 0, ""), run(4400, 3300, 0, ""), run(4200, 3100, 0, "")];
        let verdicts = [run(6000, 3000, 900, "6.12.1"), run(5000, 3200, 700, "6.12.1"), run(6300, 3100, 800, "6.12.1")];
        let f = figures(&nulls, &verdicts).unwrap();
        assert_eq!((f.null_ms.min, f.null_ms.median, f.null_ms.max), (4000.0, 4200.0, 4400.0));
        assert_eq!((f.verdict_ms.min, f.verdict_ms.median, f.verdict_ms.max), (5000.0, 6000.0, 6300.0));
        assert_eq!(f.verdict_over_null, 6000.0 / 4200.0);
        assert_eq!((f.verdict_phases_median_ms.boot_ms, f.verdict_phases_median_ms.verify_ms), (3100, 800));
        assert_eq!(f.null_phases_median_ms.boot_ms, 3100);
        assert_eq!(f.release, "6.12.1");
        assert!(figures(&[], &verdicts).is_err());
    }
}
