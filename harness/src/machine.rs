//! One virtual machine, as the harness drives it: QEMU, its QMP connection,
//! the guest console, the host's mapping of guest RAM, the run directory,
//! the QMP transcript and the artifacts (the role QEMU's own Python
//! `QEMUMachine` plays in QEMU's tests).
//!
//! The machine owns the QEMU process and the private run directory, so
//! dropping it kills QEMU and removes the directory whatever happened. Every
//! wait is bounded; [`Machine::shutdown`] escalates from QMP `quit` to
//! SIGTERM to SIGKILL and says which it took.

use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use hvo_images::Profile;
use tokio::net::{UnixListener, UnixStream};

use crate::addr::PhysAddr;
use crate::console::{Console, ConsoleLog};
use crate::memory::MappedMemory;
use crate::qemu::{describe_exit, BootPayload, Ending, MachineSpec, QemuCommand, QemuProcess, RunPaths};
use crate::qmp::{Qmp, QmpError, Transcript};

/// How long QEMU gets to exit after `quit`, and after SIGTERM.
const QUIT_GRACE: Duration = Duration::from_secs(2);
const TERM_GRACE: Duration = Duration::from_millis(500);
/// How long a QEMU that may be hung gets to answer one QMP command.
pub const QMP_PROBE: Duration = Duration::from_millis(500);

/// Why a machine could not be launched.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// QEMU could not be started or did not come up (its stderr included).
    #[error("{0}")]
    Start(String),
    /// QEMU came up but its QMP handshake failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

/// How the machine's QEMU ended at shutdown.
#[derive(Clone, Copy, Debug)]
pub struct Shutdown {
    pub ending: Ending,
    pub exit: Option<ExitStatus>,
}

impl Shutdown {
    pub fn needed_sigkill(&self) -> bool {
        self.ending == Ending::Sigkill
    }

    /// One line for the artifacts.
    pub fn describe(&self) -> String {
        let how = match self.ending {
            Ending::ByItself => "QEMU had already exited",
            Ending::Quit => "QEMU quit when asked over QMP",
            Ending::Sigterm => "QEMU did not end on `quit` (or had no QMP to take it) and ended on SIGTERM",
            Ending::Sigkill => "QEMU ended neither on `quit` nor on SIGTERM and needed SIGKILL",
        };
        format!("{how} ({})", describe_exit(self.exit))
    }
}

pub struct Machine {
    profile: &'static Profile,
    /// The machine QEMU runs: its memory as the command line gives it.
    spec: MachineSpec,
    command: QemuCommand,
    /// The profile's stub firmware is written before QEMU starts.
    stub_firmware: bool,
    paths: RunPaths,
    start: Instant,
    // Declared before `_dir`: QEMU is killed before its directory is removed.
    qemu: Option<QemuProcess>,
    qmp: Option<Qmp>,
    /// Kept apart from the connection so that it outlives it.
    transcript: Option<Transcript>,
    console: Option<Console>,
    memory: MappedMemory,
    qemu_version: String,
    shutdown: Option<Shutdown>,
    _dir: tempfile::TempDir,
}

impl Machine {
    /// A machine for `spec` booting `payload`, its private run directory
    /// made; nothing runs until [`Machine::launch`]. `start` is the run's
    /// clock for the console and QMP logs.
    pub fn new(
        profile: &'static Profile,
        spec: &MachineSpec,
        payload: &BootPayload,
        start: Instant,
    ) -> std::io::Result<Machine> {
        let dir = private_dir()?;
        let paths = RunPaths { dir: dir.path().to_path_buf() };
        let command = QemuCommand::new(profile, spec, payload, &paths);
        Ok(Machine {
            profile,
            spec: *spec,
            command,
            stub_firmware: payload.needs_stub_firmware(),
            paths,
            start,
            qemu: None,
            qmp: None,
            transcript: None,
            console: None,
            memory: MappedMemory::new(),
            qemu_version: String::new(),
            shutdown: None,
            _dir: dir,
        })
    }

