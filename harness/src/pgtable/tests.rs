//! Walkers on hand-built tables: what each manual says, entry by entry.

use super::*;
use crate::memory::SparseMemory;

fn put(mem: &mut SparseMemory, table: u64, index: u64, raw: u64, big_endian: bool) {
    let at = PhysAddr(table + index * 8);
    if big_endian {
        mem.write_u64_be(at, raw)
    } else {
        mem.write_u64_le(at, raw)
    }
}

fn idx(va: u64, shift: u32, bits: u32) -> u64 {
    (va >> shift) & ((1 << bits) - 1)
}

const RW: Perms = Perms { write: true, exec: false };
const RO: Perms = Perms { write: false, exec: false };

#[test]
fn x86_64_walks_4k_2m_and_1g_leaves_and_ands_permissions() {
    let mut mem = SparseMemory::new();
    let (pml4, pdpt, pd, pt) = (0x1000, 0x2000, 0x3000, 0x4000);
    for t in [pml4, pdpt, pd, pt, 0x7000] {
        mem.write(PhysAddr(t), &[0; 4096]);
    }
    let vmemmap = 0xffff_ea00_0000_0000u64;
    let table = |pa: u64| pa | 0x3; // present, writable
    put(&mut mem, pml4, idx(vmemmap, 39, 9), table(pdpt), false);
    put(&mut mem, pdpt, idx(vmemmap, 30, 9), table(pd), false);
    put(&mut mem, pd, 0, table(pt), false);
    // A 4 KiB read-only, non-executable page with accessed/dirty preset.
    put(&mut mem, pt, 0, 0x5000 | 0x1 | 0x60 | 1 << 63, false);
    // A writable one next to it.
    put(&mut mem, pt, 1, 0x6000 | 0x3 | 1 << 63, false);
    // A 2 MiB leaf with PAT (bit 12) set, which is no address bit.
    put(&mut mem, pd, 1, 0x20_0000 | 0x83 | 1 << 12, false);
    // A 1 GiB leaf, executable, under a read-only PDPT entry: not writable.
    let linear = 0xffff_8880_0000_0000u64;
    let pdpt2 = 0x7000;
    put(&mut mem, pml4, idx(linear, 39, 9), pdpt2 | 0x1, false);
    put(&mut mem, pdpt2, idx(linear, 30, 9), 0x4000_0000 | 0x83, false);

    let w = Walker::new(&X86_64::FOUR_LEVEL, PhysAddr(pml4));
    let leaf = w.translate(&mem, VirtAddr(vmemmap + 0x10)).unwrap().unwrap();
    assert_eq!((leaf.pa, leaf.shift, leaf.perms, leaf.level), (PhysAddr(0x5000), 12, RO, 3));
    assert_eq!(leaf.translate(VirtAddr(vmemmap + 0x10)), PhysAddr(0x5010));
    assert_eq!(leaf.entry_pa, PhysAddr(pt));
    let big = w.translate(&mem, VirtAddr(vmemmap + 0x20_0000 + 5)).unwrap().unwrap();
    assert_eq!((big.pa, big.shift, big.perms.write), (PhysAddr(0x20_0000), 21, true));
    let giant = w.translate(&mem, VirtAddr(linear + 0x1234)).unwrap().unwrap();
    assert_eq!((giant.pa, giant.shift), (PhysAddr(0x4000_0000), 30));
    assert_eq!(giant.perms, Perms { write: false, exec: true }, "the PDPT entry forbids writes");
    assert_eq!(w.translate(&mem, VirtAddr(vmemmap + 0x40_0000)).unwrap(), None);
    assert_eq!(w.translate(&mem, VirtAddr(0x1234)).unwrap(), None);

    let leaves = w.leaves(&mem, VirtAddr(vmemmap), VirtAddr(vmemmap + 0x40_0000)).unwrap();
    let got: Vec<(u64, u64, u32)> = leaves.iter().map(|l| (l.va.0, l.pa.0, l.shift)).collect();
    assert_eq!(got, vec![(vmemmap, 0x5000, 12), (vmemmap + 0x1000, 0x6000, 12), (vmemmap + 0x20_0000, 0x20_0000, 21)]);
    assert_eq!(leaves[1].perms, RW);
}

