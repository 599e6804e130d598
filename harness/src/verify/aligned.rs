//! compound-aligned: every compound page starts at a multiple of its size.
//! The buddy allocator, HugeTLB and DAX all find a head by masking a pfn
//! with the compound size; a compound page off that alignment (an altmap
//! reserve rounded to a page, not to the compound size) puts its head where
//! nobody looks, and its struct pages across its neighbours' vmemmap pages.

use hvo_abi::manifest::Region;
use hvo_abi::model::RegionKind;

use super::findings::Findings;
use super::pfns::PfnRange;
use super::{size_name, Context, VerifyError};
use crate::addr::Pfn;

pub(super) fn compound_aligned(ctx: &Context, f: &mut Findings) -> Result<(), VerifyError> {
    let page = ctx.map.page;
    for region in ctx.compound_regions() {
        let pages = 1u64 << region.order;
        let size = size_name(page << region.order);
        f.cover(region.nr_pages / pages);
        let start = Pfn(region.start_pfn);
        let skew = start.0 % pages;
        if skew != 0 && !tiled_from_device(region) {
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

/// Whether a device range QEMU placed off its compound size (a DIMM on a
/// smaller boundary: Linux's device DAX refuses such a range, the model
/// takes it) tiles its compound pages from the device's first pfn: heads at
/// multiples of the compound size from there, after an altmap reserve of
/// whole compound pages.
fn tiled_from_device(region: &Region) -> bool {
    let pages = 1u64 << region.order;
    let device = PfnRange::with_altmap(region).start;
    region.kind == RegionKind::Dax
        && !device.0.is_multiple_of(pages)
        && (region.start_pfn - device.0).is_multiple_of(pages)
}
