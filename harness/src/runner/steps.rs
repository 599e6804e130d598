//! The steps of a scenario, as the guest and the machine carry them out:
//! boot-time set-up, each [`Step`], and allocation-failure sweeps.

use hvo_abi::model::Layout;
use hvo_abi::protocol::Command;

use super::interpreter::Run;
use super::probes::around;
use super::Abort;
use crate::addr::PhysAddr;
use crate::hotplug::{self, DimmKind};
use crate::report::Check;
use crate::scenario::{Backend, DaxDevice, Step};

impl Run<'_> {
    /// What the scenario asks of the guest right after boot: bug knobs,
    /// persistent memory, gigantic pages, the boot memmap.
    pub(super) async fn boot_setup(&mut self) -> Result<(), Abort> {
        for knob in &self.scenario.bug_knobs {
            self.request(Command::Knob { knob: *knob }).await?;
        }
        if self.scenario.boot_pmem > 0 {
            let reply = self.request(Command::ReservePmem { size: self.scenario.boot_pmem }).await?;
            let start =
                reply_field(&reply, "pmem").ok_or_else(|| Abort::Fail(format!("no pmem start in `{reply}`")))?;
            self.tracked.pmem_start = Some(PhysAddr(start));
        }
        for g in &self.scenario.boot_gigantic {
            let order = self.order(g.size);
            let reply = self.request(Command::ReserveGigantic { order, count: g.count, zone: g.zone }).await?;
            let id = reply_field(&reply, "region").ok_or_else(|| Abort::Fail(format!("no region id in `{reply}`")))?;
            self.tracked.regions.insert(g.region.clone(), id as u32);
            // Reserved at boot to be populated already optimized.
            self.tracked.requested.insert(id as u32, Layout::Unified);
        }
        if self.scenario.needs_vmemmap() {
            let started = std::time::Instant::now();
            let reply = self.request(Command::BootMemmap).await?;
            self.findings.metrics.boot_memmap_ms = Some(started.elapsed().as_millis() as u64);
            if let Some(n) = reply_field(&reply, "initialized") {
                self.findings.metrics.struct_pages_initialized = Some(n);
            }
        }
        Ok(())
    }

    pub(super) async fn step(&mut self, step: &Step) -> Result<(), Abort> {
        match step {
            Step::Ping => {
                let token = format!("t{}", self.elapsed_ms());
                let reply = self.request(Command::Ping { token: Some(&token) }).await?;
                let expected = format!("pong {token}");
                self.findings.checks.push(if reply == expected {
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
                let (vas, (before, after)) = (self.probe_samples(id)?, around("optimize", id));
                self.probe_reads(&vas, &before).await?;
                self.request(Command::Optimize { region: id, layout: *layout }).await?;
                self.probe_reads(&vas, &after).await?;
                self.record_request(id, *layout);
                Ok(())
            }
            Step::Restore { region } => {
                let id = self.region_id(region)?;
                let (vas, (before, after)) = (self.probe_samples(id)?, around("restore", id));
                self.probe_reads(&vas, &before).await?;
                self.request(Command::Restore { region: id }).await?;
                self.probe_reads(&vas, &after).await?;
                self.record_request(id, Layout::None);
                Ok(())
            }
            Step::HugetlbFree { region: name } => {
                let region = self.region_id(name)?;
                let (vas, (before, after)) = (self.probe_samples(region)?, around("hugetlb-free", region));
                self.probe_reads(&vas, &before).await?;
                self.request(Command::HugetlbFree { region }).await?;
                self.probe_reads(&vas, &after).await?;
                if let Some(id) = self.tracked.regions.remove(name) {
                    self.tracked.requested.remove(&id);
                }
                Ok(())
            }
            Step::Verify => self.verify().await,
            Step::HotAdd { region, size, compound_size, zone, layout, device, altmap, backend, address } => {
                let start = self.hot_add_range(region, *size, *device, *backend, *address).await?;
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
                let start = self.hot_add_range(region, *size, DaxDevice::Dimm, *backend, None).await?;
                let reply = self.request(Command::HotAddMemory { start: start.0, size: *size, zone: *zone }).await?;
                if self.expect_refusal.is_none() {
                    self.tracked.hot_added_memory.push(start.0..start.0 + size);
                }
                self.record_region(region, &reply, Layout::None)
            }
            Step::HotRemove { region: name } => {
                let region = self.region_id(name)?;
                let (vas, (before, after)) = (self.probe_samples(region)?, around("hot-remove", region));
                self.probe_reads(&vas, &before).await?;
                if self.tracked.pmem_region.as_deref() == Some(name.as_str()) {
                    // Nothing to unplug: the range is boot memory.
                    self.request(Command::HotRemove { region, slot: None }).await?;
                    self.probe_reads(&vas, &after).await?;
                    self.tracked.pmem_region = None;
                } else {
                    let dimm = self
                        .tracked
                        .dimm_of
                        .remove(name)
                        .ok_or_else(|| Abort::Fail(format!("region `{name}` was not hot-added")))?;
                    hotplug::request_unplug(&self.machine, dimm.n).await.map_err(Run::hotplug_abort)?;
                    self.request(Command::HotRemove { region, slot: Some(dimm.slot) }).await?;
                    // The slot is ejected: QEMU's own flush on the memory map
                    // change may have healed a forgotten one, as it would not
                    // on hardware (pmem, which stays, shows it).
                    self.probe_reads(&vas, &after).await?;
                    let timeout = self.step_timeout();
                    hotplug::finish_unplug(&mut self.machine, dimm, timeout).await.map_err(Run::hotplug_abort)?;
                }
                if let Some(id) = self.tracked.regions.remove(name) {
                    self.tracked.requested.remove(&id);
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
        address: Option<u64>,
    ) -> Result<PhysAddr, Abort> {
        if device == DaxDevice::Pmem {
            self.tracked.pmem_region = Some(region.to_string());
            return self.tracked.pmem_start.ok_or_else(|| Abort::Infra("no persistent memory was set aside".into()));
        }
        let kind = if device == DaxDevice::Nvdimm { DimmKind::Nvdimm } else { DimmKind::Dimm };
        let n = self.tracked.dimms;
        self.tracked.dimms += 1;
        let at = address.map(PhysAddr);
        let dimm = hotplug::plug(&mut self.machine, n, size, kind, backend, at).await.map_err(Run::hotplug_abort)?;
        self.tracked.dimm_of.insert(region.to_string(), dimm);
        Ok(dimm.start)
    }

    /// Runs `step` with its 1st, 2nd, ... frame allocation failing. Each
    /// refusal must have rolled back cleanly, which every invariant checks;
    /// the sweep ends when the step succeeds, having made fewer allocations.
    pub(super) async fn sweep(&mut self, step: &Step) -> Result<(), Abort> {
        const MAX_SWEEP: u64 = 10_000;
        let mut hot_add_start = None;
        if let Step::HotAdd { region, size, device, backend, address, .. } = step {
            // One range for every attempt: a refused hot-add leaves it unused.
            hot_add_start = Some(self.hot_add_range(region, *size, *device, *backend, *address).await?);
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
                    let swept = &mut self.findings.metrics.allocation_failures_swept;
                    *swept = Some(swept.unwrap_or(0) + nth - 1);
                    return Ok(());
                }
            }
        }
        Err(Abort::Fail(format!("`{}` still fails after {MAX_SWEEP} swept allocation failures", step.name())))
    }

    /// Names the region a step created after the guest's `region=<id>` reply,
    /// with the layout asked of it; a step the guest refused as expected
    /// created none.
    fn record_region(&mut self, name: &str, reply: &str, layout: Layout) -> Result<(), Abort> {
        if self.expect_refusal.is_some() {
            return Ok(());
        }
        let id = reply_field(reply, "region").ok_or_else(|| Abort::Fail(format!("no region id in `{reply}`")))?;
        self.tracked.regions.insert(name.to_string(), id as u32);
        self.tracked.requested.insert(id as u32, layout);
        Ok(())
    }

    fn region_id(&self, name: &str) -> Result<u32, Abort> {
        self.tracked
            .regions
            .get(name)
            .copied()
            .ok_or_else(|| Abort::Fail(format!("region `{name}` was freed or never allocated")))
    }
}

/// `value` of `name=value` in a reply payload.
fn reply_field(payload: &str, name: &str) -> Option<u64> {
    payload.split_whitespace().find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}
