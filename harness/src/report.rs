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

/// Where a run's time went, in milliseconds.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Phases {
    /// Spawning QEMU until its console and QMP are connected.
    pub qemu_start_ms: u64,
    /// From there to the guest's `ready`, boot-time set-up included.
    pub boot_ms: u64,
    /// The steps, less the time spent verifying.
    pub steps_ms: u64,
    /// The host's verification in `verify` steps.
    pub verify_ms: u64,
    /// Asking the guest to exit and QEMU ending.
    pub shutdown_ms: u64,
}

/// A run's measurements, each taken at most once (a sweep's count adds up).
/// Written into [`ScenarioResult::metrics`] under the keys the JSON output
/// has always had; one not taken is left out.
#[derive(Serialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    /// From the run's start until QEMU's console and QMP were connected.
    pub qemu_start_ms: Option<u64>,
    /// From the run's start until the guest said `ready`.
    pub ready_ms: Option<u64>,
    /// Struct pages the guest initialized at boot.
    pub struct_pages_initialized: Option<u64>,
    /// The boot vmemmap's population and memmap init, request to reply.
    pub boot_memmap_ms: Option<u64>,
    /// From the run's start until boot-time set-up was done.
    pub boot_ms: Option<u64>,
    /// All the steps, verification included.
    pub steps_ms: Option<u64>,
    /// The last `verify`'s page-table checks.
    pub verify_static_ms: Option<u64>,
    pub vmemmap_ptes: Option<u64>,
    /// The last `verify`'s measure of each region's vmemmap.
    pub regions: Option<Vec<crate::verify::RegionCost>>,
    /// The last `verify`, live checks included.
    pub verify_ms: Option<u64>,
    /// Allocation failures injected by sweeps, over all of them.
    pub allocation_failures_swept: Option<u64>,
    pub shutdown_ms: Option<u64>,
}

impl Metrics {
    /// The phases, given the time spent in all `verify` steps.
    pub fn phases(&self, verify_total_ms: u64) -> Phases {
        let qemu_start_ms = self.qemu_start_ms.unwrap_or(0);
        Phases {
            qemu_start_ms,
            boot_ms: self.boot_ms.unwrap_or(0).saturating_sub(qemu_start_ms),
            steps_ms: self.steps_ms.unwrap_or(0).saturating_sub(verify_total_ms),
            verify_ms: verify_total_ms,
            shutdown_ms: self.shutdown_ms.unwrap_or(0),
        }
    }

    /// The measurements as the JSON object results carry, leaving out
    /// those not taken.
    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(mut map)) => {
                map.retain(|_, v| !v.is_null());
                map
            }
            // A struct of numbers and plain records always serializes to an object.
            _ => serde_json::Map::new(),
        }
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
    pub phases: Phases,
    pub checks: Vec<Check>,
    /// Measurements ([`Metrics`], by their JSON keys).
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
    /// The real kernel the run booted (none for the firmware).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelSummary>,
    /// Every command the guest refused, in order, with its reason.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refusals: Vec<RefusalRecord>,
}

/// One command the guest refused: where, why, and whether the scenario
/// expected that refusal.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct RefusalRecord {
    /// The scenario step's line (0: boot-time set-up).
    pub line: usize,
    /// The command's verb.
    pub command: String,
    /// The refusal's stable name (`injected-failure`, `already-optimized`,
    /// ...), or `unknown` when the guest gave none.
    pub reason: String,
    /// What the guest said after the reason.
    pub detail: String,
    /// The step expected exactly this refusal (`expect-failure`,
    /// `expect-refusal`, or an allocation failure a sweep injected).
    pub expected: bool,
}

/// A real kernel as a run found it.
#[derive(Serialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelSummary {
    /// How it was named: a spec such as `debian-6.12`, or the image's path.
    pub spec: String,
    /// `uname -r`, once the agent said it.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub release: String,
    /// The HugeTLB vmemmap optimization it implements, and why it was judged so.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub generation: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub generation_reason: String,
    /// The compound pages the last `verify` found, by size and layout.
    pub regions: Vec<FoundLayout>,
}

/// Compound pages of one size and layout a kernel's vmemmap showed.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct FoundLayout {
    /// `hugetlb` or `dax`.
    pub kind: String,
    pub compound_bytes: u64,
    pub count: u64,
    pub layout: String,
    /// Writable vmemmap only one compound page maps, per compound page.
    pub private_vmemmap_bytes: u64,
    /// Read-only or cross-compound-page frames (the shared tail pages).
    pub shared_tail_pages: u64,
}

impl KernelSummary {
    /// One line for the terminal: `debian-6.12 6.12.117+deb12-amd64: legacy (64 x 2M legacy-hugetlb)`.
    pub fn describe(&self) -> String {
        let regions: Vec<String> = self
            .regions
            .iter()
            .map(|r| format!("{} x {} {} {}", r.count, crate::scenario::Size(r.compound_bytes), r.kind, r.layout))
            .collect();
        let mut line = format!("{} {}", self.spec, self.release);
        if !self.generation.is_empty() {
            line.push_str(&format!(": {}", self.generation));
        }
        if !regions.is_empty() {
            line.push_str(&format!(" ({})", regions.join(", ")));
        }
        line
    }
}

