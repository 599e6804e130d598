//! The invariants the harness checks, as one table: the names reports and
//! scenario files use, what each one catches, and the order checks are listed
//! in all derive from here.

use std::fmt;

/// Who checks an invariant, and so where its check lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckedBy {
    /// The verifier, from the page tables, guest memory and manifest alone
    /// (`verify::check`, one function per invariant in its table).
    Tables,
    /// The runner, on the live guest: it needs QEMU (its MMU, the guest's TLB).
    LiveGuest,
    /// The runner, replaying the guest's update log after every command
    /// against the tables (`updates`).
    UpdateLog,
}

/// One named invariant of the vmemmap optimization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Invariant {
    HeadPrivate,
    TailsShared,
    TailsReadonly,
    PteGranularity,
    Contents,
    Accounting,
    NoLeak,
    TranslationAgrees,
    WriteFaults,
    RootsInSync,
    MemmapPresent,
    AltmapUnoptimized,
    CompoundAligned,
    BreakBeforeMake,
    TlbCoherent,
}

impl Invariant {
    /// Every invariant, in the order reports list them.
    pub const ALL: [Invariant; 15] = [
        Invariant::HeadPrivate,
        Invariant::TailsShared,
        Invariant::TailsReadonly,
        Invariant::PteGranularity,
        Invariant::Contents,
        Invariant::Accounting,
        Invariant::NoLeak,
        Invariant::TranslationAgrees,
        Invariant::WriteFaults,
        Invariant::RootsInSync,
        Invariant::MemmapPresent,
        Invariant::AltmapUnoptimized,
        Invariant::CompoundAligned,
        Invariant::BreakBeforeMake,
        Invariant::TlbCoherent,
    ];

    /// The name reports and scenario files use.
    pub const fn name(self) -> &'static str {
        match self {
            Invariant::HeadPrivate => "head-private",
            Invariant::TailsShared => "tails-shared",
            Invariant::TailsReadonly => "tails-readonly",
            Invariant::PteGranularity => "pte-granularity",
            Invariant::Contents => "contents",
            Invariant::Accounting => "accounting",
            Invariant::NoLeak => "no-leak",
            Invariant::TranslationAgrees => "translation-agrees",
            Invariant::WriteFaults => "write-faults",
            Invariant::RootsInSync => "roots-in-sync",
            Invariant::MemmapPresent => "memmap-present",
            Invariant::AltmapUnoptimized => "altmap-unoptimized",
            Invariant::CompoundAligned => "compound-aligned",
            Invariant::BreakBeforeMake => "break-before-make",
            Invariant::TlbCoherent => "tlb-coherent",
        }
    }

    /// What it holds the page tables to, in one sentence (for help and docs).
    pub const fn rule(self) -> &'static str {
        match self {
            Invariant::HeadPrivate => "each compound page's head vmemmap page maps a frame no other address maps, writable",
            Invariant::TailsShared => {
                "every tail vmemmap page maps the frame its layout says (the (zone, order) shared page, the head's frame, or page 1), distinct (zone, order) pairs never share a frame, and a region is optimized exactly when it can be"
            }
            Invariant::TailsReadonly => {
                "tail vmemmap pages carry their layout's protection through every level: read-only (unified, legacy-hugetlb) or writable (legacy-dax, whose tails the kernel writes), never executable"
            }
            Invariant::PteGranularity => "optimized ranges are mapped with base-page entries, never a block or huge leaf",
            Invariant::Contents => {
                "head, tail and shared struct pages, pageblock migratetypes, and (sampled by the host) plain boot RAM's struct pages hold what the model says"
            }
            Invariant::Accounting => "the guest's counters equal what the host counts in the page tables",
            Invariant::NoLeak => {
                "no vmemmap or page-table frame is orphaned or still mapped after a teardown, and no page-table page over the vmemmap stays linked mapping nothing"
            }
            Invariant::TranslationAgrees => "the host's walker and QEMU's MMU (gva2gpa) translate sampled addresses alike",
            Invariant::WriteFaults => "writes to read-only tails fault and writes to heads succeed, through the guest's own TLB",
            Invariant::RootsInSync => "every page-table root the guest keeps has the same top-level vmemmap entries",
            Invariant::MemmapPresent => "every page of memory the guest has has its struct page mapped",
            Invariant::AltmapUnoptimized => "ranges whose struct pages live on the device (altmap) are never optimized and map only device frames",
            Invariant::CompoundAligned => {
                "every compound page is naturally aligned: its head's pfn is a multiple of its size in pages, and its region holds whole compound pages"
            }
            Invariant::BreakBeforeMake => {
                "live page-table entries change only as their MMU allows (arm64, radix: invalid entry, a TLB invalidation covering the old translation, then the new entry), every invalidation removes the translation it must at its size, and the guest's update log accounts for every store"
            }
            Invariant::TlbCoherent => {
                "reads through the guest's own TLB see what the tables map now (a marker the host had written into the mapped frame), and reads of unmapped addresses fault, before and after every optimize, restore, free and hot-remove"
            }
        }
    }

    /// Whether the tables decide it or it needs the live guest.
    pub const fn checked_by(self) -> CheckedBy {
        match self {
            Invariant::TranslationAgrees | Invariant::WriteFaults | Invariant::TlbCoherent => CheckedBy::LiveGuest,
            Invariant::BreakBeforeMake => CheckedBy::UpdateLog,
            Invariant::HeadPrivate
            | Invariant::TailsShared
            | Invariant::TailsReadonly
            | Invariant::PteGranularity
            | Invariant::Contents
            | Invariant::Accounting
            | Invariant::NoLeak
            | Invariant::RootsInSync
            | Invariant::MemmapPresent
            | Invariant::AltmapUnoptimized
            | Invariant::CompoundAligned => CheckedBy::Tables,
        }
    }

    /// The invariant with this name.
    pub fn from_name(name: &str) -> Option<Invariant> {
        Invariant::ALL.into_iter().find(|i| i.name() == name)
    }

    /// Every name, comma-separated, for "known: ..." lists.
    pub fn known_names() -> String {
        Invariant::ALL.map(Invariant::name).join(", ")
    }
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_round_trip() {
        for i in Invariant::ALL {
            assert_eq!(Invariant::from_name(i.name()), Some(i));
        }
        let mut names: Vec<_> = Invariant::ALL.map(Invariant::name).to_vec();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Invariant::ALL.len());
        assert_eq!(Invariant::from_name("tails-writable"), None);
    }
}
