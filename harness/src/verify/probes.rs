//! Read probes through the guest's own TLB (`tlb-coherent`). Under QEMU's
//! emulator a write through a stale read-only entry re-walks the tables, so
//! write probes miss a forgotten flush wherever the old translation was
//! read-only (restore) or is gone (unmap); a read does not re-walk. For
//! each address the host walks the tables itself: where they map a frame of
//! RAM, the guest writes a marker the host chose into that frame (through
//! its identity map) and reads the address back, which must give the marker
//! (a stale translation reads the old frame); where they map nothing, the
//! read must fault. The guest only performs the accesses and says what it
//! read.

use std::time::Duration;

use hvo_abi::manifest::{Manifest, Region};
use hvo_abi::model::RegionKind;
use hvo_abi::protocol::{Command, Marker};
use hvo_images::Arch;

use super::live::LiveError;
use super::vmemmap_pages_per_compound;
use crate::addr::VirtAddr;
use crate::console::{Console, ConsoleError};
use crate::memory::GuestMemory;
use crate::pgtable::{self, WalkError};

/// The byte of a vmemmap page a probe reads (a word inside its first struct page).
const WORD_IN_PAGE: u64 = 8;
/// Markers are this pattern with a count in the low half, so no two probes
/// of a run look for the same value and none is a struct page's word.
const MARKER_PATTERN: u64 = 0x4856_4f50_0000_0000;

/// The words of a region's vmemmap worth probing: in its first and its
/// last compound page, the head's vmemmap page, the first tail page and the
/// last (for hot-added memory, the first and last struct page of the
/// range). The last compound page is the one a step changed most recently,
/// so its translations are the likeliest still to be in the TLB; QEMU's
/// TLB is direct-mapped and evicts older ones as a step touches other pages.
pub fn samples(manifest: &Manifest, region: &Region) -> Vec<VirtAddr> {
    let page = manifest.page_size;
    let word = |pfn: u64| manifest.struct_page_va(pfn) & !(page - 1);
    let mut pages = Vec::new();
    if region.kind == RegionKind::Memory {
        if region.nr_pages > 0 {
            pages.extend([word(region.start_pfn), word(region.start_pfn + region.nr_pages - 1)]);
        }
    } else {
        let count = vmemmap_pages_per_compound(region.order, page).max(1);
        for head in [region.heads().next(), region.heads().last()].into_iter().flatten() {
            let base = word(head);
            pages.extend([base, base + page, base + (count - 1) * page].into_iter().take(count.min(3) as usize));
        }
    }
    let mut seen = std::collections::HashSet::new();
    pages.retain(|p| seen.insert(*p));
    pages.into_iter().map(|p| VirtAddr(p + WORD_IN_PAGE)).collect()
}

/// What a read of an address must give, from the host's own walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expected {
    /// The tables map this word of RAM: the marker written there.
    Marker { pa: u64 },
    /// Mapped outside the guest's RAM (an altmap on the device): readable.
    Readable,
    /// Nothing mapped: the read faults.
    Fault,
}

fn expectation(arch: Arch, memory: &dyn GuestMemory, manifest: &Manifest, va: VirtAddr) -> Result<Expected, WalkError> {
    let leaf = pgtable::walker_for(arch, memory, manifest, va)?.translate(memory, va)?;
    Ok(match leaf {
        None => Expected::Fault,
        Some(leaf) => {
            let pa = leaf.translate(va).0;
            if manifest.ram().any(|r| pa >= r.start && pa + 8 <= r.end()) {
                Expected::Marker { pa }
            } else {
                Expected::Readable
            }
        }
    })
}

/// Reads probed and what went wrong with them.
#[derive(Default)]
pub struct ProbeLog {
    pub probed: u64,
    pub problems: Vec<String>,
}

/// One read to make, and what it must give.
pub struct PlannedRead {
    va: VirtAddr,
    expected: Expected,
    value: u64,
}

