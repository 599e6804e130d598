//! `cargo xtask bench`: where the time goes, per architecture, measured.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::Args;
use hvo_harness::bench::{bare_boot_to_exit, memory_read_throughput};
use hvo_harness::report::{Phases, Status};
use hvo_harness::runner::{run_scenario, RunConfig};
use hvo_harness::scenario::Scenario;
use hvo_images::{workspace_root, Arch};
use serde_json::{json, Value};

use crate::run::parse_arch;

/// The machine of the kernel measurements and of the firmware's equal
/// work: 4 GiB with 64 x 2M and 1 x 1G reserved at boot (on a kernel's
/// command line, `hugepagesz=2M hugepages=64 hugepagesz=1G hugepages=1`).
macro_rules! kernel_machine {
    () => {
        r#"
[machine]
boot-memory = "4G"
max-memory = "4G"

[[boot-gigantic]]
region = "boot-2m"
size = "2M"
count = 64

[[boot-gigantic]]
region = "boot-1g"
size = "1G"
count = 1
"#
    };
}

mod boot_time;
mod boot_time_chart;
mod equal;
mod kernel;

#[derive(Args)]
pub struct BenchArgs {
    /// Runs of each measurement (min, median and max are reported).
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    /// Architectures (default: all four).
    #[arg(long, value_delimiter = ',', value_parser = parse_arch)]
    pub arch: Option<Vec<Arch>>,
    /// Write every figure as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the phase chart here (default: target/bench/phases.svg).
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Also time the whole default suite at -j 1 and -j 2 (a few minutes).
    #[arg(long, conflicts_with = "kernel")]
    pub suite: bool,
    /// Measure only what a verdict on this real kernel costs against booting
    /// it: a Debian spec (`debian-6.12`, `debian-7.2`; default: all four
    /// architectures) or the path of a kernel image (then name one --arch).
    #[arg(long, value_name = "SPEC|PATH", conflicts_with = "svg")]
    pub kernel: Option<String>,
    /// Measure only the boot-time benefit of pre-optimized gigantic pages:
    /// the boot memmap's time and struct pages written, with gigantic pages
    /// reserved at boot and with the same memory as ordinary pages, from
    /// 16 GiB to each profile's largest machine (long: minutes per profile).
    #[arg(long, conflicts_with_all = ["kernel", "suite", "equal_work"])]
    pub boot_time: bool,
    /// The firmware against a real kernel at equal work, interleaved: the
    /// kernel (`--kernel`, default debian-6.12) booted to its initramfs with
    /// 64 x 2M and 1 x 1G reserved, its pools checked, against the firmware
    /// reaching the same state (those pages optimized at boot) and verifying
    /// it (default architecture: x86_64).
    #[arg(long, conflicts_with_all = ["suite", "svg"])]
    pub equal_work: bool,
    /// The kernel's System.map, for a kernel whose symbols the host has no
    /// other file of.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub system_map: Option<PathBuf>,
}

/// The null scenario: boot, read the manifest, exit.
const NULL: &str = r#"
description = "null: boot, manifest, exit"
[machine]
boot-memory = "512M"
slots = 4
max-memory = "8G"
[[step]]
action = "verify-manifest"
[[step]]
action = "exit"
"#;

/// Scenarios whose time to verdict is reported beside the null one.
const REPRESENTATIVE: [&str; 2] = ["scenarios/hugetlb-2m-unified.toml", "scenarios/dax-hotplug.toml"];

#[derive(Clone, Copy, Debug, serde::Serialize)]
struct Spread {
    min: f64,
    median: f64,
    max: f64,
}

fn spread(mut xs: Vec<f64>) -> Spread {
    xs.sort_by(f64::total_cmp);
    Spread { min: xs[0], median: xs[xs.len() / 2], max: xs[xs.len() - 1] }
}

