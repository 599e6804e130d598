//! The `break-before-make` invariant: the guest logs every page-table store
//! and TLB invalidation of a command (`hvo_abi::update_log`); after each
//! command the host reads the log, replays it over its own picture of the
//! tables with its own rules per MMU ([`rules`]), and holds the result to
//! the tables walked again ([`replay`]). A live entry changed in a way its
//! MMU forbids without an invalid entry and a covering invalidation in
//! between, an invalidation that leaves the translation it must remove
//! cached (its size wrong, say), and a log that does not account for the
//! tables, or that overflowed, all fail it: what the host cannot replay it
//! does not pass.

mod replay;
pub mod rules;
#[cfg(test)]
mod tests;

use hvo_abi::manifest::{Manifest, RootKind};
use hvo_abi::update_log::{LogHeader, Record, RECORD_SIZE, UPDATE_LOG_CAPACITY, UPDATE_LOG_HEADER_SIZE};
use hvo_images::{profile, Arch};

use crate::addr::{PhysAddr, VirtAddr};
use crate::invariant::Invariant;
use crate::memory::GuestMemory;
use crate::pgtable::{self, WalkError, Walker};
use crate::report::Check;
use crate::verify::Findings;
pub use replay::{Counts, Replay, Snapshot};

/// The tables of every tree the manifest publishes (the ppc64 process table
/// is a table of roots, not a tree).
pub fn snapshot(arch: Arch, mem: &dyn GuestMemory, manifest: &Manifest) -> Result<Snapshot, WalkError> {
    let kernel = pgtable::walker_for(arch, mem, manifest, VirtAddr(manifest.vmemmap_base))?;
    let mut s = Snapshot::default();
    s.add_tree(RootKind::Kernel, kernel.visit_tables(mem)?);
    for kind in [RootKind::Identity, RootKind::Process] {
        if let Some(root) = manifest.root(kind) {
            s.add_tree(kind, Walker::like(&kernel, PhysAddr(root.pa)).visit_tables(mem)?);
        }
    }
    Ok(s)
}

/// Follows one firmware guest's update log from boot on.
pub struct UpdateChecker {
    arch: Arch,
    manifest: Manifest,
    log: PhysAddr,
    replay: Replay,
    /// The log's record count since boot when it was last read.
    consumed: u64,
    /// Commands replayed since the last check.
    commands: u64,
    problems: Vec<String>,
}

impl UpdateChecker {
    /// At boot, before the first command: where the log is (it must lie in
    /// the image), and the tables as they are; what boot logged is not
    /// replayed (the MMU was off for most of it).
    pub fn start(arch: Arch, mem: &dyn GuestMemory, manifest: &Manifest) -> Result<UpdateChecker, String> {
        let log = manifest.update_log;
        let bytes = UPDATE_LOG_HEADER_SIZE + UPDATE_LOG_CAPACITY * RECORD_SIZE;
        let end = log.saturating_add(bytes as u64);
        let image = manifest.image;
        if log < image.start || end > image.end() {
            return Err(format!(
                "the manifest puts the update log at {log:#x}, outside the image {:#x}..{:#x}",
                image.start,
                image.end()
            ));
        }
        let snapshot = snapshot(arch, mem, manifest).map_err(|e| format!("walking the tables at boot: {e}"))?;
        let header = read_header(mem, PhysAddr(log))?;
        let mmu = profile(arch).mmu;
        Ok(UpdateChecker {
            arch,
            manifest: manifest.clone(),
            log: PhysAddr(log),
            replay: Replay::new(mmu, pgtable::format(arch), snapshot),
            consumed: header.total,
            commands: 0,
            problems: Vec::new(),
        })
    }

    /// After a command: replays what it logged and holds the result to the
    /// tables. Problems become findings of the next check.
    pub fn after_command(&mut self, mem: &dyn GuestMemory) {
        let (header, records) = match read_log(mem, self.log) {
            Ok(log) => log,
            Err(e) => {
                self.problems.push(format!("the update log cannot be read: {e}"));
                return;
            }
        };
        if header.total == self.consumed {
            return;
        }
        self.commands += 1;
        let began = header.total - header.len;
        let complete = began == self.consumed && !header.overflowed();
        if began != self.consumed {
            self.problems.push(format!(
                "the log counts {began} records before command {}, the host read {}: records of a command it never \
                 replayed",
                header.command, self.consumed
            ));
        }
        if header.overflowed() {
            self.problems.push(format!(
                "command {} made {} records, the log keeps {}: the rest cannot be replayed, so nothing proves the \
                 updates followed the rules",
                header.command, header.len, header.capacity
            ));
        }
        for record in records {
            match record {
                Record::Stores { .. } => record.stores().for_each(|s| self.replay.store(s)),
                Record::Invalidation { form, operand, second, meant_va, meant_size } => {
                    self.replay.invalidate(form, operand, second, meant_va, meant_size)
                }
            }
        }
        match snapshot(self.arch, mem, &self.manifest) {
            Ok(walked) => self.replay.reconcile(walked, complete),
            Err(e) => self.problems.push(format!("walking the tables after command {}: {e}", header.command)),
        }
        self.consumed = header.total;
    }

    /// The invariant's verdict on every command since the last check.
    pub fn take_check(&mut self) -> Check {
        let mut findings = Findings::default();
        for f in std::mem::take(&mut self.problems).into_iter().chain(std::mem::take(&mut self.replay.findings)) {
            findings.fail(f);
        }
        let c = std::mem::take(&mut self.replay.counts);
        findings.covered_as(format!(
            "{} commands replayed: {} stores ({} to live tables), {} invalidations, {} break-before-make sequences",
            std::mem::take(&mut self.commands),
            c.stores,
            c.live_stores,
            c.invalidations,
            c.breaks
        ));
        findings.into_check(Invariant::BreakBeforeMake)
    }
}

fn read_header(mem: &dyn GuestMemory, at: PhysAddr) -> Result<LogHeader, String> {
    let mut bytes = vec![0u8; UPDATE_LOG_HEADER_SIZE];
    mem.read(at, &mut bytes).map_err(|e| e.to_string())?;
    LogHeader::decode(&bytes).map_err(|e| e.to_string())
}

fn read_log(mem: &dyn GuestMemory, at: PhysAddr) -> Result<(LogHeader, Vec<Record>), String> {
    let header = read_header(mem, at)?;
    let kept = usize::try_from(header.kept()).map_err(|e| e.to_string())?;
    let mut bytes = vec![0u8; kept * RECORD_SIZE];
    mem.read(PhysAddr(at.0 + UPDATE_LOG_HEADER_SIZE as u64), &mut bytes).map_err(|e| e.to_string())?;
    let records = bytes
        .chunks_exact(RECORD_SIZE)
        .enumerate()
        .map(|(i, chunk)| Record::decode(chunk, i as u64))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    Ok((header, records))
}
