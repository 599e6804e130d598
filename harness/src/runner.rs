//! Runs one scenario on one architecture: launches a [`Machine`], boots the
//! guest, interprets the steps (`interpreter`, `steps`), shuts down, and
//! writes artifacts when asked or when it failed.
//!
//! Every wait is bounded (boot timeout, step timeout, shutdown grace), every
//! wait races QEMU's death, and the machine owns the QEMU process and the
//! temporary directory, so no path leaves either behind.

mod interpreter;
mod kernel;
mod kernel_devices;
mod kernel_verify;
mod probes;
mod steps;
mod updates;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hvo_images::{profile, Arch};

use crate::image::GuestImage;
use crate::machine::Machine;
use crate::qemu::{BootPayload, MachineSpec};
use crate::qmp::QmpError;
use crate::report::{Check, CheckStatus, ScenarioResult, Status};
use crate::scenario::{Expect, Scenario};
use interpreter::{Guest, Run, Timeouts};

pub use kernel::KernelGuest;

pub use crate::fault::HarnessFault;

/// How runs are set up, shared by every scenario of an invocation.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Artifacts go to `<root>/<arch>/<scenario>/`.
    pub artifacts_root: PathBuf,
    /// Write artifacts for passing runs too.
    pub keep_artifacts: bool,
    /// A fault the harness injects into its own run after boot, to test how
    /// failures are reported. Never set from a scenario file.
    pub inject: Option<HarnessFault>,
    /// Reproducing one run for a person (`xtask repro`): every console line
    /// and QMP exchange on standard error as it happens, and a failing run
    /// held paused for inspection.
    pub repro: Option<Repro>,
}

/// How `xtask repro` runs a scenario.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Repro {
    /// QEMU's gdb stub listens on this loopback port.
    pub gdb_port: Option<u16>,
}

/// Why there is no QMP connection when one is needed.
const NO_QMP: &str = "the QMP connection to QEMU is closed";

/// Lines of console shown with a failure.
const CONSOLE_TAIL: usize = 20;

/// Why a run stopped early; each becomes its own verdict.
enum Abort {
    /// The guest gave a wrong or unexpected answer: the scenario fails.
    Fail(String),
    /// The guest said nothing within a step's time, or the scenario ran past
    /// its deadline.
    Timeout(String),
    /// The guest panicked or took an unexpected exception.
    GuestCrash(String),
    /// QEMU died under the guest.
    QemuCrash(String),
    /// The harness could not run it (QEMU missing or refusing, no files).
    Infra(String),
}

impl Abort {
    /// The same verdict, its message prefixed with where it happened.
    fn context(self, at: &str) -> Abort {
        match self {
            Abort::Fail(m) => Abort::Fail(format!("{at}: {m}")),
            Abort::Timeout(m) => Abort::Timeout(format!("{at}: {m}")),
            Abort::GuestCrash(m) => Abort::GuestCrash(format!("{at}: {m}")),
            Abort::QemuCrash(m) => Abort::QemuCrash(format!("{at}: {m}")),
            Abort::Infra(m) => Abort::Infra(format!("{at}: {m}")),
        }
    }
}

/// A QMP failure as a verdict: QEMU not answering is a timeout, the rest
/// says the harness could not do what it needed.
fn qmp_abort(e: QmpError) -> Abort {
    match e {
        QmpError::Timeout { .. } | QmpError::HandshakeTimeout(_) | QmpError::Unanswered { .. } => {
            Abort::Timeout(format!("QEMU hung: {e}"))
        }
        other => Abort::Infra(other.to_string()),
    }
}

/// Runs `scenario` on `arch` with the guest image at `guest_elf`.
pub async fn run_scenario(scenario: &Scenario, arch: Arch, guest_elf: &Path, config: &RunConfig) -> ScenarioResult {
    let start = Instant::now();
    let result = ScenarioResult::started(&scenario.name, scenario.file.clone(), arch.name());
    let image = match GuestImage::load(guest_elf) {
        Ok(i) => i,
        Err(e) => return errored(result, start, e.to_string()),
    };
    let payload = BootPayload::Firmware(guest_elf.to_path_buf());
    let timeouts = Timeouts {
        boot: Duration::from_millis(scenario.boot_timeout_ms),
        step: Duration::from_millis(scenario.step_timeout_ms),
    };
    let deadline = Duration::from_millis(scenario.deadline_ms);
    let launch =
        Launch { machine: scenario.machine, payload, guest: Guest::Firmware(image), timeouts, deadline, start };
    run(scenario, arch, launch, guest_elf, config, result).await
}

