//! Starting and stopping QEMU.
//!
//! The command line is built from the image profile and the scenario's machine
//! (never from raw arguments in a scenario file). QEMU runs in its own process
//! group, dies with the harness (`PR_SET_PDEATHSIG`), and is killed with SIGKILL
//! when its handle is dropped, so no path leaves a QEMU process behind.
//! Signals only ever go to QEMU's own group ([`ProcessGroup`]), never to the
//! harness's.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hvo_images::{Loader, Profile};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;

/// The memory a scenario's machine has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MachineSpec {
    /// Boot RAM in bytes.
    pub boot_memory: u64,
    /// Hotplug slots; 0 disables memory hotplug.
    pub slots: u32,
    /// Upper bound on boot plus hotplugged memory, in bytes.
    pub max_memory: u64,
    /// NVDIMMs will be hotplugged: the machine needs `nvdimm=on`.
    pub nvdimm: bool,
    /// An NVDIMM of this many bytes present from boot (on QEMU's command
    /// line, taking one slot), backed by a shared file the host maps: how
    /// kernels that see persistent memory only through ACPI get it.
    pub boot_nvdimm: Option<u64>,
}

/// The files of one run, all inside its private temporary directory.
#[derive(Clone, Debug)]
pub struct RunPaths {
    pub dir: PathBuf,
}

impl RunPaths {
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join("console.sock")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// The shared file backing boot RAM, which the host maps.
    pub fn boot_ram(&self) -> PathBuf {
        self.dir.join("boot-ram")
    }
    /// A second QMP monitor, for a person inspecting a held run.
    pub fn inspect_socket(&self) -> PathBuf {
        self.dir.join("inspect.sock")
    }
    /// The shared file backing hotplugged DIMM `n` when it is file-backed.
    pub fn dimm_file(&self, n: u32) -> PathBuf {
        self.dir.join(format!("dimm{n}"))
    }
    /// The shared file backing the NVDIMM present from boot.
    pub fn boot_nvdimm_file(&self) -> PathBuf {
        self.dir.join("boot-nvdimm")
    }
    pub fn firmware_stub(&self) -> PathBuf {
        self.dir.join("firmware-stub.bin")
    }
}

/// What a machine boots, as one value: the command line's boot arguments
/// all follow from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootPayload {
    /// Our firmware ELF, loaded the way the profile's loader says.
    Firmware(PathBuf),
    /// A Linux kernel with the harness's initramfs and command line, loaded
    /// the way the profile's [`hvo_images::KernelBoot`] says, or by this
    /// UEFI firmware (`-bios`), which then loads it from QEMU's fw_cfg.
    Kernel { image: PathBuf, initramfs: PathBuf, append: String, uefi: Option<PathBuf> },
}

impl BootPayload {
    /// The CPU QEMU emulates for this payload.
    fn cpu(&self, profile: &Profile) -> &'static str {
        match self {
            BootPayload::Firmware(_) => profile.cpu,
            BootPayload::Kernel { .. } => profile.kernel.cpu,
        }
    }

    /// Whether QEMU needs the profile's stub firmware written for it.
    pub fn needs_stub_firmware(&self) -> bool {
        matches!(self, BootPayload::Firmware(_))
    }
}

/// A QEMU invocation: the program and its arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuCommand {
    pub program: String,
    pub args: Vec<String>,
}

const BOOT_RAM_ID: &str = "boot-ram";
/// The NVDIMM present from boot, and its memory backend.
pub const BOOT_NVDIMM_ID: &str = "hvo-boot-nvdimm";
const BOOT_NVDIMM_BACKEND: &str = "hvo-boot-pmem";

