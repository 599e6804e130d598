//! The host's hot paths without QEMU: walking a vmemmap's page tables, and
//! the verifier's static checks, over hand-built x86_64 tables.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hvo_harness::addr::VirtAddr;
use hvo_harness::pgtable;
use hvo_harness::synth::SynthVmemmap;
use hvo_harness::verify;
use hvo_images::Arch;

/// 4096 2 MiB compound pages and 4 of 1 GiB: 49,160 vmemmap PTEs.
fn vmemmap() -> (SynthVmemmap, u64) {
    let mut s = SynthVmemmap::new();
    s.add_unified_dax(0x10_0000, 4096, 9);
    s.add_unified_dax(0x40_0000, 4, 18);
    (s, 8 + 4096 * 8 + 4 * 4096)
}

fn benches(c: &mut Criterion) {
    let (s, ptes) = vmemmap();
    let manifest = s.manifest();
    let mut group = c.benchmark_group("vmemmap");
    group.throughput(Throughput::Elements(ptes));
    group.bench_function("walk x86_64 leaves", |b| {
        let walker = pgtable::walker_for(Arch::X86_64, &s.mem, &manifest, VirtAddr(manifest.vmemmap_base)).unwrap();
        let (start, end) = (VirtAddr(manifest.vmemmap_base), VirtAddr(SynthVmemmap::va(0x80_0000)));
        b.iter(|| {
            let mut leaves = 0u64;
            walker.for_each_leaf(&s.mem, start, end, &mut |_| leaves += 1).unwrap();
            leaves
        })
    });
    group.bench_function("verify static invariants", |b| {
        b.iter(|| {
            let (checks, _) = verify::check(Arch::X86_64, &manifest, &s.mem, &verify::Requested::new()).unwrap();
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
