//! The manifest: a `#[repr(C)]` structure the guest keeps at the ELF symbol
//! [`MANIFEST_SYMBOL`] and the host reads from guest-physical memory.
//!
//! Every field is little-endian (all three guests run little-endian). The host
//! decodes it field by field with [`Manifest::decode`], so a manifest from a
//! guest of another ABI version is rejected with a reason instead of misread.
//!
//! Kept in one file past the usual size on purpose: the layout, its
//! decoder and the decoder's tests must change together, field by field,
//! and the update log's own layout already lives in `update_log.rs`.

use core::mem::{offset_of, size_of};

use crate::model::{Layout, RegionKind, Zone};
use crate::Arch;

/// The ELF symbol the guest exports its manifest under.
pub const MANIFEST_SYMBOL: &str = "HVO_MANIFEST";
/// `b"HVOMANIF"` read as a little-endian u64.
pub const MANIFEST_MAGIC: u64 = u64::from_le_bytes(*b"HVOMANIF");
/// Bumped whenever the layout below changes.
pub const ABI_VERSION: u32 = 7;

pub const MAX_ROOTS: usize = 4;
pub const MAX_RAM_RANGES: usize = 8;
pub const MAX_REGIONS: usize = 32;
pub const MAX_SHARED_TAILS: usize = 16;

/// Where the guest is in its life; the host only trusts a `Ready` manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum GuestState {
    /// Static initializer: the guest has not run far enough to fill it in.
    Booting = 0,
    /// The MMU is on, handlers are installed, the manifest is complete.
    Ready = 1,
}

/// What a published page-table root is the root of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum RootKind {
    /// The table that translates the kernel half: x86_64 CR3, arm64 TTBR1_EL1,
    /// ppc64le the radix tree of process-table entry 0.
    Kernel = 1,
    /// arm64 TTBR0_EL1: the low (identity) half the firmware runs in.
    Identity = 2,
    /// ppc64le: the process table registered with the hypervisor.
    ProcessTable = 3,
    /// A second root that must carry the same kernel entries (a process's table).
    Process = 4,
}

impl RootKind {
    pub const fn from_raw(raw: u32) -> Option<RootKind> {
        match raw {
            1 => Some(RootKind::Kernel),
            2 => Some(RootKind::Identity),
            3 => Some(RootKind::ProcessTable),
            4 => Some(RootKind::Process),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RawRoot {
    pub kind: u32,
    pub _reserved: u32,
    /// Guest-physical address of the root table.
    pub pa: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RawRange {
    pub start: u64,
    pub size: u64,
}

/// What the guest counted; the host recounts it from the page tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Counters {
    /// 4 KiB vmemmap frames allocated, ever, and freed, ever.
    pub vmemmap_allocated: u64,
    pub vmemmap_freed: u64,
    /// 4 KiB page-table frames allocated and freed (roots included).
    pub pagetable_allocated: u64,
    pub pagetable_freed: u64,
    /// Struct pages memmap init wrote (it skips shared tails).
    pub struct_pages_initialized: u64,
}

impl Counters {
    pub fn vmemmap_live(&self) -> u64 {
        self.vmemmap_allocated.wrapping_sub(self.vmemmap_freed)
    }
    pub fn pagetable_live(&self) -> u64 {
        self.pagetable_allocated.wrapping_sub(self.pagetable_freed)
    }
}

/// A range of compound pages the guest manages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RawRegion {
    pub start_pfn: u64,
    pub nr_pages: u64,
    pub kind: u32,
    pub zone: u32,
    /// Compound order of every page in the region (9: 2 MiB with 4 KiB pages).
    pub order: u32,
    pub layout: u32,
    /// Whether the region's vmemmap is optimized now.
    pub optimized: u32,
    /// The id commands name the region by.
    pub id: u32,
    /// DAX: guest-physical address of the region's pageblock migratetype tags,
    /// one byte per 2 MiB pageblock (0: none kept).
    pub pageblock_tags: u64,
    /// DAX with an altmap: the pages just below `start_pfn` that hold the
    /// region's struct pages, on the device itself (0: struct pages in
    /// system memory).
    pub altmap_pfns: u64,
}

/// A shared tail page: one per (zone, order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RawSharedTail {
    pub pa: u64,
    pub zone: u32,
    pub order: u32,
    /// Compound pages mapping it.
    pub users: u64,
}

/// The manifest exactly as it lies in guest memory.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct RawManifest {
    pub magic: u64,
    pub abi_version: u32,
    /// `size_of::<RawManifest>()` as the guest was built.
    pub size: u32,
    pub arch: u32,
    pub state: u32,
    pub page_size: u64,
    /// Base of the linear map of physical memory (the kernel's PAGE_OFFSET).
    pub linear_map_base: u64,
    /// Base of the vmemmap region.
    pub vmemmap_base: u64,
    /// Guest-physical range the firmware image occupies.
    pub image: RawRange,
    pub root_count: u32,
    pub ram_count: u32,
    pub roots: [RawRoot; MAX_ROOTS],
    /// Boot RAM as the platform described it.
    pub ram: [RawRange; MAX_RAM_RANGES],
    /// Bumped by the guest every time it rewrites the manifest.
    pub generation: u64,
    /// log2 of a memory section (SECTION_SIZE_BITS).
    pub section_size_bits: u32,
    pub region_count: u32,
    /// The struct page of pfn `p` is at `vmemmap_base + (p - memstart_pfn) * 64`.
    pub memstart_pfn: u64,
    pub counters: Counters,
    /// Bug knobs in force (bit per knob), for the report.
    pub knobs: u64,
    pub shared_tail_count: u32,
    pub _reserved: u32,
    /// Guest-physical address of the update log (`crate::update_log::RawUpdateLog`):
    /// the page-table stores and TLB invalidations of the last command.
    pub update_log: u64,
    pub regions: [RawRegion; MAX_REGIONS],
    pub shared_tails: [RawSharedTail; MAX_SHARED_TAILS],
}

