//! Whether the `[[boot-gigantic]]` folios fit boot memory, worked out at
//! load the way the firmware places them, on every architecture the
//! scenario runs on: a file asking for more fails here (exit 2, its file,
//! line and field) rather than at run time with `Map(Alloc(OutOfMemory))`.
//!
//! The firmware's rules: boot RAM is where the profile puts it (q35 moves
//! RAM above 2 GiB past 4 GiB when it has more than 2.75 GiB); persistent
//! memory set aside at boot is the end of the last RAM range; the firmware
//! itself (image and update log, boot page tables, what the platform
//! reserves) lies in the first [`FIRMWARE_BYTES`] of RAM; each entry's
//! folios are one block, naturally aligned, the lowest that fits after the
//! earlier entries (gaps below it stay free); and the boot memmap then needs
//! its 2 MiB vmemmap leaves.

use std::ops::Range;

use hvo_abi::model::STRUCT_PAGE_SIZE;
use hvo_images::{profile, Arch};
use toml::Spanned;

use super::locate::Locator;
use super::raw::RawBootGigantic;
use super::{BootGigantic, ScenarioError};
use crate::verify::size_name;

/// Where the firmware keeps itself: the start of boot RAM.
const FIRMWARE_BYTES: u64 = 32 << 20;
/// The boot memmap's leaves.
const LEAF: u64 = 2 << 20;

/// Boot RAM as the allocator starts with it, in address order.
fn free_ram(arch: Arch, boot_memory: u64, boot_pmem: u64) -> Vec<Range<u64>> {
    let pieces = profile(arch).boot_ram_pieces(boot_memory);
    let mut free: Vec<Range<u64>> = pieces.iter().map(|p| p.gpa..p.gpa + p.len).collect();
    if let Some(last) = free.last_mut() {
        last.end -= boot_pmem.min(last.end - last.start);
    }
    let firmware_end = free.first().map_or(0, |r| r.start) + FIRMWARE_BYTES;
    for r in &mut free {
        r.start = r.start.max(firmware_end.min(r.end));
    }
    free.retain(|r| r.start < r.end);
    free
}

/// Takes the lowest `bytes` aligned to `align` from `free`, as the
/// firmware's allocator does; `None` when no range holds them.
fn take(free: &mut Vec<Range<u64>>, bytes: u64, align: u64) -> Option<u64> {
    let i = free.iter().position(|r| r.start.div_ceil(align) * align + bytes <= r.end)?;
    let r = free.remove(i);
    let start = r.start.div_ceil(align) * align;
    free.insert(i, start + bytes..r.end);
    free.insert(i, r.start..start);
    free.retain(|r| r.start < r.end);
    Some(start)
}

/// 2 MiB leaves the boot memmap of `boot_memory` needs (one per present
/// section's 2 MiB of vmemmap, at least one).
fn memmap_leaves(arch: Arch, boot_memory: u64) -> u64 {
    let page = profile(arch).page_size();
    (boot_memory / page * STRUCT_PAGE_SIZE).div_ceil(LEAF).max(1)
}

/// Checks every architecture the scenario runs on.
pub(super) fn check(
    loc: &Locator,
    raw: &[Spanned<RawBootGigantic>],
    gigantic: &[BootGigantic],
    architectures: &[Arch],
    boot_memory: u64,
    boot_pmem: u64,
) -> Result<(), ScenarioError> {
    if gigantic.is_empty() {
        return Ok(());
    }
    for &arch in architectures {
        let mut free = free_ram(arch, boot_memory, boot_pmem);
        let ram = describe(&free);
        for (i, (g, r)) in gigantic.iter().zip(raw).enumerate() {
            if take(&mut free, g.size * g.count, g.size).is_none() {
                let r = r.get_ref();
                let span = r.count.as_ref().map_or_else(|| r.size.span(), |c| c.span());
                return Err(loc.error(
                    span,
                    Some(&format!("boot-gigantic[{}].count", i + 1)),
                    format!(
                        "{} of {} {} not fit the {} of boot memory on {arch}: an entry's folios take one naturally aligned block after the earlier entries', in boot RAM less the firmware's first {} ({ram})",
                        if g.count == 1 { "a folio".to_string() } else { format!("{} folios", g.count) },
                        size_name(g.size),
                        if g.count == 1 { "does" } else { "do" },
                        size_name(boot_memory),
                        size_name(FIRMWARE_BYTES),
                    ),
                ));
            }
        }
        let leaves = memmap_leaves(arch, boot_memory);
        let room: u64 = free.iter().map(|r| (r.end / LEAF).saturating_sub(r.start.div_ceil(LEAF))).sum();
        if room < leaves {
            let r = raw[raw.len() - 1].get_ref();
            let span = r.count.as_ref().map_or_else(|| r.size.span(), |c| c.span());
            return Err(loc.error(
                span,
                Some(&format!("boot-gigantic[{}].count", raw.len())),
                format!(
                    "the boot-time gigantic pages leave room for {room} of the {leaves} 2M vmemmap leaves the boot memmap of {} needs on {arch} ({ram})",
                    size_name(boot_memory),
                ),
            ));
        }
    }
    Ok(())
}

/// "boot RAM 0x2000000..0x80000000, 0x100000000..0x140000000".
fn describe(free: &[Range<u64>]) -> String {
    let ranges: Vec<String> = free.iter().map(|r| format!("{:#x}..{:#x}", r.start, r.end)).collect();
    format!("free boot RAM {}", ranges.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    #[test]
    fn folios_go_lowest_first_naturally_aligned_leaving_gaps_free() {
        let mut free = free_ram(Arch::X86_64, 3 * G, 0);
        assert_eq!(free, vec![FIRMWARE_BYTES..2 * G, 4 * G..5 * G], "q35 moves RAM past 2 GiB above 4 GiB");
        assert_eq!(take(&mut free, G, G), Some(G));
        assert_eq!(take(&mut free, G, G), Some(4 * G));
        assert_eq!(take(&mut free, G, G), None);
        assert_eq!(free, vec![FIRMWARE_BYTES..G]);
        let mut arm = free_ram(Arch::Aarch64, 2 * G, 0);
        assert_eq!(take(&mut arm, G, G), Some(2 * G), "arm64 RAM starts at 1 GiB, with the firmware");
        assert!(memmap_leaves(Arch::Aarch64, 2 * G) <= 16);
    }
}
