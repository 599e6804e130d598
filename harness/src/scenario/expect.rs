//! What a scenario expects (`[expect]`) and the bug knobs it turns on.

use hvo_abi::model::Knob;
use toml::Spanned;

use super::locate::Locator;
use super::names::{CheckNames, Choice};
use super::raw::RawExpect;
use super::{Expect, LinuxFix, LinuxRelease, Outcome, ScenarioError};

pub(super) const KNOBS: Choice<Knob> = Choice::all("bug knob");

pub(super) fn bug_knobs(loc: &Locator, raw: Option<&Vec<Spanned<String>>>) -> Result<Vec<Knob>, ScenarioError> {
    raw.into_iter().flatten().map(|k| KNOBS.parse(loc, "bug-knobs", k)).collect()
}

/// A check name a scenario expects to fail.
fn check(loc: &Locator, name: &Spanned<String>, field: &str) -> Result<String, ScenarioError> {
    if CheckNames::accepts(name.get_ref()) {
        Ok(name.get_ref().clone())
    } else {
        Err(loc.error(
            name.span(),
            Some(field),
            format!("unknown invariant `{}` (known: {})", name.get_ref(), CheckNames::known()),
        ))
    }
}

/// A pass by default; a failure names the check that must fire.
pub(super) fn expect(loc: &Locator, raw: Option<&RawExpect>) -> Result<Expect, ScenarioError> {
    let Some(e) = raw else { return Ok(Expect::Pass) };
    match (e.outcome.get_ref(), &e.invariant, &e.also) {
        (Outcome::Pass, None, None) => Ok(Expect::Pass),
        (Outcome::Pass, Some(i), _) => {
            Err(loc.error(i.span(), Some("expect.invariant"), "only a scenario expecting `fail` names an invariant"))
        }
        (Outcome::Pass, None, Some(_)) => {
            Err(loc.error(e.outcome.span(), Some("expect.also"), "only a scenario expecting `fail` names invariants"))
        }
        (Outcome::Fail, None, _) => Err(loc.error(
            e.outcome.span(),
            Some("expect.invariant"),
            "a scenario expecting `fail` must name the invariant that must fire",
        )),
        (Outcome::Fail, Some(i), also) => Ok(Expect::Fail {
            invariant: check(loc, i, "expect.invariant")?,
            also: also.iter().flatten().map(|a| check(loc, a, "expect.also")).collect::<Result<_, _>>()?,
        }),
    }
}

/// `expect.fixed-in`: the releases that fixed the Linux bug a failing
/// scenario reproduces.
pub(super) fn fixed_in(loc: &Locator, raw: Option<&RawExpect>) -> Result<Option<LinuxFix>, ScenarioError> {
    let Some(e) = raw else { return Ok(None) };
    let Some(written) = &e.fixed_in else { return Ok(None) };
    let refuse = |message: String| Err(loc.error(written.span(), Some("expect.fixed-in"), message));
    if *e.outcome.get_ref() != Outcome::Fail {
        return refuse("only a scenario expecting `fail` (a Linux bug) names the releases that fixed it".into());
    }
    let mut releases = Vec::new();
    for text in written.get_ref() {
        match LinuxRelease::parse(text) {
            Some(r) => releases.push(r),
            None => {
                return refuse(format!(
                    "`{text}` is no Linux release: write major.minor (mainline) or major.minor.patch (stable)"
                ))
            }
        }
    }
    LinuxFix::new(releases).map(Some).or_else(refuse)
}