/// The table's columns; rows of figures follow as `print_row` writes them.
fn print_header() {
    println!("{:<8} {:<34} {:>9} {:>9} {:>9}", "arch", "measurement", "min", "median", "max");
}

fn print_row(arch: Arch, what: &str, s: &Spread) {
    println!("{:<8} {what:<34} {:>7.0}ms {:>7.0}ms {:>7.0}ms", arch.name(), s.min, s.median, s.max);
}

fn describe_phases(p: &Phases) -> String {
    format!(
        "qemu start {} ms, boot {} ms, steps {} ms, verify {} ms, shutdown {} ms",
        p.qemu_start_ms, p.boot_ms, p.steps_ms, p.verify_ms, p.shutdown_ms
    )
}

/// A row of text in the figures' place (a ratio, the phases).
fn print_note(arch: Arch, what: &str, text: &str) {
    println!("{:<8} {what:<34} {text}", arch.name());
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Bench {
    runtime: tokio::runtime::Runtime,
    config: RunConfig,
}

impl Bench {
    /// Two worker threads: the bench runs one QEMU at a time, and its
    /// console, QMP and the host's verification need no more.
    fn new() -> Result<Bench> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let config = RunConfig {
            artifacts_root: workspace_root().join("target/bench/logs"),
            keep_artifacts: false,
            inject: None,
            repro: None,
        };
        Ok(Bench { runtime, config })
    }

    /// `runs` runs of a scenario: time to verdict and median phases.
    fn scenario(&self, scenario: &Scenario, arch: Arch, elf: &Path, runs: usize) -> Result<(Spread, Phases)> {
        let mut totals = Vec::new();
        let mut phases = Vec::new();
        for _ in 0..runs {
            let r = crate::unless_interrupted(&self.runtime, run_scenario(scenario, arch, elf, &self.config))
                .ok_or_else(|| anyhow!("interrupted"))?;
            if r.status != Status::Pass {
                return Err(anyhow!(
                    "{} on {arch}: {} {}",
                    scenario.name,
                    r.status.label(),
                    r.message.unwrap_or_default()
                ));
            }
            totals.push(r.duration_ms as f64);
            phases.push(r.phases);
        }
        Ok((spread(totals), median_phases(&phases)))
    }
}

/// Each phase's median over runs.
fn median_phases(phases: &[Phases]) -> Phases {
    let median = |f: fn(&Phases) -> u64| {
        let mut v: Vec<u64> = phases.iter().map(f).collect();
        v.sort_unstable();
        v[v.len() / 2]
    };
    Phases {
        qemu_start_ms: median(|p| p.qemu_start_ms),
        boot_ms: median(|p| p.boot_ms),
        steps_ms: median(|p| p.steps_ms),
        verify_ms: median(|p| p.verify_ms),
        shutdown_ms: median(|p| p.shutdown_ms),
    }
}

/// The host the figures were taken on.
fn machine_json() -> Value {
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|m| m.trim().to_string())),
    })
}

fn write_json(path: &Path, report: &Value) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