impl RawManifest {
    /// The manifest's bytes as a little-endian guest publishes them (every
    /// target here is little-endian in memory, and the struct has no padding).
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: a repr(C) struct of integers without padding, read as bytes
        // for exactly its own size.
        unsafe { core::slice::from_raw_parts(self as *const RawManifest as *const u8, MANIFEST_SIZE) }
    }

    /// The value the guest's static starts as, before boot code fills it in.
    pub const fn booting(arch: Arch) -> RawManifest {
        RawManifest {
            magic: MANIFEST_MAGIC,
            abi_version: ABI_VERSION,
            size: size_of::<RawManifest>() as u32,
            arch: arch as u32,
            state: GuestState::Booting as u32,
            page_size: 0,
            linear_map_base: 0,
            vmemmap_base: 0,
            image: RawRange { start: 0, size: 0 },
            root_count: 0,
            ram_count: 0,
            roots: [RawRoot { kind: 0, _reserved: 0, pa: 0 }; MAX_ROOTS],
            ram: [RawRange { start: 0, size: 0 }; MAX_RAM_RANGES],
            generation: 0,
            section_size_bits: 0,
            region_count: 0,
            memstart_pfn: 0,
            counters: Counters {
                vmemmap_allocated: 0,
                vmemmap_freed: 0,
                pagetable_allocated: 0,
                pagetable_freed: 0,
                struct_pages_initialized: 0,
            },
            knobs: 0,
            shared_tail_count: 0,
            _reserved: 0,
            update_log: 0,
            regions: [RawRegion {
                start_pfn: 0,
                nr_pages: 0,
                kind: 0,
                zone: 0,
                order: 0,
                layout: 0,
                optimized: 0,
                id: 0,
                pageblock_tags: 0,
                altmap_pfns: 0,
            }; MAX_REGIONS],
            shared_tails: [RawSharedTail { pa: 0, zone: 0, order: 0, users: 0 }; MAX_SHARED_TAILS],
        }
    }
}

/// Number of bytes the host must read to decode a manifest.
pub const MANIFEST_SIZE: usize = size_of::<RawManifest>();

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Root {
    pub kind: RootKind,
    pub pa: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub size: u64,
}

impl Range {
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }
}

/// A decoded region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub id: u32,
    /// Where the pageblock migratetype tags are (0: none kept).
    pub pageblock_tags: u64,
    pub kind: RegionKind,
    pub start_pfn: u64,
    pub nr_pages: u64,
    pub zone: Zone,
    pub order: u32,
    pub layout: Layout,
    pub optimized: bool,
    /// Pages just below `start_pfn` holding the region's struct pages on the
    /// device (altmap); 0 when they are in system memory.
    pub altmap_pfns: u64,
}