    /// Adds a second QMP monitor and the gdb stub for a person (`xtask repro`).
    pub fn with_inspection(mut self, gdb_port: Option<u16>) -> Machine {
        self.command = self.command.with_inspection(&self.paths, gdb_port);
        self
    }

    pub fn spec(&self) -> &MachineSpec {
        &self.spec
    }

    pub fn command(&self) -> &QemuCommand {
        &self.command
    }

    pub fn paths(&self) -> &RunPaths {
        &self.paths
    }

    /// Starts QEMU (the profile's firmware stub written first), accepts the
    /// console and QMP connections it makes to the harness's sockets, and
    /// negotiates QMP. `echo` shows the console and QMP as they happen.
    pub async fn launch(&mut self, timeout: Duration, qmp_timeout: Duration, echo: bool) -> Result<(), LaunchError> {
        let (console, qmp) = self.start_qemu(timeout).await.map_err(LaunchError::Start)?;
        let console = Console::attach(console, self.start);
        if echo {
            console.log().echo();
        }
        self.console = Some(console);
        let qmp = Qmp::handshake(qmp, qmp_timeout, self.start).await?;
        self.transcript = Some(qmp.transcript().clone());
        if echo {
            qmp.transcript().echo();
        }
        if let Ok(v) = qmp.execute(qapi::qmp::query_version {}).await {
            self.qemu_version = format!("{}.{}.{}", v.qemu.major, v.qemu.minor, v.qemu.micro);
        }
        self.qmp = Some(qmp);
        Ok(())
    }

    async fn start_qemu(&mut self, timeout: Duration) -> Result<(UnixStream, UnixStream), String> {
        if let Some(stub) = self.profile.stub_firmware().filter(|_| self.stub_firmware) {
            std::fs::write(self.paths.firmware_stub(), stub)
                .map_err(|e| format!("cannot write the firmware stub: {e}"))?;
        }
        let bind = |p: std::path::PathBuf| {
            UnixListener::bind(&p).map_err(|e| format!("cannot listen on {}: {e}", p.display()))
        };
        let console_listener = bind(self.paths.console_socket())?;
        let qmp_listener = bind(self.paths.qmp_socket())?;
        let qemu = QemuProcess::spawn(&self.command, self.profile.qemu_package)
            .map_err(|e| format!("{e}; run `cargo xtask setup` to install it"))?;
        // Owned from here on: after any failure it is still killed when dropped.
        let qemu = self.qemu.insert(qemu);
        // QEMU connects to the console first, then to QMP, during its start-up.
        let accept = async {
            let (console, _) = console_listener.accept().await?;
            let (qmp, _) = qmp_listener.accept().await?;
            Ok::<(UnixStream, UnixStream), std::io::Error>((console, qmp))
        };
        tokio::select! {
            accepted = tokio::time::timeout(timeout, accept) => match accepted {
                Ok(Ok(streams)) => Ok(streams),
                Ok(Err(e)) => Err(format!("accepting QEMU's connections failed: {e}")),
                Err(_) => Err(format!("QEMU did not connect its console and QMP within {timeout:?}")),
            },
            status = qemu.wait_exit(timeout) => {
                let stderr = qemu.drained_stderr().await;
                Err(format!("QEMU exited during start-up ({}): {}", describe_exit(status), stderr.trim()))
            }
        }
    }

    /// Maps the shared boot-RAM file (QEMU created it before starting the
    /// guest), piece by piece as the profile lays boot RAM out.
    pub fn map_boot_ram(&mut self, boot_memory: u64) -> Result<(), String> {
        let file = std::fs::File::open(self.paths.boot_ram())
            .map_err(|e| format!("cannot open the boot RAM backing file: {e}"))?;
        let mut memory = MappedMemory::new();
        for piece in self.profile.boot_ram_pieces(boot_memory) {
            memory
                .add_at_offset(PhysAddr(piece.gpa), &file, piece.file_offset, piece.len as usize)
                .map_err(|e| format!("cannot map boot RAM: {e}"))?;
        }
        self.memory = memory;
        Ok(())
    }

    pub fn qmp(&self) -> Option<&Qmp> {
        self.qmp.as_ref()
    }

    /// Drops the QMP connection (the transcript stays).
    pub fn close_qmp(&mut self) {
        self.qmp = None;
    }

