//! Each MMU's rules for changing live page-table entries, as the host reads
//! the manuals (nothing of the guest's mapper): which changes need
//! break-before-make, what an invalidation instruction with given operands
//! removes, and what address a tree's entry translates. One `match` per
//! fact, one arm per MMU.
//!
//! - x86_64 (Intel SDM vol. 3A 4.10.4): an entry may be rewritten in place
//!   and the old translation invalidated after. `invlpg` removes the TLB
//!   entries of the page holding its address, whatever their size, and the
//!   paging-structure caches.
//! - arm64 (Arm ARM D8.16.1, break-before-make): a live entry whose output
//!   address changes, or a block that becomes a table (or back), must first
//!   be made invalid and its translation invalidated by a TLBI that
//!   completes before the new entry is written. `tlbi vaae1is` takes
//!   VA[55:12] in Xt bits 43:0 and a TTL hint in bits 47:44 (0: none, any
//!   level; else granule in bits 3:2 and level in 1:0); the `vaale1is` form
//!   leaves cached walks alone.
//! - ppc64 radix (Power ISA v3.0 tlbie): by address (RB IS = 0), a TLB entry
//!   is invalidated only if its page size is the one RB's AP field (bits
//!   56:58, counted from the left) encodes: 0 = 4K, 5 = 64K, 1 = 2M, 2 = 1G;
//!   RIC = 0 invalidates TLB entries only, RIC 1 and 2 (page walk cache) are
//!   invalid forms by address and need IS = 1 (a PID, in RS bits 0:31), 2
//!   or 3. A live entry is changed as on arm64: made invalid and its
//!   translation invalidated before the new value (Linux invalidates a radix
//!   PMD leaf before it becomes a table).

use hvo_abi::manifest::RootKind;
use hvo_abi::update_log::InvalidationForm;
use hvo_images::Mmu;

use crate::pgtable::Decoded;
use crate::verify::size_name;

/// Why a change needs break-before-make on `mmu`, or `None` when one store
/// may do it.
pub fn break_required(mmu: Mmu, old: Decoded, new: Decoded) -> Option<&'static str> {
    let moves = match (old, new) {
        (Decoded::Leaf { pa: a, .. }, Decoded::Leaf { pa: b, .. }) if a != b => Some("its output address changes"),
        (Decoded::Leaf { .. }, Decoded::Table { .. }) => Some("a block becomes a table"),
        (Decoded::Table { .. }, Decoded::Leaf { .. }) => Some("a table becomes a block"),
        (Decoded::Table { pa: a, .. }, Decoded::Table { pa: b, .. }) if a != b => Some("its next-level table changes"),
        _ => None,
    };
    match mmu {
        Mmu::X86_64 => None,
        Mmu::Aarch64 | Mmu::Radix => moves,
    }
}

/// Where the rule `break_required` applies comes from, for messages.
pub fn break_reference(mmu: Mmu) -> &'static str {
    match mmu {
        Mmu::X86_64 => "x86_64 has no break-before-make rule",
        Mmu::Aarch64 => "Arm ARM D8.16.1 asks for break-before-make",
        Mmu::Radix => "radix asks for an invalid entry and a tlbie before the new value",
    }
}

/// Entry bits the MMU itself writes as it walks, so no store of the guest's
/// (and no log record) accounts for them: x86_64's accessed and dirty
/// (bits 5, 6), arm64's access flag (bit 10, with hardware updates on),
/// radix's reference and change (bits 8, 7 counted from the right).
pub fn mmu_written_bits(mmu: Mmu) -> u64 {
    match mmu {
        Mmu::X86_64 => 1 << 5 | 1 << 6,
        Mmu::Aarch64 => 1 << 10,
        Mmu::Radix => 1 << 8 | 1 << 7,
    }
}

/// The address an entry of a tree rooted at a `root` root translates, from
/// its address within the bits the tree translates.
pub fn canonical_va(mmu: Mmu, root: RootKind, in_tree: u64) -> u64 {
    match mmu {
        // Sign-extended from bit 47.
        Mmu::X86_64 => ((in_tree << 16) as i64 >> 16) as u64,
        // TTBR1 (the kernel's and a process's kernel half) has the top 16 bits set.
        Mmu::Aarch64 => match root {
            RootKind::Identity => in_tree,
            _ => in_tree | 0xffff_0000_0000_0000,
        },
        // The kernel's tree translates quadrant 3 (EA bits 0:1 = 0b11).
        Mmu::Radix => in_tree | 0xc000_0000_0000_0000,
    }
}

/// Which translations an invalidation reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// The translation holding `va`, whatever its size and level.
    Containing { va: u64 },
    /// The translation holding `va` if it came from a walk ending at `level`.
    AtLevel { va: u64, level: usize },
    /// Translations of exactly `2^shift` bytes over `[va, va + 2^shift)`.
    Sized { va: u64, shift: u32 },
    /// Every translation (of the kernel's address space).
    Everything,
}

/// What an invalidation instruction, with its operands, removes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalidates {
    pub reach: Reach,
    /// TLB entries (translations).
    pub translations: bool,
    /// Walks cached through table entries.
    pub walks: bool,
    /// The instruction, for messages.
    pub said: String,
}