impl Region {
    /// The device pages holding the struct pages, as a pfn range (empty
    /// without an altmap).
    pub fn altmap(&self) -> core::ops::Range<u64> {
        self.start_pfn.saturating_sub(self.altmap_pfns)..self.start_pfn
    }

    /// Head pfns of the region's compound pages.
    pub fn heads(&self) -> impl Iterator<Item = u64> + '_ {
        let step = 1u64 << self.order;
        (0..self.nr_pages / step).map(move |i| self.start_pfn + i * step)
    }
}

/// A decoded shared tail page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedTail {
    pub pa: u64,
    pub zone: Zone,
    pub order: u32,
    pub users: u64,
}

/// A decoded, validated manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub arch: Arch,
    pub state: GuestState,
    pub page_size: u64,
    pub linear_map_base: u64,
    pub vmemmap_base: u64,
    pub image: Range,
    pub roots: [Option<Root>; MAX_ROOTS],
    pub ram: [Option<Range>; MAX_RAM_RANGES],
    pub generation: u64,
    pub section_size_bits: u32,
    pub memstart_pfn: u64,
    pub counters: Counters,
    pub knobs: u64,
    pub regions: Regions,
    pub shared_tails: SharedTails,
    /// Where the update log is (0: not published).
    pub update_log: u64,
}

/// The regions, in a fixed-capacity list (the ABI crate has no heap).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Regions {
    items: [Option<Region>; MAX_REGIONS],
}

impl Regions {
    pub fn iter(&self) -> impl Iterator<Item = &Region> {
        self.items.iter().flatten()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SharedTails {
    items: [Option<SharedTail>; MAX_SHARED_TAILS],
}

impl SharedTails {
    pub fn iter(&self) -> impl Iterator<Item = &SharedTail> {
        self.items.iter().flatten()
    }

    pub fn find(&self, zone: Zone, order: u32) -> Option<&SharedTail> {
        self.iter().find(|t| t.zone == zone && t.order == order)
    }
}

impl Manifest {
    pub fn roots(&self) -> impl Iterator<Item = Root> + '_ {
        self.roots.iter().flatten().copied()
    }

    pub fn root(&self, kind: RootKind) -> Option<Root> {
        self.roots().find(|r| r.kind == kind)
    }

    pub fn ram(&self) -> impl Iterator<Item = Range> + '_ {
        self.ram.iter().flatten().copied()
    }

    /// Virtual address of the struct page of `pfn`.
    pub fn struct_page_va(&self, pfn: u64) -> u64 {
        self.vmemmap_base.wrapping_add(pfn.wrapping_sub(self.memstart_pfn).wrapping_mul(crate::model::STRUCT_PAGE_SIZE))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestError {
    /// Fewer bytes than a manifest needs.
    Truncated {
        have: usize,
        need: usize,
    },
    BadMagic(u64),
    AbiVersion {
        found: u32,
        expected: u32,
    },
    SizeMismatch {
        found: u32,
        expected: u32,
    },
    UnknownArch(u32),
    UnknownState(u32),
    UnknownRootKind {
        index: usize,
        raw: u32,
    },
    TooMany {
        field: &'static str,
        count: u32,
        max: usize,
    },
    /// The page size is not a power of two of at least 4 KiB.
    BadPageSize(u64),
    BadRegion {
        index: usize,
        what: &'static str,
        raw: u32,
    },
    BadSharedTail {
        index: usize,
        what: &'static str,
        raw: u32,
    },
}

impl core::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            ManifestError::Truncated { have, need } => {
                write!(f, "manifest truncated: {have} bytes, need {need}")
            }
            ManifestError::BadMagic(m) => write!(f, "bad manifest magic {m:#018x}"),
            ManifestError::AbiVersion { found, expected } => {
                write!(f, "guest ABI version {found}, host expects {expected}: rebuild the guest")
            }
            ManifestError::SizeMismatch { found, expected } => {
                write!(f, "manifest size {found} bytes, host expects {expected}")
            }
            ManifestError::UnknownArch(a) => write!(f, "unknown architecture code {a}"),
            ManifestError::UnknownState(s) => write!(f, "unknown guest state {s}"),
            ManifestError::UnknownRootKind { index, raw } => {
                write!(f, "root {index} has unknown kind {raw}")
            }
            ManifestError::TooMany { field, count, max } => {
                write!(f, "{field}: count {count} exceeds {max}")
            }
            ManifestError::BadPageSize(s) => write!(f, "bad page size {s:#x}"),
            ManifestError::BadRegion { index, what, raw } => {
                write!(f, "region {index}: unknown {what} {raw}")
            }
            ManifestError::BadSharedTail { index, what, raw } => {
                write!(f, "shared tail {index}: unknown {what} {raw}")
            }
        }
    }
}

