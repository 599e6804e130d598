//! End to end: real QEMU, real guests. These build the guest images and need
//! QEMU installed (`cargo xtask setup`).

use std::path::{Path, PathBuf};

use hvo_harness::report::{CheckStatus, ScenarioResult, Status};
use hvo_harness::runner::{run_scenario, HarnessFault, RunConfig};
use hvo_harness::scenario::Scenario;
use hvo_images::{build_guest, workspace_root, Arch};

fn boot_scenario() -> Scenario {
    Scenario::load(&workspace_root().join("scenarios/boot.toml")).expect("scenarios/boot.toml parses")
}

async fn run(arch: Arch, scenario: &Scenario, inject: Option<HarnessFault>) -> (ScenarioResult, tempfile::TempDir) {
    let elf = build_guest(arch).expect("guest builds");
    let artifacts = tempfile::tempdir().unwrap();
    let config =
        RunConfig { artifacts_root: artifacts.path().to_path_buf(), keep_artifacts: false, inject, repro: None };
    (run_scenario(scenario, arch, &elf, &config).await, artifacts)
}

/// The private run directory named in the QEMU command line.
fn run_dir(result: &ScenarioResult) -> PathBuf {
    let at = result.qemu_command.find("path=").expect("command names a socket path") + 5;
    let socket: String = result.qemu_command[at..].chars().take_while(|c| !c.is_whitespace() && *c != ',').collect();
    Path::new(&socket).parent().unwrap().to_path_buf()
}

