//! DIMM hotplug over QMP's own commands: `object-add` of a memory backend,
//! `device_add` of a `pc-dimm` or `nvdimm` on it, `query-memory-devices` for
//! where it landed; `device_del`, the guest's completion (DEVICE_DELETED) and
//! `object-del` to unplug. A file-backed DIMM is mapped by the host too.

use std::time::Duration;

use qapi::qmp;
use serde_json::json;

use crate::addr::PhysAddr;
use crate::machine::Machine;
use crate::qemu::BOOT_NVDIMM_ID;
use crate::qmp::{Qmp, QmpError};
use crate::scenario::Backend;

/// Why a DIMM could not be plugged or unplugged.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error("the QMP connection to QEMU is closed")]
    NoQmp,
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The guest did not complete an unplug QEMU asked of it.
    #[error("{id} was not deleted within {timeout:?}: the guest did not complete the unplug")]
    NotDeleted { id: String, timeout: Duration },
    /// Host-side trouble: the backing file, the mapping, QEMU's listing.
    #[error("{0}")]
    Host(String),
}

/// The kind of DIMM device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DimmKind {
    Dimm,
    Nvdimm,
}

/// A DIMM plugged into the guest.
#[derive(Clone, Copy, Debug)]
pub struct PluggedDimm {
    /// Its number: it names the DIMM, its backend and the backing file.
    pub n: u32,
    /// The memory slot the platform put it in (the guest ejects by slot).
    pub slot: u32,
    pub start: PhysAddr,
    /// Whether the host maps it (file-backed).
    pub mapped: bool,
}

impl PluggedDimm {
    fn device_id(n: u32) -> String {
        format!("hvo-dimm{n}")
    }

    fn backend_id(n: u32) -> String {
        format!("hvo-mem{n}")
    }
}

/// Plugs DIMM number `n` of `size` bytes, at `at` when given, and returns
/// where it landed; a file-backed one is mapped by the host too. The vCPUs are stopped around
/// `device_add`: QEMU 7.2 can wait forever there for an RCU grace period a
/// spinning vCPU never ends.
pub async fn plug(
    machine: &mut Machine,
    n: u32,
    size: u64,
    kind: DimmKind,
    backend: Backend,
    at: Option<PhysAddr>,
) -> Result<PluggedDimm, HotplugError> {
    let file = machine.paths().dimm_file(n);
    let (id, memdev) = (PluggedDimm::device_id(n), PluggedDimm::backend_id(n));
    let qmp = machine.qmp().ok_or(HotplugError::NoQmp)?;
    let object = memory_backend(&memdev, size, backend, &file.display().to_string())?;
    qmp.execute(qmp::stop {}).await?;
    let plugged = add(qmp, object, kind, &id, &memdev, at).await;
    qmp.execute(qmp::cont {}).await?;
    plugged?;
    let (start, slot) = placement(qmp, &id).await?;
    let mapped = backend == Backend::File;
    if mapped {
        let opened = std::fs::File::open(&file)
            .map_err(|e| HotplugError::Host(format!("cannot open the backing file of {id}: {e}")))?;
        let len = usize::try_from(size).map_err(|_| HotplugError::Host(format!("{id} is too large to map")))?;
        machine
            .memory_mut()
            .add_at_offset(start, &opened, 0, len)
            .map_err(|e| HotplugError::Host(format!("cannot map {id}: {e}")))?;
    }
    Ok(PluggedDimm { n, slot, start, mapped })
}

/// Maps the NVDIMM QEMU was started with (`MachineSpec::boot_nvdimm`) where
/// QEMU placed it, and returns its byte range.
pub async fn map_boot_nvdimm(machine: &mut Machine, size: u64) -> Result<std::ops::Range<u64>, HotplugError> {
    let qmp = machine.qmp().ok_or(HotplugError::NoQmp)?;
    let (start, _) = placement(qmp, BOOT_NVDIMM_ID).await?;
    let file = std::fs::File::open(machine.paths().boot_nvdimm_file())
        .map_err(|e| HotplugError::Host(format!("cannot open the backing file of {BOOT_NVDIMM_ID}: {e}")))?;
    let len = usize::try_from(size).map_err(|_| HotplugError::Host(format!("{BOOT_NVDIMM_ID} is too large to map")))?;
    machine
        .memory_mut()
        .add_at_offset(start, &file, 0, len)
        .map_err(|e| HotplugError::Host(format!("cannot map {BOOT_NVDIMM_ID}: {e}")))?;
    Ok(start.0..start.0 + size)
}

