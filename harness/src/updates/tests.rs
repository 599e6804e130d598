//! The host's update rules on hand-built logs over hand-built tables, in
//! every format: the sequence each MMU asks for passes, a single store where
//! arm64 and radix ask for a break fails, so does an invalidation of the
//! wrong size or kind, and so does a log that does not account for the
//! tables, is short of records, or overflowed.

use hvo_abi::manifest::{Manifest, Range};
use hvo_abi::model::{Layout, RegionKind, Zone};
use hvo_abi::update_log::{
    InvalidationForm, RawRecord, Store, RECORD_SIZE, UPDATE_LOG_CAPACITY, UPDATE_LOG_HEADER_SIZE, UPDATE_LOG_MAGIC,
};
use hvo_images::{profile, Arch, Mmu};

use super::rules::{self, Coverage, Reach, Removed};
use super::*;
use crate::memory::SparseMemory;
use crate::pgtable::{Decoded, Perms};
use crate::report::CheckStatus;
use crate::synth::{RegionSpec, SynthVmemmap};

/// One record of a hand-built log.
#[derive(Clone, Copy, Debug)]
enum Rec {
    Store {
        entry: u64,
        old: u64,
        new: u64,
    },
    /// An invalidation of the translation at `va` of `2^shift` bytes, as
    /// the architecture's instruction encodes it (`walk`: the walks cached
    /// through a freed table).
    Invalidate {
        va: u64,
        shift: u32,
        walk: bool,
    },
    /// An invalidation with these operands exactly.
    Raw {
        form: InvalidationForm,
        operand: u64,
        second: u64,
    },
}

/// The instruction and operands a correct guest uses, written here from the
/// manuals (not the firmware's code).
fn encode(mmu: Mmu, va: u64, shift: u32, walk: bool) -> (InvalidationForm, u64, u64) {
    match mmu {
        Mmu::X86_64 => (InvalidationForm::X86Invlpg, va, 0),
        Mmu::Aarch64 => (InvalidationForm::Arm64TlbiVaae1is, (va >> 12) & ((1 << 44) - 1), 0),
        Mmu::Radix if walk => (InvalidationForm::Ppc64Tlbie { ric: 2, prs: true, r: true }, 1 << 10, 0),
        Mmu::Radix => {
            let ap = match shift {
                12 => 0,
                16 => 5,
                21 => 1,
                _ => 2,
            };
            (InvalidationForm::Ppc64Tlbie { ric: 0, prs: true, r: true }, va | ap << 5, 0)
        }
    }
}

struct Bench {
    arch: Arch,
    mmu: Mmu,
    s: SynthVmemmap,
    replay: Replay,
}

impl Bench {
    fn new(arch: Arch, in_block: bool) -> Bench {
        let mut s = SynthVmemmap::new(arch);
        let spec = RegionSpec {
            kind: RegionKind::HugeTlb,
            zone: Zone::Normal,
            order: s.order(),
            count: 2,
            layout: Layout::None,
            altmap: false,
        };
        if in_block {
            s.add_region_in_block(spec);
        } else {
            s.add_region(spec);
        }
        let snapshot = snapshot(arch, &s.mem, &s.manifest()).unwrap();
        let mmu = profile(arch).mmu;
        Bench { arch, mmu, replay: Replay::new(mmu, pgtable::format(arch), snapshot), s }
    }

    /// The leaf translating the first struct page of the last region: its
    /// address, entry, raw value and log2 size.
    fn leaf(&self) -> (u64, u64, u64, u32) {
        let m = self.s.manifest();
        let region = m.regions.iter().last().copied().unwrap();
        let va = m.struct_page_va(region.start_pfn);
        let w = pgtable::walker_for(self.arch, &self.s.mem, &m, VirtAddr(va)).unwrap();
        let leaf = w.translate(&self.s.mem, VirtAddr(va)).unwrap().unwrap();
        (leaf.va.0, leaf.entry_pa.0, leaf.raw, leaf.shift)
    }

    fn write(&mut self, entry: u64, raw: u64) {
        if self.mmu == Mmu::Radix {
            self.s.mem.write_u64_be(PhysAddr(entry), raw);
        } else {
            self.s.mem.write_u64_le(PhysAddr(entry), raw);
        }
    }