/// Runs `scenario` on `arch` booting the real kernel `kernel` (the shared
/// machine, console, verdicts and artifacts; the kernel's own steps).
pub async fn run_kernel_scenario(
    scenario: &Scenario,
    arch: Arch,
    kernel: &KernelGuest,
    config: &RunConfig,
) -> ScenarioResult {
    let start = Instant::now();
    let mut result = ScenarioResult::started(&scenario.name, scenario.file.clone(), arch.name());
    if let Some(why) = scenario.firmware_only_because() {
        result.status = Status::Skip;
        result.message = Some(format!("firmware-only: {why}"));
        return result;
    }
    if let Some(why) = kernel::unsupported_because(scenario, arch, kernel) {
        result.status = Status::Skip;
        result.message = Some(format!("not on {arch}'s kernels: {why}"));
        return result;
    }
    let (launch, kernel_summary) = kernel::launch(scenario, arch, kernel, start);
    result.kernel = Some(kernel_summary);
    run(scenario, arch, launch, &kernel.image, config, result).await
}

/// What one run boots and how long it may take.
struct Launch {
    /// The machine QEMU runs (a kernel may need it other than the file says).
    machine: MachineSpec,
    payload: BootPayload,
    guest: Guest,
    timeouts: Timeouts,
    deadline: Duration,
    start: Instant,
}

/// Launches, interprets, judges and cleans up one run of either guest.
async fn run(
    scenario: &Scenario,
    arch: Arch,
    launch: Launch,
    booted: &Path,
    config: &RunConfig,
    mut result: ScenarioResult,
) -> ScenarioResult {
    let Launch { machine, payload, guest, timeouts, deadline, start } = launch;
    let p = profile(arch);
    let mut machine = match Machine::new(p, &machine, &payload, start) {
        Ok(m) => m,
        Err(e) => return errored(result, start, format!("cannot create a temporary directory: {e}")),
    };
    if let Some(repro) = &config.repro {
        machine = machine.with_inspection(repro.gdb_port);
        eprintln!("qemu: {}", machine.command().shell_line());
    }
    let mut run = Run::new(scenario, arch, start, guest, timeouts, machine, config.repro.is_some());

    let outcome = match tokio::time::timeout(deadline, run.execute(config.inject)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(Abort::Timeout(format!("the scenario ran past its deadline of {deadline:?}"))),
    };
    let (expect, note) = expectation(scenario, &run.guest);
    let (status, mut message) = judge(&expect, &run.findings.checks, outcome);
    if let Some(note) = note {
        message = Some(match message {
            Some(m) => format!("{note}: {m}"),
            None => note,
        });
    }
    if let (Some(repro), true) = (&config.repro, status != Status::Pass) {
        run.hold(repro, status, message.as_deref(), booted).await;
    }
    let shutdown_start = Instant::now();
    run.machine.shutdown().await;
    run.findings.metrics.shutdown_ms = Some(shutdown_start.elapsed().as_millis() as u64);

    result.duration_ms = start.elapsed().as_millis() as u64;
    result.qemu_command = run.machine.command().shell_line();
    result.checks = std::mem::take(&mut run.findings.checks);
    result.refusals = std::mem::take(&mut run.findings.refusals);
    result.phases = run.findings.metrics.phases(run.findings.verify_ms);
    result.metrics = run.findings.metrics.to_json();
    result.qemu_version = run.machine.qemu_version().to_string();
    result.status = status;
    result.message = message;
    if let (Some(summary), Guest::Kernel(state)) = (result.kernel.as_mut(), &run.guest) {
        state.summarize(summary);
    }
    if status != Status::Pass {
        result.console_tail = run.machine.console_log().map(|l| l.tail(CONSOLE_TAIL)).unwrap_or_default();
    }
    if status != Status::Pass || config.keep_artifacts {
        let target = config.artifacts_root.join(arch.name()).join(&scenario.name);
        let vmemmap = run.findings.last_vmemmap.as_deref().map(|dump| ("vmemmap.txt", dump));
        match run.machine.write_artifacts(&target, vmemmap.as_slice()) {
            Ok(()) => result.artifacts = Some(target),
            Err(e) => {
                let note = format!("(artifacts could not be written to {}: {e})", target.display());
                result.message = Some(match result.message.take() {
                    Some(m) => format!("{m} {note}"),
                    None => note,
                });
            }
        }
    }
    result
}