impl QemuCommand {
    pub fn new(profile: &Profile, machine: &MachineSpec, payload: &BootPayload, paths: &RunPaths) -> QemuCommand {
        let mut args: Vec<String> = Vec::new();
        let mut push = |a: &[&str]| args.extend(a.iter().map(|s| s.to_string()));
        let mib = machine.boot_memory >> 20;
        let memory = if machine.slots > 0 {
            format!("{mib}M,slots={},maxmem={}M", machine.slots, machine.max_memory >> 20)
        } else {
            format!("{mib}M")
        };
        let nvdimm = if machine.nvdimm || machine.boot_nvdimm.is_some() { ",nvdimm=on" } else { "" };
        push(&["-M", &format!("{},memory-backend={BOOT_RAM_ID}{nvdimm}", profile.machine)]);
        push(&["-cpu", payload.cpu(profile), "-m", &memory]);
        push(&[
            "-object",
            &format!(
                "memory-backend-file,id={BOOT_RAM_ID},size={}M,mem-path={},share=on",
                mib,
                paths.boot_ram().display()
            ),
        ]);
        if let Some(bytes) = machine.boot_nvdimm {
            push(&[
                "-object",
                &format!(
                    "memory-backend-file,id={BOOT_NVDIMM_BACKEND},size={}M,mem-path={},share=on",
                    bytes >> 20,
                    paths.boot_nvdimm_file().display()
                ),
                "-device",
                &format!("nvdimm,memdev={BOOT_NVDIMM_BACKEND},id={BOOT_NVDIMM_ID}"),
            ]);
        }
        // No default devices, no config files, no display: only what we name.
        push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
        // QEMU connects to sockets the harness already listens on, so no output
        // is lost and there is no start-up race.
        push(&["-chardev", &format!("socket,id=console,path={}", paths.console_socket().display())]);
        push(&["-serial", "chardev:console"]);
        push(&["-chardev", &format!("socket,id=qmp,path={}", paths.qmp_socket().display())]);
        push(&["-mon", "chardev=qmp,mode=control"]);
        match payload {
            BootPayload::Firmware(elf) => {
                let elf = elf.display().to_string();
                match profile.loader {
                    Loader::Kernel { bios: Some(bios) } => push(&["-bios", bios, "-kernel", &elf]),
                    Loader::Kernel { bios: None } => push(&["-kernel", &elf]),
                    Loader::StubFirmware { .. } => push(&[
                        "-bios",
                        &paths.firmware_stub().display().to_string(),
                        "-device",
                        &format!("loader,file={elf}"),
                    ]),
                }
            }
            BootPayload::Kernel { image, initramfs, append, uefi } => {
                match (uefi, profile.kernel.loader) {
                    (Some(uefi), _) => push(&["-bios", &uefi.display().to_string()]),
                    (None, Loader::Kernel { bios: Some(bios) }) => push(&["-bios", bios]),
                    (None, _) => {}
                }
                let (image, initramfs) = (image.display().to_string(), initramfs.display().to_string());
                push(&["-kernel", &image, "-initrd", &initramfs, "-append", append]);
            }
        }
        push(profile.extra_args);
        QemuCommand { program: profile.qemu_binary.to_string(), args }
    }

    /// The command as one line a user can paste into a shell.
    /// For `xtask repro`: a second QMP monitor (QEMU listens; a person
    /// connects while the harness keeps its own) and QEMU's gdb stub on
    /// `gdb_port` of the loopback interface.
    pub fn with_inspection(mut self, paths: &RunPaths, gdb_port: Option<u16>) -> QemuCommand {
        self.args.extend([
            "-chardev".to_string(),
            format!("socket,id=inspect,path={},server=on,wait=off", paths.inspect_socket().display()),
            "-mon".to_string(),
            "chardev=inspect,mode=control".to_string(),
        ]);
        if let Some(port) = gdb_port {
            self.args.extend(["-gdb".to_string(), format!("tcp:127.0.0.1:{port}")]);
        }
        self
    }

    pub fn shell_line(&self) -> String {
        std::iter::once(&self.program).chain(&self.args).map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ")
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=,./:+@%".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{binary} is not installed (Debian package {package})")]
    NotInstalled { binary: String, package: String },
    #[error("could not start {binary}: {source}")]
    Spawn { binary: String, source: std::io::Error },
    /// A process id QEMU's group cannot be named by: signalling "group 0"
    /// would reach the harness's own group instead.
    #[error("{binary} has no process id to signal its group by (got {pid:?})")]
    NoProcessGroup { binary: String, pid: Option<u32> },
}

/// QEMU's own process group (it leads it: `process_group(0)` at spawn). Only
/// a real pid makes one, so a signal to it can never reach the harness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessGroup(Pid);