/// The backend object of a DIMM: anonymous RAM reserving nothing up front
/// (so large sparse DIMMs cost little), or a shared file the host can map.
fn memory_backend(id: &str, size: u64, backend: Backend, path: &str) -> Result<qmp::ObjectOptions, HotplugError> {
    let options = match backend {
        Backend::Ram => json!({ "qom-type": "memory-backend-ram", "id": id, "size": size, "reserve": false }),
        Backend::File => {
            json!({ "qom-type": "memory-backend-file", "id": id, "size": size, "mem-path": path, "share": true })
        }
    };
    // Built from JSON so that only the properties we set are sent, whatever
    // else the schema's property structs grow.
    serde_json::from_value(options).map_err(|e| HotplugError::Host(format!("backend options for {id}: {e}")))
}

async fn add(
    qmp: &Qmp,
    object: qmp::ObjectOptions,
    kind: DimmKind,
    id: &str,
    memdev: &str,
    at: Option<PhysAddr>,
) -> Result<(), QmpError> {
    qmp.execute(qmp::object_add(object)).await?;
    let driver = match kind {
        DimmKind::Dimm => "pc-dimm",
        DimmKind::Nvdimm => "nvdimm",
    };
    let mut props = vec![("memdev".to_string(), json!(memdev))];
    if let Some(at) = at {
        props.push(("addr".to_string(), json!(at.0)));
    }
    qmp.execute(qmp::device_add::new(driver, Some(id.to_string()), None, props)).await?;
    Ok(())
}

/// Where QEMU put DIMM `id`: its address and slot.
async fn placement(qmp: &Qmp, id: &str) -> Result<(PhysAddr, u32), HotplugError> {
    let devices = qmp.execute(qmp::query_memory_devices {}).await?;
    let found = devices.iter().find_map(|d| match d {
        qmp::MemoryDeviceInfo::dimm(info) | qmp::MemoryDeviceInfo::nvdimm(info) => {
            Some(&info.data).filter(|data| data.id.as_deref() == Some(id))
        }
        _ => None,
    });
    let placed = found.and_then(|d| Some((PhysAddr(u64::try_from(d.addr).ok()?), u32::try_from(d.slot).ok()?)));
    placed.ok_or_else(|| HotplugError::Host(format!("QEMU does not list {id} with its address and slot: {devices:?}")))
}

/// Asks the platform to remove DIMM `n` (`device_del`): the guest must then
/// tear the range down and complete the removal.
pub async fn request_unplug(machine: &Machine, n: u32) -> Result<(), HotplugError> {
    let qmp = machine.qmp().ok_or(HotplugError::NoQmp)?;
    qmp.execute(qmp::device_del { id: PluggedDimm::device_id(n) }).await?;
    Ok(())
}

/// Waits up to `timeout` for QEMU to report the DIMM deleted, then deletes
/// its backend (and the host's mapping and backing file).
pub async fn finish_unplug(machine: &mut Machine, dimm: PluggedDimm, timeout: Duration) -> Result<(), HotplugError> {
    let id = PluggedDimm::device_id(dimm.n);
    let qmp = machine.qmp().ok_or(HotplugError::NoQmp)?;
    let deleted = qmp
        .wait_event(
            |e| matches!(e, qmp::Event::DEVICE_DELETED { data, .. } if data.device.as_deref() == Some(id.as_str())),
            timeout,
        )
        .await;
    if deleted.is_none() {
        return Err(HotplugError::NotDeleted { id, timeout });
    }
    qmp.execute(qmp::object_del { id: PluggedDimm::backend_id(dimm.n) }).await?;
    if dimm.mapped {
        machine.memory_mut().remove(dimm.start);
        std::fs::remove_file(machine.paths().dimm_file(dimm.n))
            .map_err(|e| HotplugError::Host(format!("cannot delete the backing file of {id}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_carry_only_the_properties_set() {
        let ram = memory_backend("hvo-mem0", 1 << 30, Backend::Ram, "/r/dimm0").unwrap();
        let sent = serde_json::to_value(qmp::object_add(ram)).unwrap();
        assert_eq!(
            sent,
            json!({ "qom-type": "memory-backend-ram", "id": "hvo-mem0", "size": 1u64 << 30, "reserve": false })
        );
        let file = memory_backend("hvo-mem1", 2 << 20, Backend::File, "/r/dimm1").unwrap();
        let sent = serde_json::to_value(qmp::object_add(file)).unwrap();
        assert_eq!(sent["mem-path"], "/r/dimm1");
        assert_eq!(sent["share"], true);
    }
}