pub fn bench(args: BenchArgs) -> Result<ExitCode> {
    if args.equal_work {
        return equal::bench_equal_work(&args);
    }
    if let Some(kernel) = &args.kernel {
        return kernel::bench_kernel(kernel, &args);
    }
    if args.boot_time {
        return boot_time::bench_boot_time(&args);
    }
    let root = workspace_root();
    let arches = args.arch.clone().unwrap_or(Arch::ALL.to_vec());
    let images: Vec<PathBuf> = crate::build_guests(&arches)?;
    let runs = args.runs.max(1);
    let bench = Bench::new()?;
    let null = Scenario::parse(Path::new("null.toml"), NULL).map_err(|e| anyhow!("{e}"))?;
    let scale = Scenario::load(&root.join("scenarios/scale-dax.toml")).map_err(|e| anyhow!("{e}"))?;

    let mut report = BTreeMap::new();
    let mut chart = Vec::new();
    print_header();
    for (&arch, elf) in arches.iter().zip(&images) {
        // Bare boots and null scenarios alternate, so that a drift in the
        // machine's speed weighs on both alike.
        let (mut bare, mut nulls, mut phases) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let d = crate::unless_interrupted(&bench.runtime, bare_boot_to_exit(arch, elf, &null.machine))
                .ok_or_else(|| anyhow!("interrupted"))??;
            bare.push(ms(d));
            let (t, p) = bench.scenario(&null, arch, elf, 1)?;
            nulls.push(t.median);
            phases.push(p);
        }
        let bare = spread(bare);
        let null_time = spread(nulls);
        let null_phases = median_phases(&phases);
        let row = |what: &str, s: &Spread| print_row(arch, what, s);
        row("bare boot to exit", &bare);
        row("null scenario, time to verdict", &null_time);
        let ratio = null_time.median / bare.median;
        print_note(arch, "  null / bare (medians)", &format!("{ratio:>9.2}x"));
        print_note(arch, "  null phases (medians)", &describe_phases(&null_phases));
        let mut representative = BTreeMap::new();
        for file in REPRESENTATIVE {
            let s = Scenario::load(&root.join(file)).map_err(|e| anyhow!("{e}"))?;
            let (t, phases) = bench.scenario(&s, arch, elf, runs)?;
            row(&s.name, &t);
            representative.insert(s.name.clone(), json!({ "time_to_verdict_ms": t, "phases_median_ms": phases }));
        }
        let r = crate::unless_interrupted(&bench.runtime, run_scenario(&scale, arch, elf, &bench.config))
            .ok_or_else(|| anyhow!("interrupted"))?;
        let ptes = r.metrics.get("vmemmap_ptes").and_then(Value::as_u64).unwrap_or(0);
        let verify_ms = r.metrics.get("verify_static_ms").and_then(Value::as_u64).unwrap_or(0).max(1);
        let per_second = ptes as f64 * 1000.0 / verify_ms as f64;
        println!(
            "{:<8} {:<34} {ptes} PTEs in {verify_ms} ms: {:.2} M PTEs/s",
            arch.name(),
            "verification at scale",
            per_second / 1e6
        );
        let (qmp_rate, map_rate) =
            crate::unless_interrupted(&bench.runtime, memory_read_throughput(arch, elf, &null.machine, 64 << 20, 3))
                .ok_or_else(|| anyhow!("interrupted"))??;
        println!(
            "{:<8} {:<34} pmemsave {:.0} MB/s, shared mapping {:.0} MB/s ({:.0}x)",
            arch.name(),
            "reading 64 MiB of guest memory",
            qmp_rate / 1e6,
            map_rate / 1e6,
            map_rate / qmp_rate
        );
        chart.push((arch, bare.median, null_phases));
        report.insert(
            arch.name().to_string(),
            json!({
                "bare_boot_to_exit_ms": bare,
                "null_scenario_ms": null_time,
                "null_over_bare": ratio,
                "null_phases_median_ms": null_phases,
                "representative": representative,
                "scale": { "status": r.status, "vmemmap_ptes": ptes, "verify_ms": verify_ms, "ptes_per_second": per_second },
                "memory_read_bytes_per_second": { "pmemsave": qmp_rate, "shared_mapping": map_rate },
            }),
        );
    }
    let mut suite = BTreeMap::new();
    if args.suite {
        for jobs in [1, 2] {
            let t = Instant::now();
            let status = Command::new(std::env::current_exe()?)
                .args(["run-scenarios", "-j", &jobs.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .context("cannot run the suite")?;
            let secs = t.elapsed().as_secs_f64();
            println!("{:<8} {:<34} {secs:.1} s ({status})", "all", format!("default suite at -j {jobs}"));
            suite.insert(format!("j{jobs}_seconds"), json!(secs));
        }
    }
    if let Some(path) = &args.json {
        write_json(path, &json!({ "machine": machine_json(), "architectures": report, "suite": suite }))?;
    }
    let svg_path = args.svg.clone().unwrap_or_else(|| root.join("target/bench/phases.svg"));
    if let Some(dir) = svg_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&svg_path, svg(&chart)).with_context(|| format!("cannot write {}", svg_path.display()))?;
    println!("chart: {}", svg_path.strip_prefix(root).unwrap_or(&svg_path).display());
    Ok(ExitCode::SUCCESS)
}

