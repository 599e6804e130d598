//! The host's hot paths without QEMU: walking a vmemmap's page tables, and
//! the verifier's static checks, over hand-built x86_64 tables.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hvo_abi::model::{Layout, RegionKind, Zone};
use hvo_harness::addr::{Pfn, VirtAddr};
use hvo_harness::pgtable;
use hvo_harness::synth::{RegionSpec, SynthVmemmap};
use hvo_harness::verify;
use hvo_images::Arch;

/// 4096 2 MiB compound pages and 4 of 1 GiB: 49,160 vmemmap PTEs.
fn vmemmap() -> (SynthVmemmap, u64) {
    let mut s = SynthVmemmap::new(Arch::X86_64);
    let unified_dax = |order, count| RegionSpec {
        kind: RegionKind::Dax,
        zone: Zone::Device,
        order,
        count,
        layout: Layout::Unified,
        altmap: false,
    };
    s.add_region(unified_dax(9, 4096));
    s.add_region(unified_dax(18, 4));
    (s, 8 + 4096 * 8 + 4 * 4096)
}

fn benches(c: &mut Criterion) {
    let (s, ptes) = vmemmap();
    let manifest = s.manifest();
    let mut group = c.benchmark_group("vmemmap");
    group.throughput(Throughput::Elements(ptes));
    group.bench_function("walk x86_64 leaves", |b| {
        let walker = pgtable::walker_for(Arch::X86_64, &s.mem, &manifest, VirtAddr(manifest.vmemmap_base)).unwrap();
        // Past the last region: the next region would start there.
        let last = manifest.regions.iter().map(|r| r.start_pfn + r.nr_pages).max().unwrap_or(0);
        let (start, end) = (VirtAddr(manifest.vmemmap_base), VirtAddr(s.va(Pfn(last))));
        b.iter(|| {
            let mut leaves = 0u64;
            walker.for_each_leaf(&s.mem, start, end, &mut |_| leaves += 1).unwrap();
            leaves
        })
    });
    group.bench_function("verify static invariants", |b| {
        b.iter(|| {
            let (checks, _) = verify::check(Arch::X86_64, &manifest, &s.mem, &verify::Requested::new(), &[]).unwrap();
            assert!(checks.iter().all(|c| c.status == hvo_harness::report::CheckStatus::Pass));
        })
    });
    group.finish();
}

criterion_group! {
    name = verifier;
    config = Criterion::default().sample_size(10);
    targets = benches
}
criterion_main!(verifier);
