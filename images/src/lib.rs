//! Image profiles: every per-architecture fact about building the guest and
//! starting QEMU for it, as data in one table ([`profile`]).
//!
//! The linker scripts live beside this crate in `images/<arch>/link.ld`.

use std::path::{Path, PathBuf};
use std::process::Command;

pub use hvo_abi::Arch;

/// How QEMU gets the guest image into memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loader {
    /// `-kernel guest.elf`, with the given `-bios` firmware when set (q35 with
    /// qboot via PVH; pseries with VOF, which needs no firmware file). The
    /// firmware is named, not pathed: QEMU looks it up in its own data
    /// directory, wherever the installed QEMU keeps it.
    Kernel { bios: Option<&'static str> },
    /// arm virt: plain `-kernel` leaves out the ACPI GED device memory hotplug
    /// needs, so a tiny generated firmware (`-bios`) jumps to `entry` and the ELF
    /// is placed by `-device loader`.
    StubFirmware { entry: u64 },
}

/// How the guest ends the VM, which decides how a process exit code is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitDevice {
    /// x86 `isa-debug-exit` at I/O port 0xf4: QEMU exits with `(status << 1) | 1`.
    IsaDebugExit,
    /// arm semihosting SYS_EXIT: QEMU exits with the status itself.
    Semihosting,
    /// pseries RTAS: `power-off` exits 0, `ibm,os-term` exits 1 (with
    /// `-action panic=exit-failure`); only success and failure survive.
    Rtas,
}