impl ProcessGroup {
    /// The group led by the process `pid`; refused for no pid, 0 (the
    /// caller's own group) and pids that are no pid (negative as `pid_t`).
    pub fn led_by(binary: &str, pid: Option<u32>) -> Result<ProcessGroup, QemuError> {
        match pid.and_then(|p| i32::try_from(p).ok()) {
            Some(p) if p > 0 => Ok(ProcessGroup(Pid::from_raw(p))),
            _ => Err(QemuError::NoProcessGroup { binary: binary.to_string(), pid }),
        }
    }

    fn signal(self, signal: Signal) {
        // The group may already be gone; there is nothing more to do then.
        let _ = killpg(self.0, signal);
    }
}

/// How QEMU came to end when it was stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// It had already exited (the guest asked, or it died).
    ByItself,
    /// It obeyed QMP `quit`.
    Quit,
    /// It obeyed SIGTERM.
    Sigterm,
    /// It ignored `quit` and SIGTERM and needed SIGKILL (QEMU 7.2 hung in
    /// `device_add`, or a stopped process).
    Sigkill,
}

/// A running QEMU. Dropping it kills the whole process group.
pub struct QemuProcess {
    child: tokio::process::Child,
    group: ProcessGroup,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// The task copying QEMU's stderr, joined once QEMU has exited so that
    /// nothing it printed last is missing.
    stderr_reader: Option<JoinHandle<()>>,
    exit: Option<ExitStatus>,
}

/// How long the stderr reader gets to reach the end of the pipe after QEMU exited.
const STDERR_DRAIN: Duration = Duration::from_secs(1);
/// How long SIGKILL gets to end QEMU.
const KILL_WAIT: Duration = Duration::from_secs(5);

impl QemuProcess {
    pub fn spawn(cmd: &QemuCommand, package: &str) -> Result<QemuProcess, QemuError> {
        let mut command = tokio::process::Command::new(&cmd.program);
        command
            .args(&cmd.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: set_pdeathsig is async-signal-safe (a single prctl call).
        unsafe {
            command.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from));
        }
        let mut child = command.spawn().map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                QemuError::NotInstalled { binary: cmd.program.clone(), package: package.to_string() }
            } else {
                QemuError::Spawn { binary: cmd.program.clone(), source }
            }
        })?;
        // Without a group to signal, the child is dropped here: kill_on_drop ends it.
        let group = ProcessGroup::led_by(&cmd.program, child.id())?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stderr_reader = child.stderr.take().map(|mut pipe| {
            let sink = stderr.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&buf[..n]);
                }
            })
        });
        Ok(QemuProcess { child, group, stderr, stderr_reader, exit: None })
    }

    /// What QEMU printed on standard error so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Everything QEMU printed on standard error: once it has exited, the
    /// reader is first let run to the end of the pipe.
    pub async fn drained_stderr(&mut self) -> String {
        if self.try_exit().is_some() {
            if let Some(reader) = self.stderr_reader.take() {
                // A reader still blocked after the grace (a grandchild holding
                // the pipe) is left to end with the pipe; what it has is kept.
                let _ = tokio::time::timeout(STDERR_DRAIN, reader).await;
            }
        }
        self.stderr()
    }

    /// The exit status, if QEMU has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Waits up to `timeout` for QEMU to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_exit() {
            return Some(s);
        }
        if let Ok(Ok(status)) = tokio::time::timeout(timeout, self.child.wait()).await {
            self.exit = Some(status);
        }
        self.exit
    }

    /// Stops QEMU by signal: SIGTERM, then SIGKILL if it has not gone within
    /// `grace` (QEMU 7.2 can ignore SIGTERM while stuck in `device_add`).
    /// Says which it took.
    pub async fn terminate(&mut self, grace: Duration) -> (Ending, Option<ExitStatus>) {
        if self.try_exit().is_some() {
            return (Ending::ByItself, self.exit);
        }
        self.group.signal(Signal::SIGTERM);
        if self.wait_exit(grace).await.is_some() {
            return (Ending::Sigterm, self.exit);
        }
        self.group.signal(Signal::SIGKILL);
        (Ending::Sigkill, self.wait_exit(KILL_WAIT).await)
    }

    /// Stops QEMU dead without ending it (SIGSTOP): the harness's test of a
    /// QEMU that hangs. Dropping it still kills it.
    pub fn freeze(&self) {
        self.group.signal(Signal::SIGSTOP);
    }

    /// Kills QEMU at once (for tests and for giving up on a hung VM).
    pub fn kill_now(&mut self) {
        self.group.signal(Signal::SIGKILL);
    }
}

