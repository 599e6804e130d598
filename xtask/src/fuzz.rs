//! `cargo xtask fuzz`: random scenarios from a seed; a failing one is shrunk
//! to a minimal scenario file that fails the same way.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use hvo_abi::model::Knob;
use hvo_harness::fuzz::{generate, FuzzCase};
use hvo_harness::report::{CheckStatus, ScenarioResult, Status};
use hvo_harness::runner::{run_scenario, RunConfig};
use hvo_images::{workspace_root, Arch};

use crate::run::parse_arch;

#[derive(Args)]
pub struct FuzzArgs {
    /// The seed: the same seed always draws the same scenarios.
    #[arg(long)]
    pub seed: u64,
    /// Scenarios to draw.
    #[arg(long, default_value_t = 20)]
    pub count: u64,
    /// Architectures to run each on (default: all four).
    #[arg(long, value_delimiter = ',', value_parser = parse_arch)]
    pub arch: Option<Vec<Arch>>,
    /// Turn this bug knob on in every scenario: to watch the fuzzer find a
    /// known bug and shrink it.
    #[arg(long = "bug-knob", value_parser = parse_knob)]
    pub bug_knobs: Vec<Knob>,
    /// Where shrunk failing scenarios are written (default: target/fuzz/).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// At most this many runs spent shrinking one failure.
    #[arg(long, default_value_t = 300)]
    pub max_shrink_runs: u32,
}

fn parse_knob(s: &str) -> Result<Knob, String> {
    Knob::from_name(s).ok_or_else(|| {
        let known: Vec<&str> = Knob::ALL.iter().map(|k| k.name()).collect();
        format!("unknown bug knob `{s}` (known: {})", known.join(", "))
    })
}

/// How a run failed: its verdict and the first check that failed. A smaller
/// scenario reproduces the failure if it fails the same way.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Signature {
    status: Status,
    check: Option<String>,
}

impl Signature {
    fn of(r: &ScenarioResult) -> Signature {
        let check = r.checks.iter().find(|c| c.status == CheckStatus::Fail).map(|c| c.name.clone());
        Signature { status: r.status, check }
    }

    fn describe(&self) -> String {
        match &self.check {
            Some(c) => format!("{} ({c})", self.status.label()),
            None => self.status.label().to_string(),
        }
    }
}

struct Fuzzer {
    runtime: tokio::runtime::Runtime,
    config: RunConfig,
    images: std::collections::HashMap<Arch, PathBuf>,
}

/// Ctrl-C or SIGTERM ended the fuzzing (every QEMU stopped).
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

impl Fuzzer {
    fn run(&self, case: &FuzzCase, arch: Arch) -> Result<ScenarioResult> {
        let name = format!("fuzz-{}-{}", case.seed, case.index);
        let scenario = case.scenario(&name, &[arch.name()]).map_err(|e| anyhow::anyhow!("{e}"))?;
        let image = self.images.get(&arch).context("no guest image")?;
        crate::unless_interrupted(&self.runtime, run_scenario(&scenario, arch, image, &self.config))
            .ok_or_else(|| Interrupted.into())
    }
}

pub fn fuzz(args: FuzzArgs) -> Result<ExitCode> {
    match hunt(args) {
        Err(e) if e.is::<Interrupted>() => {
            eprintln!("interrupted: every QEMU was stopped");
            Ok(ExitCode::from(crate::INTERRUPTED))
        }
        other => other,
    }
}

fn hunt(args: FuzzArgs) -> Result<ExitCode> {
    let root = workspace_root();
    let arches = args.arch.clone().unwrap_or(Arch::ALL.to_vec());
    let images = arches.iter().copied().zip(crate::build_guests(&arches)?).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let config =
        RunConfig { artifacts_root: root.join("target/fuzz-logs"), keep_artifacts: false, inject: None, repro: None };
    let fuzzer = Fuzzer { runtime, config, images };
    let out_dir = args.out.clone().unwrap_or_else(|| root.join("target/fuzz"));
    let mut found = 0;
    for index in 0..args.count {
        let case = generate(args.seed, index, &args.bug_knobs);
        for &arch in &arches {
            let result = fuzzer.run(&case, arch)?;
            println!(
                "{:<9} seed {} #{index:<4} {arch:<8} {} steps",
                result.status.label(),
                args.seed,
                case.steps.len()
            );
            if result.status == Status::Pass {
                continue;
            }
            found += 1;
            let signature = Signature::of(&result);
            if let Some(m) = &result.message {
                println!("          {m}");
            }
            let (small, runs) = shrink(&fuzzer, case.clone(), arch, &signature, args.max_shrink_runs)?;
            std::fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
            let path = out_dir.join(format!("seed{}-{index}-{arch}.toml", args.seed));
            let knobs: Vec<&str> = args.bug_knobs.iter().map(|k| k.name()).collect();
            let header = format!(
                "Found by `cargo xtask fuzz --seed {} --count {}{}` (scenario {index}) on {arch}:\nit fails with {}. Shrunk from {} to {} steps in {runs} runs.",
                args.seed,
                args.count,
                knobs.iter().map(|k| format!(" --bug-knob {k}")).collect::<String>(),
                signature.describe(),
                case.steps.len(),
                small.steps.len(),
            );
            std::fs::write(&path, small.to_toml(&[arch.name()], &header))
                .with_context(|| format!("cannot write {}", path.display()))?;
            let shown = path.strip_prefix(root).unwrap_or(&path);
            println!(
                "          shrunk to {} steps: {}\n          reproduce: cargo xtask run-scenarios {}",
                small.steps.len(),
                shown.display(),
                shown.display()
            );
        }
    }
    println!("{found} failing of {} random scenario runs", args.count as usize * arches.len());
    Ok(if found > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// Greedy shrinking: take the first smaller variant that still fails the
/// same way, and start again from it, until none does (or the budget ends).
fn shrink(
    fuzzer: &Fuzzer,
    mut best: FuzzCase,
    arch: Arch,
    signature: &Signature,
    budget: u32,
) -> Result<(FuzzCase, u32)> {
    let mut runs = 0;
    'smaller: loop {
        for candidate in best.shrink_candidates(&[arch.name()]) {
            if runs == budget {
                break 'smaller;
            }
            runs += 1;
            if Signature::of(&fuzzer.run(&candidate, arch)?) == *signature {
                best = candidate;
                continue 'smaller;
            }
        }
        break;
    }
    Ok((best, runs))
}
