//! What becomes of a failing random scenario: shrunk to the smallest one
//! that fails the same way, tried on every other profile, written as a
//! scenario file with the commands that reproduce it; and the summary of a
//! whole fuzzing run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hvo_harness::fuzz::FuzzCase;
use hvo_harness::report::{CheckStatus, ScenarioResult, Status};
use hvo_images::{workspace_root, Arch};
use serde::Serialize;

use super::Fuzzer;

/// How a run failed: its verdict and the first invariant that fired (the
/// first failing check of the earliest verify that failed). A smaller
/// scenario reproduces the failure if it fails the same way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub status: Status,
    pub check: Option<String>,
}

impl Signature {
    pub fn of(r: &ScenarioResult) -> Signature {
        let check = r.checks.iter().find(|c| c.status == CheckStatus::Fail).map(|c| c.name.clone());
        Signature { status: r.status, check }
    }

    pub fn describe(&self) -> String {
        match &self.check {
            Some(c) => format!("{} ({c})", self.status.label()),
            None => self.status.label().to_string(),
        }
    }
}

/// How the shrunk scenario fares on one other profile.
#[derive(Clone, Debug, Serialize)]
pub struct Elsewhere {
    pub arch: String,
    /// `pass`, `fail (tails-shared)`, ...; or why it could not run.
    pub verdict: String,
    /// Whether it fails the same way as where it was found.
    pub same: bool,
}

/// A failing scenario, followed up.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    pub index: u64,
    pub arch: String,
    /// The verdict and the first invariant that fired.
    pub signature: String,
    pub first_invariant: Option<String>,
    pub message: String,
    pub steps: usize,
    pub shrunk_steps: usize,
    pub shrink_runs: u32,
    pub elsewhere: Vec<Elsewhere>,
    /// The scenario file written, relative to the workspace when inside it.
    pub file: Option<PathBuf>,
    pub reproduce: String,
    pub regenerate: String,
}

impl Failure {
    /// The lines printed under the run's verdict.
    pub fn report(&self) -> String {
        let mut lines = vec![self.message.lines().take(4).collect::<Vec<_>>().join("\n          ")];
        lines.push(format!(
            "first to fire: {}; shrunk from {} to {} steps in {} runs",
            self.first_invariant.as_deref().unwrap_or(&self.signature),
            self.steps,
            self.shrunk_steps,
            self.shrink_runs
        ));
        let elsewhere: Vec<String> = self
            .elsewhere
            .iter()
            .map(|e| format!("{} {}{}", e.arch, e.verdict, if e.same { " (same)" } else { "" }))
            .collect();
        if !elsewhere.is_empty() {
            lines.push(format!("shrunk, on the other profiles: {}", elsewhere.join(", ")));
        }
        if let Some(f) = &self.file {
            lines.push(format!("written: {}", f.display()));
        }
        lines.push(format!("reproduce: {}", self.reproduce));
        lines.push(format!("regenerate: {}", self.regenerate));
        lines.iter().map(|l| format!("          {l}")).collect::<Vec<_>>().join("\n")
    }
}

/// Shrinks a failure of `case` on `arch`, runs the shrunk scenario on the
/// other profiles, and writes it (listing every profile it fails on the same
/// way) with a header saying how it was found.
pub async fn follow_up(
    fuzzer: &Fuzzer,
    case: &FuzzCase,
    arch: Arch,
    result: &ScenarioResult,
    signature: Signature,
) -> Failure {
    let (small, runs) = shrink(fuzzer, case.clone(), arch, &signature).await;
    let mut elsewhere = Vec::new();
    let mut failing_on = vec![arch];
    for other in Arch::ALL.into_iter().filter(|a| *a != arch) {
        let (verdict, same) = match fuzzer.run(&small, other).await {
            Ok(r) => {
                let theirs = Signature::of(&r);
                let same = theirs == signature;
                if same {
                    failing_on.push(other);
                }
                (theirs.describe().to_lowercase(), same)
            }
            Err(e) => (format!("not run: {e}"), false),
        };
        elsewhere.push(Elsewhere { arch: other.name().to_string(), verdict, same });
    }
    let regenerate = fuzzer.regenerate(case.index, arch);
    let header = header(case, &small, arch, &signature, runs, &elsewhere, &regenerate);
    let path = fuzzer.out_dir.join(format!("seed{}-{}-{arch}.toml", case.seed, case.index));
    let names: Vec<&str> = Arch::ALL.into_iter().filter(|a| failing_on.contains(a)).map(|a| a.name()).collect();
    let written = std::fs::create_dir_all(&fuzzer.out_dir)
        .and_then(|()| std::fs::write(&path, small.to_toml(&names, &header)))
        .map(|()| shown(&path));
    let (file, reproduce) = match written {
        Ok(shown) => {
            let cmd = format!("cargo xtask run-scenarios --arch {arch} {}", shown.display());
            (Some(shown), cmd)
        }
        Err(e) => (None, format!("(cannot write {}: {e})", path.display())),
    };
    Failure {
        index: case.index,
        arch: arch.name().to_string(),
        signature: signature.describe(),
        first_invariant: signature.check.clone(),
        message: abridged(result.message.as_deref().unwrap_or_default(), 1500),
        steps: case.steps.len(),
        shrunk_steps: small.steps.len(),
        shrink_runs: runs,
        elsewhere,
        file,
        reproduce,
        regenerate,
    }
}

