//! `cargo xtask fuzz`: random scenarios from a seed, for a count or for a
//! time, on every profile; a failing one is shrunk to a minimal scenario
//! file that fails the same way, tried on the other profiles, and written
//! with the commands that reproduce it.

mod failure;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use hvo_abi::model::Knob;
use hvo_harness::fuzz::{generate, FuzzCase};
use hvo_harness::report::{ScenarioResult, Status};
use hvo_harness::runner::{run_scenario, RunConfig};
use hvo_images::{workspace_root, Arch};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::run::parse_arch;
use failure::{Failure, Signature};

#[derive(Args)]
pub struct FuzzArgs {
    /// The seed: the same seed always draws the same scenarios (default:
    /// today's date, UTC, as YYYYMMDD; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Scenarios to draw (default 20; with `--time`, no limit).
    #[arg(long, conflicts_with = "time")]
    pub count: Option<u64>,
    /// Draw scenarios for this long instead of a count (`90s`, `10m`,
    /// `1h30m`): no scenario starts after it; those running finish, and a
    /// failure is still shrunk.
    #[arg(long, value_parser = parse_duration)]
    pub time: Option<Duration>,
    /// The first scenario's number: `--from 7 --count 1` draws scenario 7 alone.
    #[arg(long, default_value_t = 0)]
    pub from: u64,
    /// Architectures to run each on (default: all four).
    #[arg(long, value_delimiter = ',', value_parser = parse_arch)]
    pub arch: Option<Vec<Arch>>,
    /// Runs at once (default: number of CPUs).
    #[arg(short = 'j', long)]
    pub jobs: Option<usize>,
    /// Turn this bug knob on in every scenario: to watch the fuzzer find a
    /// known bug and shrink it.
    #[arg(long = "bug-knob", value_parser = parse_knob)]
    pub bug_knobs: Vec<Knob>,
    /// Where shrunk failing scenarios and summary.json are written (default: target/fuzz/).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// At most this many runs spent shrinking one failure.
    #[arg(long, default_value_t = 300)]
    pub max_shrink_runs: u32,
    /// At most this long spent shrinking one failure.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub max_shrink_time: Duration,
    /// Print the scenarios as scenario files, and run nothing.
    #[arg(long)]
    pub dry_run: bool,
}

fn parse_knob(s: &str) -> Result<Knob, String> {
    Knob::from_name(s).ok_or_else(|| {
        let known: Vec<&str> = Knob::ALL.iter().map(|k| k.name()).collect();
        format!("unknown bug knob `{s}` (known: {})", known.join(", "))
    })
}

/// `90s`, `10m`, `2h`, `1h30m`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not a duration (write 90s, 10m, 2h or 1h30m)");
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let (mut total, mut digits) = (0u64, String::new());
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
        digits.clear();
    }
    if !digits.is_empty() || total == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

/// Today's date (UTC) as the number YYYYMMDD: the nightly seed.
pub fn seed_of_today() -> u64 {
    let days =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() / 86_400).unwrap_or(0)
            as i64;
    let (y, m, d) = civil_from_days(days);
    (y as u64) * 10_000 + m * 100 + d
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's days-to-civil arithmetic).
fn civil_from_days(z: i64) -> (i64, u64, u64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
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

/// What every run shares: how to run, the guest images (built when a
/// profile is first needed), and how the command was asked.
pub(crate) struct Fuzzer {
    config: RunConfig,
    images: tokio::sync::Mutex<HashMap<Arch, Result<PathBuf, String>>>,
    seed: u64,
    knobs: Vec<Knob>,
    out_dir: PathBuf,
    max_shrink_runs: u32,
    max_shrink_time: Duration,
}

impl Fuzzer {
    /// The guest image of `arch`, built on first use.
    async fn image(&self, arch: Arch) -> Result<PathBuf, String> {
        let mut images = self.images.lock().await;
        if let Some(built) = images.get(&arch) {
            return built.clone();
        }
        let built = tokio::task::spawn_blocking(move || crate::build_guests(&[arch]))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| format!("{e:#}")))
            .and_then(|paths| paths.into_iter().next().ok_or_else(|| "no image built".to_string()));
        images.insert(arch, built.clone());
        built
    }

    /// Runs `case` on `arch`; `None` when the harness could not (no image).
    pub(crate) async fn run(&self, case: &FuzzCase, arch: Arch) -> Result<ScenarioResult, String> {
        let name = format!("fuzz-{}-{}", case.seed, case.index);
        let scenario = case.scenario(&name, &[arch.name()]).map_err(|e| e.to_string())?;
        let image = self.image(arch).await?;
        Ok(run_scenario(&scenario, arch, &image, &self.config).await)
    }

    /// The command that draws scenario `index` alone on `arch`.
    pub(crate) fn regenerate(&self, index: u64, arch: Arch) -> String {
        let knobs: String = self.knobs.iter().map(|k| format!(" --bug-knob {}", k.name())).collect();
        format!("cargo xtask fuzz --seed {} --from {index} --count 1 --arch {arch}{knobs}", self.seed)
    }
}

