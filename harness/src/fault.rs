//! Failures the harness causes in its own runs on purpose, to test how each
//! kind of failure is reported (harness/tests/qemu.rs). Never set from a
//! scenario file.

use std::time::Duration;

use hvo_abi::protocol::Command;

use crate::console::ConsoleError;
use crate::machine::Machine;
use crate::qmp::QmpError;

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

/// What injecting a fault ran into; the caller judges it like any other
/// console or QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

/// Causes `fault` in the running `machine`.
pub async fn inject(fault: HarnessFault, machine: &mut Machine, timeout: Duration) -> Result<(), FaultError> {
    match fault {
        HarnessFault::KillQemu => {
            if let Some(q) = machine.qemu() {
                q.kill_now();
            }
        }
        HarnessFault::FreezeGuest => {
            if let Some(qmp) = machine.qmp() {
                qmp.execute(qapi::qmp::stop {}).await?;
            }
        }
        HarnessFault::HangQemu => {
            if let Some(q) = machine.qemu() {
                q.freeze();
            }
        }
        HarnessFault::GuestPanic => {
            if let Some(console) = machine.console() {
                console.request(Command::Panic, timeout).await?;
            }
        }
        HarnessFault::CloseQmp => machine.close_qmp(),
        HarnessFault::ConsoleGarbage => {
            if let Some(console) = machine.console() {
                let mut garbage: Vec<u8> = (0u8..=255).cycle().take(2000).collect();
                garbage.extend_from_slice(b"\n\xff\xfe not a command\n99999999999999999999999 ping\n\n");
                console.send_raw(&garbage).await?;
            }
        }
    }
    Ok(())
}
