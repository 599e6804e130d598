//! Measurements for `cargo xtask bench` that need a live QEMU but no
//! scenario: the bare boot-to-exit time of a guest image, and how fast the
//! host reads guest memory through QMP `pmemsave` and through the shared
//! boot-RAM mapping.

use std::path::Path;
use std::time::{Duration, Instant};

use hvo_abi::protocol::Command;
use hvo_images::{profile, Arch};

use crate::addr::PhysAddr;
use crate::console::Console;
use crate::memory::{GuestMemory, MappedMemory};
use crate::qemu::{MachineSpec, QemuCommand, QemuProcess, RunPaths};
use crate::qmp::Qmp;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error("the guest did not get ready: {0}")]
    Guest(String),
}

const LIMIT: Duration = Duration::from_secs(20);

/// A QEMU started with the scenario runner's command line, its console and
/// QMP accepted, and its guest ready.
struct Started {
    qemu: QemuProcess,
    console: Console,
    qmp_stream: tokio::net::UnixStream,
    paths: RunPaths,
    _dir: tempfile::TempDir,
}

async fn start(arch: Arch, elf: &Path, machine: &MachineSpec) -> Result<Started, BenchError> {
    let setup = |e: std::io::Error| BenchError::Setup(e.to_string());
    let dir = tempfile::Builder::new().prefix("hvo-bench-").tempdir_in("/dev/shm").map_err(setup)?;
    let paths = RunPaths { dir: dir.path().to_path_buf() };
    let command = QemuCommand::new(profile(arch), machine, elf, &paths);
    let started = Instant::now();
    let mut slot = None;
    let (console, qmp_stream) =
        crate::qemu::start(profile(arch), &command, &paths, LIMIT, &mut slot).await.map_err(BenchError::Setup)?;
    let qemu = slot.ok_or_else(|| BenchError::Setup("QEMU did not start".into()))?;
    let mut console = Console::attach(console, started);
    console.wait_ready(LIMIT).await.map_err(|e| BenchError::Guest(e.to_string()))?;
    Ok(Started { qemu, console, qmp_stream, paths, _dir: dir })
}

/// Spawn to exit of the guest image with the runner's QEMU command line and
/// nothing else: wait for `ready`, ask it to exit, wait for QEMU to end.
pub async fn bare_boot_to_exit(arch: Arch, elf: &Path, machine: &MachineSpec) -> Result<Duration, BenchError> {
    let t = Instant::now();
    let mut s = start(arch, elf, machine).await?;
    s.console.request(Command::Exit { status: 0 }, LIMIT).await.map_err(|e| BenchError::Guest(e.to_string()))?;
    s.qemu.wait_exit(LIMIT).await.ok_or_else(|| BenchError::Guest("QEMU did not exit".into()))?;
    Ok(t.elapsed())
}

/// Bytes per second reading `bytes` of boot RAM: through QMP `pmemsave`
/// (QEMU writes a file, the host reads it) and through the host's mapping
/// of the shared boot-RAM file. Each is the best of `rounds`.
pub async fn memory_read_throughput(
    arch: Arch,
    elf: &Path,
    machine: &MachineSpec,
    bytes: usize,
    rounds: usize,
) -> Result<(f64, f64), BenchError> {
    let mut s = start(arch, elf, machine).await?;
    let qmp =
        Qmp::handshake(s.qmp_stream, LIMIT, Instant::now()).await.map_err(|e| BenchError::Setup(e.to_string()))?;
    let p = profile(arch);
    let piece = p.boot_ram_pieces(machine.boot_memory).into_iter().next().ok_or(BenchError::Setup("no RAM".into()))?;
    let at = PhysAddr(piece.gpa);
    let file = std::fs::File::open(s.paths.boot_ram()).map_err(|e| BenchError::Setup(e.to_string()))?;
    let mut mapped = MappedMemory::new();
    mapped
        .add_at_offset(at, &file, piece.file_offset, piece.len as usize)
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let scratch = s.paths.dir.join("pmemsave.bin");
    let (mut by_qmp, mut by_map) = (f64::MAX, f64::MAX);
    let mut buf = vec![0u8; bytes];
    for _ in 0..rounds.max(1) {
        let t = Instant::now();
        // (The two reads need not be equal: the idle guest's stack lives in
        // this RAM. verify-manifest cross-checks the paths on stable bytes.)
        let read = qmp.pmemsave(at, bytes, &scratch).await.map_err(|e| BenchError::Setup(e.to_string()))?;
        by_qmp = by_qmp.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        mapped.read(at, &mut buf).map_err(|e| BenchError::Setup(e.to_string()))?;
        by_map = by_map.min(t.elapsed().as_secs_f64());
        if read.len() != buf.len() {
            return Err(BenchError::Setup("pmemsave returned a short read".into()));
        }
    }
    let _ = s.console.request(Command::Exit { status: 0 }, LIMIT).await;
    s.qemu.wait_exit(LIMIT).await;
    Ok((bytes as f64 / by_qmp, bytes as f64 / by_map))
}
