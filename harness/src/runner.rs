//! Runs one scenario on one architecture: starts QEMU, boots the guest, runs
//! the steps, shuts down, and writes artifacts when asked or when it failed.
//!
//! Every wait is bounded (boot timeout, step timeout, shutdown grace), every
//! wait races QEMU's death, and the QEMU process and temporary directory are
//! owned by the run, so no path leaves either behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hvo_abi::manifest::{GuestState, Manifest, RootKind, MANIFEST_SIZE};
use hvo_abi::model::Layout;
use hvo_abi::protocol::Command;
use hvo_images::{profile, Arch, Profile};
use serde_json::json;

use crate::addr::{PhysAddr, VirtAddr};
use crate::console::{Console, ConsoleError};
use crate::image::GuestImage;
use crate::memory::{GuestMemory, MappedMemory};
use crate::pgtable;
use crate::qemu::{self, describe_exit, QemuCommand, QemuProcess, RunPaths};
use crate::qmp::{Qmp, QmpError};
use crate::report::{Check, CheckStatus, Phases, ScenarioResult, Status};
use crate::scenario::{Backend, DaxDevice, Expect, Scenario, Step};
use crate::verify::{self, VmemmapMap};

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

/// Failures the harness can cause on purpose, for its own tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HarnessFault {
    /// SIGKILL QEMU: the run must end as an infrastructure error.
    KillQemu,
    /// Stop the vCPUs over QMP: the guest never answers again.
    FreezeGuest,
    /// Write bytes that are no command: the guest must answer and go on.
    ConsoleGarbage,
    /// SIGSTOP QEMU, as when `device_add` hangs: console and QMP both go
    /// silent, and the run must end as a timeout naming QEMU.
    HangQemu,
    /// Ask the guest to panic: the run must end as a guest crash.
    GuestPanic,
    /// Close the QMP connection: every later QMP use is an infrastructure error.
    CloseQmp,
}

/// A QMP failure as a verdict: QEMU not answering is a timeout, the rest
/// says the harness could not do what it needed.
fn qmp_abort(e: QmpError) -> Abort {
    match e {
        QmpError::Timeout { .. } | QmpError::HandshakeTimeout(_) => Abort::Timeout(format!("QEMU hung: {e}")),
        other => Abort::Infra(other.to_string()),
    }
}

/// Why there is no QMP connection when one is needed.
const NO_QMP: &str = "the QMP connection to QEMU is closed";
/// How long a silent QEMU gets to answer QMP before it counts as hung.
const QMP_PROBE: Duration = Duration::from_millis(500);

/// Lines of console shown with a failure.
const CONSOLE_TAIL: usize = 20;
/// How long QEMU gets to exit after the guest asked for it, and after SIGTERM.
const EXIT_GRACE: Duration = Duration::from_secs(2);
const KILL_GRACE: Duration = Duration::from_millis(500);

/// A DIMM plugged into the guest.
#[derive(Clone, Copy)]
struct PluggedDimm {
    /// Its number: it names the DIMM, its backend and the backing file.
    n: u32,
    /// The memory slot the platform put it in (the guest ejects by slot).
    slot: u32,
    start: PhysAddr,
    /// Whether the host maps it (file-backed).
    mapped: bool,
}

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

struct Run<'a> {
    scenario: &'a Scenario,
    arch: Arch,
    profile: &'static Profile,
    start: Instant,
    paths: RunPaths,
    command: QemuCommand,
    image: GuestImage,
    qemu: Option<QemuProcess>,
    qmp: Option<Qmp>,
    console: Option<Console>,
    memory: MappedMemory,
    checks: Vec<Check>,
    metrics: serde_json::Map<String, serde_json::Value>,
    guest_exited: bool,
    /// Scenario region names -> the guest's region ids.
    regions: HashMap<String, u32>,
    /// The layout last asked of each live region, by id (`verify` checks the
    /// guest optimized exactly those it could).
    requested: verify::Requested,
    /// DIMMs plugged so far (they name their memory backends).
    dimms: u32,
    /// Region name -> the DIMM it was hot-added on.
    dimm_of: HashMap<String, PluggedDimm>,
    /// Where the persistent memory set aside at boot starts, once it is.
    pmem_start: Option<PhysAddr>,
    /// The region made of that persistent memory, while it is added.
    pmem_region: Option<String>,
    /// The current step must be refused (an allocation was set to fail).
    expect_refusal: bool,
    /// The QMP transcript, kept apart from the connection so that it
    /// outlives it.
    transcript: Option<crate::qmp::Transcript>,
    qemu_version: String,
    /// The last verify's picture of the vmemmap (regions, shared pages and
    /// each region's leaves), written with a failure's artifacts.
    last_vmemmap: Option<String>,
    /// Milliseconds spent in `verify` steps.
    verify_ms: u64,
    /// Show the console and QMP as they happen (`xtask repro`).
    repro: bool,
}

