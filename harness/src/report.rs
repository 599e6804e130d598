//! Results of scenario runs, as the terminal shows them and as JSON.

use std::path::PathBuf;

use serde::Serialize;

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Pass,
    /// The scenario's expectation was not met: an invariant, a wrong answer.
    Fail,
    /// The guest said nothing within a step's time, or the scenario ran
    /// past its deadline.
    Timeout,
    /// The guest panicked or took an unexpected exception.
    GuestCrash,
    /// QEMU died under the guest.
    QemuCrash,
    /// The harness could not run the scenario (QEMU missing, no files).
    Error,
    /// Not run on this architecture.
    Skip,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Timeout => "TIMEOUT",
            Status::GuestCrash => "CRASH",
            Status::QemuCrash => "QEMU-DIED",
            Status::Error => "ERROR",
            Status::Skip => "SKIP",
        }
    }

    /// A verdict on the code under test (exit status 1), as opposed to the
    /// harness or QEMU failing to give one (exit status 2).
    pub fn is_verdict_failure(self) -> bool {
        matches!(self, Status::Fail | Status::Timeout | Status::GuestCrash)
    }
}

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Pass,
    Fail,
}

/// One named check and what it found.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub status: CheckStatus,
    pub detail: String,
}

impl Check {
    pub fn pass(name: &str, detail: impl Into<String>) -> Check {
        Check { name: name.into(), status: CheckStatus::Pass, detail: detail.into() }
    }
    pub fn fail(name: &str, detail: impl Into<String>) -> Check {
        Check { name: name.into(), status: CheckStatus::Fail, detail: detail.into() }
    }
}

/// The outcome of one scenario on one architecture.
#[derive(Serialize, Clone, Debug)]
pub struct ScenarioResult {
    pub scenario: String,
    pub file: PathBuf,
    pub arch: String,
    pub status: Status,
    pub duration_ms: u64,
    pub checks: Vec<Check>,
    /// Measurements: phase durations now, vmemmap figures later.
    pub metrics: serde_json::Map<String, serde_json::Value>,
    /// Why the scenario did not pass, in one paragraph.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Where the console log, QEMU's stderr, its command line and the QMP
    /// transcript were written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<PathBuf>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub console_tail: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub qemu_command: String,
    /// QEMU's version as QMP reports it.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub qemu_version: String,
}

impl ScenarioResult {
    pub fn skipped(scenario: &str, file: PathBuf, arch: &str, why: &str) -> ScenarioResult {
        ScenarioResult {
            scenario: scenario.into(),
            file,
            arch: arch.into(),
            status: Status::Skip,
            duration_ms: 0,
            checks: Vec::new(),
            metrics: Default::default(),
            message: Some(why.into()),
            artifacts: None,
            console_tail: Vec::new(),
            qemu_command: String::new(),
            qemu_version: String::new(),
        }
    }
}

/// Counts of a run, for the closing line.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub passed: usize,
    pub failed: usize,
    pub errors: usize,
    pub skipped: usize,
}

impl Totals {
    pub fn of(results: &[ScenarioResult]) -> Totals {
        let mut t = Totals::default();
        for r in results {
            match r.status {
                Status::Pass => t.passed += 1,
                Status::Fail | Status::Timeout | Status::GuestCrash => t.failed += 1,
                Status::QemuCrash | Status::Error => t.errors += 1,
                Status::Skip => t.skipped += 1,
            }
        }
        t
    }

    /// `N passed, N failed` (errors count as failed), `, N skipped` when any.
    pub fn summary_line(&self) -> String {
        let mut line = format!("{} passed, {} failed", self.passed, self.failed + self.errors);
        if self.skipped > 0 {
            line.push_str(&format!(", {} skipped", self.skipped));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_line_is_what_ci_reads() {
        let mut r = ScenarioResult::skipped("a", "a.toml".into(), "x86_64", "");
        let mut results = vec![r.clone()];
        r.status = Status::Pass;
        results.push(r.clone());
        r.status = Status::Error;
        results.push(r);
        let t = Totals::of(&results);
        assert_eq!(t.summary_line(), "1 passed, 1 failed, 1 skipped");
        assert_eq!(Totals { passed: 3, ..Default::default() }.summary_line(), "3 passed, 0 failed");
    }

    #[test]
    fn json_has_the_documented_fields() {
        let mut r = ScenarioResult::skipped("boot", "scenarios/boot.toml".into(), "aarch64", "not listed");
        r.checks.push(Check::pass("manifest", "ok"));
        let v = serde_json::to_value(&r).unwrap();
        for field in ["scenario", "arch", "status", "duration_ms", "checks", "metrics"] {
            assert!(v.get(field).is_some(), "{field} missing from {v}");
        }
        assert_eq!(v["status"], "skip");
        assert_eq!(v["checks"][0]["status"], "pass");
    }
}
