//! The update log: every page-table store and every TLB invalidation the
//! guest made while serving one command, in order, in a `#[repr(C)]` array
//! the guest keeps in its image and the manifest points at
//! ([`crate::manifest::RawManifest::update_log`]).
//!
//! The guest writes it from the one function that stores page-table entries
//! and from the one that executes invalidation instructions; the host replays
//! it with its own rules per architecture (break-before-make, the size an
//! invalidation covers). Nothing here says what an entry or an operand means:
//! a store is an address and two raw values, an invalidation the raw operands
//! of the instruction the guest executed.
//!
//! Bounded: [`UPDATE_LOG_CAPACITY`] records per command. Stores to
//! consecutive entries that leave the same old value and whose new values
//! step by a constant are one record (a run), so populating thousands of
//! tails that map one shared page costs one record per table. When a command
//! makes more records than fit, the guest keeps the first ones and goes on
//! counting: `len` above `capacity` tells the host it cannot see them all.

use crate::manifest::{le_u32, le_u64};
use core::mem::{offset_of, size_of};

/// Records one command may leave before the log overflows.
pub const UPDATE_LOG_CAPACITY: usize = 1 << 17;
/// `b"HVOUPLOG"` read as a little-endian u64.
pub const UPDATE_LOG_MAGIC: u64 = u64::from_le_bytes(*b"HVOUPLOG");

/// What a record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum RecordKind {
    /// A run of page-table stores.
    Store = 1,
    /// One TLB invalidation instruction.
    Invalidation = 2,
}

/// Which invalidation instruction the guest executed, its immediate fields
/// included (they are part of the instruction, not of its operands).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InvalidationForm {
    /// x86 `invlpg m`: the operand is the linear address.
    X86Invlpg,
    /// arm64 `tlbi vaae1is, Xt`: all ASIDs, every level of the walk, inner
    /// shareable; the operand is Xt.
    Arm64TlbiVaae1is,
    /// arm64 `tlbi vaale1is, Xt`: as above, last level of the walk only.
    Arm64TlbiVaale1is,
    /// ppc64 `tlbie RB,RS,RIC,PRS,R` (ISA v3.0); the operands are RB and RS.
    Ppc64Tlbie { ric: u8, prs: bool, r: bool },
}

const FORM_X86_INVLPG: u32 = 1;
const FORM_ARM64_VAAE1IS: u32 = 2;
const FORM_ARM64_VAALE1IS: u32 = 3;
/// ppc64 tlbie: this tag, then RIC in bits 3:2, PRS in bit 1, R in bit 0.
const FORM_PPC64_TLBIE: u32 = 0x100;

impl InvalidationForm {
    pub const fn to_raw(self) -> u32 {
        match self {
            InvalidationForm::X86Invlpg => FORM_X86_INVLPG,
            InvalidationForm::Arm64TlbiVaae1is => FORM_ARM64_VAAE1IS,
            InvalidationForm::Arm64TlbiVaale1is => FORM_ARM64_VAALE1IS,
            InvalidationForm::Ppc64Tlbie { ric, prs, r } => {
                FORM_PPC64_TLBIE | ((ric as u32 & 3) << 2) | (prs as u32) << 1 | r as u32
            }
        }
    }

    pub const fn from_raw(raw: u32) -> Option<InvalidationForm> {
        match raw {
            FORM_X86_INVLPG => Some(InvalidationForm::X86Invlpg),
            FORM_ARM64_VAAE1IS => Some(InvalidationForm::Arm64TlbiVaae1is),
            FORM_ARM64_VAALE1IS => Some(InvalidationForm::Arm64TlbiVaale1is),
            _ if raw & !0xf == FORM_PPC64_TLBIE => {
                Some(InvalidationForm::Ppc64Tlbie { ric: ((raw >> 2) & 3) as u8, prs: raw & 2 != 0, r: raw & 1 != 0 })
            }
            _ => None,
        }
    }
}