    pub fn console(&mut self) -> Option<&mut Console> {
        self.console.as_mut()
    }

    pub fn console_log(&self) -> Option<&ConsoleLog> {
        self.console.as_ref().map(Console::log)
    }

    pub fn memory(&self) -> &MappedMemory {
        &self.memory
    }

    pub fn memory_mut(&mut self) -> &mut MappedMemory {
        &mut self.memory
    }

    pub fn qemu(&mut self) -> Option<&mut QemuProcess> {
        self.qemu.as_mut()
    }

    /// QEMU's version as QMP reported it at launch (empty if it did not).
    pub fn qemu_version(&self) -> &str {
        &self.qemu_version
    }

    /// Whether QEMU runs (false before launch and after it exited).
    pub fn is_running(&mut self) -> bool {
        self.qemu.as_mut().is_some_and(|q| q.try_exit().is_none())
    }

    /// Waits up to `timeout` for QEMU to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        match self.qemu.as_mut() {
            Some(q) => q.wait_exit(timeout).await,
            None => None,
        }
    }

    /// What QEMU printed on standard error; all of it once it has exited.
    pub async fn stderr(&mut self) -> String {
        match self.qemu.as_mut() {
            Some(q) => q.drained_stderr().await,
            None => String::new(),
        }
    }

    /// Ends QEMU if it still runs: QMP `quit`, then SIGTERM, then SIGKILL,
    /// each given its grace; then reads the rest of its stderr.
    pub async fn shutdown(&mut self) -> Option<Shutdown> {
        let qemu = self.qemu.as_mut()?;
        let mut ending = Ending::ByItself;
        if qemu.try_exit().is_none() {
            // Only an answered (or connection-closing) `quit` is worth waiting for.
            let quit_heard = match self.qmp.as_ref() {
                Some(qmp) => {
                    let quit = qmp.execute_within(qapi::qmp::quit {}, QMP_PROBE).await;
                    !matches!(quit, Err(QmpError::Timeout { .. } | QmpError::Unanswered { .. }))
                }
                None => false,
            };
            if quit_heard && qemu.wait_exit(QUIT_GRACE).await.is_some() {
                ending = Ending::Quit;
            }
        }
        let (by_signal, exit) = qemu.terminate(TERM_GRACE).await;
        if by_signal != Ending::ByItself {
            ending = by_signal;
        }
        qemu.drained_stderr().await;
        let shutdown = Shutdown { ending, exit };
        self.shutdown = Some(shutdown);
        Some(shutdown)
    }

    /// Writes the QEMU command line, console log, QEMU's stderr, the QMP
    /// transcript and how the machine shut down into `dir`, with `extra`
    /// files (name, contents) from the caller.
    pub fn write_artifacts(&self, dir: &Path, extra: &[(&str, &str)]) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("qemu-command.txt"), format!("{}\n", self.command.shell_line()))?;
        let console = self.console_log().map(ConsoleLog::text).unwrap_or_default();
        std::fs::write(dir.join("console.log"), console)?;
        let stderr = self.qemu.as_ref().map(QemuProcess::stderr).unwrap_or_default();
        std::fs::write(dir.join("qemu-stderr.log"), stderr)?;
        let transcript = self.transcript.as_ref().map(Transcript::text).unwrap_or_default();
        std::fs::write(dir.join("qmp-transcript.log"), transcript)?;
        if let Some(shutdown) = &self.shutdown {
            std::fs::write(dir.join("shutdown.txt"), format!("{}\n", shutdown.describe()))?;
        }
        for (name, contents) in extra {
            std::fs::write(dir.join(name), contents)?;
        }
        Ok(())
    }
}

/// A private directory for sockets and the RAM backing file: on tmpfs where
/// there is one, so guest RAM never touches a disk.
fn private_dir() -> std::io::Result<tempfile::TempDir> {
    let mut builder = tempfile::Builder::new();
    builder.prefix("hvo-");
    match builder.tempdir_in("/dev/shm") {
        Ok(d) => Ok(d),
        Err(_) => builder.tempdir(),
    }
}