#[test]
fn aarch64_honours_block_page_encodings_and_table_permissions() {
    let mut mem = SparseMemory::new();
    let (l0, l1, l2, l3) = (0x4000_1000u64, 0x4000_2000, 0x4000_3000, 0x4000_4000);
    for t in [l0, l1, l2, l3, 0x4000_5000] {
        mem.write(PhysAddr(t), &[0; 4096]);
    }
    let va = 0xffff_fd00_0000_0000u64;
    let table = |pa: u64| pa | 0x3;
    put(&mut mem, l0, idx(va, 39, 9), table(l1), false);
    put(&mut mem, l1, idx(va, 30, 9), table(l2), false);
    put(&mut mem, l2, 0, table(l3), false);
    let normal_af = 0x1 << 2 | 0x3 << 8 | 1 << 10;
    // Page: read-only (AP[2]), PXN and UXN.
    put(&mut mem, l3, 0, 0x4010_0000 | 0x3 | normal_af | 1 << 7 | 3 << 53, false);
    // Level 3 with bit 1 clear is reserved: a fault, not a mapping.
    put(&mut mem, l3, 1, 0x4010_1000 | 0x1 | normal_af, false);
    // 2 MiB block, writable and executable, under an APTable no-write table.
    let l2b = 0x4000_5000u64;
    put(&mut mem, l1, idx(va, 30, 9) + 1, l2b | 0x3 | 1 << 62, false);
    put(&mut mem, l2b, 0, 0x4020_0000 | 0x1 | normal_af, false);

    let w = Walker::new(&Aarch64::VA48, PhysAddr(l0));
    let page = w.translate(&mem, VirtAddr(va + 8)).unwrap().unwrap();
    assert_eq!((page.pa, page.shift, page.perms), (PhysAddr(0x4010_0000), 12, RO));
    assert_eq!(w.translate(&mem, VirtAddr(va + 0x1000)).unwrap(), None);
    let block = w.translate(&mem, VirtAddr(va + (1 << 30) + 0x123)).unwrap().unwrap();
    assert_eq!((block.pa, block.shift), (PhysAddr(0x4020_0000), 21));
    assert_eq!(block.perms, Perms { write: false, exec: true }, "APTable[1] removes write");

    let leaves = w.leaves(&mem, VirtAddr(va), VirtAddr(va + (2 << 30))).unwrap();
    assert_eq!(leaves.iter().map(|l| l.va.0).collect::<Vec<_>>(), vec![va, va + (1 << 30)]);
}

