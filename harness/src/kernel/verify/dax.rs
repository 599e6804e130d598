//! Device DAX ranges: where their compound pages are, which layout each
//! one's vmemmap shows, and the contract of that layout.
//!
//! Linux (mm/sparse-vmemmap.c) lays a device's compound pages out in one
//! of three ways, read here from the tables alone:
//! - legacy DAX (`vmemmap_populate_compound_pages`, every packaged kernel):
//!   vmemmap pages 0 and 1 private, pages 2.. mapping page 1's frame, all
//!   writable; a compound page larger than a section continues in the next
//!   sections on that same frame (`compound_section_tail_page`);
//! - unified (the series): one private head page, every tail on the one
//!   read-only shared page of (device zone, order);
//! - not optimized: every vmemmap page its own writable frame, as with
//!   struct pages on the device (altmap), compound pages with no more
//!   vmemmap pages than Linux keeps private (`VMEMMAP_RESERVE_NR`), or
//!   kernels that do not build DAX vmemmap optimization.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::Range;

use hvo_abi::model::{Layout, STRUCT_PAGE_SIZE};

use super::checks::Context;
use super::pattern::{unified_tails_on, vmemmap_pages, FoundCompound};
use super::{FoundRegion, Generation, KernelView};
use crate::addr::{Pfn, PhysAddr};
use crate::verify::{size_name, CompoundView, Findings, PageMapping, VmemmapMap};

/// Vmemmap pages Linux keeps private per compound page under legacy DAX
/// (`VMEMMAP_RESERVE_NR`): a compound page with no more than these is
/// never optimized (`__vmemmap_can_optimize`).
pub(super) const VMEMMAP_RESERVE_NR: u64 = 2;

/// A device DAX range the kernel was asked to create (the agent's
/// `dax-create`): a namespace whose data range holds compound pages of the
/// device's `align`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaxRange {
    /// The device's name ("dax0.0"), for messages.
    pub name: String,
    /// The pfns Linux maps struct pages for: the namespace, which its
    /// `dev_pagemap` covers whole (info block, altmap, data).
    pub namespace: Range<Pfn>,
    /// The device-dax data range, inside the namespace.
    pub data: Range<Pfn>,
    /// The compound page size: the device's `align` (2 MiB or 1 GiB).
    pub compound_bytes: u64,
    /// Where its struct pages live when they live on the device (mode
    /// pmem: the altmap, from the namespace's start up to the data's);
    /// None when they are in system memory (mode ram).
    pub altmap: Option<Range<Pfn>>,
    /// The layout the scenario expects (`Layout::LegacyDax`,
    /// `Layout::Unified`, or `Layout::None` for not optimized); None
    /// accepts whatever the kernel's generation allows.
    pub expected: Option<Layout>,
}

impl DaxRange {
    /// "DAX dax2.0 (2M compound pages, struct pages on the device at pfns ..)".
    pub fn describe(&self) -> String {
        let whose = match &self.altmap {
            Some(a) => format!(", struct pages on the device at pfns {}..{}", a.start, a.end),
            None => String::new(),
        };
        format!("DAX {} ({} compound pages{whose})", self.name, size_name(self.compound_bytes))
    }

    /// Refuses ranges no device has: a compound size not a power of two of
    /// pages, data outside the namespace, an altmap outside the space
    /// before the data.
    pub(super) fn validate(&self, page: u64) -> Result<(), String> {
        let bad = if !self.compound_bytes.is_power_of_two() || self.compound_bytes < page {
            Some(format!("its compound size {:#x} is not a power of two of whole pages", self.compound_bytes))
        } else if self.data.start < self.namespace.start || self.data.end > self.namespace.end {
            Some(format!(
                "its data (pfns {}..{}) is not inside its namespace (pfns {}..{})",
                self.data.start, self.data.end, self.namespace.start, self.namespace.end
            ))
        } else if self.altmap.as_ref().is_some_and(|a| a.start < self.namespace.start || a.end > self.data.start) {
            Some("its altmap is not between the namespace's start and the data's".to_string())
        } else {
            None
        };
        bad.map_or(Ok(()), |why| Err(format!("DAX range {}: {why}", self.name)))
    }

