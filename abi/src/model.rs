//! The vmemmap model's vocabulary: the guest's `struct page`, zones, layouts
//! and region kinds. Defined once so the host decodes exactly what the guest
//! writes; how pages are mapped is not here (the host works that out itself).

/// Pageblocks are 2 MiB whatever the base page (pageblock_order 9 with 4 KiB
/// pages, 5 with ppc64's 64 KiB pages, where it follows the 2 MiB huge page).
pub const PAGEBLOCK_BYTES: u64 = 2 << 20;

/// Base pages per pageblock.
pub const fn pageblock_pages(page_size: u64) -> u64 {
    PAGEBLOCK_BYTES / page_size
}
/// The migratetype memmap init gives device memory's pageblocks.
pub const MIGRATE_MOVABLE: u8 = 1;

/// Every architecture's `struct page` is 64 bytes.
pub const STRUCT_PAGE_SIZE: u64 = 64;

/// The guest's model of `struct page`: eight little-endian words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(C)]
pub struct StructPage {
    /// Zone in bits 0-7, [`HEAD`] or [`TAIL`], compound order in bits 16-23.
    pub flags: u64,
    /// Tails: [`TAIL_MARKER`] (the head is found by alignment, so every tail of
    /// a given zone and order is identical, which is what makes sharing work).
    pub compound_head: u64,
    pub refcount: u64,
    /// [`INITIALIZED`] once memmap init wrote this struct page.
    pub marker: u64,
    pub reserved: [u64; 4],
}

pub const HEAD: u64 = 1 << 8;
pub const TAIL: u64 = 1 << 9;
pub const TAIL_MARKER: u64 = 1;
pub const INITIALIZED: u64 = u64::from_le_bytes(*b"hvo-page");
const ZONE_MASK: u64 = 0xff;
const ORDER_SHIFT: u32 = 16;

impl StructPage {
    /// What a struct page holds before memmap init writes it: Linux's
    /// PAGE_POISON_PATTERN (all ones) under CONFIG_DEBUG_VM.
    pub const POISONED: StructPage = StructPage {
        flags: u64::MAX,
        compound_head: u64::MAX,
        refcount: u64::MAX,
        marker: u64::MAX,
        reserved: [u64::MAX; 4],
    };

    /// A page memmap init has initialized and nothing has claimed.
    pub const fn free(zone: Zone) -> StructPage {
        StructPage { flags: zone as u64, compound_head: 0, refcount: 0, marker: INITIALIZED, reserved: [0; 4] }
    }

    pub const fn head(zone: Zone, order: u32) -> StructPage {
        StructPage {
            flags: zone as u64 | HEAD | (order as u64) << ORDER_SHIFT,
            compound_head: 0,
            refcount: 1,
            marker: INITIALIZED,
            reserved: [0; 4],
        }
    }

    pub const fn tail(zone: Zone, order: u32) -> StructPage {
        StructPage {
            flags: zone as u64 | TAIL | (order as u64) << ORDER_SHIFT,
            compound_head: TAIL_MARKER,
            refcount: 0,
            marker: INITIALIZED,
            reserved: [0; 4],
        }
    }

    pub fn zone(&self) -> Option<Zone> {
        Zone::from_raw((self.flags & ZONE_MASK) as u32)
    }

    pub fn order(&self) -> u32 {
        ((self.flags >> ORDER_SHIFT) & 0xff) as u32
    }

    pub fn to_words(self) -> [u64; 8] {
        let r = self.reserved;
        [self.flags, self.compound_head, self.refcount, self.marker, r[0], r[1], r[2], r[3]]
    }

    pub fn from_le_bytes(b: &[u8; 64]) -> StructPage {
        let w = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(x)
        };
        StructPage {
            flags: w(0),
            compound_head: w(1),
            refcount: w(2),
            marker: w(3),
            reserved: [w(4), w(5), w(6), w(7)],
        }
    }
}

/// Memory zones the model distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum Zone {
    Normal = 0,
    Movable = 1,
    Device = 2,
}

impl Zone {
    pub const ALL: [Zone; 3] = [Zone::Normal, Zone::Movable, Zone::Device];

