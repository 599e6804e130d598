//! contents, for boot RAM outside every region: memmap init left each of
//! its struct pages a free page of the normal zone. A million struct pages
//! per 4 GiB are too many to read at every `verify`, so the host samples
//! them, by its own choice: the vmemmap pages holding the first and last
//! struct page of every stretch of plain RAM (where an off-by-one at a
//! region's edge shows), and pseudo-random ones from a seed of its own;
//! every plain struct page in a vmemmap page read is checked.

use std::collections::BTreeSet;

use hvo_abi::manifest::Manifest;
use hvo_abi::model::{StructPage, Zone, STRUCT_PAGE_SIZE};

use super::compound::read_page;
use super::findings::Findings;
use super::pfns::{pfn_of_struct_page, struct_page_va, PfnRange};
use super::Context;
use crate::addr::{Pfn, VirtAddr};
use crate::fuzz::Rng;

/// Vmemmap pages drawn at random per `verify`, beside the edges.
const RANDOM_SAMPLES: u64 = 256;

/// The host's seed ("hvo-plai"); each `verify` mixes in the manifest's
/// generation, so successive verifies of a run read different pages and a
/// rerun of the scenario reads the same ones.
const SEED: u64 = u64::from_le_bytes(*b"hvo-plai");

/// The frames of `ram` outside every range `taken` (regions and their
/// altmaps), in order.
fn plain_runs(ram: &[PfnRange], taken: &[PfnRange]) -> Vec<PfnRange> {
    let mut taken = taken.to_vec();
    taken.sort_by_key(|r| r.start);
    let mut runs = Vec::new();
    for ram in ram {
        let mut start = ram.start;
        for t in taken.iter().filter(|t| t.end > ram.start && t.start < ram.end) {
            if t.start > start {
                runs.push(PfnRange { start, end: t.start });
            }
            start = start.max(t.end);
        }
        if start < ram.end {
            runs.push(PfnRange { start, end: ram.end });
        }
    }
    runs
}

/// Boot RAM's frames outside every region, as the manifest has them.
fn plain_boot_runs(manifest: &Manifest, page: u64) -> Vec<PfnRange> {
    let ram: Vec<PfnRange> = manifest.ram().map(|r| PfnRange::of_bytes(&r, page)).collect();
    let taken: Vec<PfnRange> = manifest.regions.iter().map(PfnRange::with_altmap).collect();
    plain_runs(&ram, &taken)
}

/// The `n`th frame of the runs, counting through them in order.
fn nth_frame(runs: &[PfnRange], mut n: u64) -> Option<Pfn> {
    for r in runs {
        let len = r.end.0 - r.start.0;
        if n < len {
            return Some(r.start + n);
        }
        n -= len;
    }
    None
}

/// The frames whose vmemmap pages the host reads: the edges of every run,
/// and [`RANDOM_SAMPLES`] drawn from `seed` over all of the runs' frames.
fn sampled_frames(runs: &[PfnRange], seed: u64) -> Vec<Pfn> {
    let total: u64 = runs.iter().map(|r| r.end.0 - r.start.0).sum();
    let mut frames: Vec<Pfn> = runs.iter().flat_map(|r| [r.start, Pfn(r.end.0 - 1)]).collect();
    if total > 0 {
        let mut rng = Rng::new(seed);
        frames.extend((0..RANDOM_SAMPLES).filter_map(|_| nth_frame(runs, rng.below(total))));
    }
    frames
}

pub(super) fn plain_boot_ram(ctx: &Context, f: &mut Findings) {
    let (manifest, page) = (ctx.manifest, ctx.map.page);
    let runs = plain_boot_runs(manifest, page);
    let seed = SEED ^ manifest.generation;
    let pages: BTreeSet<u64> =
        sampled_frames(&runs, seed).into_iter().map(|pfn| struct_page_va(manifest, pfn).0 / page * page).collect();
    let expect = StructPage::free(Zone::Normal);
    let (mut checked, mut wrong, mut first) = (0u64, 0u64, None);
    for va in pages {
        // An unmapped one is memmap-present's to report.
        let Some((_, frame)) = ctx.map.lookup(va) else { continue };
        let Some(pages) = read_page(ctx.mem, frame, page) else {
            f.fail(format!("boot RAM's vmemmap page {va:#x} ({frame}) unreadable"));
            continue;
        };
        for (k, p) in pages.iter().enumerate() {
            let pfn = pfn_of_struct_page(manifest, VirtAddr(va + k as u64 * STRUCT_PAGE_SIZE));
            if !runs.iter().any(|r| r.contains(pfn)) {
                continue;
            }
            checked += 1;
            if *p != expect {
                wrong += 1;
                first.get_or_insert((pfn, *p));
            }
        }
    }
    f.cover(checked);
    if let Some((pfn, p)) = first {
        let what = if p == StructPage::POISONED { "still poisoned".to_string() } else { format!("{p:?}") };
        f.fail(format!(
            "boot RAM outside every region: {wrong} of the {checked} struct pages sampled (seed {seed:#x}) are not \
             free pages of the normal zone; pfn {pfn}'s is {what}"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(start: u64, end: u64) -> PfnRange {
        PfnRange { start: Pfn(start), end: Pfn(end) }
    }

    #[test]
    fn plain_runs_are_ram_less_every_region_touching_or_overhanging_it() {
        let ram = [run(0x100, 0x1000), run(0x2000, 0x3000)];
        let taken = [run(0x2800, 0x3800), run(0x100, 0x200), run(0x400, 0x600), run(0x600, 0x700)];
        let runs = plain_runs(&ram, &taken);
        assert_eq!(runs, [run(0x200, 0x400), run(0x700, 0x1000), run(0x2000, 0x2800)]);
        assert_eq!(plain_runs(&ram, &[run(0, 0x4000)]), []);
    }

    #[test]
    fn samples_take_every_runs_edges_and_draw_the_rest_from_the_seed_inside_the_runs() {
        let runs = [run(0x200, 0x400), run(0x700, 0x1000)];
        let frames = sampled_frames(&runs, 7);
        assert_eq!(frames[..4], [Pfn(0x200), Pfn(0x3ff), Pfn(0x700), Pfn(0xfff)]);
        assert_eq!(frames.len() as u64, 4 + RANDOM_SAMPLES);
        assert!(frames.iter().all(|pfn| runs.iter().any(|r| r.contains(*pfn))));
        // Both runs drawn from: the draw covers all plain frames.
        assert!(frames[4..].iter().any(|pfn| runs[0].contains(*pfn)));
        assert!(frames[4..].iter().any(|pfn| runs[1].contains(*pfn)));
        assert_eq!(sampled_frames(&runs, 7), frames);
        assert_ne!(sampled_frames(&runs, 8), frames);
        assert_eq!(sampled_frames(&[], 7), []);
    }
}
