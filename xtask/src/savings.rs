//! `cargo xtask savings`: private vmemmap per compound page under every layout,
//! measured from the guests' page tables (scenarios/savings.toml), and with
//! `--kernel` a real kernel's beside the firmware's model: its HugeTLB pages
//! and its device DAX, where its architecture makes DAX ([`KERNEL_SCENARIOS`]).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use hvo_abi::model::STRUCT_PAGE_SIZE;
use hvo_harness::report::{ScenarioResult, Status};
use hvo_harness::runner::{run_kernel_scenario, run_scenario, RunConfig};
use hvo_harness::scenario::Scenario;
use hvo_harness::verify::size_name;
use hvo_images::{profile, workspace_root, Arch};
use serde::Serialize;
use serde_json::Value;

#[derive(Args)]
pub struct SavingsArgs {
    /// Architectures to measure (default: all four).
    #[arg(long, value_delimiter = ',', value_parser = crate::run::parse_arch)]
    pub arch: Option<Vec<Arch>>,
    /// Write the rows as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also measure a real kernel's HugeTLB pages (a Debian spec or an
    /// image's path, as `run-scenarios --kernel` takes), beside the model's.
    #[arg(long, value_name = "SPEC|PATH")]
    pub kernel: Option<String>,
    /// The kernel's System.map, as `run-scenarios --system-map`.
    #[arg(long)]
    pub system_map: Option<PathBuf>,
}

/// One measured row: compound pages of one kind, size and layout.
#[derive(Serialize, Debug, PartialEq)]
struct Row {
    arch: &'static str,
    /// `firmware`, or the kernel's release.
    source: String,
    kind: String,
    compound_bytes: u64,
    page_size: u64,
    layout: String,
    compound_pages: u64,
    private_vmemmap_bytes: u64,
    shared_tail_pages: u64,
    unoptimized_vmemmap_bytes: u64,
    /// False where the figure is what an unoptimized compound page keeps by
    /// definition (a kernel's pages the pattern did not find optimized).
    measured: bool,
}

/// What the firmware's savings scenario measured, one row per region.
fn firmware_rows(arch: Arch, result: &ScenarioResult) -> Vec<Row> {
    let regions = result.metrics.get("regions").and_then(Value::as_array).cloned().unwrap_or_default();
    regions
        .iter()
        .map(|r| {
            let num = |name: &str| r.get(name).and_then(Value::as_u64).unwrap_or(0);
            let text = |name: &str| r.get(name).and_then(Value::as_str).unwrap_or("").to_string();
            Row {
                arch: arch.name(),
                source: "firmware".into(),
                kind: text("kind"),
                compound_bytes: num("compound_bytes"),
                page_size: num("page_size"),
                layout: text("layout"),
                compound_pages: num("compound_pages"),
                private_vmemmap_bytes: num("private_vmemmap_bytes"),
                shared_tail_pages: num("shared_tail_pages"),
                unoptimized_vmemmap_bytes: num("unoptimized_vmemmap_bytes"),
                measured: true,
            }
        })
        .collect()
}

/// What a kernel run showed: the compound pages found optimized, as
/// measured, and the rest of what the scenario reserved as not optimized.
fn kernel_rows(arch: Arch, scenario: &Scenario, result: &ScenarioResult) -> Vec<Row> {
    let page = profile(arch).page_size();
    let Some(kernel) = &result.kernel else { return Vec::new() };
    let row = |compound_bytes: u64, layout: &str| Row {
        arch: arch.name(),
        source: kernel.release.clone(),
        kind: "hugetlb".into(),
        compound_bytes,
        page_size: page,
        layout: layout.to_string(),
        compound_pages: 0,
        private_vmemmap_bytes: 0,
        shared_tail_pages: 0,
        unoptimized_vmemmap_bytes: compound_bytes / page * STRUCT_PAGE_SIZE,
        measured: true,
    };
    let mut rows: Vec<Row> = kernel
        .regions
        .iter()
        .map(|r| Row {
            kind: r.kind.clone(),
            compound_pages: r.count,
            private_vmemmap_bytes: r.private_vmemmap_bytes,
            shared_tail_pages: r.shared_tail_pages,
            ..row(r.compound_bytes, &r.layout)
        })
        .collect();
    for g in &scenario.boot_gigantic {
        let found: u64 =
            kernel.regions.iter().filter(|r| r.kind == "hugetlb" && r.compound_bytes == g.size).map(|r| r.count).sum();
        if found < g.count {
            let unoptimized = row(g.size, "none");
            rows.push(Row {
                compound_pages: g.count - found,
                private_vmemmap_bytes: unoptimized.unoptimized_vmemmap_bytes,
                measured: false,
                ..unoptimized
            });
        }
    }
    rows
}

