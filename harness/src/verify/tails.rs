//! tails-shared: every tail vmemmap page maps the frame its layout says,
//! (zone, order) pairs never share a frame, and a region is optimized
//! exactly when the host's own arithmetic says it can be.

use hvo_abi::manifest::{Manifest, Region};
use hvo_abi::model::{Layout, RegionKind, STRUCT_PAGE_SIZE};

use super::compound::tails_under;
use super::findings::Findings;
use super::pfns::PfnRange;
use super::{size_name, vmemmap_pages_per_compound, Context, VerifyError};

pub(super) fn tails_shared(ctx: &Context, f: &mut Findings) -> Result<(), VerifyError> {
    optimized_when_it_can_be(ctx, f);
    distinct_pairs_apart(ctx, f);
    for c in ctx.compounds().filter(|c| c.optimized) {
        let Some((_, head_frame)) = c.head() else { continue };
        let (region, view, shared) = (c.region, &c.view, c.shared);
        let expected = match region.layout {
            Layout::Unified => shared,
            Layout::LegacyHugetlb => Some(head_frame),
            Layout::LegacyDax => view.pages.get(1).and_then(|p| p.1).map(|(_, fr)| fr),
            Layout::None => None,
        };
        if region.layout == Layout::Unified && shared.is_none() {
            f.fail(format!(
                "{}: optimized under unified, but the manifest has no {}/order {} shared tail page",
                c.at(1),
                region.zone.name(),
                region.order
            ));
        }
        let (first_tail, _) = tails_under(region.layout, view.pages.len());
        for (i, (_, m)) in view.pages.iter().enumerate().skip(first_tail).filter(|(i, _)| !c.borrowed(*i)) {
            f.cover(1);
            let Some((_, frame)) = m else {
                f.fail_in(view, shared, format!("{}: tail page unmapped", c.at(i)));
                continue;
            };
            if Some(*frame) != expected {
                f.fail_in(
                    view,
                    shared,
                    format!(
                        "{}: tail maps {frame}, expected {} under {}",
                        c.at(i),
                        expected.map(|e| e.to_string()).unwrap_or_else(|| "a shared page".into()),
                        region.layout.name()
                    ),
                );
            }
        }
    }
    Ok(())
}

/// Optimized exactly when it can be: the layout asked for, room to share,
/// struct pages in system memory (altmap-unoptimized judges the others)
/// and not in a boot section's memmap.
fn optimized_when_it_can_be(ctx: &Context, f: &mut Findings) {
    let page = ctx.map.page;
    for region in ctx.compound_regions().filter(|r| r.altmap_pfns == 0) {
        let Some(&asked) = ctx.requested.get(&region.id) else { continue };
        f.cover(1);
        let reason =
            why_not_optimizable(ctx.manifest, region, asked, page).or_else(|| in_neighbours_leaves(ctx, region, asked));
        let problem = match (&reason, region.optimized) {
            (None, false) => Some(format!(
                "region {} was to be optimized under {}, its {} compound pages spanning {} vmemmap pages of {} KiB, but the guest left it unoptimized",
                region.id,
                asked.name(),
                size_name(page << region.order),
                vmemmap_pages_per_compound(region.order, page),
                page >> 10
            )),
            (Some(why), true) => Some(format!(
                "region {} claims to be optimized under {}, but it cannot be: {why}",
                region.id,
                region.layout.name()
            )),
            (None, true) if region.layout != asked => Some(format!(
                "region {} is optimized under {}, but {} was asked for",
                region.id,
                region.layout.name(),
                asked.name()
            )),
            _ => None,
        };
        if let Some(p) = problem {
            f.fail(p);
        }
    }
}

/// Why a device region cannot be optimized although its arithmetic allows
/// it: every compound page keeps the vmemmap pages `asked` would keep
/// private in a neighbour's leaf (memory hot-added beside it populated them
/// first; see `in_neighbours_leaf`). `None` when some compound page could be.
fn in_neighbours_leaves(ctx: &Context, region: &Region, asked: Layout) -> Option<String> {
    let private = asked.private_pages() as usize;
    let mut compounds = ctx.compounds().filter(|c| c.region.id == region.id).peekable();
    compounds.peek()?;
    if compounds.all(|c| (0..private.min(c.view.pages.len())).any(|i| c.borrowed(i))) {
        return Some(
            "every compound page's vmemmap lies in a 2 MiB leaf that memory hot-added beside it populated first (radix's vmemmap_populate_compound_pages skips an existing PMD leaf)".into(),
        );
    }
    None
}

/// Distinct (zone, order) pairs never share a frame.
fn distinct_pairs_apart(ctx: &Context, f: &mut Findings) {
    let tails: Vec<_> = ctx.manifest.shared_tails.iter().collect();
    for (i, a) in tails.iter().enumerate() {
        for b in &tails[i + 1..] {
            if a.pa == b.pa {
                f.fail(format!(
                    "zones {}/order {} and {}/order {} share the tail page {:#x}",
                    a.zone.name(),
                    a.order,
                    b.zone.name(),
                    b.order,
                    a.pa
                ));
            }
        }
    }
}

/// Why a region asked to take `asked` cannot be optimized, by the host's own
/// arithmetic; `None` when it can and must be.
fn why_not_optimizable(manifest: &Manifest, region: &Region, asked: Layout, page: u64) -> Option<String> {
    let n = vmemmap_pages_per_compound(region.order, page);
    if asked == Layout::None {
        return Some("no layout was asked for".into());
    }
    // Pages each compound page keeps private (VMEMMAP_RESERVE_NR).
    let private = asked.private_pages();
    if n <= private {
        return Some(format!(
            "its {} compound pages have {} of struct pages, {} of {} KiB, and {} stays private under {}: nothing is left to share",
            size_name(page << region.order),
            size_name((1u64 << region.order) * STRUCT_PAGE_SIZE),
            match n {
                0 => "less than one vmemmap page".to_string(),
                1 => "one vmemmap page".to_string(),
                n => format!("{n} vmemmap pages"),
            },
            page >> 10,
            private,
            asked.name()
        ));
    }
    if region.kind == RegionKind::Dax {
        // A range starting in a section boot RAM shares reuses that
        // section's memmap, populated whole at boot (section_activate).
        let section = 1u64 << manifest.section_size_bits.min(40);
        let start = PfnRange::of_region(region).to_sections(section, page).start.addr(page);
        let in_boot_section = |r: &hvo_abi::manifest::Range| r.start < start.0 + section && r.end() > start.0;
        if manifest.ram().any(|r| in_boot_section(&r)) {
            return Some(format!("it starts in the boot memory section at {start}, whose memmap it reuses"));
        }
    }
    None
}