impl ExitDevice {
    /// The guest's exit status from QEMU's process exit code, where it can be told.
    pub fn guest_status(self, process_code: i32) -> GuestExit {
        match self {
            ExitDevice::IsaDebugExit if process_code & 1 == 1 => GuestExit::Status((process_code >> 1) as u8),
            // isa-debug-exit can never produce an even code: QEMU itself exited.
            ExitDevice::IsaDebugExit => GuestExit::NotByGuest,
            ExitDevice::Semihosting => GuestExit::Status(process_code as u8),
            ExitDevice::Rtas if process_code == 0 => GuestExit::Success,
            ExitDevice::Rtas => GuestExit::Failure,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    Status(u8),
    Success,
    Failure,
    NotByGuest,
}

impl GuestExit {
    /// Whether this is what a guest asked to exit with `status` produces.
    pub fn matches(self, status: u8) -> bool {
        match self {
            GuestExit::Status(s) => s == status,
            GuestExit::Success => status == 0,
            GuestExit::Failure => status != 0,
            GuestExit::NotByGuest => false,
        }
    }
}

/// The page-table format the MMU walks: which of the host's walkers reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mmu {
    /// x86_64 4-level paging.
    X86_64,
    /// AArch64 VMSAv8-64, 4 KiB granule, 48-bit addresses.
    Aarch64,
    /// Power ISA v3.0 radix, shaped by the tree's own size fields.
    Radix,
}

/// How a real Linux kernel boots on this architecture's machine and where
/// the host finds what it needs in it (`--kernel` runs).
#[derive(Clone, Copy, Debug)]
pub struct KernelBoot {
    /// The console device QEMU's first serial port is to the kernel.
    pub console: &'static str,
    /// How QEMU loads the kernel: never the firmware's stub (arm64 boots
    /// a Linux Image by plain `-kernel` with a device tree).
    pub loader: Loader,
    /// The CPU to emulate for kernels.
    pub cpu: &'static str,
    /// The symbol whose address is the kernel's top page table.
    pub root_symbol: &'static str,
    /// How to find the address of pfn 0's struct page.
    pub vmemmap: VmemmapStart,
    /// Linux's `SECTION_SIZE_BITS` (arch/*/include/asm/sparsemem.h): the
    /// unit its boot memmap counter counts in.
    pub section_shift: u32,
    /// How a kernel here sees persistent memory present at boot, for device
    /// DAX; or why it cannot.
    pub boot_pmem: BootPmem,
    /// Device DAX alignments (compound page sizes) a kernel here offers:
    /// `dax_pmem` allows a PUD-sized one only where the architecture has
    /// PUD-sized transparent huge pages (x86_64 only).
    pub dax_aligns: &'static [u64],
    /// Whether Linux optimizes device DAX vmemmap here at all: the
    /// architecture selects ARCH_WANT_OPTIMIZE_DAX_VMEMMAP (x86_64, ppc64
    /// radix) or keeps every DAX vmemmap page private (arm64).
    pub dax_vmemmap_optimized: bool,
    /// Whether a kernel here takes a DIMM hot-plugged over QMP, and if not, why.
    pub dimm_hotplug: KernelSupport,
}

/// How a profile's kernels get persistent memory present at boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootPmem {
    /// `memmap=SIZE!START` sets the end of boot RAM aside as legacy
    /// persistent memory (nd_e820); a region flagged for struct pages, so
    /// its raw namespace has them before any DAX device takes it.
    Memmap,
    /// A QEMU nvdimm on the command line, which the kernel sees only
    /// through ACPI's NFIT: booted by this UEFI firmware with `acpi=force`.
    /// Boot memory less the persistent memory is RAM; the NFIT region's
    /// raw namespace has no struct pages.
    AcpiNvdimm(&'static UefiFirmware),
    /// Not here: what is missing (the machine, the firmware, the kernel).
    No(&'static str),
}

/// A UEFI firmware file from a Debian package, fetched like the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UefiFirmware {
    pub package: &'static str,
    /// Pinned, so every run boots the same firmware: the one of the QEMU
    /// release the project is measured on (bookworm's 7.2).
    pub version: &'static str,
    /// The file inside the package that QEMU takes as `-bios`.
    pub file: &'static str,
    /// Byte ranges (start, length) beside RAM that the firmware's memory
    /// map describes as memory, so Linux gives them struct pages too.
    pub memory_beside_ram: &'static [(u64, u64)],
}

/// EDK2 for QEMU's arm64 virt machine.
pub const QEMU_EFI_AARCH64: UefiFirmware = UefiFirmware {
    package: "qemu-efi-aarch64",
    version: "2022.11-6+deb12u2",
    file: "usr/share/qemu-efi-aarch64/QEMU_EFI.fd",
    // virt's second flash bank, EDK2's variable store: a runtime region
    // with a cacheable attribute, which arm64 Linux adds to memblock
    // (nomap). Measured: 2112 MiB of memory for 2 GiB of RAM, one more
    // 128 MiB section counted in nr_memmap_boot_pages.
    memory_beside_ram: &[(0x0400_0000, 64 * MIB)],
};

/// Whether the kernels of a profile can do something the scenario asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelSupport {
    Yes,
    /// No: what is missing (the machine, the firmware, the kernel).
    No(&'static str),
}

/// Where a kernel's vmemmap starts (the VA of pfn 0's struct page).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmemmapStart {
    /// A kernel variable holds it (x86_64 `vmemmap_base`, ppc64 `vmemmap`).
    Variable(&'static str),
    /// arm64: `VMEMMAP_START - (memstart_addr >> PAGE_SHIFT) * sizeof(struct
    /// page)`, `memstart_addr` a signed variable. VMEMMAP_START follows the
    /// build's VA_BITS, which the host cannot see: the candidates (52-bit,
    /// 48-bit) are tried in order and the one under which RAM's first
    /// struct page is mapped wins.
    Arm64MemstartAddr { symbol: &'static str, vmemmap_starts: &'static [u64] },
}

/// Everything per architecture.
#[derive(Clone, Copy, Debug)]
pub struct Profile {
    pub arch: Arch,
    /// The Rust target the guest is built for.
    pub rust_target: &'static str,
    /// Guest cargo features this profile builds with (the base page size).
    pub guest_features: &'static [&'static str],
    /// log2 of the base page size the guest runs with.
    pub page_shift: u32,
    pub mmu: Mmu,
    /// The linker script, relative to `images/` (profiles that differ only
    /// in features share one).
    pub linker_script: &'static str,
    /// Code-generation flags beyond the linker script (added by [`build_guest`]).
    pub rustflags: &'static [&'static str],
    pub qemu_binary: &'static str,
    /// The Debian package that ships `qemu_binary`.
    pub qemu_package: &'static str,
    pub machine: &'static str,
    pub cpu: &'static str,
    pub loader: Loader,
    pub exit: ExitDevice,
    /// Machine-specific arguments that every run needs (exit devices, semihosting).
    pub extra_args: &'static [&'static str],
    /// Where boot RAM starts.
    pub ram_base: u64,
    /// Boot RAM sizes must be multiples of this.
    pub ram_granule: u64,
    /// Hotplugged DIMM sizes must be multiples of this.
    pub dimm_granule: u64,
    /// How boot RAM is laid out in guest-physical space.
    pub ram_layout: RamLayout,
    /// Whether an `nvdimm` can be hotplugged (with the machine's `nvdimm=on`).
    pub nvdimm_hotplug: bool,
    /// The largest boot memory the machine takes under TCG with no hotplug
    /// room (measured on QEMU 7.2 in 10 GiB steps), for the boot-time bench.
    pub max_boot_memory: u64,
    /// The kernel's PAGE_OFFSET: where all RAM is mapped again.
    pub linear_map_base: u64,
    /// Base of the vmemmap region (docs/design.md section 3).
    pub vmemmap_base: u64,
    /// How a real kernel boots here.
    pub kernel: KernelBoot,
}

