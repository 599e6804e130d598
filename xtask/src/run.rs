//! `cargo xtask run-scenarios`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use hvo_harness::report::{ScenarioResult, Status, Totals};
use hvo_harness::runner::{run_scenario, RunConfig};
use hvo_harness::scenario::{discover, Scenario};
use hvo_images::{workspace_root, Arch};

#[derive(Args, Default, Clone)]
pub struct RunArgs {
    /// Scenario files or directories (default: scenarios/).
    pub paths: Vec<PathBuf>,
    /// Architectures to run on (default: all three).
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
    /// Keep artifacts of passing runs too (failing runs always keep them).
    #[arg(long)]
    pub keep_artifacts: bool,
}

pub fn parse_arch(s: &str) -> Result<Arch, String> {
    Arch::from_name(s).ok_or_else(|| format!("unknown architecture `{s}` (known: x86_64, aarch64, ppc64le)"))
}

/// One scenario on one architecture.
struct Job {
    scenario: Arc<Scenario>,
    arch: Arch,
}

pub fn run_scenarios(args: RunArgs) -> Result<ExitCode> {
    let root = workspace_root();
    let paths = if args.paths.is_empty() { vec![root.join("scenarios")] } else { args.paths.clone() };
    let mut files = Vec::new();
    for p in &paths {
        if !p.exists() {
            bail!("{}: no such file or directory", p.display());
        }
        files.extend(discover(p).with_context(|| format!("cannot list {}", p.display()))?);
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
    for s in &scenarios {
        for &arch in &arches {
            if s.architectures.contains(&arch) {
                jobs.push(Job { scenario: s.clone(), arch });
            } else {
                results.push(ScenarioResult::skipped(
                    &s.name,
                    s.file.clone(),
                    arch.name(),
                    "the scenario does not list this architecture",
                ));
            }
        }
    }
    let needed: Vec<Arch> = arches.iter().copied().filter(|a| jobs.iter().any(|j| j.arch == *a)).collect();
    let images: HashMap<Arch, PathBuf> = needed.iter().copied().zip(crate::build_guests(&needed)?).collect();

    let parallel =
        args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1);
    let config = RunConfig {
        artifacts_root: root.join("target/scenario-logs"),
        keep_artifacts: args.keep_artifacts,
        inject: None,
    };
    for r in &results {
        print_result(r);
    }
    let start = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(parallel.clamp(2, 8))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let ran = runtime.block_on(run_all(jobs, images, config, parallel));
    let Some(ran) = ran else {
        eprintln!("interrupted: every QEMU was stopped");
        return Ok(ExitCode::from(130));
    };
    results.extend(ran);

    if let Some(json) = &args.json {
        let text = serde_json::to_string_pretty(&results).context("cannot encode the JSON report")?;
        std::fs::write(json, text + "\n").with_context(|| format!("cannot write {}", json.display()))?;
    }
    let totals = Totals::of(&results);
    println!("ran {} scenario runs in {:.2}s", results.len() - totals.skipped, start.elapsed().as_secs_f64());
    println!("{}", totals.summary_line());
    Ok(if totals.errors > 0 {
        ExitCode::from(2)
    } else if totals.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs the jobs, `parallel` at a time, printing each result as it ends;
/// `None` if interrupted (Ctrl-C), after every run was dropped and so stopped.
async fn run_all(
    jobs: Vec<Job>,
    images: HashMap<Arch, PathBuf>,
    config: RunConfig,
    parallel: usize,
) -> Option<Vec<ScenarioResult>> {
    let limit = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut set = tokio::task::JoinSet::new();
    for job in jobs {
        let limit = limit.clone();
        let image = images.get(&job.arch).cloned().unwrap_or_default();
        let config = config.clone();
        set.spawn(async move {
            let _slot = limit.acquire_owned().await;
            run_scenario(&job.scenario, job.arch, &image, &config).await
        });
    }
    let mut results = Vec::new();
    loop {
        tokio::select! {
            next = set.join_next() => match next {
                None => break,
                Some(Ok(r)) => {
                    print_result(&r);
                    results.push(r);
                }
                Some(Err(e)) => eprintln!("a scenario task failed: {e}"),
            },
            _ = tokio::signal::ctrl_c() => {
                // Aborting the tasks drops their runs, which kills every QEMU.
                set.shutdown().await;
                return None;
            }
        }
    }
    results.sort_by(|a, b| (&a.scenario, &a.arch).cmp(&(&b.scenario, &b.arch)));
    Some(results)
}

fn print_result(r: &ScenarioResult) {
    let mut line =
        format!("{:<5} {:<32} {:<8} {:>7.2}s", r.status.label(), r.scenario, r.arch, r.duration_ms as f64 / 1000.0);
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
    println!("{line}");
}