    /// Why Linux never optimizes this device's vmemmap; None when it can.
    pub(super) fn why_unoptimizable(&self, page: u64) -> Option<String> {
        if self.altmap.is_some() {
            return Some("its struct pages live on the device (altmap)".to_string());
        }
        let n = vmemmap_pages(self.compound_bytes, page);
        (n <= VMEMMAP_RESERVE_NR).then(|| {
            let pages = match n {
                0 => "less than one vmemmap page".to_string(),
                n => format!("{n} vmemmap pages"),
            };
            format!(
                "its {} compound pages have {} of struct pages, {pages} of {} KiB, and Linux keeps {VMEMMAP_RESERVE_NR} private",
                size_name(self.compound_bytes),
                size_name(self.compound_bytes / page * STRUCT_PAGE_SIZE),
                page >> 10
            )
        })
    }

    /// Its compound pages' heads: over the whole namespace, from its start
    /// (Linux lays the memmap of a `dev_pagemap`'s range out as compound
    /// pages from the range's start: `vmemmap_populate_compound_pages`,
    /// `reuse_compound_section`, `memmap_init_compound`). The data starts
    /// on one where the namespace is aligned to the device's `align`.
    pub(super) fn heads(&self, page: u64) -> impl Iterator<Item = Pfn> {
        let pfns = (self.compound_bytes / page).max(1);
        let end = self.namespace.end.0;
        (self.namespace.start.0..end).step_by(pfns as usize).filter(move |h| h + pfns <= end).map(Pfn)
    }
}

/// Every compound page of every DAX range whose vmemmap fills at least one
/// page, each with the layout its first vmemmap pages show (`Layout::None`
/// when not optimized). Heads that are not mapped are left to
/// memmap-present.
pub(super) fn find(view: &KernelView, map: &VmemmapMap) -> Vec<FoundCompound> {
    let page = view.page_size;
    let mut found = Vec::new();
    for (index, d) in view.dax.iter().enumerate() {
        let n = vmemmap_pages(d.compound_bytes, page);
        if n == 0 {
            continue;
        }
        for head in d.heads(page) {
            let pages = map.span(view.struct_page(head), n);
            let Some((layout, (head_mapping, head_frame))) = classify(map, &pages) else { continue };
            found.push(FoundCompound {
                head,
                bytes: d.compound_bytes,
                layout,
                head_mapping,
                head_frame,
                view: CompoundView::of_pages(head, pages, page),
                device: Some(index),
                owner: format!("{}: ", d.name),
            });
        }
    }
    found
}

/// The layout one DAX compound page's vmemmap pages show, from its first
/// tails: on the head's frame (the HugeTLB layout, never DAX's), read-only
/// or on a frame other compound pages map too (unified), a private
/// writable page 1 that page 2 maps too (legacy DAX), else not optimized.
fn classify(
    map: &VmemmapMap,
    pages: &[(u64, Option<(PageMapping, PhysAddr)>)],
) -> Option<(Layout, (PageMapping, PhysAddr))> {
    let head = pages.first()?.1?;
    let Some((first_tail, frame)) = pages.get(1).and_then(|(_, m)| *m) else {
        return Some((Layout::None, head));
    };
    let own = pages.iter().filter(|(_, m)| m.is_some_and(|(_, f)| f == frame)).count() as u64;
    let second = pages.get(2).and_then(|(_, m)| *m).map(|(_, f)| f);
    let layout = if frame == head.1 {
        Layout::LegacyHugetlb
    } else if !first_tail.perms.write || map.mappers(frame) > own {
        Layout::Unified
    } else if second == Some(frame) {
        Layout::LegacyDax
    } else {
        Layout::None
    };
    Some((layout, head))
}

