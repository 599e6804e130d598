//! The step interpreter's state and its dealings with the machine: boot,
//! guest requests, failures turned into verdicts, `verify`, `exit`, and a
//! failed run held for inspection. The steps themselves are in `steps`.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use hvo_abi::manifest::{Manifest, MANIFEST_SIZE};
use hvo_abi::model::Layout;
use hvo_abi::protocol::Command;
use hvo_abi::refusal::Refusal;
use hvo_images::{profile, Arch, Profile};

use super::kernel::KernelState;
use super::{qmp_abort, Abort, Repro, NO_QMP};
use crate::addr::PhysAddr;
use crate::console::ConsoleError;
use crate::fault::{self, FaultError, HarnessFault};
use crate::hotplug::{HotplugError, PluggedDimm};
use crate::image::GuestImage;
use crate::machine::{LaunchError, Machine, QMP_PROBE};
use crate::memory::GuestMemory;
use crate::qemu::describe_exit;
use crate::report::{Check, CheckStatus, Metrics, RefusalRecord, Status};
use crate::scenario::Scenario;
use crate::updates::UpdateChecker;
use crate::verify::live::{self, LiveError};
use crate::verify::probes::ReadProber;
use crate::verify::{self, Requested};

/// What the host keeps track of in the guest, by the scenario's names.
#[derive(Default)]
pub(super) struct Tracked {
    /// Scenario region names -> the guest's region ids.
    pub regions: HashMap<String, u32>,
    /// The layout last asked of each live region, by id (`verify` checks the
    /// guest optimized exactly those it could).
    pub requested: Requested,
    /// Where memory was hot-added, removed ranges too (`verify` knows whose
    /// vmemmap leaf a device range may find).
    pub hot_added_memory: Vec<std::ops::Range<u64>>,
    /// DIMMs plugged so far (they number the next one).
    pub dimms: u32,
    /// Region name -> the DIMM it was hot-added on.
    pub dimm_of: HashMap<String, PluggedDimm>,
    /// Read probes' markers (`tlb-coherent`).
    pub reads: ReadProber,
    /// Where the persistent memory set aside at boot starts, once it is.
    pub pmem_start: Option<PhysAddr>,
    /// The region made of that persistent memory, while it is added.
    pub pmem_region: Option<String>,
}

/// What the run found and measured.
#[derive(Default)]
pub(super) struct Findings {
    pub checks: Vec<Check>,
    pub metrics: Metrics,
    /// The last verify's picture of the vmemmap (regions, shared pages and
    /// each region's leaves), written with a failure's artifacts.
    pub last_vmemmap: Option<String>,
    /// Milliseconds spent in all `verify` steps.
    pub verify_ms: u64,
    /// Every command the guest refused, with its reason.
    pub refusals: Vec<RefusalRecord>,
}

/// What the machine boots, and what the run keeps of it.
pub(super) enum Guest {
    /// The project's firmware, its manifest where the image says.
    Firmware(GuestImage),
    /// A real Linux kernel with the agent.
    Kernel(Box<KernelState>),
}

/// How long the guest may take to boot and to answer a step.
#[derive(Clone, Copy, Debug)]
pub(super) struct Timeouts {
    pub boot: Duration,
    pub step: Duration,
}

pub(super) struct Run<'a> {
    pub scenario: &'a Scenario,
    pub arch: Arch,
    pub profile: &'static Profile,
    start: Instant,
    pub guest: Guest,
    timeouts: Timeouts,
    /// Show the console and QMP as they happen (`xtask repro`).
    echo: bool,
    pub machine: Machine,
    pub tracked: Tracked,
    pub findings: Findings,
    /// The current step must be refused, for this reason.
    pub expect_refusal: Option<Refusal>,
    /// The current step's line (0 during boot-time set-up).
    line: usize,
    /// The firmware's update log, followed from boot (`break-before-make`).
    pub updates: Option<UpdateChecker>,
}