/// How the machine places boot RAM (one backing file) in guest-physical space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamLayout {
    /// One range from `ram_base`.
    Contiguous,
    /// q35: RAM above 2.75 GiB is split, the part from 2 GiB moving above 4 GiB
    /// to leave room for the PCI hole (hw/i386/pc_q35.c).
    PcSplit,
}

/// A piece of boot RAM: guest-physical start, offset in the backing file, length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamPiece {
    pub gpa: u64,
    pub file_offset: u64,
    pub len: u64,
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// cortex-a57 has 44 physical address bits, and virt takes 16000 GiB; but
/// there the firmware's boot makes 34 M page-table updates, past what its
/// update log keeps, so no verdict: 4000 GiB is the largest measured.
const AARCH64_MAX_BOOT_MEMORY: u64 = 4000 * GIB;
/// pseries: 990 GiB boots; 2000 GiB is refused (see the profile).
const PPC64_MAX_BOOT_MEMORY: u64 = 990 * GIB;

/// ppc64le on pseries with the radix MMU; the 64 KiB profile differs only in
/// its base page.
const PPC64LE: Profile = Profile {
    arch: Arch::Ppc64le,
    rust_target: "powerpc64le-unknown-linux-gnu",
    guest_features: &[],
    page_shift: 12,
    mmu: Mmu::Radix,
    linker_script: "ppc64le/link.ld",
    rustflags: &[
        "-Clinker=rust-lld",
        "-Clinker-flavor=ld.lld",
        "-Crelocation-model=static",
        "-Ctarget-cpu=pwr9",
        "-Clink-arg=-static",
        "-Clink-arg=--no-pie",
    ],
    qemu_binary: "qemu-system-ppc64",
    qemu_package: "qemu-system-ppc",
    // VOF boots in 0.18 s where SLOF takes 15-22 s; the spectre caps
    // are set to what TCG can provide so QEMU does not refuse to start.
    machine: "pseries,x-vof=on,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,cap-ccf-assist=off",
    cpu: "power9",
    loader: Loader::Kernel { bios: None },
    exit: ExitDevice::Rtas,
    extra_args: &["-action", "panic=exit-failure"],
    ram_base: 0,
    ram_granule: 256 * MIB,
    dimm_granule: 256 * MIB,
    ram_layout: RamLayout::Contiguous,
    nvdimm_hotplug: false,
    // QEMU allocates the hash page table (1/128 of RAM) up front even for
    // a radix guest: 2000 GiB asks 16 GiB of the host at once and fails.
    max_boot_memory: PPC64_MAX_BOOT_MEMORY,
    linear_map_base: 0xc000_0000_0000_0000,
    vmemmap_base: 0xc00c_0000_0000_0000,
    // SLOF takes 10 s to boot Linux where VOF takes none.
    kernel: KernelBoot {
        console: "hvc0",
        loader: Loader::Kernel { bios: None },
        cpu: "power9",
        root_symbol: "swapper_pg_dir",
        vmemmap: VmemmapStart::Variable("vmemmap"),
        section_shift: 24,
        boot_pmem: BootPmem::No(
            "persistent memory at boot needs `memmap=nn!ss`, which only x86 kernels take, or an nvdimm, \
             which Debian's ppc64le kernels cannot use: they are built without LIBNVDIMM",
        ),
        dax_aligns: &[2 * MIB],
        dax_vmemmap_optimized: true,
        dimm_hotplug: KernelSupport::Yes,
    },
};