    pub const fn from_raw(raw: u32) -> Option<Zone> {
        match raw {
            0 => Some(Zone::Normal),
            1 => Some(Zone::Movable),
            2 => Some(Zone::Device),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Zone::Normal => "normal",
            Zone::Movable => "movable",
            Zone::Device => "device",
        }
    }

    pub fn from_name(name: &str) -> Option<Zone> {
        Zone::ALL.into_iter().find(|z| z.name() == name)
    }
}

/// How an optimized compound page's vmemmap is laid out (docs/design.md section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Layout {
    /// The series: one private head page, tails on the (zone, order) shared page, read-only.
    Unified = 0,
    /// Linux up to about 6.19: tails map the head page's own frame, read-only.
    LegacyHugetlb = 1,
    /// DAX before the series: head and first tail private, tails map page 1, writable.
    LegacyDax = 2,
    /// Not optimized: every vmemmap page private and writable.
    None = 3,
}

impl Layout {
    pub const ALL: [Layout; 4] = [Layout::Unified, Layout::LegacyHugetlb, Layout::LegacyDax, Layout::None];

    pub const fn from_raw(raw: u32) -> Option<Layout> {
        match raw {
            0 => Some(Layout::Unified),
            1 => Some(Layout::LegacyHugetlb),
            2 => Some(Layout::LegacyDax),
            3 => Some(Layout::None),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Layout::Unified => "unified",
            Layout::LegacyHugetlb => "legacy-hugetlb",
            Layout::LegacyDax => "legacy-dax",
            Layout::None => "none",
        }
    }

    pub fn from_name(name: &str) -> Option<Layout> {
        Layout::ALL.into_iter().find(|l| l.name() == name)
    }

    /// Vmemmap pages each compound page keeps private under this layout.
    pub const fn private_pages(self) -> u64 {
        match self {
            Layout::Unified | Layout::LegacyHugetlb => 1,
            Layout::LegacyDax => 2,
            Layout::None => u64::MAX,
        }
    }
}