    /// Replays `log` (its stores also made in memory) and the walk after it;
    /// returns the findings.
    fn run(&mut self, log: &[Rec]) -> Vec<String> {
        for r in log {
            match *r {
                Rec::Store { entry, old, new } => {
                    self.write(entry, new);
                    self.replay.store(Store { entry, old, new });
                }
                Rec::Invalidate { va, shift, walk } => {
                    let (form, operand, second) = encode(self.mmu, va, shift, walk);
                    self.replay.invalidate(form, operand, second, va, 1 << shift);
                }
                Rec::Raw { form, operand, second } => self.replay.invalidate(form, operand, second, 0, 0),
            }
        }
        let walked = snapshot(self.arch, &self.s.mem, &self.s.manifest()).unwrap();
        self.replay.reconcile(walked, true);
        std::mem::take(&mut self.replay.findings)
    }

    /// A raw leaf for `frame` like `old` (its attributes kept).
    fn moved(&self, old: u64, frame: u64, shift: u32) -> u64 {
        let address = match self.mmu {
            Mmu::X86_64 => 0x000f_ffff_ffff_f000,
            Mmu::Aarch64 => 0x0000_ffff_ffff_f000,
            Mmu::Radix => 0x01ff_ffff_ffff_f000,
        } & !((1u64 << shift) - 1);
        (old & !address) | frame
    }
}

fn breaks(mmu: Mmu) -> bool {
    mmu != Mmu::X86_64
}

#[test]
fn every_format_remaps_a_live_entry_in_its_own_sequence() {
    for arch in Arch::ALL {
        let mut b = Bench::new(arch, false);
        let (va, entry, old, shift) = b.leaf();
        let new = b.moved(old, 0x7000_0000, shift);
        let log = if breaks(b.mmu) {
            vec![
                Rec::Store { entry, old, new: 0 },
                Rec::Invalidate { va, shift, walk: false },
                Rec::Store { entry, old: 0, new },
            ]
        } else {
            vec![Rec::Store { entry, old, new }, Rec::Invalidate { va, shift, walk: false }]
        };
        assert_eq!(b.run(&log), Vec::<String>::new(), "{arch}");
        assert_eq!(b.replay.counts.breaks, u64::from(breaks(b.mmu)), "{arch}");
    }
}

#[test]
fn one_store_fails_where_the_mmu_asks_for_a_break() {
    for arch in Arch::ALL {
        let mut b = Bench::new(arch, false);
        let (va, entry, old, shift) = b.leaf();
        let new = b.moved(old, 0x7000_0000, shift);
        let found = b.run(&[Rec::Store { entry, old, new }, Rec::Invalidate { va, shift, walk: false }]);
        if breaks(b.mmu) {
            assert_eq!(found.len(), 1, "{arch}: {found:?}");
            assert!(found[0].contains("in one store") && found[0].contains("output address changes"), "{found:?}");
        } else {
            assert!(found.is_empty(), "{arch}: {found:?}");
        }
    }
}

#[test]
fn a_break_made_again_before_its_invalidation_fails() {
    for arch in Arch::ALL {
        let mut b = Bench::new(arch, false);
        let (va, entry, old, shift) = b.leaf();
        let new = b.moved(old, 0x7000_0000, shift);
        let found = b.run(&[
            Rec::Store { entry, old, new: 0 },
            Rec::Store { entry, old: 0, new },
            Rec::Invalidate { va, shift, walk: false },
        ]);
        assert_eq!(found.len(), usize::from(breaks(b.mmu)), "{arch}: {found:?}");
        if breaks(b.mmu) {
            assert!(found[0].contains("made again before its old translation was invalidated"), "{found:?}");
        }
    }
}

#[test]
fn a_tlbie_of_the_base_size_leaves_a_2m_translation_cached() {
    for arch in [Arch::Ppc64le, Arch::Ppc64le64k] {
        let mut b = Bench::new(arch, true);
        let (va, entry, old, shift) = b.leaf();
        assert_eq!(shift, 21, "the region lies under a 2 MiB leaf");
        let base = profile(arch).page_shift;
        let found = b.run(&[Rec::Store { entry, old, new: 0 }, Rec::Invalidate { va, shift: base, walk: false }]);
        assert_eq!(found.len(), 1, "{arch}: {found:?}");
        assert!(found[0].contains("leaves the 2M translation") && found[0].contains("removes only"), "{found:?}");
        // The right size: nothing to say.
        let mut b = Bench::new(arch, true);
        let found = b.run(&[Rec::Store { entry, old, new: 0 }, Rec::Invalidate { va, shift, walk: false }]);
        assert!(found.is_empty(), "{arch}: {found:?}");
    }
}