/// The DAX compound pages found, as regions by size and layout, with the
/// devices whose compound pages fill less than a vmemmap page (never
/// optimized, so every struct page is theirs).
pub(super) fn summarize(view: &KernelView, map: &VmemmapMap, dax: &[FoundCompound]) -> Vec<FoundRegion> {
    let page = view.page_size;
    let mut regions = super::pattern::summarize(map, dax);
    for d in view.dax.iter().filter(|d| vmemmap_pages(d.compound_bytes, page) == 0) {
        let count = d.heads(page).count() as u64;
        let same = |r: &FoundRegion| {
            r.kind == super::CompoundKind::Dax && r.compound_bytes == d.compound_bytes && r.layout == Layout::None
        };
        match regions.iter_mut().find(|r| same(r)) {
            Some(r) => r.count += count,
            None => regions.push(FoundRegion {
                kind: super::CompoundKind::Dax,
                compound_bytes: d.compound_bytes,
                count,
                layout: Layout::None,
                private_vmemmap_bytes: d.compound_bytes / page * STRUCT_PAGE_SIZE,
                shared_tail_pages: 0,
            }),
        }
    }
    regions.sort_by(|a, b| b.compound_bytes.cmp(&a.compound_bytes).then(a.layout.name().cmp(b.layout.name())));
    regions
}

/// The compound pages of device `index`.
fn of_device<'c>(ctx: &'c Context, index: usize) -> impl Iterator<Item = &'c FoundCompound> + 'c {
    ctx.dax.iter().filter(move |c| c.device == Some(index))
}

/// "1022 x 2M legacy-dax + 2 x 2M none": a device's compound pages by layout.
fn layouts_of<'c>(compounds: impl Iterator<Item = &'c FoundCompound>) -> (BTreeMap<&'static str, u64>, String) {
    let mut by_layout: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut bytes = 0;
    for c in compounds {
        *by_layout.entry(c.layout.name()).or_default() += 1;
        bytes = c.bytes;
    }
    let words: Vec<String> = by_layout.iter().map(|(l, n)| format!("{n} x {} {l}", size_name(bytes))).collect();
    (by_layout, words.join(" + "))
}

/// "dax0.0: 1024 x 2M legacy-dax, dax1.0: 2 x 1G none": what the DAX part
/// of a check covered.
pub(super) fn covered(ctx: &Context) -> String {
    let parts: Vec<String> = ctx
        .view
        .dax
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let (_, words) = layouts_of(of_device(ctx, i));
            match words.is_empty() {
                true => format!(
                    "{}: {} x {} none (less than a vmemmap page each)",
                    d.name,
                    d.heads(ctx.view.page_size).count(),
                    size_name(d.compound_bytes)
                ),
                false => format!("{}: {words}", d.name),
            }
        })
        .collect();
    parts.join(", ")
}

/// tails-shared for device DAX: every compound page in the layout its
/// device allows (unoptimizable devices show none; those in a boot section
/// reuse its memmap unoptimized; the unified layout only where the kernel
/// is of the series; the scenario's expected layout if it says one, else
/// one layout a device), and its tails on the frame that layout says.
pub(super) fn tails_shared(ctx: &Context, f: &mut Findings) {
    let page = ctx.view.page_size;
    for (index, d) in ctx.view.dax.iter().enumerate() {
        if let Some(why) = d.why_unoptimizable(page) {
            if let Some(want) = d.expected.filter(|l| *l != Layout::None) {
                f.fail(format!(
                    "{}: the scenario expects the {} layout, yet Linux never optimizes it: {why}",
                    d.name,
                    want.name()
                ));
            }
            // altmap-unoptimized judges devices keeping struct pages on the device.
            if d.altmap.is_none() {
                unoptimizable_device(ctx, f, index, &why);
            }
            continue;
        }
        let in_boot_section = |c: &FoundCompound| ctx.view.in_ram_section(c.head);
        for c in of_device(ctx, index) {
            if in_boot_section(c) {
                if c.layout != Layout::None {
                    let what = format!(
                        "{}: in a section boot RAM shares, whose memmap Linux reuses unoptimized, yet it shows the {} layout",
                        c.at(1),
                        c.layout.name()
                    );
                    f.fail_in(&c.view, c.shared_tail(), what);
                }
                continue;
            }
            compound_tails(ctx, f, c);
        }
        let (by_layout, words) = layouts_of(of_device(ctx, index).filter(|c| !in_boot_section(c)));
        match d.expected {
            Some(want) if by_layout.keys().any(|l| *l != want.name()) => f.fail(format!(
                "{}: the scenario expects the {} layout, yet its compound pages show {words}",
                d.name,
                want.name()
            )),
            None if by_layout.len() > 1 => {
                f.fail(format!("{}: its compound pages show {words}: one device lays them all out alike", d.name))
            }
            _ => {}
        }
    }
    dax_shared_pages(ctx, f);
}

