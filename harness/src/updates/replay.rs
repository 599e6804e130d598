//! Replaying the guest's update log over the host's picture of its tables.
//!
//! The picture starts from the tables as walked (a [`Snapshot`]) and follows
//! the log store by store: which tables are live (reachable from a root the
//! guest publishes), what each of their entries holds, which translations a
//! store took out and no invalidation has removed yet, and which entries
//! are broken (made invalid) waiting for their new value. Stores to entries
//! no live table holds (a table filled before it is linked) are kept aside
//! until a store links that table. After each command the picture is held
//! to the tables walked again: anything the log does not account for is a
//! finding, since the log is then no proof.

use std::collections::HashMap;

use hvo_abi::manifest::RootKind;
use hvo_abi::update_log::{InvalidationForm, Store};
use hvo_images::Mmu;

use super::rules::{self, Coverage, Removed};
use crate::pgtable::{Decoded, Format, TableVisit};
use crate::verify::size_name;

/// A live table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub root: RootKind,
    pub level: usize,
    /// The first address it translates within the tree's bits.
    pub tree_va: u64,
    /// log2 of the bytes one entry spans.
    pub shift: u32,
    pub index_bits: u32,
    pub entries: Vec<u64>,
    /// Entries (of live tables, or roots) pointing at it.
    pub links: u32,
}

/// Every live table, by its guest-physical address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub tables: HashMap<u64, Table>,
}

impl Snapshot {
    /// The tables of one tree, as walked, added to the picture (a table
    /// two trees share is one table).
    pub fn add_tree(&mut self, root: RootKind, visits: Vec<TableVisit>) {
        for v in visits {
            self.tables.entry(v.pa.0).or_insert(Table {
                root,
                level: v.level,
                tree_va: v.va,
                shift: v.shift,
                index_bits: v.index_bits,
                entries: v.entries,
                links: 0,
            });
        }
    }

    /// Counts, for every table, the entries of the others that point at it.
    fn count_links(&mut self, format: &dyn Format) {
        let mut links: HashMap<u64, u32> = HashMap::new();
        for t in self.tables.values() {
            for &raw in &t.entries {
                if let Decoded::Table { pa, .. } = format.decode(raw, t.level, t.shift) {
                    *links.entry(pa.0).or_default() += 1;
                }
            }
        }
        for (pa, t) in self.tables.iter_mut() {
            t.links = links.get(pa).copied().unwrap_or(0);
        }
    }
}

/// A translation a store took out, not yet invalidated.
#[derive(Clone, Debug)]
struct Removal {
    what: Removed,
    va: u64,
    shift: u32,
    level: usize,
    entry: u64,
}

/// An entry made invalid with a valid value before.
#[derive(Clone, Copy, Debug)]
struct Broken {
    old: Decoded,
    /// Its translation was invalidated since.
    invalidated: bool,
    /// A finding already says what went wrong with it.
    reported: bool,
}

/// What the replay went through, for a passing check's words.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub stores: u64,
    pub live_stores: u64,
    pub invalidations: u64,
    /// Live entries that went through an invalid entry and an invalidation.
    pub breaks: u64,
}

/// The host's picture of the guest's tables, following the log.
pub struct Replay {
    mmu: Mmu,
    format: &'static dyn Format,
    tables: HashMap<u64, Table>,
    /// Index bits tables come in, to find the table an entry lies in.
    table_sizes: Vec<u32>,
    pending: Vec<Removal>,
    broken: HashMap<u64, Broken>,
    aside: HashMap<u64, u64>,
    pub findings: Vec<String>,
    pub counts: Counts,
}

impl Replay {
    pub fn new(mmu: Mmu, format: &'static dyn Format, snapshot: Snapshot) -> Replay {
        let mut r = Replay {
            mmu,
            format,
            tables: HashMap::new(),
            table_sizes: Vec::new(),
            pending: Vec::new(),
            broken: HashMap::new(),
            aside: HashMap::new(),
            findings: Vec::new(),
            counts: Counts::default(),
        };
        r.adopt(snapshot);
        r
    }

    fn adopt(&mut self, mut snapshot: Snapshot) {
        snapshot.count_links(self.format);
        self.tables = snapshot.tables;
        for t in self.tables.values() {
            if !self.table_sizes.contains(&t.index_bits) {
                self.table_sizes.push(t.index_bits);
            }
        }
        self.aside.clear();
    }

    /// The live table holding the entry at `entry`, and the entry's index.
    fn locate(&self, entry: u64) -> Option<(u64, usize)> {
        self.table_sizes.iter().find_map(|&bits| {
            let base = entry & !((8u64 << bits) - 1);
            let t = self.tables.get(&base)?;
            (t.index_bits == bits).then_some((base, ((entry - base) / 8) as usize))
        })
    }

