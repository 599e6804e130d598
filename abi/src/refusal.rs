//! Why the guest refused a step, in words both sides agree on: the guest
//! answers a refused command `@hvo <seq> err refused=<reason> <detail>`, and
//! the host reads the reason back into a [`Refusal`]. Scenarios name the
//! refusal they expect by the same names.

use core::fmt;

/// The reason a command was refused. The names are stable: scenario files
/// and JSON results carry them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// A frame allocation fault injection was told to fail.
    InjectedFailure,
    /// Memory ran out (frames, or room in hot-added memory).
    OutOfMemory,
    /// Every region slot is taken.
    NoRegionSlot,
    /// Every shared tail page slot is taken.
    NoSharedTailSlot,
    /// No such region, or not one of the kind the command takes.
    NoSuchRegion,
    /// The region is optimized already.
    AlreadyOptimized,
    /// The region is not optimized.
    NotOptimized,
    /// The compound pages have too few struct pages to share any.
    TooSmallToOptimize,
    /// Too late: boot-time set-up after the vmemmap was populated.
    TooLate,
    /// The region is still in use.
    Busy,
    /// Section bookkeeping refused the range (present already, not whole subsections).
    BadRange,
    /// The range cannot hold its own struct pages (altmap).
    NoRoomForAltmap,
    /// Persistent memory set aside at boot must be whole subsections of
    /// the last boot RAM range and leave some RAM.
    BadPmemSize,
    /// An address not aligned to the page size asked for.
    Misaligned,
    /// Something is mapped there already.
    AlreadyMapped,
    /// Nothing is mapped there.
    NotMapped,
    /// A leaf of that size cannot be placed on this architecture.
    SizeNotSupported,
}

/// What the refusal reply's payload starts with.
const KEY: &str = "refused=";

impl Refusal {
    pub const ALL: [Refusal; 17] = [
        Refusal::InjectedFailure,
        Refusal::OutOfMemory,
        Refusal::NoRegionSlot,
        Refusal::NoSharedTailSlot,
        Refusal::NoSuchRegion,
        Refusal::AlreadyOptimized,
        Refusal::NotOptimized,
        Refusal::TooSmallToOptimize,
        Refusal::TooLate,
        Refusal::Busy,
        Refusal::BadRange,
        Refusal::NoRoomForAltmap,
        Refusal::BadPmemSize,
        Refusal::Misaligned,
        Refusal::AlreadyMapped,
        Refusal::NotMapped,
        Refusal::SizeNotSupported,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Refusal::InjectedFailure => "injected-failure",
            Refusal::OutOfMemory => "out-of-memory",
            Refusal::NoRegionSlot => "no-region-slot",
            Refusal::NoSharedTailSlot => "no-shared-tail-slot",
            Refusal::NoSuchRegion => "no-such-region",
            Refusal::AlreadyOptimized => "already-optimized",
            Refusal::NotOptimized => "not-optimized",
            Refusal::TooSmallToOptimize => "too-small-to-optimize",
            Refusal::TooLate => "too-late",
            Refusal::Busy => "busy",
            Refusal::BadRange => "bad-range",
            Refusal::NoRoomForAltmap => "no-room-for-altmap",
            Refusal::BadPmemSize => "bad-pmem-size",
            Refusal::Misaligned => "misaligned",
            Refusal::AlreadyMapped => "already-mapped",
            Refusal::NotMapped => "not-mapped",
            Refusal::SizeNotSupported => "size-not-supported",
        }
    }

    pub fn from_name(name: &str) -> Option<Refusal> {
        Refusal::ALL.into_iter().find(|r| r.name() == name)
    }

    /// The reason a refusal reply's payload gives, and the detail after it;
    /// `None` for an error that is no refusal (a command the guest could
    /// not read).
    pub fn parse(payload: &str) -> Option<(Refusal, &str)> {
        let rest = payload.strip_prefix(KEY)?;
        let (name, detail) = rest.split_once(' ').unwrap_or((rest, ""));
        Some((Refusal::from_name(name)?, detail))
    }

    /// Writes a refusal reply's payload: the reason, then `detail`.
    pub fn write_payload(self, out: &mut impl fmt::Write, detail: fmt::Arguments) -> fmt::Result {
        write!(out, "{KEY}{} {detail}", self.name())
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_round_trip_through_a_reply() {
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(Refusal::from_name(r.name()), Some(*r));
            assert!(Refusal::ALL[i + 1..].iter().all(|o| o.name() != r.name()));
            let mut payload = String::new();
            r.write_payload(&mut payload, format_args!("Map(Alloc(Injected))")).unwrap();
            assert_eq!(Refusal::parse(&payload), Some((*r, "Map(Alloc(Injected))")));
        }
        assert_eq!(Refusal::parse("unknown command 'x'"), None);
        assert_eq!(Refusal::parse("refused=sideways x"), None);
        assert_eq!(Refusal::parse("refused=busy"), Some((Refusal::Busy, "")));
    }
}