/// The one table of per-architecture facts (docs/design.md section 5 explains them).
pub const fn profile(arch: Arch) -> &'static Profile {
    match arch {
        Arch::X86_64 => &Profile {
            arch: Arch::X86_64,
            rust_target: "x86_64-unknown-none",
            guest_features: &[],
            page_shift: 12,
            mmu: Mmu::X86_64,
            linker_script: "x86_64/link.ld",
            rustflags: &["-Crelocation-model=static", "-Clink-arg=--no-pie"],
            qemu_binary: "qemu-system-x86_64",
            qemu_package: "qemu-system-x86",
            machine: "q35",
            cpu: "max",
            // qboot halves boot time against SeaBIOS; it boots PVH kernels.
            loader: Loader::Kernel { bios: Some("qboot.rom") },
            exit: ExitDevice::IsaDebugExit,
            extra_args: &["-device", "isa-debug-exit,iobase=0xf4,iosize=4"],
            ram_base: 0,
            ram_granule: 2 * MIB,
            dimm_granule: 2 * MIB,
            ram_layout: RamLayout::PcSplit,
            nvdimm_hotplug: true,
            // 40 physical address bits under TCG; q35 puts RAM above 2 GiB
            // at 4 GiB and its 64-bit PCI hole above that: 980 GiB is
            // refused ("phys-bits too low").
            max_boot_memory: 970 * GIB,
            linear_map_base: 0xffff_8880_0000_0000,
            vmemmap_base: 0xffff_ea00_0000_0000,
            // `max` has LA57, on which Debian's kernels run 5-level tables;
            // 1 GiB HugeTLB pages need pdpe1gb.
            kernel: KernelBoot {
                console: "ttyS0",
                loader: Loader::Kernel { bios: Some("qboot.rom") },
                cpu: "qemu64,+pdpe1gb",
                root_symbol: "init_top_pgt",
                vmemmap: VmemmapStart::Variable("vmemmap_base"),
                section_shift: 27,
                boot_pmem: BootPmem::Memmap,
                dax_aligns: &[2 * MIB, 1 << 30],
                dax_vmemmap_optimized: true,
                dimm_hotplug: KernelSupport::Yes,
            },
        },
        Arch::Aarch64 => &Profile {
            arch: Arch::Aarch64,
            rust_target: "aarch64-unknown-none",
            guest_features: &[],
            page_shift: 12,
            mmu: Mmu::Aarch64,
            linker_script: "aarch64/link.ld",
            rustflags: &["-Crelocation-model=static"],
            qemu_binary: "qemu-system-aarch64",
            qemu_package: "qemu-system-arm",
            machine: "virt",
            cpu: "cortex-a57",
            loader: Loader::StubFirmware { entry: 0x4020_0000 },
            exit: ExitDevice::Semihosting,
            extra_args: &["-semihosting-config", "enable=on,target=native"],
            ram_base: 0x4000_0000,
            ram_granule: 2 * MIB,
            dimm_granule: 2 * MIB,
            ram_layout: RamLayout::Contiguous,
            nvdimm_hotplug: true,
            max_boot_memory: AARCH64_MAX_BOOT_MEMORY,
            linear_map_base: 0xffff_0000_0000_0000,
            vmemmap_base: 0xffff_fdff_c000_0000,
            // cortex-a57 has no LPA2: Debian's 52-bit kernels run 48-bit
            // 4-level tables on it.
            kernel: KernelBoot {
                console: "ttyAMA0",
                loader: Loader::Kernel { bios: None },
                cpu: "cortex-a57",
                root_symbol: "swapper_pg_dir",
                vmemmap: VmemmapStart::Arm64MemstartAddr {
                    symbol: "memstart_addr",
                    vmemmap_starts: &[0xffff_c1ff_c000_0000, 0xffff_fdff_c000_0000],
                },
                // With 4 KiB (and 16 KiB) pages; 29 with 64 KiB.
                section_shift: 27,
                // An nvdimm is described only by ACPI NFIT on virt.
                boot_pmem: BootPmem::AcpiNvdimm(&QEMU_EFI_AARCH64),
                dax_aligns: &[2 * MIB],
                dax_vmemmap_optimized: false,
                dimm_hotplug: KernelSupport::No(
                    "virt booted by plain -kernel has no ACPI GED for pc-dimm, and Debian's arm64 kernels lack ACPI memory hotplug",
                ),
            },
        },
        Arch::Ppc64le => &PPC64LE,
        // The same machine; the radix tree is 13/9/9/5 with 64 KiB leaves.
        Arch::Ppc64le64k => {
            &Profile { arch: Arch::Ppc64le64k, guest_features: &["page-64k"], page_shift: 16, ..PPC64LE }
        }
    }
}

/// The directory this crate lives in (`images/`).
pub fn images_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The workspace root.
pub fn workspace_root() -> &'static Path {
    images_dir().parent().unwrap_or(Path::new("."))
}

impl Profile {
    /// Where `size` bytes of boot RAM land in guest-physical space.
    pub fn boot_ram_pieces(&self, size: u64) -> Vec<RamPiece> {
        match self.ram_layout {
            RamLayout::PcSplit if size >= 0xb000_0000 => vec![
                RamPiece { gpa: 0, file_offset: 0, len: 2 * GIB },
                RamPiece { gpa: 4 * GIB, file_offset: 2 * GIB, len: size - 2 * GIB },
            ],
            _ => vec![RamPiece { gpa: self.ram_base, file_offset: 0, len: size }],
        }
    }