/// A stacked bar per architecture: the null scenario's median phases, with
/// the bare boot-to-exit time beneath it for scale.
fn svg(rows: &[(Arch, f64, Phases)]) -> String {
    const COLORS: [(&str, &str); 5] = [
        ("qemu start", "#4e79a7"),
        ("boot", "#f28e2b"),
        ("steps", "#59a14f"),
        ("verify", "#e15759"),
        ("shutdown", "#9c755f"),
    ];
    let longest = rows
        .iter()
        .map(|(_, bare, p)| bare.max((p.qemu_start_ms + p.boot_ms + p.steps_ms + p.verify_ms + p.shutdown_ms) as f64))
        .fold(1.0, f64::max);
    let (left, width, bar) = (90.0, 520.0, 18.0);
    let scale = width / longest;
    let height = 40.0 + rows.len() as f64 * 56.0 + 30.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n",
        left + width + 60.0
    );
    out.push_str("<text x=\"10\" y=\"18\" font-size=\"14\">null scenario: median time per phase (ms); grey: bare boot to exit</text>\n");
    for (i, (arch, bare, p)) in rows.iter().enumerate() {
        let y = 36.0 + i as f64 * 56.0;
        out.push_str(&format!("<text x=\"10\" y=\"{}\">{arch}</text>\n", y + 13.0));
        let parts = [p.qemu_start_ms, p.boot_ms, p.steps_ms, p.verify_ms, p.shutdown_ms];
        let mut x = left;
        for (ms, (name, color)) in parts.iter().zip(COLORS) {
            let w = *ms as f64 * scale;
            out.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{y}\" width=\"{w:.1}\" height=\"{bar}\" fill=\"{color}\"><title>{name}: {ms} ms</title></rect>\n"
            ));
            x += w;
        }
        out.push_str(&format!("<text x=\"{:.1}\" y=\"{}\">{:.0}</text>\n", x + 4.0, y + 13.0, (x - left) / scale));
        let w = bare * scale;
        out.push_str(&format!(
            "<rect x=\"{left}\" y=\"{}\" width=\"{w:.1}\" height=\"10\" fill=\"#bab0ac\"><title>bare boot to exit: {bare:.0} ms</title></rect>\n",
            y + bar + 4.0
        ));
    }
    let legend_y = height - 14.0;
    for (k, (name, color)) in COLORS.iter().enumerate() {
        let x = 10.0 + k as f64 * 110.0;
        out.push_str(&format!(
            "<rect x=\"{x}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{color}\"/><text x=\"{}\" y=\"{legend_y}\">{name}</text>\n",
            legend_y - 9.0,
            x + 14.0
        ));
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_min_median_max() {
        let s = spread(vec![5.0, 1.0, 3.0, 9.0, 7.0]);
        assert_eq!((s.min, s.median, s.max), (1.0, 5.0, 9.0));
    }

    #[test]
    fn the_chart_has_a_bar_per_phase_and_architecture() {
        let p = Phases { qemu_start_ms: 40, boot_ms: 180, steps_ms: 20, verify_ms: 5, shutdown_ms: 3 };
        let text = svg(&[(Arch::X86_64, 200.0, p), (Arch::Ppc64le, 210.0, p)]);
        assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
        assert_eq!(text.matches("<title>boot: 180 ms</title>").count(), 2);
        assert_eq!(text.matches("bare boot to exit: 200 ms").count(), 1);
    }
}
