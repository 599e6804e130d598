//! What one invariant's check found: its failures in the order found, and
//! how much it covered when it passes.

use std::collections::HashSet;

use crate::addr::{Pfn, PhysAddr};
use crate::invariant::Invariant;
use crate::report::Check;

use super::compound::CompoundView;

/// Failures are listed up to this many; the rest are counted.
const LISTED: usize = 3;

/// One invariant's findings.
#[derive(Default)]
pub(super) struct Findings {
    failures: Vec<String>,
    covered: u64,
    /// Compound pages (by head) already reported with their diagram.
    pictured: HashSet<Pfn>,
}

impl Findings {
    pub fn fail(&mut self, what: String) {
        self.failures.push(what);
    }

    /// A failure inside one compound page: the first carries the page's
    /// diagram; later ones only say where.
    pub fn fail_in(&mut self, view: &CompoundView, shared: Option<PhysAddr>, what: String) {
        if self.pictured.insert(view.head_pfn) {
            self.fail(format!("{what}{}", view.diagram(shared)));
        } else {
            self.fail(what);
        }
    }

    pub fn cover(&mut self, n: u64) {
        self.covered += n;
    }

    /// The invariant's line in the report.
    pub fn into_check(self, invariant: Invariant) -> Check {
        let f = &self.failures;
        if f.is_empty() {
            return Check::pass(invariant.name(), format!("{} checked", self.covered));
        }
        let more = if f.len() > LISTED { format!(" (and {} more)", f.len() - LISTED) } else { String::new() };
        Check::fail(invariant.name(), format!("{}{more}", f[..f.len().min(LISTED)].join("; ")))
    }
}