/// The scenario file's leading comment.
fn header(
    case: &FuzzCase,
    small: &FuzzCase,
    arch: Arch,
    signature: &Signature,
    runs: u32,
    elsewhere: &[Elsewhere],
    regenerate: &str,
) -> String {
    let mut h = format!(
        "Found by `{regenerate}` (scenario {} of seed {}) on {arch}:\nit fails with {}. Shrunk from {} to {} steps in {runs} runs.\n",
        case.index,
        case.seed,
        signature.describe(),
        case.steps.len(),
        small.steps.len(),
    );
    for e in elsewhere {
        h.push_str(&format!("On {}: {}{}.\n", e.arch, e.verdict, if e.same { ", the same failure" } else { "" }));
    }
    h.push_str("Reproduce: cargo xtask run-scenarios <this file>");
    h
}

/// `text` cut to about `max` bytes, at a character boundary, saying so.
fn abridged(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let cut = (0..=max).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    format!("{} ... ({} bytes more)", &text[..cut], text.len() - cut)
}

/// A path as shown to a person: relative to the workspace when inside it.
fn shown(path: &Path) -> PathBuf {
    let root = workspace_root();
    path.strip_prefix(root).unwrap_or(path).to_path_buf()
}

/// Greedy shrinking: take the first smaller variant that still fails the
/// same way, and start again from it, until none does (or the runs or the
/// time allowed are spent).
async fn shrink(fuzzer: &Fuzzer, mut best: FuzzCase, arch: Arch, signature: &Signature) -> (FuzzCase, u32) {
    let started = Instant::now();
    let mut runs = 0;
    'smaller: loop {
        for candidate in best.shrink_candidates(&[arch.name()]) {
            if runs == fuzzer.max_shrink_runs || started.elapsed() >= fuzzer.max_shrink_time {
                break 'smaller;
            }
            runs += 1;
            if fuzzer.run(&candidate, arch).await.is_ok_and(|r| Signature::of(&r) == *signature) {
                best = candidate;
                continue 'smaller;
            }
        }
        break;
    }
    (best, runs)
}

/// A whole fuzzing run: what ran and what failed, printed and written to
/// `summary.json` beside the failing scenarios.
#[derive(Serialize)]
pub struct Summary {
    pub seed: u64,
    /// Scenarios `from..to` were drawn (the last perhaps on some profiles only).
    pub from: u64,
    pub to: u64,
    pub arches: Vec<String>,
    pub seconds: u64,
    pub runs: usize,
    pub passed: usize,
    pub runs_per_arch: Vec<(String, usize)>,
    pub failures: Vec<Failure>,
    /// Every run again, on these profiles: the same scenarios, the same verdicts.
    pub replay: String,
    #[serde(skip)]
    out_dir: PathBuf,
}

impl Summary {
    pub fn new(fuzzer: &Fuzzer, from: u64, to: u64, arches: &[Arch], took: Duration) -> Summary {
        let names: Vec<String> = arches.iter().map(|a| a.name().to_string()).collect();
        let knobs: String = fuzzer.knobs.iter().map(|k| format!(" --bug-knob {}", k.name())).collect();
        let replay = format!(
            "cargo xtask fuzz --seed {} --from {from} --count {} --arch {}{knobs}",
            fuzzer.seed,
            to - from,
            names.join(",")
        );
        Summary {
            seed: fuzzer.seed,
            from,
            to,
            arches: names,
            seconds: took.as_secs(),
            runs: 0,
            passed: 0,
            runs_per_arch: Vec::new(),
            failures: Vec::new(),
            replay,
            out_dir: fuzzer.out_dir.clone(),
        }
    }

    /// Prints the totals and writes summary.json; returns how many runs failed.
    pub fn write(mut self, outcomes: &[(Arch, Status, Option<&Failure>)]) -> Result<usize> {
        self.runs = outcomes.len();
        self.passed = outcomes.iter().filter(|(_, s, _)| *s == Status::Pass).count();
        self.runs_per_arch = Arch::ALL
            .iter()
            .map(|a| (a.name().to_string(), outcomes.iter().filter(|(b, _, _)| b == a).count()))
            .filter(|(_, n)| *n > 0)
            .collect();
        let mut failures: Vec<Failure> = outcomes.iter().filter_map(|(_, _, f)| f.cloned()).collect();
        failures.sort_by(|a, b| (a.index, &a.arch).cmp(&(b.index, &b.arch)));
        self.failures = failures;
        let failing = self.runs - self.passed;
        let per_arch: Vec<String> = self.runs_per_arch.iter().map(|(a, n)| format!("{a} {n}")).collect();
        println!(
            "{failing} failing of {} random scenario runs (scenarios {}..{} of seed {}; {}) in {}s",
            self.runs,
            self.from,
            self.to,
            self.seed,
            per_arch.join(", "),
            self.seconds
        );
        println!("replay: {}", self.replay);
        std::fs::create_dir_all(&self.out_dir).with_context(|| format!("cannot create {}", self.out_dir.display()))?;
        let path = self.out_dir.join("summary.json");
        let json = serde_json::to_string_pretty(&self).context("cannot encode the summary")?;
        std::fs::write(&path, json).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(failing)
    }
}