/// Runs `scenario` on `arch` with the guest image at `guest_elf`.
pub async fn run_scenario(scenario: &Scenario, arch: Arch, guest_elf: &Path, config: &RunConfig) -> ScenarioResult {
    let start = Instant::now();
    let mut result = ScenarioResult::skipped(&scenario.name, scenario.file.clone(), arch.name(), "");
    result.message = None;

    let dir = match private_dir() {
        Ok(d) => d,
        Err(e) => return errored(result, start, format!("cannot create a temporary directory: {e}")),
    };
    let image = match GuestImage::load(guest_elf) {
        Ok(i) => i,
        Err(e) => return errored(result, start, e.to_string()),
    };
    let paths = RunPaths { dir: dir.path().to_path_buf() };
    let p = profile(arch);
    let mut command = QemuCommand::new(p, &scenario.machine, guest_elf, &paths);
    if let Some(repro) = &config.repro {
        command = command.with_inspection(&paths, repro.gdb_port);
        eprintln!("qemu: {}", command.shell_line());
    }
    let mut run = Run {
        scenario,
        arch,
        profile: p,
        start,
        paths,
        command,
        image,
        qemu: None,
        qmp: None,
        console: None,
        memory: MappedMemory::new(),
        checks: Vec::new(),
        metrics: Default::default(),
        guest_exited: false,
        regions: HashMap::new(),
        requested: verify::Requested::new(),
        expect_refusal: false,
        dimms: 0,
        dimm_of: HashMap::new(),
        pmem_start: None,
        pmem_region: None,
        transcript: None,
        qemu_version: String::new(),
        last_vmemmap: None,
        verify_ms: 0,
        repro: config.repro.is_some(),
    };

    let deadline = Duration::from_millis(scenario.deadline_ms);
    let outcome = match tokio::time::timeout(deadline, run.execute(config.inject)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(Abort::Timeout(format!("the scenario ran past its deadline of {deadline:?}"))),
    };
    let (status, message) = judge(&scenario.expect, &run.checks, outcome);
    if let (Some(repro), true) = (&config.repro, status != Status::Pass) {
        run.hold(repro, status, message.as_deref(), guest_elf).await;
    }
    let shutdown_start = Instant::now();
    run.shutdown().await;
    run.metrics.insert("shutdown_ms".into(), json!(shutdown_start.elapsed().as_millis() as u64));

    result.duration_ms = start.elapsed().as_millis() as u64;
    result.qemu_command = run.command.shell_line();
    result.checks = std::mem::take(&mut run.checks);
    let metric = |name: &str| run.metrics.get(name).and_then(|v| v.as_u64()).unwrap_or(0);
    let (qemu_start, ready, steps) = (metric("qemu_start_ms"), metric("boot_ms"), metric("steps_ms"));
    result.phases = Phases {
        qemu_start_ms: qemu_start,
        boot_ms: ready.saturating_sub(qemu_start),
        steps_ms: steps.saturating_sub(run.verify_ms),
        verify_ms: run.verify_ms,
        shutdown_ms: metric("shutdown_ms"),
    };
    result.metrics = std::mem::take(&mut run.metrics);
    result.qemu_version = std::mem::take(&mut run.qemu_version);
    result.status = status;
    result.message = message;
    if status != Status::Pass {
        result.console_tail = run.console.as_ref().map(|c| c.log().tail(CONSOLE_TAIL)).unwrap_or_default();
    }
    if status != Status::Pass || config.keep_artifacts {
        let target = config.artifacts_root.join(arch.name()).join(&scenario.name);
        match run.write_artifacts(&target) {
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
    drop(run);
    drop(dir);
    result
}

fn errored(mut result: ScenarioResult, start: Instant, message: String) -> ScenarioResult {
    result.status = Status::Error;
    result.message = Some(message);
    result.duration_ms = start.elapsed().as_millis() as u64;
    result
}

/// A private directory for sockets and the RAM backing file: on tmpfs where
/// there is one, so guest RAM never touches a disk.
fn private_dir() -> std::io::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let builder = {
        let mut b = tempfile::Builder::new();
        b.prefix("hvo-");
        b
    };
    match builder.tempdir_in(shm) {
        Ok(d) => Ok(d),
        Err(_) => builder.tempdir(),
    }
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
            let caught = failed.iter().any(|c| &c.name == invariant);
            let others: Vec<&Check> =
                failed.iter().copied().filter(|c| &c.name != invariant && !also.contains(&c.name)).collect();
            match (caught, others.is_empty()) {
                (true, true) => (Status::Pass, None),
                (false, true) => (Status::Fail, Some(format!("expected `{invariant}` to fail, but it held"))),
                (_, false) => {
                    (Status::Fail, Some(format!("expected only `{invariant}` to fail, but: {}", describe(&others))))
                }
            }
        }
    }
}

