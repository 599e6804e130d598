//! Steps and boot-time gigantic pages: each `[[step]]` read on its own, then
//! the steps weighed against each other (regions allocated before use, once).

use std::ops::{Range, RangeInclusive};

use hvo_abi::model::{Layout, Zone};
use hvo_abi::refusal::Refusal;
use toml::Spanned;

use super::locate::Locator;
use super::names::{Action, Choice, HotAddKind, MEMORY_ZONES, OPTIMIZE_LAYOUTS};
use super::raw::{RawBootGigantic, RawStep, Size};
use super::{valid_name, Backend, BootGigantic, DaxDevice, PlacedStep, ScenarioError, Step};

/// HugeTLB folio and DAX compound page sizes the model allocates: 128 KiB
/// to 1 GiB. Below 2 MiB only to reach the optimizability boundary with
/// 4 KiB pages (256 KiB: one vmemmap page, 512 KiB: two), as 64 MiB and
/// 128 MiB reach it with 64 KiB pages.
const FOLIO_SIZES: RangeInclusive<u64> = (128 << 10)..=(1 << 30);
const MAX_FOLIOS: u64 = 65536;
/// The compound page size of a DAX hot-add that names none.
const DEFAULT_COMPOUND: u64 = 2 << 20;

const ZONES: Choice<Zone> = Choice::all("zone");
const MEMORY_ZONE: Choice<Zone> = Choice { what: "zone for memory", accepted: MEMORY_ZONES };
const OPTIMIZE_LAYOUT: Choice<Layout> = Choice { what: "layout", accepted: OPTIMIZE_LAYOUTS };
const DAX_LAYOUT: Choice<Layout> = Choice::all("layout");
const BACKENDS: Choice<Backend> = Choice::all("backend");
const DEVICES: Choice<DaxDevice> = Choice::all("device");
const KINDS: Choice<HotAddKind> = Choice::all("kind");
pub(super) const ACTIONS: Choice<Action> = Choice::all("action");
const REFUSALS: Choice<Refusal> = Choice::all("refusal");

/// Whether `bytes` is a size compound pages come in.
fn is_folio_size(bytes: u64) -> bool {
    bytes.is_power_of_two() && FOLIO_SIZES.contains(&bytes)
}

/// The folio size and count of a HugeTLB allocation, at boot or in a step.
fn folios(
    loc: &Locator,
    field: impl Fn(&str) -> String,
    size: &Spanned<Size>,
    count: Option<&Spanned<u64>>,
) -> Result<(u64, u64), ScenarioError> {
    let bytes = size.get_ref().0;
    if !is_folio_size(bytes) {
        return Err(loc.error(
            size.span(),
            Some(&field("size")),
            format!("{} is not a HugeTLB folio size: a power of two from 128K to 1G", size.get_ref()),
        ));
    }
    let count_value = count.map_or(1, |c| *c.get_ref());
    match count {
        Some(c) if count_value == 0 || count_value > MAX_FOLIOS => {
            Err(loc.error(c.span(), Some(&field("count")), format!("{count_value} folios is outside 1..={MAX_FOLIOS}")))
        }
        _ => Ok((bytes, count_value)),
    }
}

/// Reads the `[[boot-gigantic]]` tables: names new and distinct, folios as in
/// `hugetlb-alloc`.
pub(super) fn boot_gigantic(
    loc: &Locator,
    raw: &[Spanned<RawBootGigantic>],
) -> Result<Vec<BootGigantic>, ScenarioError> {
    let mut out: Vec<BootGigantic> = Vec::with_capacity(raw.len());
    for (i, g) in raw.iter().enumerate() {
        let field = |name: &str| format!("boot-gigantic[{}].{name}", i + 1);
        let g = g.get_ref();
        let name = g.region.get_ref();
        if !valid_name(name) || out.iter().any(|b| &b.region == name) {
            return Err(loc.error(
                g.region.span(),
                Some(&field("region")),
                format!("`{name}` must be a new name of a-z, 0-9, '-' and '_'"),
            ));
        }
        let (size, count) = folios(loc, field, &g.size, g.count.as_ref())?;
        let zone = ZONES.parse_or(loc, &field("zone"), g.zone.as_ref(), Zone::Normal)?;
        out.push(BootGigantic { region: name.clone(), size, count, zone });
    }
    Ok(out)
}

/// One `[[step]]` being read: its raw fields and where errors about them go.
struct StepReader<'a> {
    raw: &'a RawStep,
    loc: &'a Locator<'a>,
    /// 1-based, as `step[i]` names it.
    index: usize,
}

