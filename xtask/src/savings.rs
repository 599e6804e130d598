//! `cargo xtask savings`: private vmemmap per compound page under every layout,
//! measured from the guests' page tables (scenarios/savings.toml).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use hvo_harness::report::Status;
use hvo_harness::runner::{run_scenario, RunConfig};
use hvo_harness::scenario::Scenario;
use hvo_harness::verify::size_name;
use hvo_images::{workspace_root, Arch};
use serde_json::{json, Value};

#[derive(Args)]
pub struct SavingsArgs {
    /// Architectures to measure (default: all four).
    #[arg(long, value_delimiter = ',', value_parser = crate::run::parse_arch)]
    pub arch: Option<Vec<Arch>>,
    /// Write the rows as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn savings(args: SavingsArgs) -> Result<ExitCode> {
    let root = workspace_root();
    let file = root.join("scenarios/savings.toml");
    let scenario = Scenario::load(&file).map_err(|e| anyhow::anyhow!("{e}"))?;
    let arches = args.arch.unwrap_or(Arch::ALL.to_vec());
    let images = crate::build_guests(&arches)?;
    let config = RunConfig {
        artifacts_root: root.join("target/scenario-logs"),
        keep_artifacts: false,
        inject: None,
        repro: None,
    };
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    let mut rows: Vec<Value> = Vec::new();
    for (arch, image) in arches.iter().zip(&images) {
        let result = runtime.block_on(run_scenario(&scenario, *arch, image, &config));
        if result.status != Status::Pass {
            bail!("measuring on {arch} failed: {}", result.message.unwrap_or_default());
        }
        let regions = result.metrics.get("regions").and_then(Value::as_array).cloned().unwrap_or_default();
        for r in regions {
            let field = |name: &str| r.get(name).cloned().unwrap_or(Value::Null);
            rows.push(json!({
                "arch": arch.name(),
                "kind": field("kind"),
                "order": field("order"),
                "compound_bytes": field("compound_bytes"),
                "page_size": field("page_size"),
                "layout": field("layout"),
                "compound_pages": field("compound_pages"),
                "private_vmemmap_bytes": field("private_vmemmap_bytes"),
                "shared_tail_pages": field("shared_tail_pages"),
                "unoptimized_vmemmap_bytes": field("unoptimized_vmemmap_bytes"),
            }));
        }
    }
    println!(
        "{:<12} {:<8} {:>6} {:<15} {:>8} {:>14} {:>12} {:>14}",
        "arch", "kind", "size", "layout", "compound", "private/page", "shared tails", "unoptimized"
    );
    for r in &rows {
        let bytes = |v: &Value| size_name(v.as_u64().unwrap_or(0));
        println!(
            "{:<12} {:<8} {:>6} {:<15} {:>8} {:>14} {:>12} {:>14}",
            r["arch"].as_str().unwrap_or(""),
            r["kind"].as_str().unwrap_or(""),
            bytes(&r["compound_bytes"]),
            r["layout"].as_str().unwrap_or(""),
            r["compound_pages"].as_u64().unwrap_or(0),
            bytes(&r["private_vmemmap_bytes"]),
            r["shared_tail_pages"].as_u64().unwrap_or(0),
            bytes(&r["unoptimized_vmemmap_bytes"]),
        );
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&rows).context("cannot encode the rows")?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