#[test]
fn a_freed_table_needs_its_cached_walks_invalidated() {
    for arch in Arch::ALL {
        let mut b = Bench::new(arch, false);
        let (va, leaf_entry, ..) = b.leaf();
        let (entry, old, span) = b.parent_of(b.table_holding(leaf_entry));
        let block = va & !((1u64 << span) - 1);
        // Invalidating the block's translation by address is not enough on
        // radix (RIC=0 leaves the page walk cache); the others' instructions
        // drop the cached walks for the address too.
        let found =
            b.run(&[Rec::Store { entry, old, new: 0 }, Rec::Invalidate { va: block, shift: span, walk: false }]);
        if b.mmu == Mmu::Radix {
            assert_eq!(found.len(), 1, "{arch}: {found:?}");
            assert!(found[0].contains("leaves the walks cached"), "{found:?}");
        } else {
            assert!(found.is_empty(), "{arch}: {found:?}");
        }
        let mut b = Bench::new(arch, false);
        let found = b.run(&[Rec::Store { entry, old, new: 0 }, Rec::Invalidate { va: block, shift: span, walk: true }]);
        assert!(found.is_empty(), "{arch}: {found:?}");
    }
}

impl Bench {
    /// The live table holding the entry at `entry`.
    fn table_holding(&self, entry: u64) -> u64 {
        let walked = snapshot(self.arch, &self.s.mem, &self.s.manifest()).unwrap();
        let found = walked.tables.iter().find(|(&pa, t)| (pa..pa + (8 << t.index_bits)).contains(&entry));
        found.map(|(&pa, _)| pa).unwrap_or_else(|| panic!("no live table holds {entry:#x}"))
    }

    /// The entry of a live table pointing at `table`, its value and the log2
    /// bytes it spans.
    fn parent_of(&self, table: u64) -> (u64, u64, u32) {
        let walked = snapshot(self.arch, &self.s.mem, &self.s.manifest()).unwrap();
        let format = pgtable::format(self.arch);
        for (pa, t) in &walked.tables {
            for (i, &raw) in t.entries.iter().enumerate() {
                if let Decoded::Table { pa: child, .. } = format.decode(raw, t.level, t.shift) {
                    if child.0 == table {
                        return (pa + 8 * i as u64, raw, t.shift);
                    }
                }
            }
        }
        panic!("no entry points at the table {table:#x}")
    }
}

#[test]
fn a_table_filled_before_it_is_linked_is_replayed_when_linked() {
    for arch in Arch::ALL {
        // What a split does: a fresh table of base pages over a 2 MiB leaf,
        // filled, then put in the leaf's place.
        let (_, _, template, page_shift) = Bench::new(arch, false).leaf();
        let mut b = Bench::new(arch, true);
        let (va, entry, old, shift) = b.leaf();
        let Decoded::Leaf { pa: frame, .. } = pgtable::format(arch).decode(old, 2, shift) else {
            panic!("{arch}: no 2 MiB leaf")
        };
        let fresh = 0x6000_0000u64;
        let entries = 1u64 << (shift - page_shift);
        b.s.mem.write(PhysAddr(fresh), &vec![0u8; (entries * 8) as usize]);
        let mut log: Vec<Rec> = (0..entries)
            .map(|i| Rec::Store {
                entry: fresh + 8 * i,
                old: 0,
                new: b.moved(template, frame.0 + (i << page_shift), page_shift),
            })
            .collect();
        let table = match b.mmu {
            Mmu::X86_64 | Mmu::Aarch64 => fresh | 0b11,
            Mmu::Radix => 1 << 63 | fresh | u64::from(shift - page_shift),
        };
        if breaks(b.mmu) {
            log.extend([
                Rec::Store { entry, old, new: 0 },
                Rec::Invalidate { va, shift, walk: false },
                Rec::Store { entry, old: 0, new: table },
            ]);
        } else {
            log.extend([Rec::Store { entry, old, new: table }, Rec::Invalidate { va, shift, walk: false }]);
        }
        let found = b.run(&log);
        assert!(found.is_empty(), "{arch}: {found:?}");
        assert_eq!(b.replay.counts.live_stores, if breaks(b.mmu) { 2 } else { 1 }, "{arch}");
        assert_eq!(b.replay.counts.stores, entries + if breaks(b.mmu) { 2 } else { 1 }, "{arch}");
    }
}

#[test]
fn a_log_that_does_not_account_for_the_tables_fails() {
    for arch in Arch::ALL {
        // A store the log does not have.
        let mut b = Bench::new(arch, false);
        let (_, entry, old, shift) = b.leaf();
        let new = b.moved(old, 0x7000_0000, shift);
        b.write(entry, new);
        let found = b.run(&[]);
        assert_eq!(found.len(), 1, "{arch}: {found:?}");
        assert!(found[0].contains("a store the log does not have"), "{found:?}");
        // A store whose old value is not what the entry held.
        let mut b = Bench::new(arch, false);
        let found = b.run(&[Rec::Store { entry, old: old ^ 0x1000, new: old }]);
        assert!(found.iter().any(|f| f.contains("the replayed tables say")), "{arch}: {found:?}");
    }
}