impl ScenarioResult {
    /// A run not yet judged (an error until it is).
    pub fn started(scenario: &str, file: PathBuf, arch: &str) -> ScenarioResult {
        ScenarioResult { status: Status::Error, message: None, ..ScenarioResult::skipped(scenario, file, arch, "") }
    }

    pub fn skipped(scenario: &str, file: PathBuf, arch: &str, why: &str) -> ScenarioResult {
        ScenarioResult {
            scenario: scenario.into(),
            file,
            arch: arch.into(),
            status: Status::Skip,
            duration_ms: 0,
            phases: Phases::default(),
            checks: Vec::new(),
            metrics: Default::default(),
            message: Some(why.into()),
            artifacts: None,
            console_tail: Vec::new(),
            qemu_command: String::new(),
            qemu_version: String::new(),
            kernel: None,
            refusals: Vec::new(),
        }
    }
}

/// Counts of a run, for the closing line.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

/// A scenario whose repeated runs on one architecture did not all end alike.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct Flaky {
    pub scenario: String,
    pub arch: String,
    /// How the runs ended, like `pass 19, fail 1`.
    pub outcomes: String,
}

/// The scenarios (per architecture) whose runs ended in more than one way.
pub fn flaky(results: &[ScenarioResult]) -> Vec<Flaky> {
    let mut runs: std::collections::BTreeMap<(&str, &str), Vec<Status>> = Default::default();
    for r in results.iter().filter(|r| r.status != Status::Skip) {
        runs.entry((&r.scenario, &r.arch)).or_default().push(r.status);
    }
    runs.into_iter()
        .filter(|(_, statuses)| statuses.iter().any(|s| *s != statuses[0]))
        .map(|((scenario, arch), statuses)| {
            let mut counts: Vec<(Status, usize)> = Vec::new();
            for s in statuses {
                match counts.iter_mut().find(|(c, _)| *c == s) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((s, 1)),
                }
            }
            let outcomes =
                counts.iter().map(|(s, n)| format!("{} {n}", s.label().to_lowercase())).collect::<Vec<_>>().join(", ");
            Flaky { scenario: scenario.into(), arch: arch.into(), outcomes }
        })
        .collect()
}

/// What a failed run says in one text: its message, then the console tail.
fn failure_text(r: &ScenarioResult) -> String {
    let mut text = r.message.clone().unwrap_or_default();
    if let Some(a) = &r.artifacts {
        text.push_str(&format!("\nartifacts: {}", a.display()));
    }
    if !r.console_tail.is_empty() {
        text.push_str("\nconsole tail:\n");
        text.push_str(&r.console_tail.join("\n"));
    }
    text
}

/// JUnit XML: one testsuite per architecture, one testcase per scenario run.
/// A failure's message names the failing invariant; its text carries the
/// console tail.
pub fn junit(results: &[ScenarioResult]) -> Result<String, quick_junit::SerializeError> {
    use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};
    let mut report = Report::new("hvo-harness");
    let mut arches: Vec<&str> = results.iter().map(|r| r.arch.as_str()).collect();
    arches.sort_unstable();
    arches.dedup();
    for arch in arches {
        let mut suite = TestSuite::new(arch);
        for r in results.iter().filter(|r| r.arch == arch) {
            let mut status = match r.status {
                Status::Pass => TestCaseStatus::success(),
                Status::Skip => TestCaseStatus::skipped(),
                s if s.is_verdict_failure() => TestCaseStatus::non_success(NonSuccessKind::Failure),
                _ => TestCaseStatus::non_success(NonSuccessKind::Error),
            };
            if !matches!(r.status, Status::Pass) {
                let failed: Vec<&str> =
                    r.checks.iter().filter(|c| c.status == CheckStatus::Fail).map(|c| c.name.as_str()).collect();
                let headline = match (r.status, failed.is_empty()) {
                    (Status::Skip, _) => r.message.clone().unwrap_or_default(),
                    (_, false) => format!("{}: {}", r.status.label(), failed.join(", ")),
                    (_, true) => r.status.label().to_string(),
                };
                status.set_message(headline);
                if r.status != Status::Skip {
                    status.set_type(r.status.label());
                    status.set_description(failure_text(r));
                }
            }
            let mut case = TestCase::new(r.scenario.as_str(), status);
            case.set_classname(format!("{arch}.{}", r.file.display()));
            case.set_time(std::time::Duration::from_millis(r.duration_ms));
            suite.add_test_case(case);
        }
        report.add_test_suite(suite);
    }
    report.to_string()
}