/// What the run must show: the scenario's expectation, or for a Linux bug
/// what it means on the kernel that ran (a fixed kernel must pass), with a
/// note saying which.
fn expectation(scenario: &Scenario, guest: &Guest) -> (Expect, Option<String>) {
    let Some(fixed_in) = &scenario.fixed_in else { return (scenario.expect.clone(), None) };
    let release = match guest {
        Guest::Kernel(state) => state.facts.as_ref().and_then(|f| crate::scenario::LinuxRelease::parse(&f.release)),
        Guest::Firmware(_) => None,
    };
    match release {
        Some(release) => {
            let (expect, note) = fixed_in.expectation(&scenario.expect, release);
            (expect, Some(note))
        }
        None => (scenario.expect.clone(), None),
    }
}

fn errored(mut result: ScenarioResult, start: Instant, message: String) -> ScenarioResult {
    result.status = Status::Error;
    result.message = Some(message);
    result.duration_ms = start.elapsed().as_millis() as u64;
    result
}

/// The scenario's verdict from its checks, its expectation and how it ended.
fn judge(expect: &Expect, checks: &[Check], outcome: Result<(), Abort>) -> (Status, Option<String>) {
    let failed: Vec<&Check> = checks.iter().filter(|c| c.status == CheckStatus::Fail).collect();
    match outcome {
        Err(Abort::Infra(m)) => return (Status::Error, Some(m)),
        Err(Abort::Fail(m)) => return (Status::Fail, Some(m)),
        Err(Abort::Timeout(m)) => return (Status::Timeout, Some(m)),
        Err(Abort::GuestCrash(m)) => return (Status::GuestCrash, Some(m)),
        Err(Abort::QemuCrash(m)) => return (Status::QemuCrash, Some(m)),
        Ok(()) => {}
    }
    let describe =
        |cs: &[&Check]| cs.iter().map(|c| format!("{}: {}", c.name, c.detail)).collect::<Vec<_>>().join("; ");
    match expect {
        Expect::Pass if failed.is_empty() => (Status::Pass, None),
        Expect::Pass => (Status::Fail, Some(describe(&failed))),
        Expect::Fail { invariant, also } => {
            let caught: Vec<&Check> = failed.iter().copied().filter(|c| &c.name == invariant).collect();
            let others: Vec<&Check> =
                failed.iter().copied().filter(|c| &c.name != invariant && !also.contains(&c.name)).collect();
            match (!caught.is_empty(), others.is_empty()) {
                // What fired is the evidence a reproduced bug is there.
                (true, true) => (Status::Pass, Some(format!("failed as expected: {}", describe(&caught)))),
                (false, true) => (Status::Fail, Some(format!("expected `{invariant}` to fail, but it held"))),
                (_, false) => {
                    (Status::Fail, Some(format!("expected only `{invariant}` to fail, but: {}", describe(&others))))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fail_scenario_passes_only_when_its_invariant_alone_fires() {
        let expect = Expect::Fail { invariant: "exit-status".into(), also: vec!["contents".into()] };
        let fired = [Check::pass("ping", ""), Check::fail("exit-status", "x")];
        assert_eq!(judge(&expect, &fired, Ok(())).0, Status::Pass);
        let held = [Check::pass("exit-status", "")];
        assert_eq!(judge(&expect, &held, Ok(())).0, Status::Fail);
        let consequence = [Check::fail("exit-status", ""), Check::fail("contents", "x")];
        assert_eq!(judge(&expect, &consequence, Ok(())).0, Status::Pass, "`also` may fire too");
        let other = [Check::fail("exit-status", ""), Check::fail("manifest", "bad")];
        let (status, message) = judge(&expect, &other, Ok(()));
        assert_eq!(status, Status::Fail);
        assert!(message.unwrap().contains("manifest"));
    }

    #[test]
    fn aborts_decide_over_checks() {
        assert_eq!(judge(&Expect::Pass, &[], Err(Abort::Infra("qemu".into()))).0, Status::Error);
        assert_eq!(judge(&Expect::Pass, &[], Err(Abort::Fail("wrong".into()))).0, Status::Fail);
        assert_eq!(judge(&Expect::Pass, &[], Err(Abort::Timeout("hang".into()))).0, Status::Timeout);
        assert_eq!(judge(&Expect::Pass, &[], Err(Abort::GuestCrash("panic".into()))).0, Status::GuestCrash);
        assert_eq!(judge(&Expect::Pass, &[], Err(Abort::QemuCrash("SIGSEGV".into()))).0, Status::QemuCrash);
        assert_eq!(judge(&Expect::Pass, &[Check::pass("a", "")], Ok(())).0, Status::Pass);
    }
}