#[test]
fn ppc64_radix_reads_big_endian_entries_through_the_process_table() {
    let mut mem = SparseMemory::new();
    let (prtb, root, l1, l2, l3) = (0x10000u64, 0x20000u64, 0x30000, 0x31000, 0x32000);
    // Tables exist whole in real memory; the walker reads them whole.
    mem.write(PhysAddr(root), &[0; 0x10000]);
    for t in [l1, l2, l3, 0x33000] {
        mem.write(PhysAddr(t), &[0; 4096]);
    }
    // Process table entry 0: RTS 52 bits, 13-bit root.
    mem.write_u64_be(PhysAddr(prtb), 2 << 61 | root | 5 << 5 | 13);
    let va = 0xc00c_0000_0000_0000u64;
    let dir = |pa: u64| 1 << 63 | pa | 9;
    put(&mut mem, root, idx(va, 39, 13), dir(l1), true);
    put(&mut mem, l1, idx(va, 30, 9), dir(l2), true);
    put(&mut mem, l2, 0, dir(l3), true);
    let leaf_bits = 1u64 << 63 | 1 << 62 | 0x8 | 0x4;
    // Read-only page with R and C written back by TCG: still the same mapping.
    put(&mut mem, l3, 0, leaf_bits | 0x5000 | 0x180, true);
    put(&mut mem, l3, 1, leaf_bits | 0x6000 | 0x2, true);
    // Last level without L: QEMU faults.
    put(&mut mem, l3, 2, 1 << 63 | 0x7000 | 0x6, true);
    // The linear map's 1 GiB leaf, executable.
    put(&mut mem, root, 0, dir(0x33000), true);
    put(&mut mem, 0x33000, 0, leaf_bits | 0x2 | 0x1, true);

    let (tree, bits) = Radix::from_process_table(&mem, PhysAddr(prtb)).unwrap();
    assert_eq!((tree, bits), (PhysAddr(root), 13));
    let w = Walker::new(&Radix, tree);
    let page = w.translate(&mem, VirtAddr(va + 0x10)).unwrap().unwrap();
    assert_eq!((page.pa, page.shift, page.perms), (PhysAddr(0x5000), 12, RO));
    assert_eq!(w.translate(&mem, VirtAddr(va + 0x2000)).unwrap(), None);
    for linear in [0xc000_0000_0000_1000u64, 0x1000] {
        let l = w.translate(&mem, VirtAddr(linear)).unwrap().unwrap();
        assert_eq!((l.pa, l.shift, l.perms), (PhysAddr(0), 30, Perms { write: true, exec: true }), "{linear:#x}");
    }
    let leaves = w.leaves(&mem, VirtAddr(va), VirtAddr(va + 0x4000)).unwrap();
    assert_eq!(
        leaves.iter().map(|l| (l.va.0, l.pa.0, l.perms.write)).collect::<Vec<_>>(),
        vec![(va, 0x5000, false), (va + 0x1000, 0x6000, true)]
    );

    mem.write_u64_be(PhysAddr(prtb), 2 << 61 | root | 5 << 5 | 9);
    assert!(matches!(Radix::from_process_table(&mem, PhysAddr(prtb)), Err(WalkError::BadRoot(_))));
}

#[test]
fn ppc64_radix_takes_the_64k_shape_from_the_next_level_sizes() {
    let mut mem = SparseMemory::new();
    let (prtb, root, l1, l2, l3) = (0x10000u64, 0x20000u64, 0x30000, 0x31000, 0x32000);
    mem.write(PhysAddr(root), &[0; 0x10000]);
    for t in [l1, l2] {
        mem.write(PhysAddr(t), &[0; 4096]);
    }
    // A 64 KiB-page PTE table: 32 entries, 256 bytes.
    mem.write(PhysAddr(l3), &[0; 256]);
    mem.write_u64_be(PhysAddr(prtb), 2 << 61 | root | 5 << 5 | 13);
    let va = 0xc00c_0000_0000_0000u64;
    let dir = |pa: u64, nls: u64| 1 << 63 | pa | nls;
    let leaf_bits = 1u64 << 63 | 1 << 62 | 0x8 | 0x4;
    put(&mut mem, root, idx(va, 39, 13), dir(l1, 9), true);
    put(&mut mem, l1, idx(va, 30, 9), dir(l2, 9), true);
    put(&mut mem, l2, 0, dir(l3, 5), true);
    put(&mut mem, l3, 0, leaf_bits | 0x40_0000 | 0x2, true);
    put(&mut mem, l3, 1, leaf_bits | 0x41_0000, true);
    put(&mut mem, l3, 31, leaf_bits | 0x50_0000, true);
    // The next 2 MiB: a PMD leaf.
    put(&mut mem, l2, 1, leaf_bits | 0x60_0000 | 0x2, true);
    // A directory of 2^7 entries is no layout POWER9 walks: it faults.
    put(&mut mem, l2, 2, dir(0x34000, 7), true);

    let (tree, _) = Radix::from_process_table(&mem, PhysAddr(prtb)).unwrap();
    let w = Walker::new(&Radix, tree);
    let page = w.translate(&mem, VirtAddr(va + 0x1_2345)).unwrap().unwrap();
    assert_eq!((page.va.0, page.pa, page.shift, page.perms), (va + 0x1_0000, PhysAddr(0x41_0000), 16, RO));
    assert_eq!(page.translate(VirtAddr(va + 0x1_2345)), PhysAddr(0x41_2345));
    let pmd = w.translate(&mem, VirtAddr(va + 0x20_1000)).unwrap().unwrap();
    assert_eq!((pmd.pa, pmd.shift, pmd.level), (PhysAddr(0x60_0000), 21, 2));
    assert_eq!(w.translate(&mem, VirtAddr(va + 0x40_0000)).unwrap(), None);
    let leaves = w.leaves(&mem, VirtAddr(va), VirtAddr(va + 0x60_0000)).unwrap();
    assert_eq!(
        leaves.iter().map(|l| (l.va.0 - va, l.pa.0, l.shift)).collect::<Vec<_>>(),
        vec![(0, 0x40_0000, 16), (0x1_0000, 0x41_0000, 16), (0x1f_0000, 0x50_0000, 16), (0x20_0000, 0x60_0000, 21)]
    );
    // The PTE table counts at its real size.
    let tables = w.tables(&mem).unwrap();
    assert!(tables.contains(&(PhysAddr(l3), 256)), "{tables:?}");
}

