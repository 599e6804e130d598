//! Small hand-built ELF64 files for the tests of the symbol reader and of
//! the initramfs builder's busybox check.

pub const EM_X86_64: u16 = 62;
pub const EM_PPC64: u16 = 21;
pub const EM_AARCH64: u16 = 183;
/// Symbol types (st_info's low nibble).
pub const OBJECT: u8 = 1;
pub const SECTION: u8 = 3;

/// name, type, flags, addr, offset, size, link, info, align, entsize
type SectionHeader = (u32, u32, u64, u64, u64, u64, u32, u32, u64, u64);

/// (name, value, global, type)
pub type Sym<'a> = (&'a str, u64, bool, u8);

/// A little-endian ELF64 executable for `machine` with sections [null,
/// .bss, .symtab, .strtab, .shstrtab] and an `.interp` (a dynamically
/// linked program) when `interp`. `.symtab` holds `symbols`; with None it is
/// a PROGBITS section, so the file has no symbol table.
pub fn elf(machine: u16, interp: bool, symbols: Option<&[Sym]>) -> Vec<u8> {
    let mut strtab = vec![0u8];
    let mut symtab = vec![0u8; 24]; // the null symbol
    let syms = symbols.unwrap_or(&[]);
    // Locals first: sh_info is the index of the first global.
    let mut ordered: Vec<_> = syms.iter().collect();
    ordered.sort_by_key(|s| s.2);
    for &&(name, value, global, kind) in &ordered {
        let name_off = strtab.len() as u32;
        strtab.extend_from_slice(name.as_bytes());
        strtab.push(0);
        symtab.extend_from_slice(&name_off.to_le_bytes());
        symtab.push((global as u8) << 4 | kind);
        symtab.push(0);
        symtab.extend_from_slice(&1u16.to_le_bytes()); // defined in .bss
        symtab.extend_from_slice(&value.to_le_bytes());
        symtab.extend_from_slice(&8u64.to_le_bytes());
    }
    let first_global = 1 + syms.iter().filter(|s| !s.2).count() as u32;
    let shstrtab = b"\0.bss\0.symtab\0.strtab\0.shstrtab\0.interp\0".to_vec();
    let interp_path = b"/lib64/ld-linux-x86-64.so.2\0";
    let mut out = vec![0u8; 64];
    let symtab_off = out.len() as u64;
    out.extend_from_slice(&symtab);
    let strtab_off = out.len() as u64;
    out.extend_from_slice(&strtab);
    let shstrtab_off = out.len() as u64;
    out.extend_from_slice(&shstrtab);
    let interp_off = out.len() as u64;
    out.extend_from_slice(interp_path);
    out.resize(out.len().next_multiple_of(8), 0);
    let shoff = out.len() as u64;
    let mut sections: Vec<SectionHeader> =
        vec![(0, 0, 0, 0, 0, 0, 0, 0, 0, 0), (1, 8, 3, 0xc000_0000_0200_0000, 0, 0x1000, 0, 0, 8, 0)];
    if symbols.is_some() {
        sections.push((6, 2, 0, 0, symtab_off, symtab.len() as u64, 3, first_global, 8, 24));
    } else {
        sections.push((6, 1, 0, 0, symtab_off, 0, 0, 0, 8, 0));
    }
    sections.push((14, 3, 0, 0, strtab_off, strtab.len() as u64, 0, 0, 1, 0));
    sections.push((22, 3, 0, 0, shstrtab_off, shstrtab.len() as u64, 0, 0, 1, 0));
    if interp {
        sections.push((32, 1, 2, 0, interp_off, interp_path.len() as u64, 0, 0, 1, 0));
    }
    for (name, kind, flags, addr, offset, size, link, info, align, entsize) in &sections {
        for v in [name, kind] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [flags, addr, offset, size] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [link, info] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [align, entsize] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    let mut h = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    h.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    h.extend_from_slice(&machine.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&0xc000_0000_0000_0000u64.to_le_bytes()); // entry
    h.extend_from_slice(&0u64.to_le_bytes()); // phoff
    h.extend_from_slice(&shoff.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // flags
                                              // ehsize, phentsize, phnum, shentsize, shnum, shstrndx (.shstrtab is 4)
    for v in [64u16, 56, 0, 64, sections.len() as u16, 4] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    out[..64].copy_from_slice(&h);
    out
}