#[test]
fn invalidation_operands_decode_by_the_manuals() {
    use rules::decode_invalidation as decode;
    // arm64: VA[55:12], sign-extended from bit 55; a TTL hint names a level.
    let kernel = 0xffff_fdff_c000_1000u64;
    let op = (kernel >> 12) & ((1 << 44) - 1);
    let inv = decode(Mmu::Aarch64, InvalidationForm::Arm64TlbiVaae1is, op, 0).unwrap();
    assert_eq!((inv.reach, inv.walks), (Reach::Containing { va: kernel }, true));
    let hinted = decode(Mmu::Aarch64, InvalidationForm::Arm64TlbiVaale1is, op | 0b0111 << 44, 0).unwrap();
    assert_eq!((hinted.reach, hinted.walks), (Reach::AtLevel { va: kernel, level: 3 }, false));
    assert_eq!(
        rules::coverage(&hinted, Removed::Translation, kernel & !0x1f_ffff, 21, 2),
        Coverage::Misses("its TTL names level 3, the entry was at level 2".into())
    );
    assert!(decode(Mmu::Aarch64, InvalidationForm::Arm64TlbiVaae1is, op | 0b1001 << 44, 0).is_err());
    // radix: AP sizes, invalid forms, the PID.
    let tlbie = |ric| InvalidationForm::Ppc64Tlbie { ric, prs: true, r: true };
    let va = 0xc00c_0000_0020_0000u64;
    for (ap, shift) in [(0u64, 12), (5, 16), (1, 21), (2, 30)] {
        let inv = decode(Mmu::Radix, tlbie(0), va | ap << 5, 0).unwrap();
        assert_eq!(inv.reach, Reach::Sized { va: va & !((1 << shift) - 1), shift });
        assert!(inv.translations && !inv.walks);
    }
    assert!(decode(Mmu::Radix, tlbie(0), va | 0b111 << 5, 0).is_err(), "AP 7 is no size");
    assert!(decode(Mmu::Radix, tlbie(2), va, 0).is_err(), "RIC=2 by address is an invalid form");
    assert!(decode(Mmu::Radix, tlbie(0), va, 5 << 32).is_err(), "another PID");
    let hpt = InvalidationForm::Ppc64Tlbie { ric: 0, prs: false, r: false };
    assert!(decode(Mmu::Radix, hpt, va, 0).is_err());
    let all = decode(Mmu::Radix, tlbie(2), 1 << 10, 0).unwrap();
    assert_eq!((all.reach, all.translations, all.walks), (Reach::Everything, true, true));
    let pwc = decode(Mmu::Radix, tlbie(1), 1 << 10, 0).unwrap();
    assert_eq!(
        rules::coverage(&pwc, Removed::Translation, va, 12, 3),
        Coverage::Misses("it removes no TLB entries".into())
    );
    // Another MMU's instruction removes nothing here.
    assert!(decode(Mmu::X86_64, InvalidationForm::Arm64TlbiVaae1is, op, 0).is_err());
    assert!(decode(Mmu::Aarch64, InvalidationForm::X86Invlpg, kernel, 0).is_err());
}

#[test]
fn only_arm64_and_radix_ask_for_a_break_and_only_for_what_moves() {
    let leaf = |pa: u64, write| Decoded::Leaf { pa: PhysAddr(pa), perms: Perms { write, exec: false } };
    let table = |pa: u64| Decoded::Table { pa: PhysAddr(pa), index_bits: 9, allows: Perms { write: true, exec: true } };
    for mmu in [Mmu::Aarch64, Mmu::Radix] {
        assert!(rules::break_required(mmu, leaf(0x1000, true), leaf(0x2000, false)).is_some());
        assert!(rules::break_required(mmu, leaf(0x20_0000, true), table(0x3000)).is_some());
        assert!(rules::break_required(mmu, table(0x3000), table(0x4000)).is_some());
        assert_eq!(rules::break_required(mmu, leaf(0x1000, true), leaf(0x1000, false)), None, "permissions only");
        assert_eq!(rules::break_required(mmu, Decoded::Invalid, leaf(0x1000, true)), None);
    }
    assert_eq!(rules::break_required(Mmu::X86_64, leaf(0x1000, true), leaf(0x2000, true)), None);
}

