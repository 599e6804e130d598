//! A real kernel's device steps: device DAX of the persistent memory set
//! aside at boot (the agent's `dax-create`, `dax-destroy`), and DIMMs
//! hot-plugged over QMP that the kernel onlines by itself (`mem-online`,
//! `mem-gone`). What the kernel says it made is checked against what the
//! host set up; the ranges are then what `verify` holds the tables to.

use std::ops::Range;

use hvo_abi::model::Layout;

use super::interpreter::Run;
use super::Abort;
use crate::addr::{Pfn, PhysAddr};
use crate::hotplug::{self, DimmKind, PluggedDimm};
use crate::kernel::agent::{AgentCommand, DaxDevice, DaxMode, MemGone, MemOnline, MEM_WAIT_S};
use crate::kernel::verify::DaxRange;
use crate::scenario::Backend;

/// A device-dax instance a step made, and the layout the scenario expects.
pub(super) struct KernelDax {
    pub region: String,
    pub device: DaxDevice,
    pub expected: Layout,
}

/// A DIMM a step plugged and the kernel onlined.
pub(super) struct KernelDimm {
    pub region: String,
    pub dimm: PluggedDimm,
    pub size: u64,
}

/// The ranges `verify` must know beside boot RAM.
#[derive(Default)]
pub(super) struct KernelRanges {
    pub dax: Vec<KernelDax>,
    pub dimms: Vec<KernelDimm>,
    /// Where the persistent memory present at boot is, once known.
    pub boot_pmem: Option<Range<u64>>,
    /// The persistent memory set aside at boot while nd_pmem still holds
    /// it raw: Linux gives it struct pages (ZONE_DEVICE, unoptimized) until
    /// a DAX device takes the namespace over.
    pub raw_pmem: Option<Range<u64>>,
    /// DIMMs plugged so far, to name the next one.
    pub plugged: u32,
    /// Byte ranges removed since boot whose vmemmap must be gone.
    pub removed: Vec<Range<u64>>,
}

impl KernelRanges {
    /// Memory with struct pages beside boot RAM, as pfn ranges: onlined
    /// DIMMs, and raw persistent memory.
    pub fn extra_ram(&self, page: u64) -> Vec<Range<Pfn>> {
        let dimms = self.dimms.iter().map(|d| d.dimm.start.0..d.dimm.start.0 + d.size);
        dimms.chain(self.raw_pmem.clone()).map(|r| pfns(r, page)).collect()
    }

    /// Memory removed since boot and not added again, as pfn ranges.
    pub fn removed(&self, page: u64) -> Vec<Range<Pfn>> {
        self.removed.iter().map(|r| pfns(r.clone(), page)).collect()
    }

    /// `range` has memory again: it is no longer removed.
    fn added(&mut self, range: &Range<u64>) {
        self.removed.retain(|r| r.end <= range.start || range.end <= r.start);
    }

    /// The DAX ranges for the verifier.
    pub fn dax_ranges(&self, page: u64) -> Vec<DaxRange> {
        self.dax
            .iter()
            .map(|d| {
                let namespace =
                    pfns(d.device.namespace_start.0..d.device.namespace_start.0 + d.device.namespace_size, page);
                let data = pfns(d.device.start.0..d.device.start.0 + d.device.size, page);
                let altmap = (d.device.mode == DaxMode::Pmem).then_some(namespace.start..data.start);
                DaxRange {
                    name: d.device.dev.clone(),
                    namespace,
                    data,
                    compound_bytes: d.device.align,
                    // Struct pages on the device are never optimized.
                    expected: Some(if altmap.is_some() { Layout::None } else { d.expected }),
                    altmap,
                }
            })
            .collect()
    }
}

fn pfns(bytes: Range<u64>, page: u64) -> Range<Pfn> {
    Pfn::containing(PhysAddr(bytes.start), page)..Pfn::containing(PhysAddr(bytes.end), page)
}