/// No process still runs with the run's directory on its command line, and the
/// directory itself is gone.
fn assert_nothing_left(result: &ScenarioResult) {
    let dir = run_dir(result);
    assert!(!dir.exists(), "{} was left behind", dir.display());
    let needle = dir.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(!cmdline.contains(&needle), "process {:?} still runs: {cmdline}", entry.file_name());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn boot_scenario_passes_on_every_architecture() {
    let scenario = boot_scenario();
    for arch in Arch::ALL {
        let (r, _artifacts) = run(arch, &scenario, None).await;
        assert_eq!(r.status, Status::Pass, "{arch}: {:?}\n{:#?}", r.message, r);
        for name in ["guest-ready", "ping", "manifest", "translation-agrees", "exit-status"] {
            let check = r.checks.iter().find(|c| c.name == name);
            assert!(
                check.is_some_and(|c| c.status == CheckStatus::Pass),
                "{arch}: {name} missing or failed: {:?}",
                r.checks
            );
        }
        // The boot is timed: ready, then boot set-up done. Its phase after
        // QEMU's start can round to 0 ms now that a boot without vmemmap
        // takes under a millisecond past `ready`.
        let ms = |name: &str| r.metrics.get(name).and_then(|v| v.as_u64());
        assert!(ms("ready_ms").is_some_and(|ready| ready > 0), "{arch}: {:?}", r.metrics);
        assert!(ms("boot_ms") >= ms("ready_ms"), "{arch}: {:?}", r.metrics);
        assert!(r.phases.qemu_start_ms + r.phases.boot_ms <= r.duration_ms, "{arch}: {:?}", r.phases);
        assert_nothing_left(&r);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_killed_mid_scenario_is_a_qemu_crash_with_console_tail_and_artifacts() {
    let (r, artifacts) = run(Arch::X86_64, &boot_scenario(), Some(HarnessFault::KillQemu)).await;
    assert_eq!(r.status, Status::QemuCrash, "{r:#?}");
    let message = r.message.clone().unwrap_or_default();
    assert!(message.contains("QEMU died") && message.contains("signal 9"), "{message}");
    assert!(r.console_tail.iter().any(|l| l.starts_with("@hvo ready")), "{:?}", r.console_tail);
    let dir = r.artifacts.clone().expect("artifacts written");
    assert!(dir.starts_with(artifacts.path()));
    for file in ["console.log", "qemu-stderr.log", "qemu-command.txt", "qmp-transcript.log", "shutdown.txt"] {
        assert!(dir.join(file).is_file(), "{file} missing");
    }
    let command = std::fs::read_to_string(dir.join("qemu-command.txt")).unwrap();
    assert!(command.starts_with("qemu-system-x86_64 "), "{command}");
    assert_nothing_left(&r);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_that_never_answers_fails_within_the_step_timeout() {
    let mut scenario = boot_scenario();
    scenario.step_timeout_ms = 1000;
    let (r, _artifacts) = run(Arch::Aarch64, &scenario, Some(HarnessFault::FreezeGuest)).await;
    assert_eq!(r.status, Status::Timeout, "{r:#?}");
    let message = r.message.clone().unwrap_or_default();
    assert!(message.contains("the guest hung") && message.contains("step ping (line"), "{message}");
    assert!(!r.console_tail.is_empty());
    assert!(r.artifacts.is_some());
    assert_nothing_left(&r);
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_on_the_console_is_refused_and_the_guest_goes_on() {
    let (r, _artifacts) = run(Arch::Ppc64le, &boot_scenario(), Some(HarnessFault::ConsoleGarbage)).await;
    assert_eq!(r.status, Status::Pass, "{r:#?}");
    assert_nothing_left(&r);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_qemu_is_a_timeout_that_names_qemu_and_is_still_killed() {
    let mut scenario = boot_scenario();
    scenario.step_timeout_ms = 1000;
    let (r, _artifacts) = run(Arch::X86_64, &scenario, Some(HarnessFault::HangQemu)).await;
    assert_eq!(r.status, Status::Timeout, "{r:#?}");
    let message = r.message.clone().unwrap_or_default();
    assert!(message.contains("QEMU hung"), "{message}");
    // A stopped QEMU ignores `quit` and SIGTERM: only SIGKILL ends it, and the artifacts say so.
    let dir = r.artifacts.clone().expect("artifacts written");
    let shutdown = std::fs::read_to_string(dir.join("shutdown.txt")).expect("shutdown.txt written");
    assert!(shutdown.contains("needed SIGKILL") && shutdown.contains("signal 9"), "{shutdown}");
    assert_nothing_left(&r);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_panic_is_a_crash_with_its_message() {
    let (r, _artifacts) = run(Arch::Ppc64le, &boot_scenario(), Some(HarnessFault::GuestPanic)).await;
    assert_eq!(r.status, Status::GuestCrash, "{r:#?}");
    let message = r.message.clone().unwrap_or_default();
    assert!(message.contains("the host asked for a panic"), "{message}");
    assert!(r.console_tail.iter().any(|l| l.contains("crash")), "{:?}", r.console_tail);
    assert_nothing_left(&r);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_qmp_connection_is_an_infrastructure_error_not_a_verdict() {
    let (r, _artifacts) = run(Arch::Aarch64, &boot_scenario(), Some(HarnessFault::CloseQmp)).await;
    assert_eq!(r.status, Status::Error, "{r:#?}");
    let message = r.message.clone().unwrap_or_default();
    assert!(message.contains("QMP connection to QEMU is closed"), "{message}");
    assert_nothing_left(&r);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unwritable_artifacts_directory_keeps_the_verdict_and_says_so() {
    let elf = build_guest(Arch::X86_64).expect("guest builds");
    let blocker = tempfile::NamedTempFile::new().unwrap();
    // A file where the artifacts directory should go: nothing can be created under it.
    let config = RunConfig {
        artifacts_root: blocker.path().to_path_buf(),
        keep_artifacts: false,
        inject: Some(HarnessFault::GuestPanic),
        repro: None,
    };
    let r = run_scenario(&boot_scenario(), Arch::X86_64, &elf, &config).await;
    assert_eq!(r.status, Status::GuestCrash, "{r:#?}");
    let message = r.message.clone().unwrap_or_default();
    assert!(message.contains("artifacts could not be written"), "{message}");
    assert!(r.artifacts.is_none());
    assert_nothing_left(&r);
}
