//! The scenario file as written: serde types that mirror the TOML, every
//! value spanned so a refusal can name its line. Nothing here checks meaning.

use std::fmt;

use serde::Deserialize;
use toml::Spanned;

use super::Outcome;

/// A size in bytes, written as an integer or as a string with a unit:
/// `"512M"`, `"1G"`, `"2MiB"`, `"64K"`, `"1T"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl Size {
    pub fn parse(text: &str) -> Result<Size, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits.parse().map_err(|_| format!("`{text}` is not a size like \"512M\" or \"1G\""))?;
        let shift = match unit.trim() {
            "" | "B" => 0,
            "K" | "KiB" => 10,
            "M" | "MiB" => 20,
            "G" | "GiB" => 30,
            "T" | "TiB" => 40,
            other => return Err(format!("unknown size unit `{other}` (use K, M, G or T)")),
        };
        n.checked_mul(1 << shift).map(Size).ok_or_else(|| format!("`{text}` is too large"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];
        match units.iter().find(|(s, _)| self.0 >= 1 << s && self.0.is_multiple_of(1 << s)) {
            Some((s, u)) => write!(f, "{}{u}", self.0 >> s),
            None => write!(f, "{}", self.0),
        }
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected a size: bytes as an integer, or a string like \"512M\""))?
        {
            Raw::Bytes(n) => Ok(Size(n)),
            Raw::Text(t) => Size::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawScenario {
    pub name: Option<Spanned<String>>,
    pub description: Option<String>,
    pub architectures: Option<Spanned<Vec<Spanned<String>>>>,
    pub step_timeout_ms: Option<Spanned<u64>>,
    pub boot_timeout_ms: Option<Spanned<u64>>,
    pub deadline_ms: Option<Spanned<u64>>,
    #[serde(default)]
    pub machine: RawMachine,
    pub bug_knobs: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub boot_gigantic: Vec<Spanned<RawBootGigantic>>,
    pub expect: Option<RawExpect>,
    #[serde(default)]
    pub step: Vec<Spanned<RawStep>>,
}

/// A step as written: the action and every parameter any action takes, each
/// spanned, so a misplaced or missing parameter is reported at its line.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawStep {
    pub action: Spanned<String>,
    pub status: Option<Spanned<u8>>,
    pub region: Option<Spanned<String>>,
    pub size: Option<Spanned<Size>>,
    pub count: Option<Spanned<u64>>,
    pub zone: Option<Spanned<String>>,
    pub layout: Option<Spanned<String>>,
    pub nth: Option<Spanned<u64>>,
    pub expect_failure: Option<Spanned<bool>>,
    pub expect_refusal: Option<Spanned<String>>,
    pub compound: Option<Spanned<Size>>,
    pub sweep_failures: Option<Spanned<bool>>,
    pub kind: Option<Spanned<String>>,
    pub from: Option<Spanned<String>>,
    pub device: Option<Spanned<String>>,
    pub altmap: Option<Spanned<bool>>,
    pub backend: Option<Spanned<String>>,
    pub address: Option<Spanned<Size>>,
}

/// Gigantic pages reserved at boot, before memmap init: populated already optimized.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawBootGigantic {
    pub region: Spanned<String>,
    pub size: Spanned<Size>,
    pub count: Option<Spanned<u64>>,
    pub zone: Option<Spanned<String>>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawMachine {
    pub boot_memory: Option<Spanned<Size>>,
    pub slots: Option<Spanned<u32>>,
    pub max_memory: Option<Spanned<Size>>,
    pub boot_pmem: Option<Spanned<Size>>,
    pub hugetlb_free_vmemmap: Option<Spanned<bool>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawExpect {
    pub outcome: Spanned<Outcome>,
    pub invariant: Option<Spanned<String>>,
    /// Invariants that fire too, as consequences of the same bug.
    pub also: Option<Vec<Spanned<String>>>,
    /// A Linux bug: the mainline release with its fix (`"7.1"`) and stable
    /// releases it was backported to (`"6.12.90"`).
    pub fixed_in: Option<Spanned<Vec<String>>>,
}
