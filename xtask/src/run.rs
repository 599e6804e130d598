//! `cargo xtask run-scenarios`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use hvo_harness::report::{ScenarioResult, Status, Totals};
use hvo_harness::runner::{run_kernel_scenario, run_scenario, KernelGuest, RunConfig};
use hvo_harness::scenario::{discover, Scenario};
use hvo_images::{workspace_root, Arch};

#[derive(Args, Default, Clone)]
pub struct RunArgs {
    /// Scenario files or directories (default: scenarios/).
    pub paths: Vec<PathBuf>,
    /// Architectures to run on (default: all four).
    #[arg(long, value_delimiter = ',', value_parser = parse_arch)]
    pub arch: Option<Vec<Arch>>,
    /// Only scenarios whose name contains this.
    #[arg(long)]
    pub filter: Option<String>,
    /// Scenarios run at once (default: the number of CPUs).
    #[arg(short = 'j', long)]
    pub jobs: Option<usize>,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the results as JUnit XML here (a testsuite per architecture).
    #[arg(long)]
    pub junit: Option<PathBuf>,
    /// Print TAP on standard output (the usual lines go to standard error).
    #[arg(long)]
    pub tap: bool,
    /// Run only shard I of N (1-based), a fixed split of the (scenario,
    /// architecture) runs, for spreading a suite over CI runners.
    #[arg(long, value_parser = parse_shard)]
    pub shard: Option<Shard>,
    /// Run every scenario N times and report any whose results differ as flaky.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub repeat: u32,
    /// Keep artifacts of passing runs too (failing runs always keep them).
    #[arg(long)]
    pub keep_artifacts: bool,
    /// Boot a real Linux kernel instead of the firmware: a Debian spec
    /// (`debian-6.12`, `debian-7.2`: the newest the mirror serves; or one
    /// stable release such as `debian-6.12.100`; fetched and cached under
    /// target/kernels/) or the path of a kernel image (then name one --arch).
    /// The default scenarios become scenarios/linux/.
    #[arg(long, value_name = "SPEC|PATH")]
    pub kernel: Option<String>,
    /// The kernel's System.map, for a kernel whose symbols the host has no
    /// other file of (otherwise they are read from the running kernel once
    /// per build and cached).
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub system_map: Option<PathBuf>,
}

/// Real-kernel scenarios: the default of `--kernel`, left out of the
/// firmware's default suite (they are written for Linux's HugeTLB sizes and
/// memory, and the firmware suite's counts stay its own).
const LINUX_SCENARIOS: &str = "scenarios/linux";

/// One shard of a run: `index` of `count`, 1-based.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

pub fn parse_shard(s: &str) -> Result<Shard, String> {
    let bad = || format!("`{s}` is not a shard: write I/N with 1 <= I <= N, like 2/4");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (index, count) = (i.trim().parse::<usize>().map_err(|_| bad())?, n.trim().parse::<usize>().map_err(|_| bad())?);
    if index == 0 || index > count {
        return Err(bad());
    }
    Ok(Shard { index, count })
}

/// Whether the `position`-th run of a suite (in the sorted order) is in `shard`.
pub fn in_shard(shard: Option<Shard>, position: usize) -> bool {
    shard.is_none_or(|s| position % s.count == s.index - 1)
}

pub fn parse_arch(s: &str) -> Result<Arch, String> {
    Arch::from_name(s).ok_or_else(|| format!("unknown architecture `{s}` (known: {})", Arch::known_names()))
}

#[derive(Args)]
pub struct ReproArgs {
    /// The scenario file.
    pub file: PathBuf,
    /// The architecture to run it on.
    #[arg(long, value_parser = parse_arch)]
    pub arch: Arch,
    /// Print the QEMU command line and the steps, and run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Start QEMU's gdb stub on this loopback port (1234 if none is given).
    #[arg(long, num_args = 0..=1, default_missing_value = "1234")]
    pub gdb: Option<u16>,
}

