//! Measurements for `cargo xtask bench` that need a live QEMU but no
//! scenario: the bare boot-to-exit time of a guest image, and how fast the
//! host reads guest memory through QMP `pmemsave` and through the shared
//! boot-RAM mapping.

use std::path::Path;
use std::time::{Duration, Instant};

use hvo_abi::protocol::Command;
use hvo_images::{profile, Arch};

use crate::addr::PhysAddr;
use crate::machine::Machine;
use crate::memory::GuestMemory;
use crate::qemu::{BootPayload, MachineSpec};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error("the guest did not get ready: {0}")]
    Guest(String),
}

const LIMIT: Duration = Duration::from_secs(20);

/// A machine launched as the scenario runner launches it, its guest ready.
async fn start(arch: Arch, elf: &Path, spec: &MachineSpec) -> Result<Machine, BenchError> {
    let payload = BootPayload::Firmware(elf.to_path_buf());
    let mut machine =
        Machine::new(profile(arch), spec, &payload, Instant::now()).map_err(|e| BenchError::Setup(e.to_string()))?;
    machine.launch(LIMIT, LIMIT, false).await.map_err(|e| BenchError::Setup(e.to_string()))?;
    let console = machine.console().ok_or_else(|| BenchError::Setup("no console".into()))?;
    console.wait_ready(LIMIT).await.map_err(|e| BenchError::Guest(e.to_string()))?;
    Ok(machine)
}

/// Asks the guest to exit and waits for QEMU to end.
async fn exit(machine: &mut Machine) -> Result<(), BenchError> {
    let console = machine.console().ok_or_else(|| BenchError::Setup("no console".into()))?;
    console.request(Command::Exit { status: 0 }, LIMIT).await.map_err(|e| BenchError::Guest(e.to_string()))?;
    machine.wait_exit(LIMIT).await.ok_or_else(|| BenchError::Guest("QEMU did not exit".into()))?;
    Ok(())
}

/// Spawn to exit of the guest image with the runner's QEMU command line and
/// nothing else: wait for `ready`, ask it to exit, wait for QEMU to end.
pub async fn bare_boot_to_exit(arch: Arch, elf: &Path, machine: &MachineSpec) -> Result<Duration, BenchError> {
    let t = Instant::now();
    let mut m = start(arch, elf, machine).await?;
    exit(&mut m).await?;
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
    let mut m = start(arch, elf, machine).await?;
    m.map_boot_ram(machine.boot_memory).map_err(BenchError::Setup)?;
    let p = profile(arch);
    let piece = p.boot_ram_pieces(machine.boot_memory).into_iter().next().ok_or(BenchError::Setup("no RAM".into()))?;
    let at = PhysAddr(piece.gpa);
    let scratch = m.paths().dir.join("pmemsave.bin");
    let qmp = m.qmp().ok_or_else(|| BenchError::Setup("no QMP connection".into()))?;
    let (mut by_qmp, mut by_map) = (f64::MAX, f64::MAX);
    let mut buf = vec![0u8; bytes];
    for _ in 0..rounds.max(1) {
        let t = Instant::now();
        // (The two reads need not be equal: the idle guest's stack lives in
        // this RAM. verify-manifest cross-checks the paths on stable bytes.)
        let read = qmp.pmemsave(at, bytes, &scratch).await.map_err(|e| BenchError::Setup(e.to_string()))?;
        by_qmp = by_qmp.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        m.memory().read(at, &mut buf).map_err(|e| BenchError::Setup(e.to_string()))?;
        by_map = by_map.min(t.elapsed().as_secs_f64());
        if read.len() != buf.len() {
            return Err(BenchError::Setup("pmemsave returned a short read".into()));
        }
    }
    exit(&mut m).await?;
    Ok((bytes as f64 / by_qmp, bytes as f64 / by_map))
}