impl Run<'_> {
    fn step_timeout(&self) -> Duration {
        Duration::from_millis(self.scenario.step_timeout_ms)
    }

    fn elapsed_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    async fn execute(&mut self, inject: Option<HarnessFault>) -> Result<(), Abort> {
        self.boot().await?;
        if let Some(fault) = inject {
            self.inject(fault).await?;
        }
        let steps_start = Instant::now();
        for placed in &self.scenario.steps {
            self.expect_refusal = placed.expect_failure;
            (if placed.sweep_failures { self.sweep(&placed.step).await } else { self.step(&placed.step).await })
                .map_err(|abort| abort.context(&format!("step {} (line {})", placed.step.name(), placed.line)))?;
        }
        self.metrics.insert("steps_ms".into(), json!(steps_start.elapsed().as_millis() as u64));
        Ok(())
    }

    /// Starts QEMU and waits for the guest's `ready`.
    async fn boot(&mut self) -> Result<(), Abort> {
        let boot_timeout = Duration::from_millis(self.scenario.boot_timeout_ms);
        let (console_stream, qmp_stream) =
            qemu::start(self.profile, &self.command, &self.paths, boot_timeout, &mut self.qemu)
                .await
                .map_err(Abort::Infra)?;
        let console = Console::attach(console_stream, self.start);
        if self.repro {
            console.log().echo();
        }
        self.console = Some(console);
        let qmp = Qmp::handshake(qmp_stream, self.step_timeout(), self.start).await.map_err(qmp_abort)?;
        self.transcript = Some(qmp.transcript().clone());
        if self.repro {
            qmp.transcript().echo();
        }
        if let Ok(v) = qmp.execute(qapi::qmp::query_version {}).await {
            self.qemu_version = format!("{}.{}.{}", v.qemu.major, v.qemu.minor, v.qemu.micro);
        }
        self.qmp = Some(qmp);
        self.metrics.insert("qemu_start_ms".into(), json!(self.elapsed_ms()));

        let Some(console) = self.console.as_mut() else {
            return Err(Abort::Infra("no console".into()));
        };
        match console.wait_ready(boot_timeout).await {
            Ok(arch) if arch == self.arch.name() => {
                self.checks.push(Check::pass("guest-ready", format!("{arch} guest ready")));
            }
            Ok(other) => {
                self.checks
                    .push(Check::fail("guest-ready", format!("guest says it is {other}, expected {}", self.arch)));
                return Err(Abort::Fail(format!("wrong guest image: it says it is {other}")));
            }
            Err(e) => {
                self.checks.push(Check::fail("guest-ready", e.to_string()));
                return Err(self.console_abort(e).await);
            }
        }
        self.metrics.insert("ready_ms".into(), json!(self.elapsed_ms()));
        self.map_boot_ram()?;
        for knob in &self.scenario.bug_knobs {
            self.request(Command::Knob { knob: *knob }).await?;
        }
        if self.scenario.boot_pmem > 0 {
            let reply = self.request(Command::ReservePmem { size: self.scenario.boot_pmem }).await?;
            let start =
                reply_field(&reply, "pmem").ok_or_else(|| Abort::Fail(format!("no pmem start in `{reply}`")))?;
            self.pmem_start = Some(PhysAddr(start));
        }
        for g in &self.scenario.boot_gigantic {
            let order = self.order(g.size);
            let reply = self.request(Command::ReserveGigantic { order, count: g.count, zone: g.zone }).await?;
            let id = reply_field(&reply, "region").ok_or_else(|| Abort::Fail(format!("no region id in `{reply}`")))?;
            self.regions.insert(g.region.clone(), id as u32);
            // Reserved at boot to be populated already optimized.
            self.requested.insert(id as u32, Layout::Unified);
        }
        if self.scenario.needs_vmemmap() {
            let reply = self.request(Command::BootMemmap).await?;
            if let Some(n) = reply_field(&reply, "initialized") {
                self.metrics.insert("struct_pages_initialized".into(), json!(n));
            }
        }
        self.metrics.insert("boot_ms".into(), json!(self.elapsed_ms()));
        Ok(())
    }

    /// Maps the shared boot-RAM file (QEMU created it before starting the guest).
    fn map_boot_ram(&mut self) -> Result<(), Abort> {
        let file = std::fs::File::open(self.paths.boot_ram())
            .map_err(|e| Abort::Infra(format!("cannot open the boot RAM backing file: {e}")))?;
        let mut memory = MappedMemory::new();
        for piece in self.profile.boot_ram_pieces(self.scenario.machine.boot_memory) {
            memory
                .add_at_offset(PhysAddr(piece.gpa), &file, piece.file_offset, piece.len as usize)
                .map_err(|e| Abort::Infra(format!("cannot map boot RAM: {e}")))?;
        }
        self.memory = memory;
        Ok(())
    }

    /// Turns a console failure into a verdict, telling a guest crash or hang
    /// from QEMU being killed or dying.
    async fn console_abort(&mut self, error: ConsoleError) -> Abort {
        match error {
            ConsoleError::Crash(msg) => {
                // Give the guest a moment to print its registers and exit.
                if let Some(q) = self.qemu.as_mut() {
                    q.wait_exit(Duration::from_secs(1)).await;
                }
                Abort::GuestCrash(format!("guest crashed: {msg}"))
            }
            ConsoleError::Closed => {
                let status = match self.qemu.as_mut() {
                    Some(q) => q.wait_exit(Duration::from_secs(1)).await,
                    None => None,
                };
                let stderr = self.qemu.as_ref().map(|q| q.stderr()).unwrap_or_default();
                match status {
                    Some(s)
                        if s.code().is_some() && self.profile.exit.guest_status(s.code().unwrap_or(-1)).matches(1) =>
                    {
                        Abort::Fail(format!("the guest exited unasked ({})", describe_exit(Some(s))))
                    }
                    _ => Abort::QemuCrash(format!("QEMU died ({}){}", describe_exit(status), stderr_note(&stderr))),
                }
            }
            ConsoleError::Timeout { .. } => {
                // A silent console is the guest's hang, unless QEMU itself no
                // longer answers (the device_add hang of QEMU 7.2).
                let qemu_answers = match self.qmp.as_ref() {
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

    /// Keeps a failed run's QEMU paused for a person to inspect, until they
    /// press Enter (or end standard input, or Ctrl-C).
    async fn hold(&mut self, repro: &Repro, status: Status, message: Option<&str>, elf: &Path) {
        if self.qemu.as_mut().is_none_or(|q| q.try_exit().is_some()) {
            eprintln!("{}: {} (QEMU has exited: nothing to inspect)", status.label(), message.unwrap_or(""));
            return;
        }
        if let Some(qmp) = self.qmp.as_ref() {
            let _ = qmp.execute(qapi::qmp::stop {}).await;
        }
        eprintln!("\n{}: {}", status.label(), message.unwrap_or(""));
        eprintln!("QEMU is paused for inspection. Its QMP monitor:");
        eprintln!("    socat - UNIX-CONNECT:{}", self.paths.inspect_socket().display());
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

    async fn inject(&mut self, fault: HarnessFault) -> Result<(), Abort> {
        match fault {
            HarnessFault::KillQemu => {
                if let Some(q) = self.qemu.as_mut() {
                    q.kill_now();
                }
            }
            HarnessFault::FreezeGuest => {
                if let Some(qmp) = self.qmp.as_ref() {
                    qmp.execute(qapi::qmp::stop {}).await.map_err(qmp_abort)?;
                }
            }
            HarnessFault::HangQemu => {
                if let Some(q) = self.qemu.as_ref() {
                    q.freeze();
                }
            }
            HarnessFault::GuestPanic => {
                let timeout = self.step_timeout();
                if let Some(console) = self.console.as_mut() {
                    if let Err(e) = console.request(Command::Panic, timeout).await {
                        return Err(self.console_abort(e).await);
                    }
                }
            }
            HarnessFault::CloseQmp => {
                // Dropping the client closes the socket; the transcript stays.
                self.qmp = None;
            }
            HarnessFault::ConsoleGarbage => {
                if let Some(console) = self.console.as_mut() {
                    let mut garbage: Vec<u8> = (0u8..=255).cycle().take(2000).collect();
                    garbage.extend_from_slice(b"\n\xff\xfe not a command\n99999999999999999999999 ping\n\n");
                    if let Err(e) = console.send_raw(&garbage).await {
                        return Err(self.console_abort(e).await);
                    }
                }
            }
        }
        Ok(())
    }

    async fn request(&mut self, command: Command<'_>) -> Result<String, Abort> {
        let timeout = self.step_timeout();
        let Some(console) = self.console.as_mut() else {
            return Err(Abort::Infra("no console".into()));
        };
        let verb = command.verb();
        let must_refuse = self.expect_refusal
            && matches!(verb, "hugetlb-alloc" | "optimize" | "restore" | "hot-add" | "hot-add-memory");
        match console.request(command, timeout).await {
            Ok(_) if must_refuse => Err(Abort::Fail(format!(
                "`{verb}` was expected to fail on the injected allocation failure, but it succeeded"
            ))),
            // The refusal expected: the guest must have rolled back, which `verify` checks.
            Err(ConsoleError::Refused { .. }) if must_refuse => Ok(String::new()),
            Ok(payload) => Ok(payload),
            Err(e) => Err(self.console_abort(e).await),
        }
    }

    async fn step(&mut self, step: &Step) -> Result<(), Abort> {
        match step {
            Step::Ping => {
                let token = format!("t{}", self.elapsed_ms());
                let reply = self.request(Command::Ping { token: Some(&token) }).await?;
                let expected = format!("pong {token}");
                self.checks.push(if reply == expected {
                    Check::pass("ping", "the guest answered")
                } else {
                    Check::fail("ping", format!("expected `{expected}`, got `{reply}`"))
                });
                Ok(())
            }
            Step::VerifyManifest => self.verify_manifest().await,
            Step::Exit { status } => self.exit(*status).await,
            Step::HugetlbAlloc { region, folio_size, count, zone, from } => {
                let from = from.as_deref().map(|f| self.region_id(f)).transpose()?;
                let order = self.order(*folio_size);
                let reply = self.request(Command::HugetlbAlloc { order, count: *count, zone: *zone, from }).await?;
                self.record_region(region, &reply, Layout::None)
            }
            Step::Optimize { region, layout } => {
                let id = self.region_id(region)?;
                self.request(Command::Optimize { region: id, layout: *layout }).await?;
                self.record_request(id, *layout);
                Ok(())
            }
            Step::Restore { region } => {
                let id = self.region_id(region)?;
                self.request(Command::Restore { region: id }).await?;
                self.record_request(id, Layout::None);
                Ok(())
            }
            Step::HugetlbFree { region: name } => {
                let region = self.region_id(name)?;
                self.request(Command::HugetlbFree { region }).await?;
                if let Some(id) = self.regions.remove(name) {
                    self.requested.remove(&id);
                }
                Ok(())
            }
            Step::Verify => self.verify().await,
            Step::HotAdd { region, size, compound_size, zone, layout, device, altmap, backend } => {
                let start = self.hot_add_range(region, *size, *device, *backend).await?;
                let reply = self
                    .request(Command::HotAdd {
                        start: start.0,
                        size: *size,
                        order: self.order(*compound_size),
                        zone: *zone,
                        layout: *layout,
                        altmap: *altmap,
                    })
                    .await?;
                self.record_region(region, &reply, *layout)
            }
            Step::HotAddMemory { region, size, zone, backend } => {
                let start = self.hot_add_range(region, *size, DaxDevice::Dimm, *backend).await?;
                let reply = self.request(Command::HotAddMemory { start: start.0, size: *size, zone: *zone }).await?;
                self.record_region(region, &reply, Layout::None)
            }
            Step::HotRemove { region: name } => {
                let region = self.region_id(name)?;
                if self.pmem_region.as_deref() == Some(name.as_str()) {
                    // Nothing to unplug: the range is boot memory.
                    self.request(Command::HotRemove { region, slot: None }).await?;
                    self.pmem_region = None;
                } else {
                    let dimm = self
                        .dimm_of
                        .remove(name)
                        .ok_or_else(|| Abort::Fail(format!("region `{name}` was not hot-added")))?;
                    self.request_unplug(dimm.n).await?;
                    self.request(Command::HotRemove { region, slot: Some(dimm.slot) }).await?;
                    self.finish_unplug(dimm).await?;
                }
                if let Some(id) = self.regions.remove(name) {
                    self.requested.remove(&id);
                }
                Ok(())
            }
            Step::FailAllocation { nth } => self.request(Command::FailAlloc { nth: *nth }).await.map(drop),
        }
    }

    /// The memory a hot-add of `region` takes: a DIMM plugged now, or the
    /// persistent memory set aside at boot.
    async fn hot_add_range(
        &mut self,
        region: &str,
        size: u64,
        device: DaxDevice,
        backend: Backend,
    ) -> Result<PhysAddr, Abort> {
        if device == DaxDevice::Pmem {
            self.pmem_region = Some(region.to_string());
            return self.pmem_start.ok_or_else(|| Abort::Infra("no persistent memory was set aside".into()));
        }
        let dimm = self.plug_dimm(size, device == DaxDevice::Nvdimm, backend).await?;
        self.dimm_of.insert(region.to_string(), dimm);
        Ok(dimm.start)
    }

    /// Plugs a DIMM of `size` bytes and returns where it landed; a
    /// file-backed one is mapped by the host too. The vCPUs are stopped
    /// around `device_add`: QEMU 7.2 can wait forever there for an RCU grace
    /// period a spinning vCPU never ends.
    async fn plug_dimm(&mut self, size: u64, nvdimm: bool, backend: Backend) -> Result<PluggedDimm, Abort> {
        let n = self.dimms;
        self.dimms += 1;
        let file = self.paths.dimm_file(n);
        let Some(qmp) = self.qmp.as_ref() else { return Err(Abort::Infra(NO_QMP.into())) };
        let infra = qmp_abort;
        qmp.execute(qapi::qmp::stop {}).await.map_err(infra)?;
        let mut plugged = Ok(());
        let object = match backend {
            Backend::Ram => format!("object_add memory-backend-ram,id=hvo-mem{n},size={size},reserve=off"),
            Backend::File => {
                format!("object_add memory-backend-file,id=hvo-mem{n},size={size},mem-path={},share=on", file.display())
            }
        };
        for command in [
            object,
            format!("device_add {},id=hvo-dimm{n},memdev=hvo-mem{n}", if nvdimm { "nvdimm" } else { "pc-dimm" }),
        ] {
            match qmp.hmp(&command).await {
                Ok(out) if out.trim().is_empty() => {}
                Ok(out) => {
                    plugged = Err(Abort::Infra(format!("`{command}`: {}", out.trim())));
                    break;
                }
                Err(e) => {
                    plugged = Err(infra(e));
                    break;
                }
            }
        }
        qmp.execute(qapi::qmp::cont {}).await.map_err(infra)?;
        plugged?;
        let listing = qmp.hmp("info memory-devices").await.map_err(infra)?;
        let id = format!("hvo-dimm{n}");
        let (start, slot) = match (dimm_field(&listing, &id, "addr"), dimm_field(&listing, &id, "slot")) {
            (Some(addr), Some(slot)) => (PhysAddr(addr), slot as u32),
            _ => {
                return Err(Abort::Infra(format!(
                    "QEMU does not list {id} with its address and slot: {}",
                    listing.trim()
                )))
            }
        };
        let mapped = backend == Backend::File;
        if mapped {
            let opened = std::fs::File::open(&file)
                .map_err(|e| Abort::Infra(format!("cannot open the backing file of {id}: {e}")))?;
            let len = usize::try_from(size).map_err(|_| Abort::Infra(format!("{id} is too large to map")))?;
            self.memory
                .add_at_offset(start, &opened, 0, len)
                .map_err(|e| Abort::Infra(format!("cannot map {id}: {e}")))?;
        }
        Ok(PluggedDimm { n, slot, start, mapped })
    }

    /// Asks the platform to remove DIMM `n` (`device_del`): the guest must
    /// then tear the range down and complete the removal.
    async fn request_unplug(&mut self, n: u32) -> Result<(), Abort> {
        let Some(qmp) = self.qmp.as_ref() else { return Err(Abort::Infra(NO_QMP.into())) };
        let out = qmp.hmp(&format!("device_del hvo-dimm{n}")).await.map_err(qmp_abort)?;
        if !out.trim().is_empty() {
            return Err(Abort::Infra(format!("`device_del hvo-dimm{n}`: {}", out.trim())));
        }
        Ok(())
    }

    /// Waits for QEMU to report the DIMM deleted, then deletes its backend
    /// (and the host's mapping and backing file).
    async fn finish_unplug(&mut self, dimm: PluggedDimm) -> Result<(), Abort> {
        let n = dimm.n;
        let id = format!("hvo-dimm{n}");
        let timeout = self.step_timeout();
        let Some(qmp) = self.qmp.as_ref() else { return Err(Abort::Infra(NO_QMP.into())) };
        let deleted = qmp
            .wait_event(
                |e| matches!(e, qapi::qmp::Event::DEVICE_DELETED { data, .. } if data.device.as_deref() == Some(id.as_str())),
                timeout,
            )
            .await;
        if deleted.is_none() {
            return Err(Abort::Fail(format!(
                "{id} was not deleted within {timeout:?}: the guest did not complete the unplug"
            )));
        }
        let out = qmp.hmp(&format!("object_del hvo-mem{n}")).await.map_err(qmp_abort)?;
        if !out.trim().is_empty() {
            return Err(Abort::Infra(format!("`object_del hvo-mem{n}`: {}", out.trim())));
        }
        if dimm.mapped {
            self.memory.remove(dimm.start);
            std::fs::remove_file(self.paths.dimm_file(n))
                .map_err(|e| Abort::Infra(format!("cannot delete the backing file of {id}: {e}")))?;
        }
        Ok(())
    }

    /// Runs `step` with its 1st, 2nd, ... frame allocation failing. Each
    /// refusal must have rolled back cleanly, which every invariant checks;
    /// the sweep ends when the step succeeds, having made fewer allocations.
    async fn sweep(&mut self, step: &Step) -> Result<(), Abort> {
        const MAX_SWEEP: u64 = 10_000;
        let mut hot_add_start = None;
        if let Step::HotAdd { region, size, device, backend, .. } = step {
            // One range for every attempt: a refused hot-add leaves it unused.
            hot_add_start = Some(self.hot_add_range(region, *size, *device, *backend).await?);
        }
        for nth in 1..=MAX_SWEEP {
            self.request(Command::FailAlloc { nth }).await?;
            let command = match step {
                Step::HugetlbAlloc { folio_size, count, zone, from, .. } => Command::HugetlbAlloc {
                    order: self.order(*folio_size),
                    count: *count,
                    zone: *zone,
                    from: from.as_deref().map(|f| self.region_id(f)).transpose()?,
                },
                Step::Optimize { region, layout } => {
                    Command::Optimize { region: self.region_id(region)?, layout: *layout }
                }
                Step::Restore { region } => Command::Restore { region: self.region_id(region)? },
                Step::HotAdd { size, compound_size, zone, layout, altmap, .. } => Command::HotAdd {
                    start: hot_add_start.map(|s| s.0).unwrap_or(0),
                    size: *size,
                    order: self.order(*compound_size),
                    zone: *zone,
                    layout: *layout,
                    altmap: *altmap,
                },
                other => return Err(Abort::Fail(format!("`{}` makes no allocations to sweep", other.name()))),
            };
            match self.try_request(command).await? {
                None => self.verify().await?,
                Some(reply) => {
                    // This allocation was never reached: disarm it.
                    self.request(Command::FailAlloc { nth: 0 }).await?;
                    match step {
                        Step::HugetlbAlloc { region, .. } => self.record_region(region, &reply, Layout::None)?,
                        Step::HotAdd { region, layout, .. } => self.record_region(region, &reply, *layout)?,
                        Step::Optimize { region, layout } => self.record_request(self.region_id(region)?, *layout),
                        Step::Restore { region } => self.record_request(self.region_id(region)?, Layout::None),
                        _ => {}
                    }
                    let swept = self.metrics.get("allocation_failures_swept").and_then(|v| v.as_u64()).unwrap_or(0);
                    self.metrics.insert("allocation_failures_swept".into(), json!(swept + nth - 1));
                    return Ok(());
                }
            }
        }
        Err(Abort::Fail(format!("`{}` still fails after {MAX_SWEEP} swept allocation failures", step.name())))
    }

    /// A request the guest may refuse: `None` when it did.
    async fn try_request(&mut self, command: Command<'_>) -> Result<Option<String>, Abort> {
        let timeout = self.step_timeout();
        let Some(console) = self.console.as_mut() else { return Err(Abort::Infra("no console".into())) };
        match console.request(command, timeout).await {
            Ok(payload) => Ok(Some(payload)),
            Err(ConsoleError::Refused { .. }) => Ok(None),
            Err(e) => Err(self.console_abort(e).await),
        }
    }

    /// Names the region a step created after the guest's `region=<id>` reply,
    /// with the layout asked of it; a step the guest refused as expected
    /// created none.
    fn record_region(&mut self, name: &str, reply: &str, layout: Layout) -> Result<(), Abort> {
        if self.expect_refusal {
            return Ok(());
        }
        let id = reply_field(reply, "region").ok_or_else(|| Abort::Fail(format!("no region id in `{reply}`")))?;
        self.regions.insert(name.to_string(), id as u32);
        self.requested.insert(id as u32, layout);
        Ok(())
    }

    /// The layout a step that the guest did not refuse asked of a region.
    fn record_request(&mut self, id: u32, layout: Layout) {
        if !self.expect_refusal {
            self.requested.insert(id, layout);
        }
    }

    /// The page order of `bytes` on this architecture.
    fn order(&self, bytes: u64) -> u32 {
        crate::scenario::order_of(bytes, self.profile.page_shift)
    }

    fn region_id(&self, name: &str) -> Result<u32, Abort> {
        self.regions
            .get(name)
            .copied()
            .ok_or_else(|| Abort::Fail(format!("region `{name}` was freed or never allocated")))
    }

    /// The manifest as the guest last published it (it republishes after every change).
    fn read_manifest(&self) -> Result<Manifest, Abort> {
        let mut bytes = vec![0u8; MANIFEST_SIZE];
        self.memory
            .read(self.image.manifest, &mut bytes)
            .map_err(|e| Abort::Infra(format!("reading the manifest: {e}")))?;
        Manifest::decode(&bytes).map_err(|e| Abort::Fail(format!("the manifest is unreadable: {e}")))
    }

    /// Every invariant: from the page tables, then on the live guest (write
    /// probes and QEMU's own translation).
    async fn verify(&mut self) -> Result<(), Abort> {
        let started = Instant::now();
        let manifest = self.read_manifest()?;
        // Seconds of CPU at scale: off the async workers, so the console and
        // QMP tasks of runs in parallel keep being served meanwhile.
        let (arch, memory, requested) = (self.arch, &self.memory, &self.requested);
        let (checks, map, costs) = tokio::task::block_in_place(|| {
            verify::check(arch, &manifest, memory, requested).map(|(checks, map)| {
                let costs = verify::region_costs(&manifest, &map);
                (checks, map, costs)
            })
        })
        .map_err(|e| Abort::Fail(format!("the page tables cannot be walked: {e}")))?;
        self.metrics.insert("verify_static_ms".into(), json!(started.elapsed().as_millis() as u64));
        self.metrics.insert("vmemmap_ptes".into(), json!(map.ptes()));
        self.metrics.insert("regions".into(), json!(costs));
        if checks.iter().any(|c| c.status == CheckStatus::Fail) {
            self.last_vmemmap = Some(verify::dump(&manifest, &map));
        }
        self.checks.extend(checks);
        self.check_write_faults(&manifest).await?;
        self.check_vmemmap_translations(&manifest, &map).await?;
        let took = started.elapsed().as_millis() as u64;
        self.metrics.insert("verify_ms".into(), json!(took));
        self.verify_ms += took;
        Ok(())
    }

    /// What a write to each sampled vmemmap page must do under its layout:
    /// heads are writable, read-only tails must fault (a missing TLB flush
    /// shows here: the tables say read-only, the stale TLB entry lets it through).
    async fn check_write_faults(&mut self, manifest: &Manifest) -> Result<(), Abort> {
        let mut wrong = Vec::new();
        let mut probed = 0;
        for region in manifest.regions.iter().filter(|r| r.kind != hvo_abi::model::RegionKind::Memory) {
            let Some(head) = region.heads().next() else {
                continue;
            };
            let base = manifest.struct_page_va(head);
            let page = manifest.page_size;
            let pages = verify::vmemmap_pages_per_compound(region.order, page).max(1);
            let read_only_tails = region.optimized && matches!(region.layout, Layout::Unified | Layout::LegacyHugetlb);
            // The head page, the first tail page and the last (one page when
            // compound pages are smaller than a vmemmap page's worth).
            let mut samples = vec![(0, false)];
            if pages > 1 {
                samples.extend([(1, read_only_tails), (pages - 1, read_only_tails)]);
                samples.dedup();
            }
            for (i, must_fault) in samples {
                let va = base + i * page + 8;
                let reply = self.request(Command::ProbeWrite { va }).await?;
                probed += 1;
                let faulted = reply == "faulted";
                if faulted != must_fault {
                    wrong.push(format!(
                        "region {} pfn {head:#x} vmemmap[{i}] ({va:#x}): the write {}, it must {}",
                        region.id,
                        if faulted { "faulted" } else { "went through" },
                        if must_fault { "fault" } else { "succeed" }
                    ));
                }
            }
        }
        self.checks.push(if wrong.is_empty() {
            Check::pass(verify::WRITE_FAULTS, format!("{probed} write probes behaved"))
        } else {
            Check::fail(verify::WRITE_FAULTS, wrong.join("; "))
        });
        Ok(())
    }

    /// QEMU's MMU and the host walker agree on sampled vmemmap pages.
    async fn check_vmemmap_translations(&mut self, manifest: &Manifest, map: &VmemmapMap) -> Result<(), Abort> {
        let Some(qmp) = self.qmp.as_ref() else {
            return Err(Abort::Infra(NO_QMP.into()));
        };
        let mut samples = Vec::new();
        for region in manifest.regions.iter().filter(|r| r.kind != hvo_abi::model::RegionKind::Memory) {
            if let Some(head) = region.heads().next() {
                let base = manifest.struct_page_va(head);
                samples.push(base);
                if verify::vmemmap_pages_per_compound(region.order, manifest.page_size) > 1 {
                    samples.push(base + manifest.page_size);
                }
            }
        }
        let mut wrong = Vec::new();
        for va in &samples {
            let by_qemu = qmp.gva2gpa(VirtAddr(*va)).await.map_err(qmp_abort)?;
            // The walker gives the page's frame; QEMU the byte's address.
            let offset = va % manifest.page_size;
            let by_host = map.lookup(*va).map(|(_, frame)| PhysAddr(frame.0 + offset));
            if by_qemu != by_host {
                wrong.push(format!("vmemmap {va:#x}: host walker {}, QEMU {}", show(by_host), show(by_qemu)));
            }
        }
        self.checks.push(if wrong.is_empty() {
            Check::pass(
                verify::TRANSLATION_AGREES,
                format!("host walker and QEMU agree on {} vmemmap pages", samples.len()),
            )
        } else {
            Check::fail(verify::TRANSLATION_AGREES, wrong.join("; "))
        });
        Ok(())
    }

    async fn exit(&mut self, status: u8) -> Result<(), Abort> {
        self.request(Command::Exit { status }).await?;
        self.guest_exited = true;
        let grace = self.step_timeout();
        let Some(qemu) = self.qemu.as_mut() else {
            return Err(Abort::Infra("no QEMU".into()));
        };
        let exit = qemu.wait_exit(grace).await;
        let code = exit.and_then(|s| s.code());
        let seen = code.map(|c| self.profile.exit.guest_status(c));
        self.checks.push(match seen {
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

    async fn verify_manifest(&mut self) -> Result<(), Abort> {
        let Some(qmp) = self.qmp.as_ref() else {
            return Err(Abort::Infra(NO_QMP.into()));
        };
        let at = self.image.manifest;
        let scratch = self.paths.dir.join("pmemsave.bin");
        let through_qmp = qmp.pmemsave(at, MANIFEST_SIZE, &scratch).await.map_err(qmp_abort)?;
        let mut through_map = vec![0u8; MANIFEST_SIZE];
        if let Err(e) = self.memory.read(at, &mut through_map) {
            self.checks.push(Check::fail("manifest", format!("manifest at {at} not in mapped boot RAM: {e}")));
            return Ok(());
        }
        if through_qmp != through_map {
            self.checks.push(Check::fail("manifest", "pmemsave and the shared RAM mapping read different manifests"));
            return Ok(());
        }
        let manifest = match Manifest::decode(&through_qmp) {
            Ok(m) => m,
            Err(e) => {
                self.checks.push(Check::fail("manifest", format!("at {at}: {e}")));
                return Ok(());
            }
        };
        let problems = manifest_problems(&manifest, self.arch, self.profile, self.scenario.machine.boot_memory, at);
        self.checks.push(if problems.is_empty() {
            Check::pass(
                "manifest",
                format!(
                    "{} roots, {} RAM ranges, generation {}",
                    manifest.roots().count(),
                    manifest.ram().count(),
                    manifest.generation
                ),
            )
        } else {
            Check::fail("manifest", problems.join("; "))
        });
        if problems.is_empty() {
            self.check_translations(&manifest).await?;
        }
        Ok(())
    }

    /// The host's own walker and QEMU's MMU must both translate the linear map
    /// and the identity map the way the manifest says the guest built them.
    async fn check_translations(&mut self, manifest: &Manifest) -> Result<(), Abort> {
        let Some(qmp) = self.qmp.as_ref() else {
            return Err(Abort::Infra(NO_QMP.into()));
        };
        let mut samples: Vec<PhysAddr> = vec![self.image.manifest];
        samples.extend(manifest.roots().map(|r| PhysAddr(r.pa)));
        for r in manifest.ram() {
            samples.push(PhysAddr(r.start));
            samples.push(PhysAddr(r.end() - 8));
        }
        let mut wrong = Vec::new();
        let mut compared = 0;
        for pa in &samples {
            for (what, va) in [
                ("linear map", VirtAddr(manifest.linear_map_base.wrapping_add(pa.0))),
                ("identity map", VirtAddr(pa.0)),
            ] {
                let by_qemu = qmp.gva2gpa(va).await.map_err(qmp_abort)?;
                let by_host = pgtable::walker_for(self.arch, &self.memory, manifest, va)
                    .and_then(|w| w.translate(&self.memory, va))
                    .map(|leaf| leaf.map(|l| l.translate(va)));
                match by_host {
                    Err(e) => wrong.push(format!("{what} {va}: host walker: {e}")),
                    Ok(host) if host != Some(*pa) || by_qemu != Some(*pa) => wrong.push(format!(
                        "{what} {va}: expected {pa}, host walker {}, QEMU {}",
                        show(host),
                        show(by_qemu)
                    )),
                    Ok(_) => compared += 1,
                }
            }
        }
        self.checks.push(if wrong.is_empty() {
            Check::pass(verify::TRANSLATION_AGREES, format!("host walker and QEMU's MMU agree on {compared} addresses"))
        } else {
            Check::fail(verify::TRANSLATION_AGREES, wrong.join("; "))
        });
        Ok(())
    }

    /// Ends the VM: asks the guest to exit if it has not, then SIGTERM, then SIGKILL.
    async fn shutdown(&mut self) {
        if !self.guest_exited && self.qemu.as_mut().is_some_and(|q| q.try_exit().is_none()) {
            if let Some(console) = self.console.as_mut() {
                let _ = console.request(Command::Exit { status: 0 }, Duration::from_millis(500)).await;
            }
            if let Some(q) = self.qemu.as_mut() {
                q.wait_exit(EXIT_GRACE).await;
            }
        }
        if let Some(q) = self.qemu.as_mut() {
            q.terminate(KILL_GRACE).await;
        }
    }

    fn write_artifacts(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("qemu-command.txt"), format!("{}\n", self.command.shell_line()))?;
        let console = self.console.as_ref().map(|c| c.log().text()).unwrap_or_default();
        std::fs::write(dir.join("console.log"), console)?;
        let stderr = self.qemu.as_ref().map(|q| q.stderr()).unwrap_or_default();
        std::fs::write(dir.join("qemu-stderr.log"), stderr)?;
        let transcript = self.transcript.as_ref().map(|t| t.text()).unwrap_or_default();
        std::fs::write(dir.join("qmp-transcript.log"), transcript)?;
        if let Some(dump) = &self.last_vmemmap {
            std::fs::write(dir.join("vmemmap.txt"), dump)?;
        }
        Ok(())
    }
}

/// What is wrong with a manifest, judged against the host's own knowledge of
/// the architecture and of the machine it started.
fn manifest_problems(m: &Manifest, arch: Arch, profile: &Profile, boot_memory: u64, at: PhysAddr) -> Vec<String> {
    let mut problems = Vec::new();
    if m.state != GuestState::Ready {
        problems.push(format!("guest state is {:?}, not ready", m.state));
    }
    if m.arch != arch {
        problems.push(format!("architecture {} instead of {arch}", m.arch));
    }
    if m.page_size != profile.page_size() {
        problems.push(format!("page size {:#x}, expected {} KiB", m.page_size, profile.page_size() >> 10));
    }
    if m.linear_map_base != profile.linear_map_base {
        problems.push(format!("linear map at {:#x}, expected {:#x}", m.linear_map_base, profile.linear_map_base));
    }
    if m.vmemmap_base != profile.vmemmap_base {
        problems.push(format!("vmemmap at {:#x}, expected {:#x}", m.vmemmap_base, profile.vmemmap_base));
    }
    let pieces = profile.boot_ram_pieces(boot_memory);
    let in_boot_ram = |pa: u64, len: u64| pieces.iter().any(|p| pa >= p.gpa && pa + len <= p.gpa + p.len);
    match m.root(RootKind::Kernel) {
        Some(root) if !in_boot_ram(root.pa, 4096) => {
            problems.push(format!("kernel root {:#x} is outside boot RAM", root.pa))
        }
        Some(_) => {}
        None => problems.push("no kernel page-table root".into()),
    }
    let mut ram_total = 0;
    for r in m.ram() {
        if !in_boot_ram(r.start, r.size) {
            problems.push(format!("RAM range {:#x}+{:#x} is outside the machine's boot RAM", r.start, r.size));
        }
        ram_total += r.size;
    }
    // Firmware keeps a little low memory for itself (x86's BIOS area below 1 MiB).
    if ram_total > boot_memory || ram_total + (2 << 20) < boot_memory {
        problems.push(format!("guest sees {ram_total:#x} bytes of RAM, the machine has {boot_memory:#x}"));
    }
    if !(at.0 >= m.image.start && at.0 + MANIFEST_SIZE as u64 <= m.image.end()) {
        problems.push(format!("manifest {at} lies outside the image range {:#x}+{:#x}", m.image.start, m.image.size));
    }
    problems
}

/// A field (`addr: 0x...`, `slot: 3`) of DIMM `id` in HMP's `info memory-devices`.
fn dimm_field(listing: &str, id: &str, field: &str) -> Option<u64> {
    let quoted = format!("\"{id}\"");
    let mut lines = listing.lines().skip_while(|l| !l.contains(&quoted));
    lines.next()?;
    let prefix = format!("{field}: ");
    let value = lines
        .map(str::trim)
        .take_while(|l| !l.starts_with("Memory device"))
        .find_map(|l| l.strip_prefix(prefix.as_str()))?;
    let value = value.trim();
    match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => value.parse().ok(),
    }
}

/// `value` of `name=value` in a reply payload.
fn reply_field(payload: &str, name: &str) -> Option<u64> {
    payload.split_whitespace().find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

fn show(pa: Option<PhysAddr>) -> String {
    pa.map(|p| p.to_string()).unwrap_or_else(|| "unmapped".into())
}

fn stderr_note(stderr: &str) -> String {
    let s = stderr.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!(": {}", s.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | "))
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

    #[test]
    fn manifest_problems_are_specific() {
        use hvo_abi::manifest::{Range, Root};
        let p = profile(Arch::Aarch64);
        let mut m = Manifest {
            arch: Arch::Aarch64,
            state: GuestState::Ready,
            page_size: 4096,
            linear_map_base: p.linear_map_base,
            vmemmap_base: p.vmemmap_base,
            image: Range { start: 0x4020_0000, size: 0x10_0000 },
            roots: [Some(Root { kind: RootKind::Kernel, pa: 0x4040_0000 }), None, None, None],
            ram: [Some(Range { start: 0x4000_0000, size: 512 << 20 }), None, None, None, None, None, None, None],
            generation: 0,
            section_size_bits: 27,
            memstart_pfn: 0x40000,
            counters: Default::default(),
            knobs: 0,
            regions: Default::default(),
            shared_tails: Default::default(),
        };
        let at = PhysAddr(0x4020_1000);
        assert!(manifest_problems(&m, Arch::Aarch64, p, 512 << 20, at).is_empty());
        m.vmemmap_base = 0;
        m.roots[0] = Some(Root { kind: RootKind::Kernel, pa: 0x1000 });
        let problems = manifest_problems(&m, Arch::Aarch64, p, 512 << 20, at);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("vmemmap"));
        assert!(problems[1].contains("outside boot RAM"));
    }
}