#[test]
fn unreadable_tables_are_errors_not_unmapped() {
    let mem = SparseMemory::new();
    let w = Walker::new(&X86_64::FOUR_LEVEL, PhysAddr(0x1000));
    assert!(matches!(w.translate(&mem, VirtAddr(0)), Err(WalkError::Memory(_))));
}

#[test]
fn x86_64_five_level_walks_a_pml5_root_and_is_told_apart_by_self_translation() {
    let mut mem = SparseMemory::new();
    let (pml5, pml4, pdpt, pd, pt) = (0x1000u64, 0x2000, 0x3000, 0x4000, 0x5000);
    let (direct_pml4, direct_pdpt) = (0x6000u64, 0x7000);
    for t in [pml5, pml4, pdpt, pd, pt, direct_pml4, direct_pdpt] {
        mem.write(PhysAddr(t), &[0; 4096]);
    }
    let table = |pa: u64| pa | 0x3;
    // Linux's 5-level vmemmap_base and direct map.
    let vmemmap = 0xffd4_0000_0000_0000u64;
    let direct = 0xff11_0000_0000_0000u64;
    put(&mut mem, pml5, idx(vmemmap, 48, 9), table(pml4), false);
    put(&mut mem, pml4, idx(vmemmap, 39, 9), table(pdpt), false);
    put(&mut mem, pdpt, idx(vmemmap, 30, 9), table(pd), false);
    put(&mut mem, pd, idx(vmemmap, 21, 9), table(pt), false);
    put(&mut mem, pt, 0, 0x8000 | 0x1 | 1 << 63, false);
    put(&mut mem, pd, idx(vmemmap, 21, 9) + 1, 0x20_0000 | 0x83, false);
    put(&mut mem, pdpt, idx(vmemmap, 30, 9) + 1, 0x4000_0000 | 0x83, false);
    // The direct map: 1 GiB from PA 0, so the root's own VA is direct + pml5.
    put(&mut mem, pml5, idx(direct, 48, 9), table(direct_pml4), false);
    put(&mut mem, direct_pml4, idx(direct, 39, 9), table(direct_pdpt), false);
    put(&mut mem, direct_pdpt, idx(direct, 30, 9), 0x83, false);

    let w = Walker::new(&X86_64::FIVE_LEVEL, PhysAddr(pml5));
    let page = w.translate(&mem, VirtAddr(vmemmap + 0x18)).unwrap().unwrap();
    assert_eq!((page.pa, page.shift, page.perms, page.level), (PhysAddr(0x8000), 12, RO, 4));
    let big = w.translate(&mem, VirtAddr(vmemmap + 0x20_0000)).unwrap().unwrap();
    assert_eq!((big.pa, big.shift, big.level, big.perms), (PhysAddr(0x20_0000), 21, 3, RW_EXEC));
    let giant = w.translate(&mem, VirtAddr(vmemmap + 0x4000_0000 + 0x1234)).unwrap().unwrap();
    assert_eq!((giant.pa, giant.shift, giant.level), (PhysAddr(0x4000_0000), 30, 2));
    let leaves = w.leaves(&mem, VirtAddr(vmemmap), VirtAddr(vmemmap + 0x8000_0000)).unwrap();
    assert_eq!(
        leaves.iter().map(|l| (l.va.0 - vmemmap, l.shift)).collect::<Vec<_>>(),
        vec![(0, 12), (0x20_0000, 21), (0x4000_0000, 30)]
    );

    // The 4-level walker indexes the same root by bits 47:39 and finds
    // nothing of this: the root's own VA picks the format.
    let four = Walker::new(&X86_64::FOUR_LEVEL, PhysAddr(pml5));
    assert!(!matches!(four.translate(&mem, VirtAddr(vmemmap)), Ok(Some(l)) if l.pa == PhysAddr(0x8000)));
    let root_va = VirtAddr(direct + pml5);
    assert_eq!(
        self_translating_format(Mmu::X86_64, &mem, PhysAddr(pml5), root_va).unwrap(),
        PagingFormat::X86_64FiveLevel
    );
    assert!(matches!(
        self_translating_format(Mmu::X86_64, &mem, PhysAddr(pml4), root_va),
        Err(WalkError::BadRoot(m)) if m.contains("none of the formats")
    ));
}