/// One record as it lies in guest memory. What the four words hold depends
/// on the kind; build records with [`RawRecord::stores`] and
/// [`RawRecord::invalidation`], read them with [`Record::decode`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RawRecord {
    pub kind: u32,
    /// Stores: how many entries the run covers (at least 1). Invalidations:
    /// the instruction form ([`InvalidationForm::to_raw`]).
    pub detail: u32,
    /// Stores: the first entry's guest-physical address, the value every
    /// entry of the run held before, the first entry's new value, and what
    /// each next entry's new value adds. Invalidations: the first operand
    /// (RB, Xt, the linear address), the second (RS, else 0), and the
    /// address and size in bytes the guest meant to invalidate (what its
    /// code asked for, which the operands may not say: the host decodes the
    /// operands).
    pub words: [u64; 4],
}

impl RawRecord {
    pub const ZERO: RawRecord = RawRecord { kind: 0, detail: 0, words: [0; 4] };

    /// A run of `count` stores: entry `i` at `entry + 8 * i` went from `old`
    /// to `new + i * step`.
    pub const fn stores(entry: u64, old: u64, new: u64, count: u32, step: u64) -> RawRecord {
        RawRecord { kind: RecordKind::Store as u32, detail: count, words: [entry, old, new, step] }
    }

    pub const fn invalidation(
        form: InvalidationForm,
        operand: u64,
        second: u64,
        meant_va: u64,
        meant_size: u64,
    ) -> RawRecord {
        RawRecord {
            kind: RecordKind::Invalidation as u32,
            detail: form.to_raw(),
            words: [operand, second, meant_va, meant_size],
        }
    }

    /// Whether one more store of `entry` from `old` to `new` continues this
    /// run (the next entry, the same old value, the same step).
    pub fn extends(&self, entry: u64, old: u64, new: u64) -> bool {
        let [first, run_old, run_new, step] = self.words;
        if self.kind != RecordKind::Store as u32 || self.detail == u32::MAX || run_old != old {
            return false;
        }
        let n = u64::from(self.detail);
        let next_entry = first.wrapping_add(8 * n);
        if entry != next_entry {
            return false;
        }
        if n == 1 {
            // A run of one has no step yet: any new value sets it.
            return true;
        }
        new == run_new.wrapping_add(step.wrapping_mul(n))
    }

    /// Adds one store to the run (after [`RawRecord::extends`] said it fits).
    pub fn extend(&mut self, new: u64) {
        if self.detail == 1 {
            self.words[3] = new.wrapping_sub(self.words[2]);
        }
        self.detail += 1;
    }
}

/// The log as it lies in guest memory: a header, then the records.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct RawUpdateLog {
    /// [`UPDATE_LOG_MAGIC`] once the guest initialized the log.
    pub magic: u64,
    /// Records the array holds.
    pub capacity: u64,
    /// Commands the guest has started serving; the log holds the last one's updates.
    pub command: u64,
    /// Records the current command made, those that did not fit included.
    pub len: u64,
    /// Records made since boot, those that did not fit included: the host,
    /// which reads the log after every command, knows it missed none when
    /// this minus `len` is what it has read before.
    pub total: u64,
    pub records: [RawRecord; UPDATE_LOG_CAPACITY],
}

/// Bytes of the header before the records.
pub const UPDATE_LOG_HEADER_SIZE: usize = offset_of!(RawUpdateLog, records);
/// Bytes of one record.
pub const RECORD_SIZE: usize = size_of::<RawRecord>();

/// The header, decoded and checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogHeader {
    pub capacity: u64,
    pub command: u64,
    pub len: u64,
    pub total: u64,
}

impl LogHeader {
    /// Records the array holds for the current command.
    pub fn kept(&self) -> u64 {
        self.len.min(self.capacity)
    }

    /// Whether the current command made more records than fit.
    pub fn overflowed(&self) -> bool {
        self.len > self.capacity
    }
}

/// One decoded record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// `count` stores: entry `i` at `entry + 8 * i` went from `old` to `new + i * step`.
    Stores {
        entry: u64,
        old: u64,
        new: u64,
        count: u32,
        step: u64,
    },
    Invalidation {
        form: InvalidationForm,
        operand: u64,
        second: u64,
        meant_va: u64,
        meant_size: u64,
    },
}

/// One page-table store, a run expanded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Store {
    pub entry: u64,
    pub old: u64,
    pub new: u64,
}