/// The little-endian word at `at` (the manifest's and the update log's decoders).
pub(crate) fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

pub(crate) fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

impl Manifest {
    /// Decodes a manifest from the bytes at its guest-physical address.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() < MANIFEST_SIZE {
            return Err(ManifestError::Truncated { have: bytes.len(), need: MANIFEST_SIZE });
        }
        let u32_at = |off| le_u32(bytes, off);
        let u64_at = |off| le_u64(bytes, off);

        let magic = u64_at(offset_of!(RawManifest, magic));
        if magic != MANIFEST_MAGIC {
            return Err(ManifestError::BadMagic(magic));
        }
        let abi_version = u32_at(offset_of!(RawManifest, abi_version));
        if abi_version != ABI_VERSION {
            return Err(ManifestError::AbiVersion { found: abi_version, expected: ABI_VERSION });
        }
        let size = u32_at(offset_of!(RawManifest, size));
        if size as usize != MANIFEST_SIZE {
            return Err(ManifestError::SizeMismatch { found: size, expected: MANIFEST_SIZE as u32 });
        }
        let raw_arch = u32_at(offset_of!(RawManifest, arch));
        let arch = Arch::from_raw(raw_arch).ok_or(ManifestError::UnknownArch(raw_arch))?;
        let state = match u32_at(offset_of!(RawManifest, state)) {
            0 => GuestState::Booting,
            1 => GuestState::Ready,
            other => return Err(ManifestError::UnknownState(other)),
        };
        let page_size = u64_at(offset_of!(RawManifest, page_size));
        if state == GuestState::Ready && (page_size < 4096 || !page_size.is_power_of_two()) {
            return Err(ManifestError::BadPageSize(page_size));
        }

        let root_count = u32_at(offset_of!(RawManifest, root_count));
        if root_count as usize > MAX_ROOTS {
            return Err(ManifestError::TooMany { field: "roots", count: root_count, max: MAX_ROOTS });
        }
        let mut roots = [None; MAX_ROOTS];
        for (i, slot) in roots.iter_mut().enumerate().take(root_count as usize) {
            let at = offset_of!(RawManifest, roots) + i * size_of::<RawRoot>();
            let raw_kind = u32_at(at + offset_of!(RawRoot, kind));
            let kind =
                RootKind::from_raw(raw_kind).ok_or(ManifestError::UnknownRootKind { index: i, raw: raw_kind })?;
            *slot = Some(Root { kind, pa: u64_at(at + offset_of!(RawRoot, pa)) });
        }

        let ram_count = u32_at(offset_of!(RawManifest, ram_count));
        if ram_count as usize > MAX_RAM_RANGES {
            return Err(ManifestError::TooMany { field: "ram", count: ram_count, max: MAX_RAM_RANGES });
        }
        let range_at = |at: usize| Range {
            start: u64_at(at + offset_of!(RawRange, start)),
            size: u64_at(at + offset_of!(RawRange, size)),
        };
        let mut ram = [None; MAX_RAM_RANGES];
        for (i, slot) in ram.iter_mut().enumerate().take(ram_count as usize) {
            *slot = Some(range_at(offset_of!(RawManifest, ram) + i * size_of::<RawRange>()));
        }

        let region_count = u32_at(offset_of!(RawManifest, region_count));
        if region_count as usize > MAX_REGIONS {
            return Err(ManifestError::TooMany { field: "regions", count: region_count, max: MAX_REGIONS });
        }
        let mut regions = Regions::default();
        for (i, slot) in regions.items.iter_mut().enumerate().take(region_count as usize) {
            let at = offset_of!(RawManifest, regions) + i * size_of::<RawRegion>();
            let field = |off: usize| u32_at(at + off);
            let bad = |what, raw| ManifestError::BadRegion { index: i, what, raw };
            let kind_raw = field(offset_of!(RawRegion, kind));
            let zone_raw = field(offset_of!(RawRegion, zone));
            let layout_raw = field(offset_of!(RawRegion, layout));
            *slot = Some(Region {
                id: field(offset_of!(RawRegion, id)),
                pageblock_tags: u64_at(at + offset_of!(RawRegion, pageblock_tags)),
                kind: RegionKind::from_raw(kind_raw).ok_or(bad("kind", kind_raw))?,
                start_pfn: u64_at(at + offset_of!(RawRegion, start_pfn)),
                nr_pages: u64_at(at + offset_of!(RawRegion, nr_pages)),
                zone: Zone::from_raw(zone_raw).ok_or(bad("zone", zone_raw))?,
                order: field(offset_of!(RawRegion, order)),
                layout: Layout::from_raw(layout_raw).ok_or(bad("layout", layout_raw))?,
                optimized: field(offset_of!(RawRegion, optimized)) != 0,
                altmap_pfns: u64_at(at + offset_of!(RawRegion, altmap_pfns)),
            });
        }

        let tail_count = u32_at(offset_of!(RawManifest, shared_tail_count));
        if tail_count as usize > MAX_SHARED_TAILS {
            return Err(ManifestError::TooMany { field: "shared tails", count: tail_count, max: MAX_SHARED_TAILS });
        }
        let mut shared_tails = SharedTails::default();
        for (i, slot) in shared_tails.items.iter_mut().enumerate().take(tail_count as usize) {
            let at = offset_of!(RawManifest, shared_tails) + i * size_of::<RawSharedTail>();
            let zone_raw = u32_at(at + offset_of!(RawSharedTail, zone));
            *slot = Some(SharedTail {
                pa: u64_at(at + offset_of!(RawSharedTail, pa)),
                zone: Zone::from_raw(zone_raw).ok_or(ManifestError::BadSharedTail {
                    index: i,
                    what: "zone",
                    raw: zone_raw,
                })?,
                order: u32_at(at + offset_of!(RawSharedTail, order)),
                users: u64_at(at + offset_of!(RawSharedTail, users)),
            });
        }

        let c = offset_of!(RawManifest, counters);
        let counters = Counters {
            vmemmap_allocated: u64_at(c + offset_of!(Counters, vmemmap_allocated)),
            vmemmap_freed: u64_at(c + offset_of!(Counters, vmemmap_freed)),
            pagetable_allocated: u64_at(c + offset_of!(Counters, pagetable_allocated)),
            pagetable_freed: u64_at(c + offset_of!(Counters, pagetable_freed)),
            struct_pages_initialized: u64_at(c + offset_of!(Counters, struct_pages_initialized)),
        };

        Ok(Manifest {
            arch,
            state,
            page_size,
            linear_map_base: u64_at(offset_of!(RawManifest, linear_map_base)),
            vmemmap_base: u64_at(offset_of!(RawManifest, vmemmap_base)),
            image: range_at(offset_of!(RawManifest, image)),
            roots,
            ram,
            generation: u64_at(offset_of!(RawManifest, generation)),
            section_size_bits: u32_at(offset_of!(RawManifest, section_size_bits)),
            memstart_pfn: u64_at(offset_of!(RawManifest, memstart_pfn)),
            counters,
            knobs: u64_at(offset_of!(RawManifest, knobs)),
            regions,
            shared_tails,
            update_log: u64_at(offset_of!(RawManifest, update_log)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(raw: &RawManifest) -> Vec<u8> {
        raw.as_bytes().to_vec()
    }

    fn ready() -> RawManifest {
        let mut raw = RawManifest::booting(Arch::Aarch64);
        raw.state = GuestState::Ready as u32;
        raw.page_size = 4096;
        raw.vmemmap_base = 0xffff_fdff_c000_0000;
        raw.root_count = 2;
        raw.roots[0] = RawRoot { kind: RootKind::Kernel as u32, _reserved: 0, pa: 0x4030_0000 };
        raw.roots[1] = RawRoot { kind: RootKind::Identity as u32, _reserved: 0, pa: 0x4030_1000 };
        raw.ram_count = 1;
        raw.ram[0] = RawRange { start: 0x4000_0000, size: 512 << 20 };
        raw
    }

    #[test]
    fn decodes_what_the_guest_publishes() {
        let m = Manifest::decode(&bytes_of(&ready())).unwrap();
        assert_eq!(m.arch, Arch::Aarch64);
        assert_eq!(m.state, GuestState::Ready);
        assert_eq!(m.root(RootKind::Kernel), Some(Root { kind: RootKind::Kernel, pa: 0x4030_0000 }));
        assert_eq!(m.roots().count(), 2);
        assert_eq!(m.ram().collect::<Vec<_>>(), vec![Range { start: 0x4000_0000, size: 512 << 20 }]);
        assert_eq!(m.vmemmap_base, 0xffff_fdff_c000_0000);
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        assert_eq!(Manifest::decode(&[0u8; 16]), Err(ManifestError::Truncated { have: 16, need: MANIFEST_SIZE }));
        let mut raw = ready();
        raw.magic = 0;
        assert_eq!(Manifest::decode(&bytes_of(&raw)), Err(ManifestError::BadMagic(0)));

        let mut raw = ready();
        raw.abi_version = 99;
        assert!(matches!(Manifest::decode(&bytes_of(&raw)), Err(ManifestError::AbiVersion { found: 99, .. })));

        let mut raw = ready();
        raw.arch = 7;
        assert_eq!(Manifest::decode(&bytes_of(&raw)), Err(ManifestError::UnknownArch(7)));

        let mut raw = ready();
        raw.root_count = 9;
        assert!(matches!(Manifest::decode(&bytes_of(&raw)), Err(ManifestError::TooMany { .. })));

        let mut raw = ready();
        raw.roots[1].kind = 42;
        assert_eq!(Manifest::decode(&bytes_of(&raw)), Err(ManifestError::UnknownRootKind { index: 1, raw: 42 }));

        let mut raw = ready();
        raw.page_size = 3000;
        assert_eq!(Manifest::decode(&bytes_of(&raw)), Err(ManifestError::BadPageSize(3000)));
    }

    #[test]
    fn regions_shared_tails_and_counters_decode() {
        let mut raw = ready();
        raw.memstart_pfn = 0x40000;
        raw.counters.vmemmap_allocated = 1030;
        raw.counters.vmemmap_freed = 6;
        raw.region_count = 1;
        raw.regions[0] = RawRegion {
            start_pfn: 0x48000,
            nr_pages: 2048,
            kind: RegionKind::HugeTlb as u32,
            zone: Zone::Movable as u32,
            order: 9,
            layout: Layout::Unified as u32,
            optimized: 1,
            id: 3,
            pageblock_tags: 0,
            altmap_pfns: 0,
        };
        raw.shared_tail_count = 1;
        raw.shared_tails[0] = RawSharedTail { pa: 0x4100_0000, zone: Zone::Movable as u32, order: 9, users: 4 };
        let m = Manifest::decode(&bytes_of(&raw)).unwrap();
        let region = *m.regions.iter().next().unwrap();
        assert_eq!((region.zone, region.layout, region.optimized), (Zone::Movable, Layout::Unified, true));
        assert_eq!(region.heads().collect::<Vec<_>>(), vec![0x48000, 0x48200, 0x48400, 0x48600]);
        assert_eq!(m.shared_tails.find(Zone::Movable, 9).map(|t| t.users), Some(4));
        assert_eq!(m.counters.vmemmap_live(), 1024);
        assert_eq!(m.struct_page_va(0x40001), 0xffff_fdff_c000_0040);

        raw.regions[0].layout = 77;
        assert_eq!(
            Manifest::decode(&bytes_of(&raw)),
            Err(ManifestError::BadRegion { index: 0, what: "layout", raw: 77 })
        );
    }

    #[test]
    fn a_booting_manifest_needs_no_page_size() {
        let m = Manifest::decode(&bytes_of(&RawManifest::booting(Arch::X86_64))).unwrap();
        assert_eq!(m.state, GuestState::Booting);
        assert_eq!(m.roots().count(), 0);
    }
}