/// One (scenario, profile) run and, if it failed, what became of it.
struct Outcome {
    arch: Arch,
    status: Status,
    failure: Option<Failure>,
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
    let seed = args.seed.unwrap_or_else(seed_of_today);
    if args.seed.is_none() {
        println!("seed {seed} (today's date)");
    }
    let count = match (args.count, args.time) {
        (Some(n), _) => Some(n),
        (None, None) => Some(20),
        (None, Some(_)) => None,
    };
    if args.dry_run {
        let n = count.unwrap_or(20);
        for index in args.from..args.from + n {
            let case = generate(seed, index, &args.bug_knobs);
            let names: Vec<&str> = arches.iter().map(|a| a.name()).collect();
            println!("{}", case.to_toml(&names, &format!("scenario {index} of seed {seed}")));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let images: HashMap<Arch, Result<PathBuf, String>> =
        arches.iter().copied().zip(crate::build_guests(&arches)?.into_iter().map(Ok)).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let config =
        RunConfig { artifacts_root: root.join("target/fuzz-logs"), keep_artifacts: false, inject: None, repro: None };
    let fuzzer = Arc::new(Fuzzer {
        config,
        images: tokio::sync::Mutex::new(images),
        seed,
        knobs: args.bug_knobs.clone(),
        out_dir: args.out.clone().unwrap_or_else(|| root.join("target/fuzz")),
        max_shrink_runs: args.max_shrink_runs,
        max_shrink_time: args.max_shrink_time,
    });
    let jobs = args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1);
    let started = Instant::now();
    let plan = Plan { from: args.from, count, deadline: args.time.map(|t| started + t), arches: arches.clone(), jobs };
    let (outcomes, next) = runtime.block_on(run_plan(fuzzer.clone(), plan)).ok_or(Interrupted)?;
    let summary = failure::Summary::new(&fuzzer, args.from, next, &arches, started.elapsed());
    let failing = summary.write(&outcomes_view(&outcomes))?;
    Ok(if failing > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn outcomes_view(outcomes: &[Outcome]) -> Vec<(Arch, Status, Option<&Failure>)> {
    outcomes.iter().map(|o| (o.arch, o.status, o.failure.as_ref())).collect()
}

/// Which runs to make: scenarios from `from`, `count` of them or until
/// `deadline`, each on every one of `arches`, `jobs` at once.
struct Plan {
    from: u64,
    count: Option<u64>,
    deadline: Option<Instant>,
    arches: Vec<Arch>,
    jobs: usize,
}

/// Runs the plan; returns every outcome and the number of the first
/// scenario not drawn, or `None` if interrupted (every run dropped, so
/// every QEMU stopped).
async fn run_plan(fuzzer: Arc<Fuzzer>, plan: Plan) -> Option<(Vec<Outcome>, u64)> {
    let limit = Arc::new(Semaphore::new(plan.jobs));
    let mut set: JoinSet<Outcome> = JoinSet::new();
    let mut outcomes = Vec::new();
    let mut index = plan.from;
    'draw: while plan.count.is_none_or(|n| index < plan.from + n) {
        let case = Arc::new(generate(fuzzer.seed, index, &fuzzer.knobs));
        for (k, &arch) in plan.arches.iter().enumerate() {
            let permit = tokio::select! {
                p = limit.clone().acquire_owned() => p.ok()?,
                _ = crate::interrupted() => {
                    set.shutdown().await;
                    return None;
                }
            };
            if plan.deadline.is_some_and(|d| Instant::now() >= d) {
                if k > 0 {
                    index += 1;
                }
                break 'draw;
            }
            while let Some(done) = set.try_join_next() {
                outcomes.extend(done.ok());
            }
            let (fuzzer, case) = (fuzzer.clone(), case.clone());
            set.spawn(async move {
                let outcome = one_run(&fuzzer, &case, arch).await;
                drop(permit);
                outcome
            });
        }
        index += 1;
    }
    loop {
        tokio::select! {
            next = set.join_next() => match next {
                None => break,
                Some(done) => outcomes.extend(done.ok()),
            },
            _ = crate::interrupted() => {
                set.shutdown().await;
                return None;
            }
        }
    }
    Some((outcomes, index))
}

/// Runs scenario `case` on `arch`, printing its line; a failure is shrunk,
/// tried on the other profiles and written before this returns.
async fn one_run(fuzzer: &Fuzzer, case: &FuzzCase, arch: Arch) -> Outcome {
    let result = match fuzzer.run(case, arch).await {
        Ok(r) => r,
        Err(e) => {
            println!("{:<9} seed {} #{:<4} {arch:<11} not run: {e}", Status::Error.label(), case.seed, case.index);
            return Outcome { arch, status: Status::Error, failure: None };
        }
    };
    let line = format!(
        "{:<9} seed {} #{:<4} {arch:<11} {} steps",
        result.status.label(),
        case.seed,
        case.index,
        case.steps.len()
    );
    if result.status == Status::Pass {
        println!("{line}");
        return Outcome { arch, status: result.status, failure: None };
    }
    let signature = Signature::of(&result);
    let failure = failure::follow_up(fuzzer, case, arch, &result, signature).await;
    println!("{line}\n{}", failure.report());
    Outcome { arch, status: result.status, failure: Some(failure) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        for bad in ["", "m", "10x", "5m3", "0s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_nightly_seed_is_the_date() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_788), (2026, 12, 1));
        let today = seed_of_today();
        assert!((20_250_101..21_000_101).contains(&today), "{today}");
    }
}
