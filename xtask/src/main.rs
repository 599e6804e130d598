//! `cargo xtask`: the hvo-harness command line.

mod apt;
mod bench;
mod fuzz;
mod kernels;
mod run;
mod savings;
mod setup;

use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hvo_images::{profile, workspace_root, Arch};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "hvo-harness: test vmemmap optimization on real MMUs under QEMU")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Which QEMU runs: `distro` (the one on PATH), `backports` (Debian
    /// bookworm-backports', unpacked by `setup --qemu backports`) or a
    /// directory of qemu-system-* binaries. With `setup`: which to fetch.
    #[arg(long, global = true, value_name = "distro|backports|DIR", value_parser = setup::parse_qemu)]
    qemu: Option<setup::QemuChoice>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run scenarios (default: everything under scenarios/) on each architecture.
    RunScenarios(run::RunArgs),
    /// One scenario on one architecture with every console line and QMP
    /// exchange shown; a failing run stays paused for inspection.
    Repro(run::ReproArgs),
    /// Where the time goes: boot, phases, verification and memory-read
    /// throughput per architecture, as a table, JSON and an SVG chart.
    Bench(bench::BenchArgs),
    /// Random scenarios from a seed; a failing one is shrunk to a minimal
    /// scenario file that fails the same way.
    Fuzz(fuzz::FuzzArgs),
    /// The full test: formatting, clippy, unit and QEMU tests, then every scenario.
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// Private vmemmap bytes per compound page under each layout, measured.
    Savings(savings::SavingsArgs),
    /// Install what is missing: the guest targets and QEMU (with `--qemu
    /// backports`, Debian bookworm-backports' QEMU under target/qemu/).
    Setup {
        #[arg(long, value_delimiter = ',', value_parser = run::parse_arch)]
        arch: Option<Vec<Arch>>,
    },
    /// Download (or find cached) a Debian kernel, busybox-static and the
    /// agent's initramfs under target/kernels/, and print their paths.
    FetchKernel(kernels::FetchKernelArgs),
    /// Build the guest image for each architecture and print its path.
    BuildGuest {
        #[arg(value_parser = run::parse_arch)]
        arches: Vec<Arch>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let qemu = cli.qemu.unwrap_or(setup::QemuChoice::Distro);
    // Before any thread starts: choosing a QEMU changes this process's PATH.
    if !matches!(cli.command, Cmd::Setup { .. }) {
        if let Err(e) = qemu.select() {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    }
    let outcome = match cli.command {
        Cmd::RunScenarios(args) => run::run_scenarios(args),
        Cmd::Repro(args) => run::repro(args),
        Cmd::Fuzz(args) => fuzz::fuzz(args),
        Cmd::Bench(args) => bench::bench(args),
        Cmd::Test { no_lint } => test(no_lint),
        Cmd::Savings(args) => savings::savings(args),
        Cmd::FetchKernel(args) => kernels::fetch_kernel(args),
        Cmd::Setup { arch } => setup::setup(&arch.unwrap_or(Arch::ALL.to_vec()), &qemu).map(|()| ExitCode::SUCCESS),
        Cmd::BuildGuest { arches } => build_guests(if arches.is_empty() { &Arch::ALL } else { &arches }).map(|paths| {
            for p in paths {
                println!("{}", p.display());
            }
            ExitCode::SUCCESS
        }),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            // Usage, set-up and infrastructure problems are 2; a failing scenario is 1.
            ExitCode::from(2)
        }
    }
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM. Long commands race their runs
/// against it: a dropped run kills its QEMU and removes its run directory.
pub async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs `work` to its end, or `None` if interrupted first (see `interrupted`).
pub fn unless_interrupted<F: std::future::Future>(runtime: &tokio::runtime::Runtime, work: F) -> Option<F::Output> {
    runtime.block_on(async {
        tokio::select! {
            out = work => Some(out),
            _ = interrupted() => None,
        }
    })
}

/// The exit status of a command stopped by Ctrl-C or SIGTERM.
pub const INTERRUPTED: u8 = 130;

pub fn build_guests(arches: &[Arch]) -> Result<Vec<std::path::PathBuf>> {
    setup::ensure(arches)?;
    arches
        .iter()
        .map(|&a| {
            eprintln!("building the {a} guest ({})", profile(a).rust_target);
            hvo_images::build_guest(a).map_err(Into::into)
        })
        .collect()
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let line = format!("cargo {}", args.join(" "));
    eprintln!("test: {line}");
    let status = Command::new(cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("cannot run {line}"))?;
    if !status.success() {
        bail!("{line} failed ({status})");
    }
    Ok(())
}

fn test(no_lint: bool) -> Result<ExitCode> {
    setup::ensure(&Arch::ALL)?;
    if !no_lint {
        cargo(&["fmt", "--all", "--check"])?;
        cargo(&["fmt", "--manifest-path", "guest/Cargo.toml", "--check"])?;
        cargo(&["clippy", "--workspace", "--all-targets", "--quiet", "--", "-D", "warnings"])?;
        for arch in Arch::ALL {
            let mut clippy = profile(arch).guest_command("clippy");
            clippy.args(["--quiet", "--", "-D", "warnings"]);
            eprintln!("test: clippy for the {arch} guest");
            let status = clippy.status().context("cannot run cargo clippy")?;
            if !status.success() {
                bail!("clippy found problems in the {arch} guest");
            }
        }
        // The firmware library's host tests are code too.
        cargo(&[
            "clippy",
            "--manifest-path",
            "guest/Cargo.toml",
            "--lib",
            "--tests",
            "--quiet",
            "--target-dir",
            "target/guest/host",
            "--",
            "-D",
            "warnings",
        ])?;
    }
    cargo(&["test", "--workspace", "--quiet"])?;
    // The firmware's memory code (its library) on the host: the guest
    // workspace sets no default target, so this builds for the host.
    cargo(&["test", "--manifest-path", "guest/Cargo.toml", "--lib", "--quiet", "--target-dir", "target/guest/host"])?;
    let firmware = run::run_scenarios(run::RunArgs::default())?;
    if firmware != ExitCode::SUCCESS {
        return Ok(firmware);
    }
    // Real kernels (fetched once, cached under target/kernels/): the Linux
    // scenarios on x86_64, where Debian's kernel optimizes; on aarch64, where
    // it cannot, the not-optimized verdict and device DAX booted by UEFI; and
    // the Linux regressions on the last 6.12 before their fix, where they
    // must fail as they state.
    let linux: [(&str, Arch, &[&str]); 3] = [
        ("debian-6.12", Arch::X86_64, &["scenarios/linux"]),
        ("debian-6.12", Arch::Aarch64, &["scenarios/linux/not-optimized.toml", "scenarios/linux/dax-pmem-2m.toml"]),
        ("debian-6.12.100", Arch::X86_64, &["scenarios/linux/regressions"]),
    ];
    for (kernel, arch, scenarios) in linux {
        eprintln!("test: {} on {kernel} for {arch}", scenarios.join(" "));
        let code = run::run_scenarios(run::RunArgs {
            paths: scenarios.iter().map(|s| hvo_images::workspace_root().join(s)).collect(),
            arch: Some(vec![arch]),
            jobs: Some(2),
            kernel: Some(kernel.into()),
            ..run::RunArgs::default()
        })?;
        if code != ExitCode::SUCCESS {
            return Ok(code);
        }
    }
    Ok(ExitCode::SUCCESS)
}
