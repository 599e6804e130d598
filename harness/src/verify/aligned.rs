//! compound-aligned: every compound page starts at a multiple of its size.
//! The buddy allocator, HugeTLB and DAX all find a head by masking a pfn
//! with the compound size; a compound page off that alignment (an altmap
//! reserve rounded to a page, not to the compound size) puts its head where
//! nobody looks, and its struct pages across its neighbours' vmemmap pages.

use super::findings::Findings;
use super::{size_name, Context, VerifyError};
use crate::addr::Pfn;

pub(super) fn compound_aligned(ctx: &Context, f: &mut Findings) -> Result<(), VerifyError> {
    let page = ctx.map.page;
    for region in ctx.compound_regions() {
        let pages = 1u64 << region.order;
        let size = size_name(page << region.order);
        f.cover(region.nr_pages / pages);
        let start = Pfn(region.start_pfn);
        let skew = region.start_pfn % pages;
        if skew != 0 {
            f.fail(format!(
                "region {}: its {size} compound pages start at pfn {start} ({}), {} past a {size} boundary: no head is naturally aligned",
                region.id,
                start.addr(page),
                size_name(skew * page),
            ));
        }
        if region.nr_pages % pages != 0 {
            f.fail(format!(
                "region {}: its {} pages are not a whole number of {size} compound pages",
                region.id, region.nr_pages
            ));
        }
    }
    Ok(())
}