/// How a process ended, in words.
pub fn describe_exit(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        None => "still running".into(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "unknown status".into(),
        },
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            self.group.signal(Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvo_images::{profile, Arch};

    fn command(arch: Arch) -> QemuCommand {
        let machine =
            MachineSpec { boot_memory: 512 << 20, slots: 4, max_memory: 8 << 30, nvdimm: false, boot_nvdimm: None };
        let paths = RunPaths { dir: PathBuf::from("/run/x") };
        QemuCommand::new(profile(arch), &machine, &BootPayload::Firmware("/g/hvo-guest".into()), &paths)
    }

    fn has_pair(cmd: &QemuCommand, flag: &str, value: &str) -> bool {
        cmd.args.windows(2).any(|w| w[0] == flag && w[1] == value)
    }

    #[test]
    fn x86_boots_pvh_with_qboot_and_exits_through_isa_debug_exit() {
        let c = command(Arch::X86_64);
        assert_eq!(c.program, "qemu-system-x86_64");
        assert!(has_pair(&c, "-M", "q35,memory-backend=boot-ram"));
        assert!(has_pair(&c, "-bios", "qboot.rom"), "by name: QEMU finds it in its own data directory");
        assert!(has_pair(&c, "-kernel", "/g/hvo-guest"));
        assert!(has_pair(&c, "-device", "isa-debug-exit,iobase=0xf4,iosize=4"));
        assert!(has_pair(&c, "-m", "512M,slots=4,maxmem=8192M"));
    }

    #[test]
    fn arm_uses_the_stub_firmware_and_the_loader_so_hotplug_works() {
        let c = command(Arch::Aarch64);
        assert!(has_pair(&c, "-bios", "/run/x/firmware-stub.bin"));
        assert!(has_pair(&c, "-device", "loader,file=/g/hvo-guest"));
        assert!(!c.args.iter().any(|a| a == "-kernel"), "plain -kernel has no GED device");
        assert!(has_pair(&c, "-semihosting-config", "enable=on,target=native"));
    }

    #[test]
    fn kernels_boot_with_their_initramfs_and_command_line_never_the_stub() {
        let machine =
            MachineSpec { boot_memory: 4 << 30, slots: 0, max_memory: 4 << 30, nvdimm: false, boot_nvdimm: None };
        let paths = RunPaths { dir: PathBuf::from("/run/x") };
        let payload = BootPayload::Kernel {
            image: "/k/Image".into(),
            initramfs: "/k/initramfs.cpio".into(),
            append: "console=ttyAMA0 nokaslr".into(),
            uefi: None,
        };
        let c = QemuCommand::new(profile(Arch::Aarch64), &machine, &payload, &paths);
        assert!(has_pair(&c, "-kernel", "/k/Image"));
        assert!(has_pair(&c, "-initrd", "/k/initramfs.cpio"));
        assert!(has_pair(&c, "-append", "console=ttyAMA0 nokaslr"));
        assert!(!c.args.iter().any(|a| a == "-bios"), "plain -kernel with a device tree");
        assert!(!payload.needs_stub_firmware());
        let x86 = QemuCommand::new(profile(Arch::X86_64), &machine, &payload, &paths);
        assert!(has_pair(&x86, "-bios", "qboot.rom"));
        assert!(has_pair(&x86, "-cpu", "qemu64,+pdpe1gb"), "1 GiB pages, 4-level tables");
    }

    #[test]
    fn a_kernel_seeing_pmem_through_acpi_boots_by_uefi_beside_an_nvdimm_the_host_can_map() {
        let machine = MachineSpec {
            boot_memory: 2 << 30,
            slots: 1,
            max_memory: 4 << 30,
            nvdimm: false,
            boot_nvdimm: Some(2 << 30),
        };
        let paths = RunPaths { dir: PathBuf::from("/run/x") };
        let payload = BootPayload::Kernel {
            image: "/k/Image".into(),
            initramfs: "/k/initramfs.cpio".into(),
            append: "console=ttyAMA0 acpi=force".into(),
            uefi: Some("/fw/QEMU_EFI.fd".into()),
        };
        let c = QemuCommand::new(profile(Arch::Aarch64), &machine, &payload, &paths);
        assert!(has_pair(&c, "-bios", "/fw/QEMU_EFI.fd"));
        assert!(has_pair(&c, "-kernel", "/k/Image"), "the firmware loads it from fw_cfg");
        assert!(has_pair(&c, "-M", "virt,memory-backend=boot-ram,nvdimm=on"));
        assert!(has_pair(&c, "-m", "2048M,slots=1,maxmem=4096M"));
        assert!(has_pair(
            &c,
            "-object",
            "memory-backend-file,id=hvo-boot-pmem,size=2048M,mem-path=/run/x/boot-nvdimm,share=on"
        ));
        assert!(has_pair(&c, "-device", "nvdimm,memdev=hvo-boot-pmem,id=hvo-boot-nvdimm"));
    }

    #[test]
    fn ppc_uses_vof_never_slof() {
        let c = command(Arch::Ppc64le);
        let machine = &c.args[c.args.iter().position(|a| a == "-M").unwrap() + 1];
        assert!(machine.starts_with("pseries,x-vof=on,"), "{machine}");
        assert!(!c.args.iter().any(|a| a == "-bios"));
        assert!(has_pair(&c, "-cpu", "power9"));
    }

    #[test]
    fn every_arch_gets_private_sockets_and_shared_boot_ram_and_no_defaults() {
        for arch in Arch::ALL {
            let c = command(arch);
            assert!(has_pair(&c, "-chardev", "socket,id=console,path=/run/x/console.sock"));
            assert!(has_pair(&c, "-chardev", "socket,id=qmp,path=/run/x/qmp.sock"));
            assert!(has_pair(
                &c,
                "-object",
                "memory-backend-file,id=boot-ram,size=512M,mem-path=/run/x/boot-ram,share=on"
            ));
            assert!(c.args.iter().any(|a| a == "-nodefaults"));
        }
    }

    #[test]
    fn without_slots_there_is_no_hotplug_memory() {
        let machine =
            MachineSpec { boot_memory: 1 << 30, slots: 0, max_memory: 1 << 30, nvdimm: true, boot_nvdimm: None };
        let paths = RunPaths { dir: PathBuf::from("/r") };
        let c = QemuCommand::new(profile(Arch::Ppc64le), &machine, &BootPayload::Firmware("/g".into()), &paths);
        assert!(has_pair(&c, "-m", "1024M"));
        assert!(c.args.iter().any(|a| a.ends_with("memory-backend=boot-ram,nvdimm=on")), "{:?}", c.args);
    }

    #[test]
    fn shell_line_quotes_what_needs_it() {
        let c = QemuCommand { program: "qemu".into(), args: vec!["-a".into(), "x y".into(), "it's".into()] };
        assert_eq!(c.shell_line(), "qemu -a 'x y' 'it'\\''s'");
    }

    #[test]
    fn without_a_real_pid_there_is_no_group_to_signal() {
        for pid in [None, Some(0), Some(u32::MAX)] {
            assert!(matches!(ProcessGroup::led_by("qemu", pid), Err(QemuError::NoProcessGroup { .. })), "{pid:?}");
        }
        assert!(ProcessGroup::led_by("qemu", Some(4242)).is_ok());
    }

    fn sh(script: &str) -> QemuProcess {
        let cmd = QemuCommand { program: "sh".into(), args: vec!["-c".into(), script.into()] };
        QemuProcess::spawn(&cmd, "dash").expect("sh runs")
    }

    #[tokio::test]
    async fn a_process_ignoring_sigterm_is_killed_and_says_so() {
        let mut p = sh("trap '' TERM; echo ignoring >&2; sleep 60");
        while p.stderr().is_empty() {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (ending, exit) = p.terminate(Duration::from_millis(200)).await;
        assert_eq!(ending, Ending::Sigkill);
        assert_eq!(describe_exit(exit), "killed by signal 9");
    }

    #[tokio::test]
    async fn stderr_is_complete_once_the_process_has_exited() {
        let mut p = sh("echo first >&2; echo last >&2; exit 3");
        assert_eq!(describe_exit(p.wait_exit(Duration::from_secs(10)).await), "exit code 3");
        assert_eq!(p.drained_stderr().await, "first\nlast\n");
        assert_eq!(p.terminate(Duration::from_millis(200)).await.0, Ending::ByItself);
    }
}