/// TAP version 13: a test point per scenario run, failures with a YAML block.
pub fn tap(results: &[ScenarioResult]) -> String {
    let mut out = format!("TAP version 13\n1..{}\n", results.len());
    for (i, r) in results.iter().enumerate() {
        let n = i + 1;
        let name = format!("{} on {}", r.scenario, r.arch);
        match r.status {
            Status::Pass => out.push_str(&format!("ok {n} - {name}\n")),
            Status::Skip => out.push_str(&format!(
                "ok {n} - {name} # SKIP {}\n",
                r.message.as_deref().unwrap_or("").replace('\n', " ")
            )),
            status => {
                out.push_str(&format!("not ok {n} - {name}\n  ---\n  status: {}\n", status.label().to_lowercase()));
                let quoted = |s: &str| serde_json::to_string(s).unwrap_or_default();
                out.push_str(&format!("  message: {}\n", quoted(r.message.as_deref().unwrap_or(""))));
                if let Some(a) = &r.artifacts {
                    out.push_str(&format!("  artifacts: {}\n", quoted(&a.display().to_string())));
                }
                out.push_str("  ...\n");
            }
        }
    }
    out
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

    fn result(scenario: &str, arch: &str, status: Status) -> ScenarioResult {
        let mut r = ScenarioResult::skipped(scenario, format!("scenarios/{scenario}.toml").into(), arch, "");
        r.status = status;
        r.message = None;
        r
    }

    #[test]
    fn runs_that_end_differently_are_flaky() {
        let results = vec![
            result("a", "x86_64", Status::Pass),
            result("a", "x86_64", Status::Timeout),
            result("a", "x86_64", Status::Pass),
            result("a", "aarch64", Status::Fail),
            result("a", "aarch64", Status::Fail),
            result("b", "x86_64", Status::Pass),
        ];
        let f = flaky(&results);
        assert_eq!(
            f,
            vec![Flaky { scenario: "a".into(), arch: "x86_64".into(), outcomes: "pass 2, timeout 1".into() }]
        );
    }

    #[test]
    fn junit_has_a_suite_per_arch_and_names_the_invariant_and_console() {
        let mut failed = result("knob", "ppc64le", Status::Fail);
        failed.checks.push(Check::fail("tails-readonly", "writable"));
        failed.message = Some("tails-readonly: tail is writable".into());
        failed.console_tail = vec!["@hvo ready abi=4 arch=ppc64le".into()];
        let results =
            vec![result("boot", "x86_64", Status::Pass), failed, result("boot", "ppc64le", Status::QemuCrash)];
        let xml = junit(&results).unwrap();
        assert!(xml.contains(r#"<testsuite name="ppc64le" tests="2" skipped="0" errors="1" failures="1""#), "{xml}");
        assert!(xml.contains(r#"<testsuite name="x86_64" tests="1""#), "{xml}");
        assert!(xml.contains(r#"message="FAIL: tails-readonly""#), "{xml}");
        assert!(xml.contains("@hvo ready abi=4 arch=ppc64le"), "{xml}");
    }

    #[test]
    fn tap_numbers_every_run_and_explains_failures() {
        let mut failed = result("knob", "aarch64", Status::GuestCrash);
        failed.message = Some("guest crashed: \"boom\"".into());
        let mut skipped = result("nv", "ppc64le", Status::Skip);
        skipped.message = Some("not listed".into());
        let text = tap(&[result("boot", "x86_64", Status::Pass), failed, skipped]);
        assert_eq!(
            text,
            "TAP version 13\n1..3\nok 1 - boot on x86_64\nnot ok 2 - knob on aarch64\n  ---\n  status: crash\n  message: \"guest crashed: \\\"boom\\\"\"\n  ...\nok 3 - nv on ppc64le # SKIP not listed\n"
        );
    }

    #[test]
    fn json_has_the_documented_fields() {
        let mut r = ScenarioResult::skipped("boot", "scenarios/boot.toml".into(), "aarch64", "not listed");
        r.checks.push(Check::pass("manifest", "ok"));
        let v = serde_json::to_value(&r).unwrap();
        for field in ["scenario", "arch", "status", "duration_ms", "phases", "checks", "metrics"] {
            assert!(v.get(field).is_some(), "{field} missing from {v}");
        }
        assert_eq!(v["status"], "skip");
        assert_eq!(v["checks"][0]["status"], "pass");
    }

    #[test]
    fn metrics_keep_their_json_keys_and_make_the_phases() {
        let m = Metrics {
            qemu_start_ms: Some(100),
            boot_ms: Some(350),
            steps_ms: Some(900),
            shutdown_ms: Some(20),
            allocation_failures_swept: Some(7),
            ..Default::default()
        };
        let json = m.to_json();
        let mut keys: Vec<&str> = json.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["allocation_failures_swept", "boot_ms", "qemu_start_ms", "shutdown_ms", "steps_ms"]);
        assert_eq!(
            m.phases(400),
            Phases { qemu_start_ms: 100, boot_ms: 250, steps_ms: 500, verify_ms: 400, shutdown_ms: 20 }
        );
    }
}
