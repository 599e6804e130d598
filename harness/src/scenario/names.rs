//! The names a scenario may write for each choice, and the one helper that
//! reads them: what a field accepts and what its "known: ..." list says come
//! from the same table, so the two cannot drift apart.

use std::fmt;

use hvo_abi::model::{Knob, Layout, Zone};
use hvo_abi::refusal::Refusal;
use hvo_images::Arch;
use toml::Spanned;

use super::locate::Locator;
use super::{Backend, DaxDevice, ScenarioError};
use crate::invariant::Invariant;

/// A closed set of things a scenario names by a fixed word.
pub(super) trait Named: Copy + PartialEq + 'static {
    /// Every value, in the order "known: ..." lists show them.
    const ALL: &'static [Self];
    fn name(self) -> &'static str;
}

macro_rules! named_by_inherent_methods {
    ($($t:ty),*) => {$(
        impl Named for $t {
            const ALL: &'static [Self] = &<$t>::ALL;
            fn name(self) -> &'static str {
                <$t>::name(self)
            }
        }
    )*};
}
named_by_inherent_methods!(Zone, Layout, Knob, Arch, Backend, DaxDevice, Refusal);

/// What a step does, as its `action` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Action {
    Ping,
    VerifyManifest,
    HugetlbAlloc,
    Optimize,
    Restore,
    HugetlbFree,
    Verify,
    FailAllocation,
    HotAdd,
    HotRemove,
    Exit,
}

impl Named for Action {
    const ALL: &'static [Action] = &[
        Action::Ping,
        Action::VerifyManifest,
        Action::HugetlbAlloc,
        Action::Optimize,
        Action::Restore,
        Action::HugetlbFree,
        Action::Verify,
        Action::FailAllocation,
        Action::HotAdd,
        Action::HotRemove,
        Action::Exit,
    ];

    fn name(self) -> &'static str {
        match self {
            Action::Ping => "ping",
            Action::VerifyManifest => "verify-manifest",
            Action::HugetlbAlloc => "hugetlb-alloc",
            Action::Optimize => "optimize",
            Action::Restore => "restore",
            Action::HugetlbFree => "hugetlb-free",
            Action::Verify => "verify",
            Action::FailAllocation => "fail-allocation",
            Action::HotAdd => "hot-add",
            Action::HotRemove => "hot-remove",
            Action::Exit => "exit",
        }
    }
}

/// What a `hot-add` step makes of the memory it plugs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HotAddKind {
    /// Device DAX with compound pages (the default).
    Dax,
    /// Ordinary memory, onlined into a zone.
    Memory,
}

impl Named for HotAddKind {
    const ALL: &'static [HotAddKind] = &[HotAddKind::Dax, HotAddKind::Memory];

    fn name(self) -> &'static str {
        match self {
            HotAddKind::Dax => "dax",
            HotAddKind::Memory => "memory",
        }
    }
}

/// Layouts an `optimize` step may ask for: not optimizing is not one.
pub(super) const OPTIMIZE_LAYOUTS: &[Layout] = &[Layout::Unified, Layout::LegacyHugetlb, Layout::LegacyDax];
/// Zones hot-added ordinary memory can be onlined into.
pub(super) const MEMORY_ZONES: &[Zone] = &[Zone::Normal, Zone::Movable];

/// One field's accepted values and how its errors describe them.
pub(super) struct Choice<T: 'static> {
    /// What the value is, as "unknown {what} `x`" says it.
    pub what: &'static str,
    pub accepted: &'static [T],
}

impl<T: Named> Choice<T> {
    /// Every value of `T`.
    pub const fn all(what: &'static str) -> Choice<T> {
        Choice { what, accepted: T::ALL }
    }

    pub fn find(&self, name: &str) -> Option<T> {
        self.accepted.iter().copied().find(|v| v.name() == name)
    }

    /// The accepted names, comma-separated.
    pub fn known(&self) -> String {
        self.accepted.iter().map(|v| v.name()).collect::<Vec<_>>().join(", ")
    }

    /// The value `given` names, or an error at its line naming `field` and
    /// listing what is accepted.
    pub fn parse(&self, loc: &Locator, field: &str, given: &Spanned<String>) -> Result<T, ScenarioError> {
        self.find(given.get_ref()).ok_or_else(|| loc.error(given.span(), Some(field), self.unknown(given.get_ref())))
    }

    /// `given`'s value when written, `default` when not.
    pub fn parse_or(
        &self,
        loc: &Locator,
        field: &str,
        given: Option<&Spanned<String>>,
        default: T,
    ) -> Result<T, ScenarioError> {
        given.map_or(Ok(default), |g| self.parse(loc, field, g))
    }

    pub fn unknown(&self, given: &str) -> String {
        format!("unknown {} `{given}` (known: {})", self.what, self.known())
    }
}

/// The checks a scenario can expect to fail: the run's own checks, then
/// every invariant.
pub(super) struct CheckNames;

impl CheckNames {
    pub fn accepts(name: &str) -> bool {
        super::RUN_CHECKS.contains(&name) || Invariant::from_name(name).is_some()
    }

    pub fn known() -> String {
        format!("{}, {}", super::RUN_CHECKS.join(", "), Invariant::known_names())
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
