//! Read probes around the steps that change live vmemmap entries
//! (`tlb-coherent`): the region's sampled words are read before the step,
//! which loads their translations into the guest's TLB, and again after it,
//! each judged against the host's own walk of the tables at that moment. A
//! flush the step forgot leaves the translation the first read loaded, and
//! the second read sees the old frame.

use super::interpreter::Run;
use super::Abort;
use crate::addr::VirtAddr;
use crate::invariant::Invariant;
use crate::report::Check;
use crate::verify::probes::{self, ProbeLog};

impl Run<'_> {
    /// The words of region `id`'s vmemmap the probes around a step read.
    pub(super) fn probe_samples(&self, id: u32) -> Result<Vec<VirtAddr>, Abort> {
        let manifest = self.read_manifest()?;
        let samples = manifest.regions.iter().find(|r| r.id == id).map(|r| probes::samples(&manifest, r));
        Ok(samples.unwrap_or_default())
    }

    /// The words of every region's vmemmap (`verify` reads them all).
    pub(super) fn all_probe_samples(&self) -> Result<Vec<VirtAddr>, Abort> {
        let manifest = self.read_manifest()?;
        Ok(manifest.regions.iter().flat_map(|r| probes::samples(&manifest, r)).collect())
    }

    /// Reads `vas` through the guest's TLB and holds each read to the
    /// tables as the host walks them now; a problem is a `tlb-coherent`
    /// failure. Returns how many reads were made, or `None` when any was wrong.
    pub(super) async fn probe_reads(&mut self, vas: &[VirtAddr], when: &str) -> Result<Option<u64>, Abort> {
        if vas.is_empty() {
            return Ok(Some(0));
        }
        let manifest = self.read_manifest()?;
        let timeout = self.step_timeout();
        let arch = self.arch;
        let mut log = ProbeLog::default();
        let planned = self.tracked.reads.plan(arch, self.machine.memory(), &manifest, vas, when, &mut log);
        let Some(console) = self.machine.console() else { return Err(Abort::Infra("no console".into())) };
        if let Err(e) = probes::read(console, timeout, &planned, when, &mut log).await {
            return Err(self.live_abort(e).await);
        }
        if log.problems.is_empty() {
            return Ok(Some(log.probed));
        }
        self.findings.checks.push(Check::fail(Invariant::TlbCoherent.name(), log.problems.join("; ")));
        Ok(None)
    }
}

/// A step's name in probe messages: `before optimize of region 2`.
pub(super) fn around(step: &str, id: u32) -> (String, String) {
    (format!("before {step} of region {id}"), format!("after {step} of region {id}"))
}