    /// The base page size, in bytes.
    pub const fn page_size(&self) -> u64 {
        1 << self.page_shift
    }

    pub fn linker_script(&self) -> PathBuf {
        images_dir().join(self.linker_script)
    }

    /// Each profile builds into its own target directory: features change the guest.
    fn target_dir(&self) -> PathBuf {
        Path::new("target/guest").join(self.arch.name())
    }

    /// Where [`build_guest`] leaves the guest ELF.
    pub fn guest_elf(&self) -> PathBuf {
        workspace_root().join(self.target_dir()).join(self.rust_target).join("release/hvo-guest")
    }

    /// The arm virt stub firmware: `ldr x0, #8; br x0; .quad entry`.
    pub fn stub_firmware(&self) -> Option<Vec<u8>> {
        let Loader::StubFirmware { entry } = self.loader else {
            return None;
        };
        let mut bytes = Vec::with_capacity(16);
        bytes.extend_from_slice(&0x5800_0040u32.to_le_bytes()); // ldr x0, #8
        bytes.extend_from_slice(&0xd61f_0000u32.to_le_bytes()); // br x0
        bytes.extend_from_slice(&entry.to_le_bytes());
        Some(bytes)
    }

    /// A cargo command (`build`, `clippy`) on the guest for this profile, with
    /// its target, flags and linker script.
    pub fn guest_command(&self, subcommand: &str) -> Command {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root())
            .args([subcommand, "--release", "--manifest-path", "guest/Cargo.toml", "--target"])
            .arg(self.rust_target)
            .arg("--target-dir")
            .arg(self.target_dir());
        if !self.guest_features.is_empty() {
            cmd.args(["--features", &self.guest_features.join(",")]);
        }
        let mut flags: Vec<String> = self.rustflags.iter().map(|s| s.to_string()).collect();
        flags.push(format!("-Clink-arg=-T{}", self.linker_script().display()));
        // CARGO_ENCODED_RUSTFLAGS applies to the target only (not build scripts)
        // when --target is given, and overrides any RUSTFLAGS in the environment.
        cmd.env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"));
        cmd.env_remove("RUSTFLAGS");
        cmd
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("could not run cargo to build the {arch} guest: {source}")]
    Spawn { arch: Arch, source: std::io::Error },
    #[error("building the {arch} guest failed ({status}):\n{stderr}")]
    Failed { arch: Arch, status: std::process::ExitStatus, stderr: String },
}

/// Builds the guest for `arch` (a no-op when it is up to date) and returns the ELF.
pub fn build_guest(arch: Arch) -> Result<PathBuf, BuildError> {
    let p = profile(arch);
    let out = p.guest_command("build").output().map_err(|source| BuildError::Spawn { arch, source })?;
    if !out.status.success() {
        return Err(BuildError::Failed {
            arch,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(p.guest_elf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_arch_has_a_linker_script() {
        for arch in Arch::ALL {
            let script = profile(arch).linker_script();
            assert!(script.is_file(), "{} missing", script.display());
        }
    }

    #[test]
    fn stub_firmware_jumps_to_the_entry() {
        let fw = profile(Arch::Aarch64).stub_firmware().unwrap();
        assert_eq!(fw.len(), 16);
        assert_eq!(u64::from_le_bytes(fw[8..16].try_into().unwrap()), 0x4020_0000);
        assert!(profile(Arch::X86_64).stub_firmware().is_none());
    }

    #[test]
    fn q35_moves_ram_above_the_pci_hole() {
        let x86 = profile(Arch::X86_64);
        assert_eq!(x86.boot_ram_pieces(512 << 20), vec![RamPiece { gpa: 0, file_offset: 0, len: 512 << 20 }]);
        let big = x86.boot_ram_pieces(4 << 30);
        assert_eq!(big[1], RamPiece { gpa: 4 << 30, file_offset: 2 << 30, len: 2 << 30 });
        assert_eq!(profile(Arch::Aarch64).boot_ram_pieces(1 << 30)[0].gpa, 0x4000_0000);
    }

    #[test]
    fn exit_codes_are_read_per_device() {
        assert_eq!(ExitDevice::IsaDebugExit.guest_status(7), GuestExit::Status(3));
        assert_eq!(ExitDevice::IsaDebugExit.guest_status(0), GuestExit::NotByGuest);
        assert_eq!(ExitDevice::Semihosting.guest_status(3), GuestExit::Status(3));
        assert!(ExitDevice::Rtas.guest_status(0).matches(0));
        assert!(ExitDevice::Rtas.guest_status(1).matches(5));
        assert!(!ExitDevice::Rtas.guest_status(1).matches(0));
    }
}