impl Run<'_> {
    /// Device DAX over the persistent memory set aside at boot: the kernel
    /// must make it of exactly that range.
    pub(super) async fn kernel_dax_add(
        &mut self,
        region: &str,
        compound_size: u64,
        altmap: bool,
        expected: Layout,
    ) -> Result<(), Abort> {
        let pmem = (self.kernel_state()?.ranges.boot_pmem.clone())
            .ok_or_else(|| Abort::Infra("no persistent memory was set aside".into()))?;
        // Where Linux builds no DAX vmemmap optimization, whatever the
        // scenario expects of a kernel that does, every page stays private.
        let expected = if self.profile.kernel.dax_vmemmap_optimized { expected } else { Layout::None };
        let mode = if altmap { DaxMode::Pmem } else { DaxMode::Ram };
        let reply = self.agent(AgentCommand::DaxCreate { mode, align: compound_size }).await?;
        let device = DaxDevice::parse(&reply).map_err(|e| Abort::Fail(e.to_string()))?;
        let namespace = device.namespace_start.0..device.namespace_start.0 + device.namespace_size;
        if namespace != pmem {
            return Err(Abort::Fail(format!(
                "the kernel made {} of {:#x}..{:#x}, the scenario set aside {:#x}..{:#x}",
                device.dev, namespace.start, namespace.end, pmem.start, pmem.end
            )));
        }
        let data = device.start.0..device.start.0 + device.size;
        if data.start < namespace.start || data.end > namespace.end || device.align != compound_size {
            return Err(Abort::Fail(format!(
                "{}: data {:#x}..{:#x} aligned to {:#x} is not inside its namespace with the {:#x} asked for",
                device.dev, data.start, data.end, device.align, compound_size
            )));
        }
        let ranges = &mut self.kernel_state()?.ranges;
        ranges.raw_pmem = None;
        ranges.added(&namespace);
        ranges.dax.push(KernelDax { region: region.to_string(), device, expected });
        Ok(())
    }

    /// A DIMM plugged over QMP, which the kernel must online (movable) by
    /// itself within the agent's wait.
    pub(super) async fn kernel_memory_add(&mut self, region: &str, size: u64, backend: Backend) -> Result<(), Abort> {
        let n = self.kernel_state()?.ranges.plugged;
        self.kernel_state()?.ranges.plugged += 1;
        let dimm = hotplug::plug(&mut self.machine, n, size, DimmKind::Dimm, backend, None)
            .await
            .map_err(Run::hotplug_abort)?;
        let reply = self.agent(AgentCommand::MemOnline { start: dimm.start, size, wait_s: MEM_WAIT_S }).await?;
        let online = MemOnline::parse(&reply).map_err(|e| Abort::Fail(e.to_string()))?;
        if online.zones.iter().any(|z| z != "Movable") {
            return Err(Abort::Fail(format!(
                "{region}: the kernel onlined it in {}, not Movable (memhp_default_state=online_movable)",
                online.zones.join(", ")
            )));
        }
        let ranges = &mut self.kernel_state()?.ranges;
        ranges.added(&(dimm.start.0..dimm.start.0 + size));
        ranges.dimms.push(KernelDimm { region: region.to_string(), dimm, size });
        Ok(())
    }

    /// Removes what `region` added: the DAX device torn down by the agent,
    /// or the DIMM unplugged over QMP once the kernel let its blocks go.
    pub(super) async fn kernel_remove(&mut self, region: &str) -> Result<(), Abort> {
        let ranges = &mut self.kernel_state()?.ranges;
        if let Some(i) = ranges.dax.iter().position(|d| d.region == region) {
            let dax = ranges.dax.remove(i);
            let d = &dax.device;
            ranges.removed.push(d.namespace_start.0..d.namespace_start.0 + d.namespace_size);
            self.agent(AgentCommand::DaxDestroy { dev: &dax.device.dev }).await?;
            return Ok(());
        }
        let Some(i) = ranges.dimms.iter().position(|d| d.region == region) else {
            return Err(Abort::Fail(format!("region `{region}` was not hot-added")));
        };
        let dimm = ranges.dimms.remove(i);
        ranges.removed.push(dimm.dimm.start.0..dimm.dimm.start.0 + dimm.size);
        hotplug::request_unplug(&self.machine, dimm.dimm.n).await.map_err(Run::hotplug_abort)?;
        let reply =
            self.agent(AgentCommand::MemGone { start: dimm.dimm.start, size: dimm.size, wait_s: MEM_WAIT_S }).await?;
        MemGone::parse(&reply).map_err(|e| Abort::Fail(e.to_string()))?;
        let timeout = self.step_timeout();
        hotplug::finish_unplug(&mut self.machine, dimm.dimm, timeout).await.map_err(Run::hotplug_abort)
    }
}