    fn va_of(&self, t: &Table, index: usize) -> u64 {
        rules::canonical_va(self.mmu, t.root, t.tree_va | ((index as u64) << t.shift))
    }

    pub fn store(&mut self, s: Store) {
        self.counts.stores += 1;
        let Some((base, index)) = self.locate(s.entry) else {
            // No MMU walks it yet: what it holds matters once it is linked.
            self.aside.insert(s.entry, s.new);
            return;
        };
        self.counts.live_stores += 1;
        let Some(t) = self.tables.get(&base) else { return };
        let (level, shift, root, tree_va) = (t.level, t.shift, t.root, t.tree_va);
        let va = self.va_of(t, index);
        let old = t.entries.get(index).copied().unwrap_or(0);
        let guest_bits = !rules::mmu_written_bits(self.mmu);
        if old & guest_bits != s.old & guest_bits {
            self.findings.push(format!(
                "the log says entry {:#x} held {:#x} before a store, the replayed tables say {old:#x}",
                s.entry, s.old
            ));
        }
        let new = s.new;
        if old & guest_bits == new & guest_bits {
            if let Some(slot) = self.tables.get_mut(&base).and_then(|t| t.entries.get_mut(index)) {
                *slot = new;
            }
            return;
        }
        let (od, nd) = (self.format.decode(old, level, shift), self.format.decode(new, level, shift));
        let what = match od {
            Decoded::Leaf { .. } => Some(Removed::Translation),
            Decoded::Table { .. } => Some(Removed::Walk),
            Decoded::Invalid => None,
        };
        if let (Some(what), true) = (what, od != nd) {
            self.pending.push(Removal { what, va, shift, level, entry: s.entry });
        }
        match (od, nd) {
            (Decoded::Invalid, Decoded::Invalid) => {}
            (_, Decoded::Invalid) => {
                self.broken.insert(s.entry, Broken { old: od, invalidated: false, reported: false });
            }
            (Decoded::Invalid, _) => {
                if let Some(b) = self.broken.remove(&s.entry) {
                    if let Some(why) = rules::break_required(self.mmu, b.old, nd) {
                        if b.invalidated {
                            self.counts.breaks += 1;
                        } else if !b.reported {
                            self.findings.push(format!(
                                "entry {:#x} ({} at {va:#x}, level {level}) was made again before its old translation \
                                 was invalidated, and {why}: {}",
                                s.entry,
                                size_name(1 << shift),
                                rules::break_reference(self.mmu)
                            ));
                        }
                    }
                }
            }
            (_, _) => {
                if let Some(why) = rules::break_required(self.mmu, od, nd) {
                    self.findings.push(format!(
                        "entry {:#x} ({} at {va:#x}, level {level}) went from {old:#x} to {new:#x} in one store, and \
                         {why}: {}",
                        s.entry,
                        size_name(1 << shift),
                        rules::break_reference(self.mmu)
                    ));
                }
            }
        }
        if let Decoded::Table { pa, .. } = od {
            if !matches!(nd, Decoded::Table { pa: p, .. } if p == pa) {
                self.unlink(pa.0);
            }
        }
        if let Decoded::Table { pa, index_bits, .. } = nd {
            if !matches!(od, Decoded::Table { pa: p, .. } if p == pa) {
                let below = tree_va | ((index as u64) << shift);
                self.link(pa.0, root, level + 1, below, shift.saturating_sub(index_bits), index_bits);
            }
        }
        if let Some(slot) = self.tables.get_mut(&base).and_then(|t| t.entries.get_mut(index)) {
            *slot = new;
        }
    }

    /// A table an entry now points at: live from here on, with what was
    /// stored into it while it was not (zero elsewhere: a table is
    /// allocated zeroed), and so are the tables it points at.
    fn link(&mut self, pa: u64, root: RootKind, level: usize, tree_va: u64, shift: u32, index_bits: u32) {
        if let Some(t) = self.tables.get_mut(&pa) {
            t.links += 1;
            if (t.level, t.tree_va) != (level, tree_va) {
                let was = (t.level, t.tree_va);
                self.findings.push(format!(
                    "the table at {pa:#x} is linked at level {level} for {tree_va:#x}, it is live at level {} for {:#x}",
                    was.0, was.1
                ));
            }
            return;
        }
        let entries: Vec<u64> =
            (0..1u64 << index_bits).map(|i| self.aside.remove(&(pa + 8 * i)).unwrap_or(0)).collect();
        if !self.table_sizes.contains(&index_bits) {
            self.table_sizes.push(index_bits);
        }
        let below: Vec<(u64, u64, u32)> = entries
            .iter()
            .enumerate()
            .filter_map(|(i, &raw)| match self.format.decode(raw, level, shift) {
                Decoded::Table { pa, index_bits, .. } => Some((pa.0, tree_va | ((i as u64) << shift), index_bits)),
                _ => None,
            })
            .collect();
        self.tables.insert(pa, Table { root, level, tree_va, shift, index_bits, entries, links: 1 });
        for (child, va, bits) in below {
            self.link(child, root, level + 1, va, shift.saturating_sub(bits), bits);
        }
    }