impl StepReader<'_> {
    fn field(&self, name: &str) -> String {
        format!("step[{}].{name}", self.index)
    }

    fn action_span(&self) -> Range<usize> {
        self.raw.action.span()
    }

    /// The span of an optional parameter, or of the action when it is absent.
    fn span_or_action<T>(&self, value: &Option<Spanned<T>>) -> Range<usize> {
        value.as_ref().map_or_else(|| self.action_span(), |v| v.span())
    }

    fn missing(&self, name: &str, what: &str) -> ScenarioError {
        let action = self.raw.action.get_ref();
        self.loc.error(self.action_span(), Some(&self.field(name)), format!("`{action}` needs {what}"))
    }

    fn invalid(&self, span: Range<usize>, name: &str, message: impl Into<String>) -> ScenarioError {
        self.loc.error(span, Some(&self.field(name)), message)
    }

    /// The parameters written, with their spans, for the "not a parameter" check.
    fn given(&self) -> Vec<(&'static str, Range<usize>)> {
        let r = self.raw;
        fn span<T>(v: &Option<Spanned<T>>) -> Option<Range<usize>> {
            v.as_ref().map(|s| s.span())
        }
        [
            ("status", span(&r.status)),
            ("region", span(&r.region)),
            ("size", span(&r.size)),
            ("count", span(&r.count)),
            ("zone", span(&r.zone)),
            ("layout", span(&r.layout)),
            ("nth", span(&r.nth)),
            ("expect-failure", span(&r.expect_failure)),
            ("expect-refusal", span(&r.expect_refusal)),
            ("compound", span(&r.compound)),
            ("sweep-failures", span(&r.sweep_failures)),
            ("kind", span(&r.kind)),
            ("from", span(&r.from)),
            ("device", span(&r.device)),
            ("altmap", span(&r.altmap)),
            ("backend", span(&r.backend)),
            ("address", span(&r.address)),
        ]
        .into_iter()
        .filter_map(|(n, s)| Some((n, s?)))
        .collect()
    }

    fn region(&self) -> Result<String, ScenarioError> {
        let r = self.raw.region.as_ref().ok_or_else(|| self.missing("region", "a `region` name"))?;
        if !valid_name(r.get_ref()) {
            return Err(self.invalid(r.span(), "region", "use only a-z, 0-9, '-' and '_'"));
        }
        Ok(r.get_ref().clone())
    }

    fn size(&self, what: &str) -> Result<&Spanned<Size>, ScenarioError> {
        self.raw.size.as_ref().ok_or_else(|| self.missing("size", what))
    }

    fn backend(&self) -> Result<Option<Backend>, ScenarioError> {
        self.raw.backend.as_ref().map(|b| BACKENDS.parse(self.loc, &self.field("backend"), b)).transpose()
    }

    fn hugetlb_alloc(&self) -> Result<Step, ScenarioError> {
        let size = self.size("a folio `size`, like \"2M\" or \"1G\"")?;
        let (folio_size, count) = folios(self.loc, |n| self.field(n), size, self.raw.count.as_ref())?;
        let zone = ZONES.parse_or(self.loc, &self.field("zone"), self.raw.zone.as_ref(), Zone::Normal)?;
        let from = self.raw.from.as_ref().map(|f| f.get_ref().clone());
        Ok(Step::HugetlbAlloc { region: self.region()?, folio_size, count, zone, from })
    }

    fn optimize(&self) -> Result<Step, ScenarioError> {
        let layout =
            OPTIMIZE_LAYOUT.parse_or(self.loc, &self.field("layout"), self.raw.layout.as_ref(), Layout::Unified)?;
        Ok(Step::Optimize { region: self.region()?, layout })
    }

    fn hot_add_memory(&self) -> Result<Step, ScenarioError> {
        let size = self.size("the hotplugged memory's `size`")?;
        let zone = MEMORY_ZONE.parse_or(self.loc, &self.field("zone"), self.raw.zone.as_ref(), Zone::Movable)?;
        let backend = self.backend()?.unwrap_or(Backend::Ram);
        Ok(Step::HotAddMemory { region: self.region()?, size: size.get_ref().0, zone, backend })
    }

    /// The backend of a DAX hot-add: what the device and altmap allow.
    fn dax_backend(&self, device: DaxDevice, altmap: bool) -> Result<Backend, ScenarioError> {
        match (device, self.backend()?, altmap) {
            (DaxDevice::Pmem, Some(_), _) => Err(self.invalid(
                self.span_or_action(&self.raw.backend),
                "backend",
                "persistent memory set aside at boot is boot RAM: it has no backend of its own",
            )),
            // Boot RAM: the host reads an altmap there as it reads the rest
            // (only kernels take it: see `Scenario::kernel_only_because`).
            (DaxDevice::Pmem, None, true) => Ok(Backend::Ram),
            (_, Some(Backend::Ram), true) => Err(self.invalid(
                self.span_or_action(&self.raw.backend),
                "backend",
                "an altmap keeps struct pages on the device, which the host reads through a file: use backend = \"file\"",
            )),
            // The host reads the struct pages an altmap keeps on the device.
            (_, None, true) => Ok(Backend::File),
            (_, chosen, _) => Ok(chosen.unwrap_or(Backend::Ram)),
        }
    }

    fn hot_add_dax(&self) -> Result<Step, ScenarioError> {
        let size = self.size("the hotplugged memory's `size`")?;
        let device = DEVICES.parse_or(self.loc, &self.field("device"), self.raw.device.as_ref(), DaxDevice::Dimm)?;
        let altmap = self.raw.altmap.as_ref().is_some_and(|a| *a.get_ref());
        let backend = self.dax_backend(device, altmap)?;
        let (compound_size, compound_span) =
            self.raw.compound.as_ref().map_or((DEFAULT_COMPOUND, size.span()), |c| (c.get_ref().0, c.span()));
        if !is_folio_size(compound_size) {
            return Err(self.invalid(
                compound_span,
                "compound",
                format!("{} is not a compound page size: a power of two from 128K to 1G", Size(compound_size)),
            ));
        }
        let bytes = size.get_ref().0;
        if bytes == 0 || !bytes.is_multiple_of(compound_size) {
            return Err(self.invalid(
                size.span(),
                "size",
                format!("{} is not a whole number of {} compound pages", size.get_ref(), Size(compound_size)),
            ));
        }
        let zone = ZONES.parse_or(self.loc, &self.field("zone"), self.raw.zone.as_ref(), Zone::Device)?;
        let layout = DAX_LAYOUT.parse_or(self.loc, &self.field("layout"), self.raw.layout.as_ref(), Layout::Unified)?;
        let address = match (&self.raw.address, device) {
            (None, _) => None,
            (Some(a), DaxDevice::Pmem) => {
                return Err(self.invalid(a.span(), "address", "persistent memory set aside at boot has its place"))
            }
            (Some(a), _) if !a.get_ref().0.is_multiple_of(compound_size.max(1 << 30)) => {
                return Err(self.invalid(
                    a.span(),
                    "address",
                    format!("{} is not a multiple of 1G and of the compound page size", a.get_ref()),
                ))
            }
            (Some(a), _) => Some(a.get_ref().0),
        };
        Ok(Step::HotAdd {
            region: self.region()?,
            size: bytes,
            compound_size,
            zone,
            layout,
            device,
            altmap,
            backend,
            address,
        })
    }

    fn fail_allocation(&self) -> Result<Step, ScenarioError> {
        let nth = self.raw.nth.as_ref().ok_or_else(|| self.missing("nth", "`nth`: which allocation from now fails"))?;
        if *nth.get_ref() == 0 || *nth.get_ref() > u64::from(u32::MAX) {
            return Err(self.invalid(nth.span(), "nth", "must be from 1 (the next allocation) up"));
        }
        Ok(Step::FailAllocation { nth: *nth.get_ref() })
    }

    /// The step and the parameters its action takes.
    fn step(&self, action: Action) -> Result<(Step, &'static [&'static str]), ScenarioError> {
        const CAN_FAIL: [&str; 3] = ["expect-failure", "sweep-failures", "expect-refusal"];
        Ok(match action {
            Action::Ping => (Step::Ping, &[]),
            Action::VerifyManifest => (Step::VerifyManifest, &[]),
            Action::Verify => (Step::Verify, &[]),
            Action::Exit => (Step::Exit { status: self.raw.status.as_ref().map_or(0, |s| *s.get_ref()) }, &["status"]),
            Action::HugetlbAlloc => (
                self.hugetlb_alloc()?,
                &["region", "size", "count", "zone", "from", CAN_FAIL[0], CAN_FAIL[1], CAN_FAIL[2]],
            ),
            Action::Optimize => (self.optimize()?, &["region", "layout", CAN_FAIL[0], CAN_FAIL[1], CAN_FAIL[2]]),
            Action::Restore => {
                (Step::Restore { region: self.region()? }, &["region", CAN_FAIL[0], CAN_FAIL[1], CAN_FAIL[2]])
            }
            Action::HotAdd => {
                match KINDS.parse_or(self.loc, &self.field("kind"), self.raw.kind.as_ref(), HotAddKind::Dax)? {
                    HotAddKind::Memory => (
                        self.hot_add_memory()?,
                        &["region", "size", "zone", "kind", "backend", CAN_FAIL[0], CAN_FAIL[1], CAN_FAIL[2]],
                    ),
                    HotAddKind::Dax => (
                        self.hot_add_dax()?,
                        &[
                            "region",
                            "size",
                            "compound",
                            "zone",
                            "layout",
                            "kind",
                            "device",
                            "altmap",
                            "backend",
                            "address",
                            CAN_FAIL[0],
                            CAN_FAIL[1],
                            CAN_FAIL[2],
                        ],
                    ),
                }
            }
            Action::HotRemove => (Step::HotRemove { region: self.region()? }, &["region"]),
            Action::FailAllocation => (self.fail_allocation()?, &["nth"]),
            Action::HugetlbFree => (Step::HugetlbFree { region: self.region()? }, &["region"]),
        })
    }
}

