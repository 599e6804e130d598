//! Starting and stopping QEMU.
//!
//! The command line is built from the image profile and the scenario's machine
//! (never from raw arguments in a scenario file). QEMU runs in its own process
//! group, dies with the harness (`PR_SET_PDEATHSIG`), and is killed with SIGKILL
//! when its handle is dropped, so no path leaves a QEMU process behind.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hvo_images::{Loader, Profile};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};

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
    pub fn firmware_stub(&self) -> PathBuf {
        self.dir.join("firmware-stub.bin")
    }
}

/// A QEMU invocation: the program and its arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuCommand {
    pub program: String,
    pub args: Vec<String>,
}

const BOOT_RAM_ID: &str = "boot-ram";

impl QemuCommand {
    pub fn new(profile: &Profile, machine: &MachineSpec, guest_elf: &Path, paths: &RunPaths) -> QemuCommand {
        let mut args: Vec<String> = Vec::new();
        let mut push = |a: &[&str]| args.extend(a.iter().map(|s| s.to_string()));
        let mib = machine.boot_memory >> 20;
        let memory = if machine.slots > 0 {
            format!("{mib}M,slots={},maxmem={}M", machine.slots, machine.max_memory >> 20)
        } else {
            format!("{mib}M")
        };
        let nvdimm = if machine.nvdimm { ",nvdimm=on" } else { "" };
        push(&["-M", &format!("{},memory-backend={BOOT_RAM_ID}{nvdimm}", profile.machine)]);
        push(&["-cpu", profile.cpu, "-m", &memory]);
        push(&[
            "-object",
            &format!(
                "memory-backend-file,id={BOOT_RAM_ID},size={}M,mem-path={},share=on",
                mib,
                paths.boot_ram().display()
            ),
        ]);
        // No default devices, no config files, no display: only what we name.
        push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
        // QEMU connects to sockets the harness already listens on, so no output
        // is lost and there is no start-up race.
        push(&["-chardev", &format!("socket,id=console,path={}", paths.console_socket().display())]);
        push(&["-serial", "chardev:console"]);
        push(&["-chardev", &format!("socket,id=qmp,path={}", paths.qmp_socket().display())]);
        push(&["-mon", "chardev=qmp,mode=control"]);
        let elf = guest_elf.display().to_string();
        match profile.loader {
            Loader::Kernel { bios: Some(bios) } => push(&["-bios", bios, "-kernel", &elf]),
            Loader::Kernel { bios: None } => push(&["-kernel", &elf]),
            Loader::StubFirmware { .. } => {
                push(&["-bios", &paths.firmware_stub().display().to_string(), "-device", &format!("loader,file={elf}")])
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
}

/// A running QEMU. Dropping it kills the whole process group.
pub struct QemuProcess {
    child: tokio::process::Child,
    pgid: Pid,
    stderr: Arc<Mutex<Vec<u8>>>,
    exit: Option<ExitStatus>,
}

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
        let pid = child.id().map(|id| Pid::from_raw(id as i32)).unwrap_or(Pid::from_raw(0));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(mut pipe) = child.stderr.take() {
            let sink = stderr.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&buf[..n]);
                }
            });
        }
        Ok(QemuProcess { child, pgid: pid, stderr, exit: None })
    }

    /// What QEMU printed on standard error so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
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

    /// Stops QEMU: SIGTERM, then SIGKILL if it has not gone within `grace`
    /// (QEMU 7.2 can ignore SIGTERM while stuck in `device_add`).
    pub async fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.try_exit().is_some() {
            return self.exit;
        }
        let _ = killpg(self.pgid, Signal::SIGTERM);
        if self.wait_exit(grace).await.is_some() {
            return self.exit;
        }
        let _ = killpg(self.pgid, Signal::SIGKILL);
        self.wait_exit(Duration::from_secs(5)).await
    }

    /// Stops QEMU dead without ending it (SIGSTOP): the harness's test of a
    /// QEMU that hangs. Dropping it still kills it.
    pub fn freeze(&self) {
        let _ = killpg(self.pgid, Signal::SIGSTOP);
    }

    /// Kills QEMU at once (for tests and for giving up on a hung VM).
    pub fn kill_now(&mut self) {
        let _ = killpg(self.pgid, Signal::SIGKILL);
    }
}

/// Starts QEMU with `command` for the run in `paths` (the profile's firmware
/// stub written first) and accepts the console and QMP connections QEMU
/// makes to the harness's sockets during its start-up. The process goes into
/// `slot` as soon as it exists, so that after a failure it is still killed
/// when dropped and its stderr can be read. Errors say what went wrong.
pub async fn start(
    profile: &Profile,
    command: &QemuCommand,
    paths: &RunPaths,
    timeout: Duration,
    slot: &mut Option<QemuProcess>,
) -> Result<(UnixStream, UnixStream), String> {
    if let Some(stub) = profile.stub_firmware() {
        std::fs::write(paths.firmware_stub(), stub).map_err(|e| format!("cannot write the firmware stub: {e}"))?;
    }
    let bind = |p: PathBuf| UnixListener::bind(&p).map_err(|e| format!("cannot listen on {}: {e}", p.display()));
    let console_listener = bind(paths.console_socket())?;
    let qmp_listener = bind(paths.qmp_socket())?;
    let qemu = QemuProcess::spawn(command, profile.qemu_package)
        .map_err(|e| format!("{e}; run `cargo xtask setup` to install it"))?;
    let qemu = slot.insert(qemu);
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
            Err(format!("QEMU exited during start-up ({}): {}", describe_exit(status), qemu.stderr().trim()))
        }
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
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvo_images::{profile, Arch};

    fn command(arch: Arch) -> QemuCommand {
        let machine = MachineSpec { boot_memory: 512 << 20, slots: 4, max_memory: 8 << 30, nvdimm: false };
        let paths = RunPaths { dir: PathBuf::from("/run/x") };
        QemuCommand::new(profile(arch), &machine, Path::new("/g/hvo-guest"), &paths)
    }

    fn has_pair(cmd: &QemuCommand, flag: &str, value: &str) -> bool {
        cmd.args.windows(2).any(|w| w[0] == flag && w[1] == value)
    }

    #[test]
    fn x86_boots_pvh_with_qboot_and_exits_through_isa_debug_exit() {
        let c = command(Arch::X86_64);
        assert_eq!(c.program, "qemu-system-x86_64");
        assert!(has_pair(&c, "-M", "q35,memory-backend=boot-ram"));
        assert!(has_pair(&c, "-bios", "/usr/share/qemu/qboot.rom"));
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
        let machine = MachineSpec { boot_memory: 1 << 30, slots: 0, max_memory: 1 << 30, nvdimm: true };
        let paths = RunPaths { dir: PathBuf::from("/r") };
        let c = QemuCommand::new(profile(Arch::Ppc64le), &machine, Path::new("/g"), &paths);
        assert!(has_pair(&c, "-m", "1024M"));
        assert!(c.args.iter().any(|a| a.ends_with("memory-backend=boot-ram,nvdimm=on")), "{:?}", c.args);
    }

    #[test]
    fn shell_line_quotes_what_needs_it() {
        let c = QemuCommand { program: "qemu".into(), args: vec!["-a".into(), "x y".into(), "it's".into()] };
        assert_eq!(c.shell_line(), "qemu -a 'x y' 'it'\\''s'");
    }
}
