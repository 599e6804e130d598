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
pub(crate) struct Findings {
    failures: Vec<String>,
    covered: u64,
    /// Compound pages (by head) already reported with their diagram.
    pictured: HashSet<Pfn>,
    /// What a pass says it covered, in words (else "N checked").
    covered_in_words: Option<String>,
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

    /// Says what a pass covered in words rather than as a count.
    pub fn covered_as(&mut self, words: String) {
        self.covered_in_words = Some(words);
    }

    /// The invariant's line in the report.
    pub fn into_check(self, invariant: Invariant) -> Check {
        let f = &self.failures;
        if f.is_empty() {
            let words = self.covered_in_words.unwrap_or_else(|| format!("{} checked", self.covered));
            return Check::pass(invariant.name(), words);
        }
        let more = if f.len() > LISTED { format!(" (and {} more)", f.len() - LISTED) } else { String::new() };
        Check::fail(invariant.name(), format!("{}{more}", f[..f.len().min(LISTED)].join("; ")))
    }
}