impl Record {
    /// The stores of a run, one by one (none for an invalidation).
    pub fn stores(&self) -> impl Iterator<Item = Store> {
        let (entry, old, new, count, step) = match *self {
            Record::Stores { entry, old, new, count, step } => (entry, old, new, count, step),
            Record::Invalidation { .. } => (0, 0, 0, 0, 0),
        };
        (0..u64::from(count)).map(move |i| Store {
            entry: entry.wrapping_add(8 * i),
            old,
            new: new.wrapping_add(step.wrapping_mul(i)),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateLogError {
    Truncated {
        have: usize,
        need: usize,
    },
    /// The guest never initialized the log (or the manifest points elsewhere).
    BadMagic(u64),
    /// A capacity other than the one this host was built for.
    Capacity(u64),
    /// More records kept than the command made.
    Total {
        len: u64,
        total: u64,
    },
    UnknownKind {
        index: u64,
        raw: u32,
    },
    UnknownForm {
        index: u64,
        raw: u32,
    },
    /// A run of no stores.
    EmptyRun {
        index: u64,
    },
}

impl core::fmt::Display for UpdateLogError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            UpdateLogError::Truncated { have, need } => write!(f, "update log truncated: {have} bytes, need {need}"),
            UpdateLogError::BadMagic(m) => write!(f, "bad update log magic {m:#018x}"),
            UpdateLogError::Capacity(c) => {
                write!(f, "update log capacity {c}, host expects {UPDATE_LOG_CAPACITY}: rebuild the guest")
            }
            UpdateLogError::Total { len, total } => {
                write!(f, "update log says the command made {len} records, more than the {total} made since boot")
            }
            UpdateLogError::UnknownKind { index, raw } => write!(f, "update log record {index}: unknown kind {raw}"),
            UpdateLogError::UnknownForm { index, raw } => {
                write!(f, "update log record {index}: unknown invalidation form {raw:#x}")
            }
            UpdateLogError::EmptyRun { index } => write!(f, "update log record {index}: a run of no stores"),
        }
    }
}

impl LogHeader {
    /// Decodes the header from the log's first [`UPDATE_LOG_HEADER_SIZE`] bytes.
    pub fn decode(bytes: &[u8]) -> Result<LogHeader, UpdateLogError> {
        if bytes.len() < UPDATE_LOG_HEADER_SIZE {
            return Err(UpdateLogError::Truncated { have: bytes.len(), need: UPDATE_LOG_HEADER_SIZE });
        }
        let at = |off| le_u64(bytes, off);
        let magic = at(offset_of!(RawUpdateLog, magic));
        if magic != UPDATE_LOG_MAGIC {
            return Err(UpdateLogError::BadMagic(magic));
        }
        let capacity = at(offset_of!(RawUpdateLog, capacity));
        if capacity != UPDATE_LOG_CAPACITY as u64 {
            return Err(UpdateLogError::Capacity(capacity));
        }
        let header = LogHeader {
            capacity,
            command: at(offset_of!(RawUpdateLog, command)),
            len: at(offset_of!(RawUpdateLog, len)),
            total: at(offset_of!(RawUpdateLog, total)),
        };
        if header.len > header.total {
            return Err(UpdateLogError::Total { len: header.len, total: header.total });
        }
        Ok(header)
    }
}

impl Record {
    /// Decodes record `index` from its [`RECORD_SIZE`] bytes.
    pub fn decode(bytes: &[u8], index: u64) -> Result<Record, UpdateLogError> {
        if bytes.len() < RECORD_SIZE {
            return Err(UpdateLogError::Truncated { have: bytes.len(), need: RECORD_SIZE });
        }
        let word = |i: usize| le_u64(bytes, offset_of!(RawRecord, words) + 8 * i);
        let kind = le_u32(bytes, offset_of!(RawRecord, kind));
        let detail = le_u32(bytes, offset_of!(RawRecord, detail));
        match kind {
            k if k == RecordKind::Store as u32 => {
                if detail == 0 {
                    return Err(UpdateLogError::EmptyRun { index });
                }
                Ok(Record::Stores { entry: word(0), old: word(1), new: word(2), count: detail, step: word(3) })
            }
            k if k == RecordKind::Invalidation as u32 => {
                let form =
                    InvalidationForm::from_raw(detail).ok_or(UpdateLogError::UnknownForm { index, raw: detail })?;
                Ok(Record::Invalidation {
                    form,
                    operand: word(0),
                    second: word(1),
                    meant_va: word(2),
                    meant_size: word(3),
                })
            }
            raw => Err(UpdateLogError::UnknownKind { index, raw }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(r: &RawRecord) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&r.kind.to_le_bytes());
        out.extend_from_slice(&r.detail.to_le_bytes());
        for w in r.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    #[test]
    fn forms_round_trip() {
        let forms = [
            InvalidationForm::X86Invlpg,
            InvalidationForm::Arm64TlbiVaae1is,
            InvalidationForm::Arm64TlbiVaale1is,
            InvalidationForm::Ppc64Tlbie { ric: 0, prs: true, r: true },
            InvalidationForm::Ppc64Tlbie { ric: 2, prs: true, r: true },
            InvalidationForm::Ppc64Tlbie { ric: 1, prs: false, r: true },
        ];
        for f in forms {
            assert_eq!(InvalidationForm::from_raw(f.to_raw()), Some(f));
        }
        assert_eq!(InvalidationForm::from_raw(0), None);
    }

    #[test]
    fn runs_grow_only_with_the_next_entry_the_same_old_value_and_the_same_step() {
        let mut run = RawRecord::stores(0x1000, 0, 0x8000_0003, 1, 0);
        assert!(run.extends(0x1008, 0, 0x8000_1003));
        run.extend(0x8000_1003);
        assert!(run.extends(0x1010, 0, 0x8000_2003));
        assert!(!run.extends(0x1010, 0, 0x8000_3003), "another step");
        assert!(!run.extends(0x1018, 0, 0x8000_2003), "not the next entry");
        assert!(!run.extends(0x1010, 5, 0x8000_2003), "another old value");
        run.extend(0x8000_2003);
        let decoded = Record::decode(&bytes(&run), 0).unwrap();
        let stores: Vec<Store> = decoded.stores().collect();
        assert_eq!(stores.len(), 3);
        assert_eq!(stores[2], Store { entry: 0x1010, old: 0, new: 0x8000_2003 });
    }

    #[test]
    fn records_decode_or_say_why_not() {
        let form = InvalidationForm::Ppc64Tlbie { ric: 0, prs: true, r: true };
        let inv = RawRecord::invalidation(form, 0xc00c_0000_0020_0020, 0, 0xc00c_0000_0020_0000, 2 << 20);
        assert_eq!(
            Record::decode(&bytes(&inv), 3),
            Ok(Record::Invalidation {
                form,
                operand: 0xc00c_0000_0020_0020,
                second: 0,
                meant_va: 0xc00c_0000_0020_0000,
                meant_size: 2 << 20
            })
        );
        let mut bad = inv;
        bad.detail = 0x77;
        assert_eq!(Record::decode(&bytes(&bad), 3), Err(UpdateLogError::UnknownForm { index: 3, raw: 0x77 }));
        bad.kind = 9;
        assert_eq!(Record::decode(&bytes(&bad), 4), Err(UpdateLogError::UnknownKind { index: 4, raw: 9 }));
        let empty = RawRecord::stores(0x1000, 0, 1, 0, 0);
        assert_eq!(Record::decode(&bytes(&empty), 5), Err(UpdateLogError::EmptyRun { index: 5 }));
    }

    #[test]
    fn a_header_tells_an_overflow() {
        let mut raw = vec![0u8; UPDATE_LOG_HEADER_SIZE];
        raw[0..8].copy_from_slice(&UPDATE_LOG_MAGIC.to_le_bytes());
        raw[8..16].copy_from_slice(&(UPDATE_LOG_CAPACITY as u64).to_le_bytes());
        raw[24..32].copy_from_slice(&(UPDATE_LOG_CAPACITY as u64 + 5).to_le_bytes());
        raw[32..40].copy_from_slice(&(UPDATE_LOG_CAPACITY as u64 + 9).to_le_bytes());
        let h = LogHeader::decode(&raw).unwrap();
        assert!(h.overflowed());
        assert_eq!(h.kept(), UPDATE_LOG_CAPACITY as u64);
        raw[0] ^= 1;
        assert!(matches!(LogHeader::decode(&raw), Err(UpdateLogError::BadMagic(_))));
    }
}