/// Decodes an invalidation the guest executed on `mmu`; an error says why
/// the instruction or its operands do not invalidate anything the kernel's
/// tables give (another MMU's instruction, an invalid form, a reserved
/// field).
pub fn decode_invalidation(mmu: Mmu, form: InvalidationForm, operand: u64, second: u64) -> Result<Invalidates, String> {
    match (mmu, form) {
        (Mmu::X86_64, InvalidationForm::X86Invlpg) => Ok(Invalidates {
            reach: Reach::Containing { va: operand },
            translations: true,
            walks: true,
            said: format!("invlpg {operand:#x}"),
        }),
        (Mmu::Aarch64, InvalidationForm::Arm64TlbiVaae1is | InvalidationForm::Arm64TlbiVaale1is) => {
            let last_level_only = form == InvalidationForm::Arm64TlbiVaale1is;
            // VA[55:12], VA[63:56] copies of bit 55.
            let va = (((operand & ((1 << 44) - 1)) << 20) as i64 >> 8) as u64;
            let ttl = (operand >> 44) & 0xf;
            let name = if last_level_only { "tlbi vaale1is" } else { "tlbi vaae1is" };
            let reach = match ttl >> 2 {
                0 => Reach::Containing { va },
                // The 4 KiB granule: level in bits 1:0 (0 is reserved).
                0b01 if ttl & 3 != 0 => Reach::AtLevel { va, level: (ttl & 3) as usize },
                _ => return Err(format!("{name} {operand:#x}: TTL {ttl:#06b} names another granule or level 0")),
            };
            Ok(Invalidates {
                reach,
                translations: true,
                walks: !last_level_only,
                said: format!("{name} {operand:#x} (va {va:#x}, TTL {ttl:#06b})"),
            })
        }
        (Mmu::Radix, InvalidationForm::Ppc64Tlbie { ric, prs, r }) => decode_tlbie(ric, prs, r, operand, second),
        (mmu, form) => Err(format!("{form:?} is no invalidation instruction of the {mmu:?} MMU")),
    }
}

/// The radix page size an AP value encodes, as log2 of its bytes.
fn actual_page_shift(ap: u64) -> Option<u32> {
    match ap {
        0b000 => Some(12),
        0b101 => Some(16),
        0b001 => Some(21),
        0b010 => Some(30),
        _ => None,
    }
}

fn decode_tlbie(ric: u8, prs: bool, r: bool, rb: u64, rs: u64) -> Result<Invalidates, String> {
    let is = (rb >> 10) & 3;
    let said = format!("tlbie RB={rb:#x} RS={rs:#x} RIC={ric} PRS={} R={} (IS={is})", u8::from(prs), u8::from(r));
    if !r || !prs {
        return Err(format!("{said}: not a process-scoped radix invalidation, the kernel's translations stay"));
    }
    if ric == 3 {
        return Err(format!("{said}: RIC=3 is an invalid form with R=1"));
    }
    let pid = rs >> 32;
    let (translations, walks) = (ric == 0 || ric == 2, ric == 1 || ric == 2);
    match is {
        0 => {
            if ric != 0 {
                return Err(format!("{said}: RIC={ric} by address is an invalid instruction form"));
            }
            if pid != 0 {
                return Err(format!("{said}: PID {pid} is not the kernel's (0)"));
            }
            let ap = (rb >> 5) & 7;
            let shift = actual_page_shift(ap).ok_or_else(|| format!("{said}: AP={ap:#05b} is no radix page size"))?;
            let va = rb & !((1u64 << shift) - 1);
            let said = format!("{said}: AP={ap:#05b} ({}) at {va:#x}", size_name(1 << shift));
            Ok(Invalidates { reach: Reach::Sized { va, shift }, translations, walks, said })
        }
        1 if pid != 0 => Err(format!("{said}: PID {pid} is not the kernel's (0)")),
        _ => Ok(Invalidates { reach: Reach::Everything, translations, walks, said }),
    }
}

/// What a store took out of the translation: a leaf's translation, or the
/// walks cached through a table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removed {
    Translation,
    Walk,
}

/// Whether an invalidation reaches, and removes, what a store took out at
/// `va` (a `2^shift`-byte entry at `level`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Coverage {
    /// It does not reach that address.
    Elsewhere,
    Covers,
    /// It reaches the address but leaves the entry cached, because ...
    Misses(String),
}

pub fn coverage(inv: &Invalidates, what: Removed, va: u64, shift: u32, level: usize) -> Coverage {
    let end = va.saturating_add(1 << shift);
    let contains = |a: u64| (va..end).contains(&a);
    let reached = match inv.reach {
        Reach::Containing { va: a } => contains(a).then_some(Ok(())),
        Reach::AtLevel { va: a, level: l } => contains(a).then(|| {
            if l == level {
                Ok(())
            } else {
                Err(format!("its TTL names level {l}, the entry was at level {level}"))
            }
        }),
        Reach::Sized { va: a, shift: s } => (a < end && va < a.saturating_add(1 << s)).then(|| {
            if s == shift {
                Ok(())
            } else {
                Err(format!(
                    "it removes only {} translations, the entry mapped {}",
                    size_name(1 << s),
                    size_name(1 << shift)
                ))
            }
        }),
        Reach::Everything => Some(Ok(())),
    };
    match reached {
        None => Coverage::Elsewhere,
        Some(Err(why)) => Coverage::Misses(why),
        Some(Ok(())) => match what {
            Removed::Translation if !inv.translations => Coverage::Misses("it removes no TLB entries".into()),
            Removed::Walk if !inv.walks => Coverage::Misses("it leaves the walks cached through the entry".into()),
            _ => Coverage::Covers,
        },
    }
}