/// One compound page's tails held to the layout it shows.
fn compound_tails(ctx: &Context, f: &mut Findings, c: &FoundCompound) {
    let page1 = c.view.pages.get(1).and_then(|(_, m)| *m).map(|(_, frame)| frame);
    let (first, want, whose) = match c.layout {
        Layout::LegacyHugetlb => {
            let what = format!(
                "{}: maps its head's frame {}: device DAX never lays tails on the head (the legacy-hugetlb layout)",
                c.at(1),
                c.head_frame
            );
            f.fail_in(&c.view, None, what);
            return;
        }
        Layout::Unified if ctx.generation != Generation::Unified => {
            let what = format!(
                "{}: the kernel is {} ({}), yet this compound page shows the unified layout",
                c.at(1),
                ctx.generation.name(),
                ctx.generation.evidence()
            );
            f.fail_in(&c.view, c.shared_tail(), what);
            return;
        }
        Layout::Unified => (1, c.shared_tail(), "the shared tail page vmemmap[1] maps"),
        Layout::LegacyDax => (2, page1, "vmemmap[1]'s frame"),
        Layout::None => {
            for (i, (_, m)) in c.view.pages.iter().enumerate() {
                let Some((m, frame)) = m else { continue };
                let mappers = ctx.map.mappers(*frame);
                if !m.perms.write || mappers != 1 {
                    let how = if m.perms.write { "RW" } else { "RO" };
                    let what = format!(
                        "{}: not optimized, yet it maps {frame} {how}, shared by {mappers} vmemmap pages",
                        c.at(i)
                    );
                    f.fail_in(&c.view, None, what);
                }
            }
            return;
        }
    };
    for (i, _, frame) in c.tails().filter(|(i, ..)| *i >= first) {
        if Some(frame) != want {
            let expected = want.map(|w| w.to_string()).unwrap_or_default();
            let what = format!("{}: maps {frame}, expected {whose} {expected}", c.at(i));
            f.fail_in(&c.view, c.shared_tail(), what);
        }
    }
}

/// A device Linux never optimizes shows no optimized vmemmap page: no
/// compound page in a layout, and (compound pages under a vmemmap page
/// each) every vmemmap page of its range its own writable frame.
fn unoptimizable_device(ctx: &Context, f: &mut Findings, index: usize, why: &str) {
    let d = &ctx.view.dax[index];
    for c in of_device(ctx, index).filter(|c| c.layout != Layout::None) {
        let what =
            format!("{}: shows the {} layout, yet {} is never optimized: {why}", c.at(1), c.layout.name(), d.name);
        f.fail_in(&c.view, c.shared_tail(), what);
    }
    if vmemmap_pages(d.compound_bytes, ctx.view.page_size) > 0 {
        return;
    }
    let span = ctx.view.vmemmap_of(&d.namespace);
    for (va, frame, how, mappers) in shared_pages(ctx, span.start.0..span.end.0) {
        f.fail(format!(
            "{}: vmemmap page {va:#x} maps {frame} {how}, shared by {mappers} vmemmap pages, yet {} is never optimized: {why}",
            d.name, d.name
        ));
    }
}

/// The vmemmap pages in `va` that are read-only or share their frame:
/// VA, frame, "RW"/"RO", how many vmemmap pages map the frame.
fn shared_pages(ctx: &Context, va: Range<u64>) -> Vec<(u64, PhysAddr, &'static str, u64)> {
    ctx.map
        .pages_in(va.start, va.end)
        .filter_map(|(va, m, frame)| {
            let mappers = ctx.map.mappers(frame);
            let how = if m.perms.write { "RW" } else { "RO" };
            (!m.perms.write || mappers != 1).then_some((va, frame, how, mappers))
        })
        .collect()
}