/// `cargo xtask repro`: one scenario, one architecture, everything shown as
/// it happens; a failing run stays paused for inspection.
pub fn repro(args: ReproArgs) -> Result<ExitCode> {
    let root = workspace_root();
    let scenario = Scenario::load(&args.file).map_err(|e| anyhow::anyhow!("{e}"))?;
    if !scenario.architectures.contains(&args.arch) {
        bail!("{} does not list {} in `architectures`", args.file.display(), args.arch);
    }
    let profile = hvo_images::profile(args.arch);
    if args.dry_run {
        let paths = hvo_harness::qemu::RunPaths { dir: PathBuf::from("<run-dir>") };
        let payload = hvo_harness::qemu::BootPayload::Firmware(profile.guest_elf());
        let command = hvo_harness::qemu::QemuCommand::new(profile, &scenario.machine, &payload, &paths)
            .with_inspection(&paths, args.gdb);
        println!("qemu: {}", command.shell_line());
        println!("boot: wait for `ready` within {} ms", scenario.boot_timeout_ms);
        for knob in &scenario.bug_knobs {
            println!("boot: bug knob {}", knob.name());
        }
        if scenario.boot_pmem > 0 {
            println!("boot: set aside the last {} bytes of boot memory as persistent memory", scenario.boot_pmem);
        }
        for g in &scenario.boot_gigantic {
            println!(
                "boot: reserve {} gigantic pages of {} (order {}) in {} as `{}`",
                g.count,
                hvo_harness::verify::size_name(g.size),
                hvo_harness::scenario::order_of(g.size, profile.page_shift),
                g.zone.name(),
                g.region
            );
        }
        println!("boot: populate the boot vmemmap and run memmap init");
        for placed in &scenario.steps {
            let mut flags = String::new();
            if let Some(reason) = placed.expect_refusal {
                flags.push_str(&format!(" (must be refused: {reason})"));
            }
            if placed.sweep_failures {
                flags.push_str(" (allocation failures swept)");
            }
            println!("line {}: {:?}{flags}", placed.line, placed.step);
        }
        println!("expect: {:?}", scenario.expect);
        return Ok(ExitCode::SUCCESS);
    }
    let image = crate::build_guests(&[args.arch])?.remove(0);
    let config = RunConfig {
        artifacts_root: root.join("target/scenario-logs"),
        keep_artifacts: true,
        inject: None,
        repro: Some(hvo_harness::runner::Repro { gdb_port: args.gdb }),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let Some(result) = crate::unless_interrupted(&runtime, run_scenario(&scenario, args.arch, &image, &config)) else {
        eprintln!("interrupted: QEMU was stopped");
        return Ok(ExitCode::from(crate::INTERRUPTED));
    };
    println!("{}", describe(&result));
    for check in &result.checks {
        println!("  {:<20} {:?}  {}", check.name, check.status, check.detail);
    }
    Ok(match result.status {
        Status::Pass => ExitCode::SUCCESS,
        s if s.is_verdict_failure() => ExitCode::from(1),
        _ => ExitCode::from(2),
    })
}

/// One scenario on one architecture.
struct Job {
    scenario: Arc<Scenario>,
    arch: Arch,
}

/// What the runs of an invocation boot, per architecture.
#[derive(Clone)]
enum Guests {
    Firmware(HashMap<Arch, PathBuf>),
    Kernel(HashMap<Arch, Arc<KernelGuest>>),
}

/// Why `scenario` does not run on this invocation's guest, if it does not.
fn guest_skip(scenario: &Scenario, kernel: bool) -> Option<String> {
    if kernel {
        scenario.firmware_only_because().map(|why| format!("firmware-only: {why}"))
    } else {
        scenario.kernel_only_because().map(|why| format!("kernel-only: {why}"))
    }
}

pub fn run_scenarios(args: RunArgs) -> Result<ExitCode> {
    let root = workspace_root();
    let default = if args.kernel.is_some() { root.join(LINUX_SCENARIOS) } else { root.join("scenarios") };
    let paths = if args.paths.is_empty() { vec![default.clone()] } else { args.paths.clone() };
    let mut files = Vec::new();
    for p in &paths {
        if !p.exists() {
            bail!("{}: no such file or directory", p.display());
        }
        files.extend(discover(p).with_context(|| format!("cannot list {}", p.display()))?);
    }
    if args.kernel.is_none() && args.paths.is_empty() {
        files.retain(|f| !f.starts_with(root.join(LINUX_SCENARIOS)));
    }
    // Every file is parsed before anything runs: one bad file stops the run.
    let mut scenarios = Vec::new();
    let mut problems = Vec::new();
    for f in &files {
        let shown = f.strip_prefix(root).unwrap_or(f);
        match Scenario::load(f) {
            Ok(mut s) => {
                s.file = shown.to_path_buf();
                scenarios.push(Arc::new(s));
            }
            Err(mut e) => {
                e.file = shown.to_path_buf();
                problems.push(e.to_string());
            }
        }
    }
    if !problems.is_empty() {
        bail!("bad scenario file(s):\n  {}", problems.join("\n  "));
    }
    let mut seen: HashMap<&str, &PathBuf> = HashMap::new();
    for s in &scenarios {
        if let Some(other) = seen.insert(&s.name, &s.file) {
            bail!("{} and {} both name a scenario `{}`", other.display(), s.file.display(), s.name);
        }
    }
    // Every bug-knob scenario also runs with its knobs off, expecting a pass.
    let controls: Vec<Arc<Scenario>> = scenarios.iter().filter_map(|s| s.knobs_off()).map(Arc::new).collect();
    scenarios.extend(controls);
    if let Some(f) = &args.filter {
        scenarios.retain(|s| s.name.contains(f.as_str()));
    }
    if scenarios.is_empty() {
        bail!("no scenario matches");
    }

    let arches = args.arch.clone().unwrap_or(Arch::ALL.to_vec());
    let mut jobs = Vec::new();
    let mut results = Vec::new();
    // Sharded over a fixed order, so every runner splits the suite alike.
    scenarios.sort_by(|a, b| a.name.cmp(&b.name));
    let pairs = scenarios.iter().flat_map(|s| arches.iter().map(move |&arch| (s, arch)));
    for (position, (s, arch)) in pairs.enumerate() {
        if !in_shard(args.shard, position) {
            continue;
        }
        if let Some(why) = guest_skip(s, args.kernel.is_some()) {
            results.push(ScenarioResult::skipped(&s.name, s.file.clone(), arch.name(), &why));
        } else if s.architectures.contains(&arch) {
            for _ in 0..args.repeat.max(1) {
                jobs.push(Job { scenario: s.clone(), arch });
            }
        } else {
            results.push(ScenarioResult::skipped(
                &s.name,
                s.file.clone(),
                arch.name(),
                "the scenario does not list this architecture",
            ));
        }
    }
    let needed: Vec<Arch> = arches.iter().copied().filter(|a| jobs.iter().any(|j| j.arch == *a)).collect();
    let guests = match &args.kernel {
        None => Guests::Firmware(needed.iter().copied().zip(crate::build_guests(&needed)?).collect()),
        Some(kernel) => {
            if !Path::new(kernel).is_file() || needed.len() <= 1 {
                let mut map = HashMap::new();
                for &arch in &needed {
                    let guest = crate::kernels::kernel_guest(kernel, args.system_map.as_deref(), arch)?;
                    map.insert(arch, Arc::new(guest));
                }
                Guests::Kernel(map)
            } else {
                bail!("a kernel image given by path boots one architecture: name it with --arch");
            }
        }
    };

    let parallel =
        args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1);
    let config = RunConfig {
        artifacts_root: root.join("target/scenario-logs"),
        keep_artifacts: args.keep_artifacts,
        inject: None,
        repro: None,
    };
    let out = Output::new(args.tap, jobs.len() + results.len());
    for r in &results {
        out.result(r);
    }
    let start = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(parallel.clamp(2, 8))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let ran = runtime.block_on(run_all(jobs, guests, config, parallel, &out));
    let Some(ran) = ran else {
        eprintln!("interrupted: every QEMU was stopped");
        return Ok(ExitCode::from(crate::INTERRUPTED));
    };
    results.extend(ran);
    out.finish();
    results.sort_by(|a, b| (&a.scenario, &a.arch).cmp(&(&b.scenario, &b.arch)));

    let flaky = hvo_harness::report::flaky(&results);
    for f in &flaky {
        out.line(&format!("FLAKY {:<32} {:<8} {}", f.scenario, f.arch, f.outcomes));
    }
    if let Some(path) = &args.json {
        let report = serde_json::json!({ "results": &results, "flaky": &flaky, "totals": Totals::of(&results) });
        let text = serde_json::to_string_pretty(&report).context("cannot encode the JSON report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.junit {
        let xml = hvo_harness::report::junit(&results).context("cannot encode the JUnit report")?;
        std::fs::write(path, xml).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if args.tap {
        print!("{}", hvo_harness::report::tap(&results));
    }
    let totals = Totals::of(&results);
    let ran = results.len() - totals.skipped;
    out.line(&format!("ran {ran} scenario runs in {:.2}s", start.elapsed().as_secs_f64()));
    let mut summary = totals.summary_line();
    if !flaky.is_empty() {
        summary.push_str(&format!(", {} flaky", flaky.len()));
    }
    out.line(&summary);
    Ok(if totals.errors > 0 {
        ExitCode::from(2)
    } else if totals.failed > 0 || !flaky.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs the jobs, `parallel` at a time, printing each result as it ends;
/// `None` if interrupted (Ctrl-C), after every run was dropped and so stopped.
async fn run_all(
    jobs: Vec<Job>,
    guests: Guests,
    config: RunConfig,
    parallel: usize,
    out: &Output,
) -> Option<Vec<ScenarioResult>> {
    let limit = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut set = tokio::task::JoinSet::new();
    for job in jobs {
        let limit = limit.clone();
        let guests = guests.clone();
        let config = config.clone();
        set.spawn(async move {
            let _slot = limit.acquire_owned().await;
            match &guests {
                Guests::Firmware(images) => {
                    let image = images.get(&job.arch).cloned().unwrap_or_default();
                    run_scenario(&job.scenario, job.arch, &image, &config).await
                }
                Guests::Kernel(kernels) => match kernels.get(&job.arch) {
                    Some(kernel) => run_kernel_scenario(&job.scenario, job.arch, kernel, &config).await,
                    None => ScenarioResult::skipped(
                        &job.scenario.name,
                        job.scenario.file.clone(),
                        job.arch.name(),
                        "no kernel for this architecture",
                    ),
                },
            }
        });
    }
    let mut results = Vec::new();
    loop {
        tokio::select! {
            next = set.join_next() => match next {
                None => break,
                Some(Ok(r)) => {
                    out.result(&r);
                    results.push(r);
                }
                Some(Err(e)) => eprintln!("a scenario task failed: {e}"),
            },
            _ = crate::interrupted() => {
                // Aborting the tasks drops their runs, which kills every QEMU.
                set.shutdown().await;
                return None;
            }
        }
    }
    Some(results)
}

/// Where a run's lines go: standard output, or standard error when TAP has
/// standard output; through a progress bar when that is a terminal.
pub struct Output {
    tap: bool,
    bar: Option<indicatif::ProgressBar>,
    counts: std::sync::Mutex<(usize, usize)>,
}

impl Output {
    pub fn new(tap: bool, total: usize) -> Output {
        use std::io::IsTerminal;
        let terminal = if tap { std::io::stderr().is_terminal() } else { std::io::stdout().is_terminal() };
        let bar = (terminal && total > 1).then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            if tap {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            }
            let style = indicatif::ProgressStyle::with_template("[{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Output { tap, bar, counts: Default::default() }
    }

    pub fn line(&self, text: &str) {
        match (&self.bar, self.tap) {
            (Some(bar), _) => bar.println(text),
            (None, true) => eprintln!("{text}"),
            (None, false) => println!("{text}"),
        }
    }

    pub fn result(&self, r: &ScenarioResult) {
        self.line(&describe(r));
        if let Some(bar) = &self.bar {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            match r.status {
                Status::Pass => counts.0 += 1,
                Status::Skip => {}
                _ => counts.1 += 1,
            }
            bar.set_message(format!("{} passed, {} failed", counts.0, counts.1));
            bar.inc(1);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn describe(r: &ScenarioResult) -> String {
    let mut line =
        format!("{:<9} {:<32} {:<8} {:>7.2}s", r.status.label(), r.scenario, r.arch, r.duration_ms as f64 / 1000.0);
    if let (Some(k), false) = (&r.kernel, r.status == Status::Skip) {
        line.push_str(&format!("\n      kernel {}", k.describe()));
        if !k.generation_reason.is_empty() {
            line.push_str(&format!("\n      judged {}", k.generation_reason));
        }
    }
    // Why it was skipped; and what a real kernel's expected failure showed
    // (a Linux bug's counts are the point of running it).
    if let (Status::Skip, Some(why)) | (Status::Pass, Some(why)) = (r.status, &r.message) {
        if r.status == Status::Skip || r.kernel.is_some() {
            line.push_str(&format!("\n      {why}"));
        }
    }
    if r.status != Status::Pass && r.status != Status::Skip {
        if let Some(m) = &r.message {
            line.push_str(&format!("\n      {m}"));
        }
        if let Some(a) = &r.artifacts {
            let shown = a.strip_prefix(workspace_root()).unwrap_or(a);
            line.push_str(&format!("\n      artifacts: {}/", shown.display()));
        }
        if !r.console_tail.is_empty() {
            line.push_str("\n      console tail:");
            for l in &r.console_tail {
                line.push_str(&format!("\n        | {l}"));
            }
        }
        if !r.qemu_command.is_empty() {
            line.push_str(&format!("\n      qemu: {}", r.qemu_command));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_every_run_exactly_once() {
        assert_eq!(parse_shard("2/4"), Ok(Shard { index: 2, count: 4 }));
        for bad in ["0/4", "5/4", "2", "a/b", "1/0"] {
            assert!(parse_shard(bad).is_err(), "{bad}");
        }
        let count = 3;
        for position in 0..20 {
            let owners =
                (1..=count).filter(|&index| in_shard(Some(Shard { index, count }), position)).collect::<Vec<_>>();
            assert_eq!(owners.len(), 1, "run {position}: {owners:?}");
        }
        assert!(in_shard(None, 7));
    }
}

#[cfg(test)]
mod ci_workflow {
    use hvo_images::{workspace_root, Arch};

    /// The nightly workflow runs the local script over every architecture,
    /// with as many shard cells as it tells the script there are.
    #[test]
    fn the_nightly_matrix_calls_the_local_script_for_every_architecture_and_shard() {
        let text = std::fs::read_to_string(workspace_root().join("ci/nightly.yml")).unwrap();
        assert!(text.contains("ci/run-shard.sh ${{ matrix.arch }} ${{ matrix.shard }}/${{ env.SHARDS }}"));
        assert!(text.contains("fail-fast: false") && text.contains("schedule:") && text.contains("workflow_dispatch:"));
        let arches: Vec<&str> = Arch::ALL.iter().map(|a| a.name()).collect();
        assert!(text.contains(&format!("arch: [{}]", arches.join(", "))), "{arches:?}");
        let shards: usize = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("SHARDS:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("SHARDS set");
        let cells: Vec<String> = (1..=shards).map(|i| i.to_string()).collect();
        assert!(text.contains(&format!("shard: [{}]", cells.join(", "))), "{shards} shards");
        assert!(workspace_root().join("ci/run-shard.sh").is_file());
    }
}