impl RawStep {
    /// The step, the refusal the guest must answer it with (if any), and
    /// whether to sweep failures.
    fn into_step(self, loc: &Locator, index: usize) -> Result<(Step, Option<Refusal>, bool), ScenarioError> {
        let reader = StepReader { raw: &self, loc, index };
        let action = ACTIONS.parse(loc, &reader.field("action"), &self.action)?;
        let (step, takes) = reader.step(action)?;
        if let Some((name, span)) = reader.given().into_iter().find(|(n, _)| !takes.contains(n)) {
            return Err(reader.invalid(span, name, format!("`{name}` is not a parameter of `{action}`")));
        }
        let expect_failure = self.expect_failure.as_ref().is_some_and(|e| *e.get_ref());
        let named = self
            .expect_refusal
            .as_ref()
            .map(|r| REFUSALS.parse(loc, &reader.field("expect-refusal"), r))
            .transpose()?;
        let expect_refusal = match (expect_failure, named) {
            (true, Some(_)) => {
                return Err(reader.invalid(
                    reader.span_or_action(&self.expect_refusal),
                    "expect-refusal",
                    "`expect-failure` already expects the injected allocation failure: name one refusal",
                ))
            }
            (true, None) => Some(Refusal::InjectedFailure),
            (false, named) => named,
        };
        let sweep = self.sweep_failures.as_ref().is_some_and(|e| *e.get_ref());
        if sweep && expect_refusal.is_some() {
            let field = if expect_failure { "expect-failure" } else { "expect-refusal" };
            return Err(reader.invalid(
                reader.span_or_action(&self.sweep_failures),
                "sweep-failures",
                format!("a swept step fails and then succeeds: drop `{field}`"),
            ));
        }
        Ok((step, expect_refusal, sweep))
    }
}