    /// A table an entry no longer points at: once nothing does, it and what
    /// only it reaches are no longer live.
    fn unlink(&mut self, pa: u64) {
        let Some(t) = self.tables.get_mut(&pa) else { return };
        t.links = t.links.saturating_sub(1);
        if t.links > 0 || t.level == 0 {
            return;
        }
        let Some(t) = self.tables.remove(&pa) else { return };
        // Its entries are gone with it: a frame reused as a table starts over.
        let end = pa + (8u64 << t.index_bits);
        self.broken.retain(|entry, _| !(pa..end).contains(entry));
        for raw in t.entries {
            if let Decoded::Table { pa: child, .. } = self.format.decode(raw, t.level, t.shift) {
                self.unlink(child.0);
            }
        }
    }

    /// One invalidation: it removes what it covers of the translations
    /// stores took out; one that reaches such a translation and leaves it
    /// cached is a finding.
    pub fn invalidate(&mut self, form: InvalidationForm, operand: u64, second: u64, meant_va: u64, meant: u64) {
        self.counts.invalidations += 1;
        let inv = match rules::decode_invalidation(self.mmu, form, operand, second) {
            Ok(inv) => inv,
            Err(why) => {
                self.findings.push(why);
                return;
            }
        };
        let mut kept = Vec::with_capacity(self.pending.len());
        for r in std::mem::take(&mut self.pending) {
            match rules::coverage(&inv, r.what, r.va, r.shift, r.level) {
                Coverage::Elsewhere => kept.push(r),
                Coverage::Covers => {
                    if let Some(b) = self.broken.get_mut(&r.entry) {
                        b.invalidated = true;
                    }
                }
                Coverage::Misses(why) => {
                    let what = match r.what {
                        Removed::Translation => "translation",
                        Removed::Walk => "table entry",
                    };
                    self.findings.push(format!(
                        "{} (meant for {} at {meant_va:#x}) leaves the {} {what} at {:#x} (level {}, entry {:#x}) \
                         cached: {why}",
                        inv.said,
                        size_name(meant),
                        size_name(1 << r.shift),
                        r.va,
                        r.level,
                        r.entry
                    ));
                    if let Some(b) = self.broken.get_mut(&r.entry) {
                        b.reported = true;
                    }
                }
            }
        }
        self.pending = kept;
    }

    /// Holds the picture to the tables as walked after a command, then
    /// takes the walk as the truth. `detail`: whether differences are
    /// findings (not after an overflow, where the log is known short).
    pub fn reconcile(&mut self, walked: Snapshot, detail: bool) {
        if detail {
            let guest_bits = !rules::mmu_written_bits(self.mmu);
            let mut differences = Vec::new();
            for (pa, t) in &walked.tables {
                match self.tables.get(pa) {
                    None => differences.push(format!(
                        "the table at {pa:#x} (level {}, {:#x}) is live but the log never linked it",
                        t.level,
                        rules::canonical_va(self.mmu, t.root, t.tree_va)
                    )),
                    Some(r) if r.index_bits != t.index_bits => differences.push(format!(
                        "the table at {pa:#x} has {} entries, the log linked it with {}",
                        1u64 << t.index_bits,
                        1u64 << r.index_bits
                    )),
                    Some(r) => {
                        for (i, (&is, &was)) in t.entries.iter().zip(&r.entries).enumerate() {
                            if is & guest_bits != was & guest_bits {
                                differences.push(format!(
                                    "entry {:#x} holds {is:#x}, the log leaves {was:#x}: a store the log does not have",
                                    pa + 8 * i as u64
                                ));
                            }
                        }
                    }
                }
            }
            for pa in self.tables.keys().filter(|pa| !walked.tables.contains_key(pa)) {
                differences.push(format!("the log links a table at {pa:#x} that no root reaches"));
            }
            differences.sort();
            self.findings.extend(differences);
        }
        self.adopt(walked);
    }
}
