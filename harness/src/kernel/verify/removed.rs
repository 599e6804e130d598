//! no-leak on a real kernel: memory removed since boot (an unplugged DIMM,
//! a DAX device torn down) leaves no vmemmap behind. A leaf that also maps
//! struct pages of memory still present stays, as Linux keeps it (it frees
//! a PMD leaf only once nothing under it is in use).

use super::checks::Context;
use crate::verify::Findings;

pub(super) fn no_leak(ctx: &Context) -> Findings {
    let mut f = Findings::default();
    let view = ctx.view;
    let live = view.live_spans();
    let mut pages = 0;
    for removed in &view.removed {
        let span = view.vmemmap_of(removed);
        let mut left: Vec<(u64, u64)> = Vec::new();
        for (va, mapping, frame) in ctx.map.pages_in(span.start.0, span.end.0) {
            pages += 1;
            let leaf = va / mapping.size() * mapping.size()..va / mapping.size() * mapping.size() + mapping.size();
            let shared_with_live = live.iter().any(|l| l.start.0 < leaf.end && leaf.start < l.end.0);
            if !shared_with_live {
                left.push((va, frame.0));
            }
        }
        if let Some(&(va, frame)) = left.first() {
            f.fail(format!(
                "removed pfns {}..{}: {} of its vmemmap pages are still mapped, the first {va:#x} -> {frame:#x}",
                removed.start,
                removed.end,
                left.len()
            ));
        }
    }
    f.covered_as(match view.removed.len() {
        0 => "nothing removed".to_string(),
        n => format!("{n} removed ranges: their vmemmap is gone ({pages} pages still mapped under leaves shared with present memory)"),
    });
    f
}
