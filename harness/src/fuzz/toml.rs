//! Random scenarios written out as scenario files.

use std::fmt::Write as _;

use crate::scenario::{Backend, DaxDevice, Size, Step};

use super::{FuzzCase, FuzzStep, MAX_MEMORY, SLOTS};

fn step_toml(out: &mut String, s: &FuzzStep) {
    let _ = writeln!(out, "\n[[step]]");
    let mut kv = |k: &str, v: String| {
        let _ = writeln!(out, "{k} = {v}");
    };
    let q = |s: &str| format!("\"{s}\"");
    let size = |b: u64| q(&Size(b).to_string());
    match &s.step {
        Step::HugetlbAlloc { region, folio_size, count, zone, from } => {
            kv("action", q("hugetlb-alloc"));
            kv("region", q(region));
            kv("size", size(*folio_size));
            kv("count", count.to_string());
            kv("zone", q(zone.name()));
            if let Some(f) = from {
                kv("from", q(f));
            }
        }
        Step::Optimize { region, layout } => {
            kv("action", q("optimize"));
            kv("region", q(region));
            kv("layout", q(layout.name()));
        }
        Step::Restore { region } => {
            kv("action", q("restore"));
            kv("region", q(region));
        }
        Step::HugetlbFree { region } => {
            kv("action", q("hugetlb-free"));
            kv("region", q(region));
        }
        Step::HotAdd { region, size: bytes, compound_size, zone, layout, device, altmap, backend, address } => {
            kv("action", q("hot-add"));
            kv("region", q(region));
            kv("size", size(*bytes));
            kv("compound", size(*compound_size));
            kv("zone", q(zone.name()));
            kv("layout", q(layout.name()));
            match device {
                DaxDevice::Pmem => kv("device", q("pmem")),
                DaxDevice::Nvdimm => kv("device", q("nvdimm")),
                DaxDevice::Dimm => {}
            }
            if *altmap {
                kv("altmap", "true".into());
            } else if *backend == Backend::File && *device != DaxDevice::Pmem {
                kv("backend", q("file"));
            }
            if let Some(at) = address {
                kv("address", size(*at));
            }
        }
        Step::HotAddMemory { region, size: bytes, zone, .. } => {
            kv("action", q("hot-add"));
            kv("kind", q("memory"));
            kv("region", q(region));
            kv("size", size(*bytes));
            kv("zone", q(zone.name()));
        }
        Step::HotRemove { region } => {
            kv("action", q("hot-remove"));
            kv("region", q(region));
        }
        Step::Verify => kv("action", q("verify")),
        Step::Ping => kv("action", q("ping")),
        Step::VerifyManifest => kv("action", q("verify-manifest")),
        Step::FailAllocation { nth } => {
            kv("action", q("fail-allocation"));
            kv("nth", nth.to_string());
        }
        Step::Exit { status } => {
            kv("action", q("exit"));
            kv("status", status.to_string());
        }
    }
    if s.sweep_failures {
        kv("sweep-failures", "true".into());
    }
}

impl FuzzCase {
    /// The case as a scenario file expecting a pass; `header` becomes its
    /// leading comment.
    pub fn to_toml(&self, architectures: &[&str], header: &str) -> String {
        let mut out = String::new();
        for line in header.lines() {
            let _ = writeln!(out, "# {line}");
        }
        let _ = writeln!(out, "description = \"random scenario {} of seed {}\"", self.index, self.seed);
        let arches: Vec<String> = architectures.iter().map(|a| format!("\"{a}\"")).collect();
        let _ = writeln!(out, "architectures = [{}]", arches.join(", "));
        if !self.bug_knobs.is_empty() {
            let knobs: Vec<String> = self.bug_knobs.iter().map(|k| format!("\"{}\"", k.name())).collect();
            let _ = writeln!(out, "bug-knobs = [{}]", knobs.join(", "));
        }
        let _ = writeln!(out, "\n[machine]");
        let _ = writeln!(out, "boot-memory = \"{}\"", Size(self.boot_memory));
        let _ = writeln!(out, "slots = {SLOTS}");
        let _ = writeln!(out, "max-memory = \"{}\"", Size(MAX_MEMORY));
        if self.boot_pmem > 0 {
            let _ = writeln!(out, "boot-pmem = \"{}\"", Size(self.boot_pmem));
        }
        for s in &self.steps {
            step_toml(&mut out, s);
        }
        out
    }
}