/// Bug knobs: each reintroduces one known bug on purpose, so every invariant
/// is shown to fire (docs/design.md section 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Knob {
    /// Tails mapped writable.
    TailsWritable = 0,
    /// The head vmemmap page mapped to the shared tail page.
    HeadShared = 1,
    /// Under unified, tails mapped to a page of their own folio.
    PerFolioTail = 2,
    /// One shared tail page used for every zone.
    CrossZoneTail = 3,
    /// A freed vmemmap frame not subtracted from the counters.
    CounterNotDecremented = 4,
    /// Remapping without invalidating the TLB.
    NoTlbFlush = 5,
    /// The shared tail page kept when its last user goes.
    SharedTailLeak = 6,
    /// The shared tail page filled with struct pages of the wrong order.
    StaleTailContents = 7,
    /// A new top-level vmemmap entry written into the kernel root only, not
    /// copied into the process root.
    UnsyncedRoot = 8,
    /// A compound page whose vmemmap lies under a 2 MiB leaf is marked
    /// optimized without splitting the leaf or remapping anything.
    SkipSplit = 9,
    /// A failed hot-add's rollback subtracts the vmemmap of the whole range,
    /// not just what it populated (v8 1/6: the memmap counter underflows).
    HotAddRollbackOvercount = 10,
    /// DAX with compound pages counts the unoptimized vmemmap size instead
    /// of the frames it allocated (v8 4/6).
    DaxCountedUnoptimized = 11,
    /// A 1 GiB device compound page gets only its first pageblock's
    /// migratetype set (v8 5/6, patch 06).
    FirstPageblockOnly = 12,
    /// DAX hot-added into the empty subsections of a boot section reuses the
    /// boot memmap unoptimized, yet only the struct pages an optimized
    /// compound page keeps private get initialized (v8 6/6). The same
    /// miscount where a compound page's struct pages stay in a neighbour's
    /// 2 MiB vmemmap leaf (64 KiB pages, memory hot-added beside it).
    BootSectionPartialInit = 13,
    /// Removing part of the memory under a 2 MiB vmemmap leaf frees the
    /// whole leaf, with the struct pages of the subsections still present
    /// (the arm64 sub-section hot-remove fix).
    SubsectionRemoveFreesLeaf = 14,
    /// A range whose struct pages live on the device (altmap) is optimized
    /// anyway, its tails on the shared page in system memory.
    OptimizeAltmap = 15,
    /// DAX whose compound pages have too few struct pages to share any
    /// (2 MiB with 64 KiB pages: 2 KiB, less than one vmemmap page) is
    /// taken for optimizable: vmemmap_can_optimize without the check that
    /// there are more vmemmap pages than the layout keeps private. HugeTLB
    /// optimize's check is off by one: a folio with exactly as many vmemmap
    /// pages as the layout keeps private is optimized.
    SmallCompoundOptimized = 16,
    /// A live vmemmap entry replaced by one with another output address (a
    /// remap), or a block by a table (a split), with a single store where the
    /// architecture asks for break-before-make (arm64, ppc64 radix): no
    /// invalid entry and TLB invalidation in between.
    NoBreakBeforeMake = 17,
    /// ppc64: `tlbie` encodes the base page size (AP) whatever the size of
    /// the translation it must invalidate, so a 2 MiB one stays cached.
    TlbieBaseSize = 18,
    /// memmap init skips boot RAM outside the gigantic pages reserved at
    /// boot: those struct pages keep whatever the raw vmemmap frames held.
    SkipBootMemmapInit = 19,
    /// Freed HugeTLB folios' struct pages reset to the normal zone, whatever
    /// zone the memory they came from is in (hot-added movable memory).
    FreeResetsZone = 20,
    /// Under legacy-dax, the tails mapped read-only: the layout keeps them
    /// writable (the kernel writes a DAX compound page's tail struct pages).
    LegacyDaxTailsReadonly = 21,
    /// The altmap reserve at the start of a device range rounded up to a
    /// page, not to the compound page size: the compound pages after it
    /// start off their natural alignment.
    AltmapReserveUnaligned = 22,
    /// A teardown leaves the page-table pages it emptied linked (and
    /// counted): vmemmap_free without free_pte_table and its kin.
    KeepEmptyTables = 23,
    /// Restore gives a tail its own frame again without invalidating the
    /// translation to the shared page (the restore path only).
    NoFlushRestore = 24,
    /// A vmemmap page unmapped on teardown (DAX or memory hot-remove, a
    /// failed hot-add's rollback) without invalidating its translation.
    NoFlushUnmap = 25,
    /// Optimize copies a compound page's private vmemmap pages (the head,
    /// legacy-dax's page 1) to fresh frames and remaps them without
    /// invalidating the translation to the old frame.
    NoFlushHeadCopy = 26,
    /// A new top-level vmemmap entry a hot-add creates stays in the kernel
    /// root (the boot-time sync is right): the hot-add path of
    /// `unsynced-root` alone.
    UnsyncedRootHotAdd = 27,
}

