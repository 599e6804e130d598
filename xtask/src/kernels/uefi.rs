//! The UEFI firmware a profile's kernels boot by when they must see ACPI
//! (an nvdimm is described only by ACPI's NFIT on arm64's virt): a pinned
//! Debian package, fetched through the kernels' private apt configuration
//! and unpacked under target/kernels/uefi/, like the kernels themselves.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use hvo_images::{profile, Arch, BootPmem, UefiFirmware};

use super::{cached_debs, deb_package, debian_names, kernel_apt, kernels_dir, unpack};

/// The firmware file `arch`'s kernels boot by beside an nvdimm, unpacked
/// (fetched if needed); None where the profile needs no UEFI.
pub(super) fn ensure_uefi(arch: Arch) -> Result<Option<PathBuf>> {
    let BootPmem::AcpiNvdimm(firmware) = profile(arch).kernel.boot_pmem else { return Ok(None) };
    let root = kernels_dir().join("uefi").join(firmware.package).join(firmware.version);
    let file = root.join(firmware.file);
    if file.exists() {
        return Ok(Some(file));
    }
    let (debian_arch, _) = debian_names(arch);
    let apt = kernel_apt(debian_arch);
    let debs = kernels_dir().join("debs").join(debian_arch);
    let deb = match find_version(&debs, firmware) {
        Some(deb) => deb,
        None => {
            if !apt.has_indexes() {
                apt.update()?;
            }
            apt.download(&[format!("{}={}", firmware.package, firmware.version)], &debs)?;
            find_version(&debs, firmware)
                .with_context(|| format!("apt-get download left no {} {} .deb", firmware.package, firmware.version))?
        }
    };
    unpack(&deb, &root)?;
    file.exists().then_some(Some(file.clone())).with_context(|| format!("{} holds no {}", deb.display(), firmware.file))
}

/// The cached `.deb` of exactly the pinned version (file names escape the
/// epoch's colon as `%3a`).
fn find_version(debs: &Path, firmware: &UefiFirmware) -> Option<PathBuf> {
    let version = firmware.version.replace(':', "%3a");
    cached_debs(debs).into_iter().find(|p| {
        deb_package(p) == Some(firmware.package)
            && p.file_name().and_then(|n| n.to_str()).and_then(|n| n.split('_').nth(1)) == Some(version.as_str())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pinned_version_is_taken_from_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let firmware = UefiFirmware {
            package: "qemu-efi-aarch64",
            version: "2022.11-6+deb12u2",
            file: "x.fd",
            memory_beside_ram: &[],
        };
        std::fs::write(dir.path().join("qemu-efi-aarch64_2026.08+ds-2_all.deb"), b"").unwrap();
        assert_eq!(find_version(dir.path(), &firmware), None);
        std::fs::write(dir.path().join("qemu-efi-aarch64_2022.11-6+deb12u2_all.deb"), b"").unwrap();
        let found = find_version(dir.path(), &firmware).unwrap();
        assert!(found.ends_with("qemu-efi-aarch64_2022.11-6+deb12u2_all.deb"));
    }
}