impl<'a> Run<'a> {
    pub fn new(
        scenario: &'a Scenario,
        arch: Arch,
        start: Instant,
        guest: Guest,
        timeouts: Timeouts,
        machine: Machine,
        echo: bool,
    ) -> Run<'a> {
        Run {
            scenario,
            arch,
            profile: profile(arch),
            start,
            guest,
            timeouts,
            echo,
            machine,
            tracked: Tracked::default(),
            findings: Findings::default(),
            expect_refusal: None,
            line: 0,
            updates: None,
        }
    }

    pub fn step_timeout(&self) -> Duration {
        self.timeouts.step
    }

    pub fn elapsed_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub async fn execute(&mut self, inject: Option<HarnessFault>) -> Result<(), Abort> {
        self.boot().await?;
        if let Some(fault) = inject {
            let timeout = self.step_timeout();
            if let Err(e) = fault::inject(fault, &mut self.machine, timeout).await {
                return Err(match e {
                    FaultError::Console(e) => self.console_abort(e).await,
                    FaultError::Qmp(e) => qmp_abort(e),
                });
            }
        }
        let steps_start = Instant::now();
        if let Guest::Kernel(_) = self.guest {
            for placed in &self.scenario.steps {
                self.kernel_step(&placed.step)
                    .await
                    .map_err(|abort| abort.context(&format!("step {} (line {})", placed.step.name(), placed.line)))?;
            }
            self.findings.metrics.steps_ms = Some(steps_start.elapsed().as_millis() as u64);
            return Ok(());
        }
        for placed in &self.scenario.steps {
            self.expect_refusal = placed.expect_refusal;
            self.line = placed.line;
            (if placed.sweep_failures { self.sweep(&placed.step).await } else { self.step(&placed.step).await })
                .map_err(|abort| abort.context(&format!("step {} (line {})", placed.step.name(), placed.line)))?;
        }
        self.findings.metrics.steps_ms = Some(steps_start.elapsed().as_millis() as u64);
        Ok(())
    }

    /// Launches the machine and waits for the guest's `ready`, then does the
    /// scenario's boot-time set-up.
    async fn boot(&mut self) -> Result<(), Abort> {
        let boot_timeout = self.timeouts.boot;
        self.machine.launch(boot_timeout, self.step_timeout(), self.echo).await.map_err(|e| match e {
            LaunchError::Start(m) => Abort::Infra(m),
            LaunchError::Qmp(e) => qmp_abort(e),
        })?;
        self.findings.metrics.qemu_start_ms = Some(self.elapsed_ms());

        let Some(console) = self.machine.console() else {
            return Err(Abort::Infra("no console".into()));
        };
        match console.wait_ready(boot_timeout).await {
            Ok(arch) if arch == self.arch.name() => {
                self.findings.checks.push(Check::pass("guest-ready", format!("{arch} guest ready")));
            }
            Ok(other) => {
                let expected = self.arch;
                self.findings
                    .checks
                    .push(Check::fail("guest-ready", format!("guest says it is {other}, expected {expected}")));
                return Err(Abort::Fail(format!("wrong guest image: it says it is {other}")));
            }
            Err(e) => {
                self.findings.checks.push(Check::fail("guest-ready", e.to_string()));
                return Err(self.console_abort(e).await);
            }
        }
        self.findings.metrics.ready_ms = Some(self.elapsed_ms());
        self.machine.map_boot_ram(self.machine.spec().boot_memory).map_err(Abort::Infra)?;
        self.start_update_log()?;
        match self.guest {
            Guest::Firmware(_) => self.boot_setup().await?,
            Guest::Kernel(_) => self.kernel_boot_setup().await?,
        }
        self.findings.metrics.boot_ms = Some(self.elapsed_ms());
        Ok(())
    }

    /// Turns a console failure into a verdict, telling a guest crash or hang
    /// from QEMU being killed or dying.
    pub async fn console_abort(&mut self, error: ConsoleError) -> Abort {
        match error {
            ConsoleError::Crash(msg) => {
                // Give the guest a moment to print its registers and exit.
                self.machine.wait_exit(Duration::from_secs(1)).await;
                Abort::GuestCrash(format!("guest crashed: {msg}"))
            }
            ConsoleError::Closed => {
                let status = self.machine.wait_exit(Duration::from_secs(1)).await;
                let stderr = self.machine.stderr().await;
                match status.and_then(|s| s.code()) {
                    Some(code) if self.profile.exit.guest_status(code).matches(1) => {
                        Abort::Fail(format!("the guest exited unasked ({})", describe_exit(status)))
                    }
                    _ => Abort::QemuCrash(format!("QEMU died ({}){}", describe_exit(status), stderr_note(&stderr))),
                }
            }
            ConsoleError::Timeout { .. } => {
                // A silent console is the guest's hang, unless QEMU itself no
                // longer answers (the device_add hang of QEMU 7.2).
                let qemu_answers = match self.machine.qmp() {
                    Some(qmp) => qmp.execute_within(qapi::qmp::query_status {}, QMP_PROBE).await.is_ok(),
                    None => true,
                };
                if qemu_answers {
                    Abort::Timeout(format!("the guest hung: {error}"))
                } else {
                    Abort::Timeout(format!("QEMU hung: neither the console nor QMP answers ({error})"))
                }
            }
            other => Abort::Fail(other.to_string()),
        }
    }

    pub async fn live_abort(&mut self, error: LiveError) -> Abort {
        match error {
            LiveError::NoQmp => Abort::Infra(NO_QMP.into()),
            LiveError::Qmp(e) => qmp_abort(e),
            LiveError::Console(e) => self.console_abort(e).await,
        }
    }

    /// Keeps a failed run's QEMU paused for a person to inspect, until they
    /// press Enter (or end standard input, or Ctrl-C).
    pub async fn hold(&mut self, repro: &Repro, status: Status, message: Option<&str>, elf: &Path) {
        if !self.machine.is_running() {
            eprintln!("{}: {} (QEMU has exited: nothing to inspect)", status.label(), message.unwrap_or(""));
            return;
        }
        if let Some(qmp) = self.machine.qmp() {
            let _ = qmp.execute(qapi::qmp::stop {}).await;
        }
        eprintln!("\n{}: {}", status.label(), message.unwrap_or(""));
        eprintln!("QEMU is paused for inspection. Its QMP monitor:");
        eprintln!("    socat - UNIX-CONNECT:{}", self.machine.paths().inspect_socket().display());
        if let Some(port) = repro.gdb_port {
            eprintln!("Its gdb stub:");
            eprintln!("    gdb {} -ex 'target remote 127.0.0.1:{port}'", elf.display());
        }
        eprintln!("Press Enter to stop QEMU and clean up.");
        let mut line = String::new();
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
        tokio::select! {
            _ = tokio::io::AsyncBufReadExt::read_line(&mut stdin, &mut line) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }

    pub async fn request(&mut self, command: Command<'_>) -> Result<String, Abort> {
        let verb = command.verb();
        let expected = self
            .expect_refusal
            .filter(|_| matches!(verb, "hugetlb-alloc" | "optimize" | "restore" | "hot-add" | "hot-add-memory"));
        let answer = self.send(command).await?;
        match (answer, expected) {
            (Ok(_), Some(reason)) => {
                Err(Abort::Fail(format!("`{verb}` was expected to be refused ({reason}), but it succeeded")))
            }
            (Ok(payload), None) => Ok(payload),
            // The refusal expected: the guest must have rolled back, which `verify` checks.
            (Err(refused), Some(reason)) if refused.reason == Some(reason) => {
                self.note_refusal(verb, &refused, true);
                Ok(String::new())
            }
            (Err(refused), expected) => {
                self.note_refusal(verb, &refused, false);
                let wanted = expected.map_or(String::new(), |r| format!(", not {r} as expected"));
                Err(Abort::Fail(format!("the guest refused `{}`: {}{wanted}", refused.command, refused.says())))
            }
        }
    }

    /// A request with an allocation set to fail (a sweep): `None` when the
    /// guest refused it on that failure; refused for any other reason, the
    /// run fails naming it.
    pub async fn try_request(&mut self, command: Command<'_>) -> Result<Option<String>, Abort> {
        let verb = command.verb();
        match self.send(command).await? {
            Ok(payload) => Ok(Some(payload)),
            Err(refused) => {
                let injected = refused.reason == Some(Refusal::InjectedFailure);
                self.note_refusal(verb, &refused, injected);
                if injected {
                    Ok(None)
                } else {
                    Err(Abort::Fail(format!(
                        "the guest refused `{}`: {}, not the injected allocation failure",
                        refused.command,
                        refused.says()
                    )))
                }
            }
        }
    }

    /// Sends a command and replays the update log; the guest's answer, or
    /// its refusal with the reason it gave.
    async fn send(&mut self, command: Command<'_>) -> Result<Result<String, Refused>, Abort> {
        let timeout = self.step_timeout();
        let Some(console) = self.machine.console() else { return Err(Abort::Infra("no console".into())) };
        let answer = console.request(command, timeout).await;
        self.replay_updates();
        match answer {
            Ok(payload) => Ok(Ok(payload)),
            Err(ConsoleError::Refused { command, message }) => {
                let (reason, detail) = match Refusal::parse(&message) {
                    Some((reason, detail)) => (Some(reason), detail.to_string()),
                    None => (None, message),
                };
                Ok(Err(Refused { command, reason, detail }))
            }
            Err(e) => Err(self.console_abort(e).await),
        }
    }

    /// Writes a refusal into the run's record (the JSON result's `refusals`).
    fn note_refusal(&mut self, verb: &str, refused: &Refused, expected: bool) {
        self.findings.refusals.push(RefusalRecord {
            line: self.line,
            command: verb.to_string(),
            reason: refused.reason.map_or("unknown", Refusal::name).to_string(),
            detail: refused.detail.clone(),
            expected,
        });
    }

    /// The manifest as the guest last published it (it republishes after every change).
    pub(super) fn read_manifest(&self) -> Result<Manifest, Abort> {
        let mut bytes = vec![0u8; MANIFEST_SIZE];
        self.machine
            .memory()
            .read(self.firmware_image()?.manifest, &mut bytes)
            .map_err(|e| Abort::Infra(format!("reading the manifest: {e}")))?;
        Manifest::decode(&bytes).map_err(|e| Abort::Fail(format!("the manifest is unreadable: {e}")))
    }

    /// Every invariant: from the page tables, then on the live guest (write
    /// probes and QEMU's own translation).
    pub async fn verify(&mut self) -> Result<(), Abort> {
        let started = Instant::now();
        let manifest = self.read_manifest()?;
        // Seconds of CPU at scale: off the async workers, so the console and
        // QMP tasks of runs in parallel keep being served meanwhile.
        let (arch, memory, requested) = (self.arch, self.machine.memory(), &self.tracked.requested);
        let hot_added = &self.tracked.hot_added_memory;
        let (checks, map, costs) = tokio::task::block_in_place(|| {
            verify::check(arch, &manifest, memory, requested, hot_added).map(|(checks, map)| {
                let costs = verify::region_costs(&manifest, &map);
                (checks, map, costs)
            })
        })
        .map_err(|e| Abort::Fail(format!("the page tables cannot be walked: {e}")))?;
        let metrics = &mut self.findings.metrics;
        metrics.verify_static_ms = Some(started.elapsed().as_millis() as u64);
        metrics.vmemmap_ptes = Some(map.ptes());
        metrics.regions = Some(costs);
        if checks.iter().any(|c| c.status == CheckStatus::Fail) {
            self.findings.last_vmemmap = Some(verify::dump(&manifest, &map));
        }
        self.findings.checks.extend(checks);
        self.update_check();
        let timeout = self.step_timeout();
        let Some(console) = self.machine.console() else { return Err(Abort::Infra("no console".into())) };
        let write_faults = live::write_faults(console, timeout, &manifest, &map).await;
        let translations = match write_faults {
            Ok(check) => {
                self.findings.checks.push(check);
                live::vmemmap_translations(&self.machine, &manifest, &map).await
            }
            Err(e) => Err(e),
        };
        match translations {
            Ok(check) => self.findings.checks.push(check),
            Err(e) => return Err(self.live_abort(e).await),
        }
        let vas = self.all_probe_samples()?;
        if let Some(probed) = self.probe_reads(&vas, "at verify").await? {
            let name = crate::invariant::Invariant::TlbCoherent.name();
            self.findings.checks.push(Check::pass(name, format!("{probed} read probes saw what the tables map")));
        }
        let took = started.elapsed().as_millis() as u64;
        self.findings.metrics.verify_ms = Some(took);
        self.findings.verify_ms += took;
        Ok(())
    }

    /// The manifest, read two ways, and the translations it promises.
    pub async fn verify_manifest(&mut self) -> Result<(), Abort> {
        let expected = live::Expected {
            arch: self.arch,
            profile: self.profile,
            boot_memory: self.scenario.machine.boot_memory,
            at: self.firmware_image()?.manifest,
        };
        match live::manifest_checks(&self.machine, expected).await {
            Ok(checks) => {
                self.findings.checks.extend(checks);
                Ok(())
            }
            Err(e) => Err(self.live_abort(e).await),
        }
    }

    /// The firmware image; a kernel has none (its scenarios never get here:
    /// [`Scenario::firmware_only_because`] keeps them out).
    fn firmware_image(&self) -> Result<&GuestImage, Abort> {
        match &self.guest {
            Guest::Firmware(image) => Ok(image),
            Guest::Kernel(_) => Err(Abort::Infra("a real kernel has no firmware manifest".into())),
        }
    }

    /// Asks the guest to exit with `status`; QEMU's exit code must say so.
    pub async fn exit(&mut self, status: u8) -> Result<(), Abort> {
        self.request(Command::Exit { status }).await?;
        if self.machine.qemu().is_none() {
            return Err(Abort::Infra("no QEMU".into()));
        }
        let exit = self.machine.wait_exit(self.step_timeout()).await;
        let seen = exit.and_then(|s| s.code()).map(|c| self.profile.exit.guest_status(c));
        self.findings.checks.push(match seen {
            Some(g) if g.matches(status) => Check::pass(
                "exit-status",
                format!("QEMU exited with {} for guest status {status}", describe_exit(exit)),
            ),
            _ => Check::fail(
                "exit-status",
                format!("guest asked to exit with {status}, QEMU ended with {}", describe_exit(exit)),
            ),
        });
        Ok(())
    }

    pub fn hotplug_abort(error: HotplugError) -> Abort {
        match error {
            HotplugError::NoQmp => Abort::Infra(NO_QMP.into()),
            HotplugError::Qmp(e) => qmp_abort(e),
            e @ HotplugError::NotDeleted { .. } => Abort::Fail(e.to_string()),
            HotplugError::Host(m) => Abort::Infra(m),
        }
    }

    /// The page order of `bytes` on this architecture.
    pub fn order(&self, bytes: u64) -> u32 {
        crate::scenario::order_of(bytes, self.profile.page_shift)
    }

    /// The layout a step that the guest did not refuse asked of a region.
    pub fn record_request(&mut self, id: u32, layout: Layout) {
        if self.expect_refusal.is_none() {
            self.tracked.requested.insert(id, layout);
        }
    }
}

fn stderr_note(stderr: &str) -> String {
    let s = stderr.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!(": {}", s.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | "))
    }
}

/// A command the guest refused.
pub(super) struct Refused {
    /// The line sent.
    command: String,
    /// The reason it gave; `None` when it gave none the host knows.
    reason: Option<Refusal>,
    /// What it said besides.
    detail: String,
}

impl Refused {
    /// The reason and the detail, as a failure message says them.
    fn says(&self) -> String {
        match self.reason {
            Some(reason) => format!("{reason} ({})", self.detail),
            None => format!("no reason given ({})", self.detail),
        }
    }
}