const RW_EXEC: Perms = Perms { write: true, exec: true };

/// An LPA2 descriptor's address field: bits 49:12 in place, 51:50 in bits 9:8.
fn lpa2_address(pa: u64) -> u64 {
    pa & 0x0003_ffff_ffff_f000 | (pa >> 50 & 3) << 8
}

#[test]
fn aarch64_lpa2_walks_five_levels_with_output_address_bits_51_50_in_bits_9_8() {
    let mut mem = SparseMemory::new();
    // A 16-entry level -1 root; the last-level table lives above 2^50.
    let (root, l0, l1, l2) = (0x4000_0000u64, 0x4000_1000, 0x4000_2000, 0x4000_3000);
    let l3 = 1u64 << 50 | 0x4000_4000;
    for t in [root, l0, l1, l2, l3] {
        mem.write(PhysAddr(t), &[0; 4096]);
    }
    let swapper = 0xffff_8000_81ce_b000u64;
    let table = |pa: u64| lpa2_address(pa) | 0x3;
    put(&mut mem, root, idx(swapper, 48, 4), table(l0), false);
    put(&mut mem, l0, idx(swapper, 39, 9), table(l1), false);
    put(&mut mem, l1, idx(swapper, 30, 9), table(l2), false);
    put(&mut mem, l2, idx(swapper, 21, 9), table(l3), false);
    let page_af = 0x3 | 1 << 10;
    // swapper_pg_dir maps the root itself, read-only and never executable.
    put(&mut mem, l3, idx(swapper, 12, 9), lpa2_address(root) | page_af | 1 << 7 | 3 << 53, false);
    // The next page: a frame above 2^51.
    let high = 1u64 << 51 | 1 << 50 | 0x4010_1000;
    put(&mut mem, l3, idx(swapper, 12, 9) + 1, lpa2_address(high) | page_af, false);
    // A 2 MiB block above 2^50, and a 512 GiB block at level 0 (LPA2 allows it).
    let block = 1u64 << 50 | 0x4020_0000;
    put(&mut mem, l2, idx(swapper, 21, 9) + 1, lpa2_address(block) | 0x1 | 1 << 10, false);
    put(&mut mem, l0, idx(swapper, 39, 9) + 1, 0x1 | 1 << 10, false);
    // A block in the level -1 root is no descriptor the MMU accepts.
    put(&mut mem, root, idx(swapper, 48, 4) - 1, 0x1 | 1 << 10, false);

    let w = Walker::new(&Aarch64::LPA2_VA52, PhysAddr(root));
    let own = w.translate(&mem, VirtAddr(swapper + 8)).unwrap().unwrap();
    assert_eq!((own.pa, own.shift, own.perms, own.level), (PhysAddr(root), 12, RO, 4));
    let page = w.translate(&mem, VirtAddr(swapper + 0x1000)).unwrap().unwrap();
    assert_eq!((page.pa, page.perms), (PhysAddr(high), RW_EXEC));
    assert_eq!(page.entry_pa, PhysAddr(l3 + (idx(swapper, 12, 9) + 1) * 8), "the table above 2^50 was read");
    let two_mb = VirtAddr((swapper & !0x1f_ffff) + 0x20_0000 + 0x10);
    let blk = w.translate(&mem, two_mb).unwrap().unwrap();
    assert_eq!((blk.pa, blk.shift, blk.level), (PhysAddr(block), 21, 3));
    assert_eq!(blk.translate(two_mb), PhysAddr(block + 0x10));
    let huge = w.translate(&mem, VirtAddr((swapper & !((1 << 39) - 1)) + (1 << 39) + 5)).unwrap().unwrap();
    assert_eq!((huge.pa, huge.shift, huge.level), (PhysAddr(0), 39, 1));
    assert_eq!(w.translate(&mem, VirtAddr(swapper - (1 << 48))).unwrap(), None);

    let start = swapper & !0x1f_ffff;
    let leaves = w.leaves(&mem, VirtAddr(start), VirtAddr(start + 0x40_0000)).unwrap();
    assert_eq!(
        leaves.iter().map(|l| (l.va.0, l.pa.0, l.shift)).collect::<Vec<_>>(),
        vec![(swapper, root, 12), (swapper + 0x1000, high, 12), (start + 0x20_0000, block, 21)]
    );

    // The 48-bit format finds nothing at swapper_pg_dir in this tree.
    assert_eq!(
        self_translating_format(Mmu::Aarch64, &mem, PhysAddr(root), VirtAddr(swapper)).unwrap(),
        PagingFormat::Aarch64Lpa2Va52
    );
}