/// Hands out markers and runs read probes over one run.
#[derive(Default)]
pub struct ReadProber {
    issued: u64,
}

impl ReadProber {
    /// What reading each of `vas` must give, as the tables map it now;
    /// addresses the host cannot walk are problems already.
    pub fn plan(
        &mut self,
        arch: Arch,
        memory: &dyn GuestMemory,
        manifest: &Manifest,
        vas: &[VirtAddr],
        when: &str,
        log: &mut ProbeLog,
    ) -> Vec<PlannedRead> {
        let mut planned = Vec::with_capacity(vas.len());
        for &va in vas {
            match expectation(arch, memory, manifest, va) {
                Ok(expected) => {
                    self.issued += 1;
                    planned.push(PlannedRead { va, expected, value: MARKER_PATTERN | (self.issued & 0xffff_ffff) });
                }
                Err(e) => log.problems.push(format!("{when}: {va}: the host cannot walk it: {e}")),
            }
        }
        planned
    }
}

/// Makes the planned reads on the guest; `when` says at what point of the
/// scenario, for messages.
pub async fn read(
    console: &mut Console,
    timeout: Duration,
    planned: &[PlannedRead],
    when: &str,
    log: &mut ProbeLog,
) -> Result<(), LiveError> {
    for &PlannedRead { va, expected, value } in planned {
        let marker = match expected {
            Expected::Marker { pa } => Some(Marker { pa, value }),
            Expected::Readable | Expected::Fault => None,
        };
        let reply = match console.request(Command::ProbeRead { va: va.0, marker }, timeout).await {
            Ok(reply) => reply,
            Err(ConsoleError::Refused { message, .. }) => {
                log.problems.push(format!("{when}: {va}: the guest refused the probe: {message}"));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        log.probed += 1;
        if let Some(p) = judge(expected, value, &reply) {
            log.problems.push(format!("{when}: {va}: {p}"));
        }
    }
    Ok(())
}

/// What is wrong with the guest's answer to a read probe, if anything.
fn judge(expected: Expected, value: u64, reply: &str) -> Option<String> {
    let read = reply.strip_prefix("read=").and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok());
    match (expected, reply, read) {
        (Expected::Marker { .. }, _, Some(got)) if got == value => None,
        (Expected::Marker { pa }, _, Some(got)) => Some(format!(
            "the tables map it to {pa:#x}, where the marker {value:#x} was written, but the read gave {got:#x}: \
             a stale translation to the frame it mapped before"
        )),
        (Expected::Marker { pa }, "faulted", _) => Some(format!("the tables map it to {pa:#x}, but the read faulted")),
        (Expected::Readable, "faulted", _) => Some("the tables map it, but the read faulted".to_string()),
        (Expected::Readable, _, Some(_)) | (Expected::Fault, "faulted", _) => None,
        (Expected::Fault, _, Some(got)) => Some(format!(
            "the tables map nothing there, but the read gave {got:#x}: a stale translation of an unmapped page"
        )),
        (_, other, _) => Some(format!("the guest answered `{other}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_judged_against_the_walk() {
        let marker = Expected::Marker { pa: 0x1008 };
        assert_eq!(judge(marker, 0x4856_4f50_0000_0001, "read=0x4856_4f50_0000_0001".replace('_', "").as_str()), None);
        let stale = judge(marker, 0x4856_4f50_0000_0001, "read=0x6f76682d").unwrap();
        assert!(stale.contains("stale translation"), "{stale}");
        assert!(judge(marker, 1, "faulted").unwrap().contains("faulted"));
        assert_eq!(judge(Expected::Fault, 1, "faulted"), None);
        assert!(judge(Expected::Fault, 1, "read=0x0").unwrap().contains("unmapped"));
        assert_eq!(judge(Expected::Readable, 1, "read=0x5"), None);
        assert!(judge(Expected::Readable, 1, "faulted").is_some());
        assert!(judge(marker, 1, "gibberish").unwrap().contains("gibberish"));
    }
}
