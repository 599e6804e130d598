//! The replies of the agent's device verbs: a device-dax instance it made
//! (`dax-create`) and the memory blocks of a plugged or unplugged DIMM
//! (`mem-online`, `mem-gone`). The numbers are the kernel's own account,
//! read from sysfs; the host checks them against what it finds in guest
//! memory, never the other way round.

use super::{AgentError, Fields};
use crate::addr::PhysAddr;

/// How long `mem-online` and `mem-gone` wait by default, in seconds: a
/// 1 GiB DIMM's blocks came and went within 0.3 s on Debian's 6.12 and
/// 7.2 under TCG, so this is a bound, not an estimate.
pub const MEM_WAIT_S: u32 = 20;

/// Where a device-dax instance keeps its struct pages: in RAM (`ram`, the
/// kernel allocates the vmemmap) or on the device itself (`pmem`, an
/// altmap at the start of the namespace, before the data).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DaxMode {
    Ram,
    Pmem,
}

impl DaxMode {
    /// The name the nd dax device's `mode` attribute takes.
    pub fn name(self) -> &'static str {
        match self {
            DaxMode::Ram => "ram",
            DaxMode::Pmem => "pmem",
        }
    }

    pub fn from_name(name: &str) -> Option<DaxMode> {
        [DaxMode::Ram, DaxMode::Pmem].into_iter().find(|m| m.name() == name)
    }
}

/// A device-dax instance, as `dax-create` made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaxDevice {
    /// `daxX.Y` under /sys/bus/dax/devices (and /dev).
    pub dev: String,
    /// The nd dax device behind it under /sys/bus/nd/devices (`daxR.N`).
    pub nd: String,
    /// The data range the device maps (its `resource` and `size`): after
    /// the info block and, in `pmem` mode, after the struct pages.
    pub start: PhysAddr,
    pub size: u64,
    /// The device's mapping size in bytes (its `align`).
    pub align: u64,
    pub mode: DaxMode,
    /// The whole namespace (`resource`, `size`): the range the kernel's
    /// page map covers, info block and altmap included.
    pub namespace_start: PhysAddr,
    pub namespace_size: u64,
}

impl DaxDevice {
    pub fn parse(payload: &str) -> Result<DaxDevice, AgentError> {
        let f = Fields::parse("dax-create", payload);
        let mode = f.text("mode")?;
        let mode = DaxMode::from_name(mode).ok_or_else(|| f.bad(format!("mode={mode} is not ram or pmem")))?;
        Ok(DaxDevice {
            dev: f.text("dev")?.to_string(),
            nd: f.text("nd")?.to_string(),
            start: PhysAddr(f.hex("start")?),
            size: f.hex("size")?,
            align: f.number("align")?,
            mode,
            namespace_start: PhysAddr(f.hex("ns_start")?),
            namespace_size: f.hex("ns_size")?,
        })
    }
}

/// The memory blocks of a range, all online.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemOnline {
    pub blocks: u64,
    /// The zones the blocks are in (`Movable` with
    /// `memhp_default_state=online_movable`), each once.
    pub zones: Vec<String>,
    /// How long the agent waited for them.
    pub waited_ms: u64,
}

impl MemOnline {
    pub fn parse(payload: &str) -> Result<MemOnline, AgentError> {
        let f = Fields::parse("mem-online", payload);
        Ok(MemOnline {
            blocks: f.number("blocks")?,
            zones: f.list("zone")?.into_iter().map(str::to_string).collect(),
            waited_ms: f.number("waited_ms")?,
        })
    }
}

/// The memory blocks of a range, all gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemGone {
    pub blocks: u64,
    pub waited_ms: u64,
}

impl MemGone {
    pub fn parse(payload: &str) -> Result<MemGone, AgentError> {
        let f = Fields::parse("mem-gone", payload);
        Ok(MemGone { blocks: f.number("blocks")?, waited_ms: f.number("waited_ms")? })
    }
}