/// Where the hand-built log lies, inside the image the manifest says.
const LOG: u64 = 0x2_0000_0000;

fn write_header(mem: &mut SparseMemory, command: u64, len: u64, total: u64) {
    let words = [UPDATE_LOG_MAGIC, UPDATE_LOG_CAPACITY as u64, command, len, total];
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    mem.write(PhysAddr(LOG), &bytes);
}

fn record_bytes(r: &RawRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_SIZE);
    out.extend_from_slice(&r.kind.to_le_bytes());
    out.extend_from_slice(&r.detail.to_le_bytes());
    r.words.iter().for_each(|w| out.extend_from_slice(&w.to_le_bytes()));
    out
}

fn checker_bench() -> (SynthVmemmap, Manifest, UpdateChecker) {
    let mut s = SynthVmemmap::new(Arch::X86_64);
    write_header(&mut s.mem, 1, 0, 40);
    let mut m = s.manifest();
    m.update_log = LOG;
    m.image = Range { start: LOG, size: 8 << 20 };
    let checker = UpdateChecker::start(Arch::X86_64, &s.mem, &m).unwrap();
    (s, m, checker)
}

#[test]
fn the_checker_replays_each_command_and_passes_what_follows_the_rules() {
    let (mut s, _, mut c) = checker_bench();
    // Nothing logged: nothing replayed.
    c.after_command(&s.mem);
    assert_eq!(c.take_check().status, CheckStatus::Pass);
    let invlpg = RawRecord::invalidation(InvalidationForm::X86Invlpg, 0x1000, 0, 0x1000, 4096);
    s.mem.write(PhysAddr(LOG + UPDATE_LOG_HEADER_SIZE as u64), &record_bytes(&invlpg));
    write_header(&mut s.mem, 2, 1, 41);
    c.after_command(&s.mem);
    let check = c.take_check();
    assert_eq!(check.status, CheckStatus::Pass, "{}", check.detail);
    assert!(check.detail.starts_with("1 commands replayed"), "{}", check.detail);
}

#[test]
fn a_command_whose_log_was_never_read_fails() {
    let (mut s, _, mut c) = checker_bench();
    write_header(&mut s.mem, 3, 0, 45);
    c.after_command(&s.mem);
    let check = c.take_check();
    assert_eq!(check.status, CheckStatus::Fail);
    assert!(check.detail.contains("never replayed"), "{}", check.detail);
}

#[test]
fn an_overflowed_log_proves_nothing() {
    let (mut s, _, mut c) = checker_bench();
    let invlpg = record_bytes(&RawRecord::invalidation(InvalidationForm::X86Invlpg, 0x1000, 0, 0x1000, 4096));
    let all: Vec<u8> = invlpg.iter().copied().cycle().take(UPDATE_LOG_CAPACITY * RECORD_SIZE).collect();
    s.mem.write(PhysAddr(LOG + UPDATE_LOG_HEADER_SIZE as u64), &all);
    let len = UPDATE_LOG_CAPACITY as u64 + 7;
    write_header(&mut s.mem, 2, len, 40 + len);
    c.after_command(&s.mem);
    let check = c.take_check();
    assert_eq!(check.status, CheckStatus::Fail);
    assert!(check.detail.contains("the rest cannot be replayed"), "{}", check.detail);
}

#[test]
fn a_log_outside_the_image_or_unreadable_is_refused() {
    let (s, mut m, mut c) = checker_bench();
    m.image = Range { start: 0, size: 0x1000 };
    let refused = UpdateChecker::start(Arch::X86_64, &s.mem, &m).err().unwrap_or_default();
    assert!(refused.contains("outside the image"), "{refused}");
    let empty = SparseMemory::new();
    c.after_command(&empty);
    let check = c.take_check();
    assert_eq!(check.status, CheckStatus::Fail);
    assert!(check.detail.contains("cannot be read"), "{}", check.detail);
}

#[test]
fn an_instruction_the_mmu_does_not_have_is_a_finding() {
    let mut b = Bench::new(Arch::X86_64, false);
    let found = b.run(&[Rec::Raw { form: InvalidationForm::Arm64TlbiVaae1is, operand: 1, second: 0 }]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("no invalidation instruction of the X86_64 MMU"), "{found:?}");
    let mut b = Bench::new(Arch::Ppc64le, false);
    let ric2_by_address = InvalidationForm::Ppc64Tlbie { ric: 2, prs: true, r: true };
    let found = b.run(&[Rec::Raw { form: ric2_by_address, operand: 0xc00c_0000_0000_0000, second: 0 }]);
    assert!(found[0].contains("invalid instruction form"), "{found:?}");
}