/// What a real kernel is measured by: boot-time HugeTLB pages of both
/// sizes, and device DAX of 2 MiB and 1 GiB compound pages with struct
/// pages in RAM (skipped where the architecture's kernels make no such DAX).
const KERNEL_SCENARIOS: [&str; 3] =
    ["scenarios/linux/hugetlb-boot.toml", "scenarios/linux/dax-pmem-2m.toml", "scenarios/linux/dax-pmem-1g.toml"];

pub fn savings(args: SavingsArgs) -> Result<ExitCode> {
    let root = workspace_root();
    let scenario = Scenario::load(&root.join("scenarios/savings.toml")).map_err(|e| anyhow!("{e}"))?;
    let linux: Vec<Scenario> = KERNEL_SCENARIOS
        .iter()
        .map(|f| Scenario::load(&root.join(f)).map_err(|e| anyhow!("{e}")))
        .collect::<Result<_>>()?;
    let arches = args.arch.clone().unwrap_or(Arch::ALL.to_vec());
    let images = crate::build_guests(&arches)?;
    let config = RunConfig {
        artifacts_root: root.join("target/scenario-logs"),
        keep_artifacts: false,
        inject: None,
        repro: None,
    };
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    let mut rows: Vec<Row> = Vec::new();
    for (arch, image) in arches.iter().zip(&images) {
        let result = crate::unless_interrupted(&runtime, run_scenario(&scenario, *arch, image, &config))
            .ok_or_else(|| anyhow!("interrupted"))?;
        if result.status != Status::Pass {
            bail!("measuring on {arch} failed: {}", result.message.unwrap_or_default());
        }
        rows.extend(firmware_rows(*arch, &result));
        if let Some(kernel) = &args.kernel {
            let guest = crate::kernels::kernel_guest(kernel, args.system_map.as_deref(), *arch)?;
            for linux in &linux {
                let result = crate::unless_interrupted(&runtime, run_kernel_scenario(linux, *arch, &guest, &config))
                    .ok_or_else(|| anyhow!("interrupted"))?;
                match result.status {
                    Status::Pass => rows.extend(kernel_rows(*arch, linux, &result)),
                    Status::Skip => eprintln!("{arch}: no {}: {}", linux.name, result.message.unwrap_or_default()),
                    _ => bail!(
                        "measuring {kernel} on {arch} ({}) failed: {}",
                        linux.name,
                        result.message.unwrap_or_default()
                    ),
                }
            }
        }
    }
    print_rows(&rows);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&rows).context("cannot encode the rows")?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_rows(rows: &[Row]) {
    let source_width = rows.iter().map(|r| r.source.len()).max().unwrap_or(0).max(8);
    println!(
        "{:<12} {:<source_width$} {:<8} {:>6} {:<15} {:>8} {:>14} {:>12} {:>14}",
        "arch", "source", "kind", "size", "layout", "compound", "private/page", "shared tails", "unoptimized"
    );
    for r in rows {
        let private = match r.measured {
            true => size_name(r.private_vmemmap_bytes),
            false => format!("({})", size_name(r.private_vmemmap_bytes)),
        };
        println!(
            "{:<12} {:<source_width$} {:<8} {:>6} {:<15} {:>8} {:>14} {:>12} {:>14}",
            r.arch,
            r.source,
            r.kind,
            size_name(r.compound_bytes),
            r.layout,
            r.compound_pages,
            private,
            r.shared_tail_pages,
            size_name(r.unoptimized_vmemmap_bytes),
        );
    }
    if rows.iter().any(|r| !r.measured) {
        println!("(in parentheses: not found optimized, so all its struct pages are its own by definition)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvo_harness::report::{FoundLayout, KernelSummary};

    #[test]
    fn a_kernels_rows_are_what_it_optimized_and_the_rest_of_its_pool_unoptimized() {
        let root = workspace_root();
        let linux = Scenario::load(&root.join("scenarios/linux/hugetlb-boot.toml")).expect("the scenario loads");
        let mut result = ScenarioResult::started(&linux.name, linux.file.clone(), Arch::X86_64.name());
        let found = FoundLayout {
            kind: "hugetlb".into(),
            compound_bytes: 2 << 20,
            count: 64,
            layout: "legacy-hugetlb".into(),
            private_vmemmap_bytes: 4096,
            shared_tail_pages: 0,
        };
        result.kernel =
            Some(KernelSummary { release: "6.12.117+deb12-amd64".into(), regions: vec![found], ..Default::default() });
        let rows = kernel_rows(Arch::X86_64, &linux, &result);
        let summary: Vec<(u64, &str, u64, u64, bool)> = rows
            .iter()
            .map(|r| (r.compound_bytes, r.layout.as_str(), r.compound_pages, r.private_vmemmap_bytes, r.measured))
            .collect();
        assert_eq!(summary, [(2 << 20, "legacy-hugetlb", 64, 4096, true), (1 << 30, "none", 1, 16 << 20, false)]);
        assert!(rows.iter().all(|r| r.source == "6.12.117+deb12-amd64" && r.kind == "hugetlb"));
    }
}
