//! The runner's side of `break-before-make`: the guest's update log read
//! and replayed after every command the firmware serves, and the verdict
//! on them at each `verify`.

use super::interpreter::{Guest, Run};
use super::Abort;
use crate::updates::UpdateChecker;

impl Run<'_> {
    /// At boot, before the first command: the firmware's log and tables as
    /// they are (a real kernel has no update log).
    pub(super) fn start_update_log(&mut self) -> Result<(), Abort> {
        if let Guest::Firmware(_) = self.guest {
            let manifest = self.read_manifest()?;
            let (arch, memory) = (self.arch, self.machine.memory());
            let checker = UpdateChecker::start(arch, memory, &manifest)
                .map_err(|e| Abort::Fail(format!("the update log cannot be followed: {e}")))?;
            self.updates = Some(checker);
        }
        Ok(())
    }

    /// After a command the guest answered (or refused): what it logged,
    /// replayed. Off the async workers: at scale it reads and compares
    /// every table.
    pub(super) fn replay_updates(&mut self) {
        let memory = self.machine.memory();
        if let Some(checker) = self.updates.as_mut() {
            tokio::task::block_in_place(|| checker.after_command(memory));
        }
    }

    /// The `break-before-make` check on every command since the last one.
    pub(super) fn update_check(&mut self) {
        if let Some(checker) = self.updates.as_mut() {
            self.findings.checks.push(checker.take_check());
        }
    }
}