impl Knob {
    pub const ALL: [Knob; 28] = [
        Knob::TailsWritable,
        Knob::HeadShared,
        Knob::PerFolioTail,
        Knob::CrossZoneTail,
        Knob::CounterNotDecremented,
        Knob::NoTlbFlush,
        Knob::SharedTailLeak,
        Knob::StaleTailContents,
        Knob::UnsyncedRoot,
        Knob::SkipSplit,
        Knob::HotAddRollbackOvercount,
        Knob::DaxCountedUnoptimized,
        Knob::FirstPageblockOnly,
        Knob::BootSectionPartialInit,
        Knob::SubsectionRemoveFreesLeaf,
        Knob::OptimizeAltmap,
        Knob::SmallCompoundOptimized,
        Knob::NoBreakBeforeMake,
        Knob::TlbieBaseSize,
        Knob::SkipBootMemmapInit,
        Knob::FreeResetsZone,
        Knob::LegacyDaxTailsReadonly,
        Knob::AltmapReserveUnaligned,
        Knob::KeepEmptyTables,
        Knob::NoFlushRestore,
        Knob::NoFlushUnmap,
        Knob::NoFlushHeadCopy,
        Knob::UnsyncedRootHotAdd,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Knob::TailsWritable => "tails-writable",
            Knob::HeadShared => "head-shared",
            Knob::PerFolioTail => "per-folio-tail",
            Knob::CrossZoneTail => "cross-zone-tail",
            Knob::CounterNotDecremented => "counter-not-decremented",
            Knob::NoTlbFlush => "no-tlb-flush",
            Knob::SharedTailLeak => "shared-tail-leak",
            Knob::StaleTailContents => "stale-tail-contents",
            Knob::UnsyncedRoot => "unsynced-root",
            Knob::SkipSplit => "skip-split",
            Knob::HotAddRollbackOvercount => "hot-add-rollback-overcount",
            Knob::DaxCountedUnoptimized => "dax-counted-unoptimized",
            Knob::FirstPageblockOnly => "first-pageblock-only",
            Knob::BootSectionPartialInit => "boot-section-partial-init",
            Knob::SubsectionRemoveFreesLeaf => "subsection-remove-frees-leaf",
            Knob::OptimizeAltmap => "optimize-altmap",
            Knob::SmallCompoundOptimized => "small-compound-optimized",
            Knob::NoBreakBeforeMake => "no-break-before-make",
            Knob::TlbieBaseSize => "tlbie-base-size",
            Knob::SkipBootMemmapInit => "skip-boot-memmap-init",
            Knob::FreeResetsZone => "free-resets-zone",
            Knob::LegacyDaxTailsReadonly => "legacy-dax-tails-readonly",
            Knob::AltmapReserveUnaligned => "altmap-reserve-unaligned",
            Knob::KeepEmptyTables => "keep-empty-tables",
            Knob::NoFlushRestore => "no-flush-restore",
            Knob::NoFlushUnmap => "no-flush-unmap",
            Knob::NoFlushHeadCopy => "no-flush-head-copy",
            Knob::UnsyncedRootHotAdd => "unsynced-root-hot-add",
        }
    }

    pub fn from_name(name: &str) -> Option<Knob> {
        Knob::ALL.into_iter().find(|k| k.name() == name)
    }

    pub const fn bit(self) -> u64 {
        1 << self as u32
    }
}

/// What a region of memory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum RegionKind {
    /// HugeTLB folios allocated from boot memory.
    HugeTlb = 1,
    /// A hotplugged device-DAX range of compound pages.
    Dax = 2,
    /// Hotplugged memory onlined as ordinary memory, for HugeTLB folios.
    Memory = 3,
}

impl RegionKind {
    pub const fn from_raw(raw: u32) -> Option<RegionKind> {
        match raw {
            1 => Some(RegionKind::HugeTlb),
            2 => Some(RegionKind::Dax),
            3 => Some(RegionKind::Memory),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_pages_round_trip_through_bytes() {
        for page in
            [StructPage::free(Zone::Movable), StructPage::head(Zone::Normal, 9), StructPage::tail(Zone::Device, 18)]
        {
            let mut bytes = [0u8; 64];
            for (i, w) in page.to_words().iter().enumerate() {
                bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
            }
            assert_eq!(StructPage::from_le_bytes(&bytes), page);
        }
        let t = StructPage::tail(Zone::Device, 18);
        assert_eq!((t.zone(), t.order()), (Some(Zone::Device), 18));
        assert_eq!(core::mem::size_of::<StructPage>() as u64, STRUCT_PAGE_SIZE);
    }

    #[test]
    fn tails_of_different_zone_or_order_differ() {
        assert_ne!(StructPage::tail(Zone::Normal, 9), StructPage::tail(Zone::Movable, 9));
        assert_ne!(StructPage::tail(Zone::Normal, 9), StructPage::tail(Zone::Normal, 18));
    }

    #[test]
    fn knobs_have_distinct_names_and_bits() {
        for (i, a) in Knob::ALL.iter().enumerate() {
            assert_eq!(Knob::from_name(a.name()), Some(*a));
            for b in &Knob::ALL[i + 1..] {
                assert_ne!(a.bit(), b.bit());
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for l in Layout::ALL {
            assert_eq!(Layout::from_name(l.name()), Some(l));
            assert_eq!(Layout::from_raw(l as u32), Some(l));
        }
        for z in Zone::ALL {
            assert_eq!(Zone::from_name(z.name()), Some(z));
        }
    }
}