/// The unified layout's DAX shared pages: one per (device zone, order), so
/// never one for two sizes nor one HugeTLB's folios use, mapped only by
/// DAX tails.
fn dax_shared_pages(ctx: &Context, f: &mut Findings) {
    let mut shared: BTreeMap<PhysAddr, Vec<u64>> = BTreeMap::new();
    for c in ctx.dax.iter().filter(|c| c.layout == Layout::Unified) {
        if let Some(frame) = c.shared_tail() {
            let sizes = shared.entry(frame).or_default();
            if !sizes.contains(&c.bytes) {
                sizes.push(c.bytes);
            }
        }
    }
    let hugetlb = ctx.shared_tails();
    for (frame, sizes) in &shared {
        if sizes.len() > 1 {
            let names: Vec<String> = sizes.iter().map(|s| size_name(*s)).collect();
            f.fail(format!(
                "DAX shared tail page {frame} serves {} compound pages alike: one page per (zone, order)",
                names.join(" and ")
            ));
        }
        if hugetlb.contains_key(frame) {
            f.fail(format!(
                "shared tail page {frame} serves HugeTLB folios and device DAX alike: device memory is a zone of its own"
            ));
        }
        let tails = unified_tails_on(ctx.dax, *frame);
        let mappers = ctx.map.mappers(*frame);
        if mappers != tails {
            f.fail(format!(
                "DAX shared tail page {frame} is mapped by {mappers} vmemmap pages, {tails} of them DAX compound pages' tails"
            ));
        }
    }
}

/// altmap-unoptimized: a device keeping its struct pages on the device is
/// never optimized, and every vmemmap page of its data maps its own
/// writable frame inside the device's altmap.
pub(super) fn altmap_unoptimized(ctx: &Context) -> Findings {
    let mut f = Findings::default();
    let page = ctx.view.page_size;
    let mut words = Vec::new();
    for (index, d) in ctx.view.dax.iter().enumerate() {
        let Some(altmap) = &d.altmap else { continue };
        for c in of_device(ctx, index).filter(|c| c.layout != Layout::None) {
            let what = format!(
                "{}: {} keeps its struct pages on the device (altmap), yet this compound page shows the {} layout",
                c.at(1),
                d.name,
                c.layout.name()
            );
            f.fail_in(&c.view, c.shared_tail(), what);
        }
        let span = ctx.view.vmemmap_of(&d.data);
        let mut pages = 0;
        for (va, m, frame) in ctx.map.pages_in(span.start.0, span.end.0) {
            pages += 1;
            let pfn = Pfn::containing(frame, page);
            let mappers = ctx.map.mappers(frame);
            let problem = if !altmap.contains(&pfn) {
                Some(format!("maps {frame}, outside the device's altmap (pfns {}..{})", altmap.start, altmap.end))
            } else if !m.perms.write || mappers != 1 {
                let how = if m.perms.write { "RW" } else { "RO" };
                Some(format!("maps {frame} {how}, shared by {mappers} vmemmap pages"))
            } else {
                None
            };
            if let Some(p) = problem {
                f.fail(format!("{}: vmemmap page {va:#x} {p}: struct pages on the device are never optimized", d.name));
            }
        }
        words.push(format!("{}: {pages} vmemmap pages, each its own writable frame in its altmap", d.name));
    }
    if words.is_empty() {
        words.push("no DAX range keeps its struct pages on the device".to_string());
    }
    f.covered_as(words.join("; "));
    f
}

/// A text picture of one device's first compound page, for artifacts.
pub(super) fn dump(out: &mut String, ctx_dax: &[FoundCompound], view: &KernelView) {
    for (index, d) in view.dax.iter().enumerate() {
        if let Some(first) = ctx_dax.iter().find(|c| c.device == Some(index)) {
            let _ = write!(
                out,
                "{} first compound page ({}):{}",
                d.name,
                first.layout.name(),
                first.view.diagram(first.shared_tail())
            );
            out.push('\n');
        }
    }
}