#[test]
fn aarch64_48_bit_trees_are_still_taken_for_48_bit() {
    let mut mem = SparseMemory::new();
    let (l0, l1, l2, l3) = (0x4000_1000u64, 0x4000_2000, 0x4000_3000, 0x4000_4000);
    for t in [l0, l1, l2, l3] {
        mem.write(PhysAddr(t), &[0; 4096]);
    }
    let swapper = 0xffff_8000_81ce_b000u64;
    let table = |pa: u64| pa | 0x3;
    put(&mut mem, l0, idx(swapper, 39, 9), table(l1), false);
    put(&mut mem, l1, idx(swapper, 30, 9), table(l2), false);
    put(&mut mem, l2, idx(swapper, 21, 9), table(l3), false);
    // Bits 9:8 are shareability here, not address bits.
    put(&mut mem, l3, idx(swapper, 12, 9), l0 | 0x3 | 3 << 8 | 1 << 10, false);
    let leaf = Walker::new(&Aarch64::VA48, PhysAddr(l0)).translate(&mem, VirtAddr(swapper)).unwrap().unwrap();
    assert_eq!(leaf.pa, PhysAddr(l0));
    assert_eq!(
        self_translating_format(Mmu::Aarch64, &mem, PhysAddr(l0), VirtAddr(swapper)).unwrap(),
        PagingFormat::Aarch64Va48
    );
    assert_eq!(PagingFormat::of_mmu(Mmu::Aarch64)[0].format().va_bits(), 48, "the firmware's format first");
}