/// The region a step allocates, if it allocates one.
fn allocates(step: &Step) -> Option<&str> {
    match step {
        Step::HugetlbAlloc { region, .. } | Step::HotAdd { region, .. } | Step::HotAddMemory { region, .. } => {
            Some(region)
        }
        _ => None,
    }
}

/// The region a step uses, if it uses one someone allocated.
fn uses(step: &Step) -> Option<&str> {
    match step {
        Step::Optimize { region, .. }
        | Step::Restore { region }
        | Step::HugetlbFree { region }
        | Step::HotRemove { region } => Some(region),
        _ => None,
    }
}

/// Reads every step in order: nothing after `exit`, a region allocated once
/// before any step uses it, HugeTLB `from` only hot-added memory.
pub(super) fn place_steps(
    loc: &Locator,
    raw: Vec<Spanned<RawStep>>,
    boot_gigantic: &[BootGigantic],
) -> Result<Vec<PlacedStep>, ScenarioError> {
    let mut steps: Vec<PlacedStep> = Vec::with_capacity(raw.len());
    for (i, spanned) in raw.into_iter().enumerate() {
        let index = i + 1;
        let span = spanned.span();
        if steps.last().is_some_and(|s| matches!(s.step, Step::Exit { .. })) {
            return Err(loc.error(
                span,
                Some(&format!("step[{index}]")),
                "no step can follow `exit`: the guest is gone",
            ));
        }
        let line = loc.line_col(span.start).0;
        let (step, expect_refusal, sweep_failures) = spanned.into_inner().into_step(loc, index)?;
        let allocated = |name: &str| {
            boot_gigantic.iter().any(|g| g.region == name) || steps.iter().any(|s| allocates(&s.step) == Some(name))
        };
        let region_error = |message: String| loc.error(span.clone(), Some(&format!("step[{index}].region")), message);
        if let Some(region) = uses(&step).filter(|r| !allocated(r)) {
            return Err(region_error(format!("no earlier step allocates region `{region}`")));
        }
        if let Some(region) = allocates(&step).filter(|r| allocated(r)) {
            return Err(region_error(format!("region `{region}` is allocated twice")));
        }
        if let Step::HugetlbAlloc { from: Some(from), .. } = &step {
            if !steps.iter().any(|s| matches!(&s.step, Step::HotAddMemory { region, .. } if region == from)) {
                return Err(loc.error(
                    span,
                    Some(&format!("step[{index}].from")),
                    format!("no earlier hot-add of kind \"memory\" names `{from}`"),
                ));
            }
        }
        steps.push(PlacedStep { step, expect_refusal, sweep_failures, line });
    }
    Ok(steps)
}
