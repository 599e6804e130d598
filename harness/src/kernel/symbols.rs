//! Kernel symbol addresses on the host, without booting: from a System.map
//! (`<hex address> <type> <name>` lines) or from an ELF vmlinux's `.symtab`
//! (Debian's ppc64el vmlinux keeps it). Debian ships a one-line stub in
//! place of System.map, which is recognised and refused with its own words,
//! so the caller can fall back to asking the running kernel (/proc/kallsyms).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSymbol, SymbolKind};

use crate::addr::VirtAddr;

#[derive(Debug, thiserror::Error)]
pub enum SymbolError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is Debian's stub System.map, not a real one ({says})")]
    StubSystemMap { path: PathBuf, says: String },
    #[error("System.map line {line}: {text:?} is not `<hex address> <type> <name>`")]
    BadLine { line: usize, text: String },
    #[error("{path} is a boot image, not an ELF vmlinux: it carries no symbols")]
    NotElf { path: PathBuf },
    #[error("not an ELF file we can read: {0}")]
    BadElf(String),
    #[error("the ELF file has no symbol table (stripped, or a compressed image)")]
    NoSymbolTable,
    #[error("{path} holds no symbols")]
    Empty { path: PathBuf },
    #[error("symbol {0} is not in the kernel's symbols")]
    Missing(String),
    #[error("symbol {name} names {count} different addresses, none of them global")]
    Ambiguous { name: String, count: usize },
}

/// Where a kernel's symbols come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SymbolSource {
    /// A real System.map file.
    SystemMap(PathBuf),
    /// An unstripped ELF vmlinux.
    ElfSymtab(PathBuf),
    /// Neither exists on the host: the running kernel's /proc/kallsyms.
    Kallsyms,
}

impl std::fmt::Display for SymbolSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SymbolSource::SystemMap(p) => write!(f, "System.map {}", p.display()),
            SymbolSource::ElfSymtab(p) => write!(f, "ELF symbol table of {}", p.display()),
            SymbolSource::Kallsyms => f.write_str("/proc/kallsyms of the running kernel"),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, SymbolError> {
    std::fs::read(path).map_err(|source| SymbolError::Read { path: path.to_path_buf(), source })
}

fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF")
}

/// What one name resolves to: a global definition wins over file-local
/// ones (static variables of the same name in several files).
#[derive(Clone, Debug)]
enum Entry {
    Global(VirtAddr),
    Locals(Vec<VirtAddr>),
}

/// Symbol name to address.
#[derive(Clone, Debug, Default)]
pub struct KernelSymbols {
    by_name: HashMap<String, Entry>,
}

impl KernelSymbols {
    /// Reads `path`: an ELF file's symbol table, or else a System.map.
    pub fn load(path: &Path) -> Result<KernelSymbols, SymbolError> {
        let bytes = read(path)?;
        KernelSymbols::parse(path, &bytes)
    }

    fn parse(path: &Path, bytes: &[u8]) -> Result<KernelSymbols, SymbolError> {
        let symbols = if is_elf(bytes) {
            KernelSymbols::from_elf(bytes)?
        } else {
            let text = String::from_utf8_lossy(bytes);
            KernelSymbols::from_system_map(&text).map_err(|e| match e {
                SymbolError::StubSystemMap { says, .. } => {
                    SymbolError::StubSystemMap { path: path.to_path_buf(), says }
                }
                other => other,
            })?
        };
        if symbols.is_empty() {
            return Err(SymbolError::Empty { path: path.to_path_buf() });
        }
        Ok(symbols)
    }

    /// Where `path`'s symbols would come from (an ELF file or a System.map),
    /// or why they cannot.
    pub fn source_of(path: &Path) -> Result<SymbolSource, SymbolError> {
        let bytes = read(path)?;
        KernelSymbols::parse(path, &bytes)?;
        Ok(if is_elf(&bytes) {
            SymbolSource::ElfSymtab(path.to_path_buf())
        } else {
            SymbolSource::SystemMap(path.to_path_buf())
        })
    }

    /// Like [`KernelSymbols::source_of`] for a kernel image, which gives
    /// symbols only as an unstripped ELF vmlinux (not as a bzImage or an
    /// arm64 Image).
    pub fn source_of_image(path: &Path) -> Result<SymbolSource, SymbolError> {
        let bytes = read(path)?;
        if !is_elf(&bytes) {
            return Err(SymbolError::NotElf { path: path.to_path_buf() });
        }
        KernelSymbols::parse(path, &bytes)?;
        Ok(SymbolSource::ElfSymtab(path.to_path_buf()))
    }

    /// Parses System.map text. A stub (Debian's "The real System.map is in
    /// the ...-dbg package" at address all-ones) is an error that quotes it.
    pub fn from_system_map(text: &str) -> Result<KernelSymbols, SymbolError> {
        let mut symbols = KernelSymbols::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let mut words = line.split_ascii_whitespace();
            // nm prints undefined symbols without an address: they name none.
            if matches!(words.clone().next(), Some("U" | "w" | "v")) {
                continue;
            }
            let (Some(addr), Some(kind), Some(name)) = (words.next(), words.next(), words.next()) else {
                return Err(SymbolError::BadLine { line: i + 1, text: line.to_string() });
            };
            let stub = addr.len() == 16 && addr.bytes().all(|b| b == b'f' || b == b'F');
            if stub && words.next().is_some() {
                let says = line.splitn(3, char::is_whitespace).nth(2).unwrap_or_default().trim().to_string();
                return Err(SymbolError::StubSystemMap { path: PathBuf::new(), says });
            }
            let (Ok(addr), true, None) = (u64::from_str_radix(addr, 16), kind.len() == 1, words.next()) else {
                return Err(SymbolError::BadLine { line: i + 1, text: line.to_string() });
            };
            let global = kind.chars().all(|c| c.is_ascii_uppercase());
            symbols.insert(name, VirtAddr(addr), global);
        }
        Ok(symbols)
    }

    /// Reads an ELF file's `.symtab`: defined data and code symbols.
    pub fn from_elf(bytes: &[u8]) -> Result<KernelSymbols, SymbolError> {
        let file = object::File::parse(bytes).map_err(|e| SymbolError::BadElf(e.to_string()))?;
        if file.symbol_table().is_none() {
            return Err(SymbolError::NoSymbolTable);
        }
        let mut symbols = KernelSymbols::default();
        for sym in file.symbols() {
            if sym.is_undefined() || matches!(sym.kind(), SymbolKind::Section | SymbolKind::File) {
                continue;
            }
            let Ok(name) = sym.name() else { continue };
            if !name.is_empty() {
                symbols.insert(name, VirtAddr(sym.address()), sym.is_global());
            }
        }
        Ok(symbols)
    }

    /// Symbols the running kernel reported (its kallsyms lookups are
    /// first-match, so every one counts as the name's definition).
    pub fn from_lookups(lookups: impl IntoIterator<Item = (String, VirtAddr)>) -> KernelSymbols {
        let mut symbols = KernelSymbols::default();
        for (name, addr) in lookups {
            symbols.insert(&name, addr, true);
        }
        symbols
    }

    fn insert(&mut self, name: &str, addr: VirtAddr, global: bool) {
        let entry = self.by_name.entry(name.to_string()).or_insert(Entry::Locals(Vec::new()));
        match (entry, global) {
            (Entry::Global(_), _) => {}
            (entry @ Entry::Locals(_), true) => *entry = Entry::Global(addr),
            (Entry::Locals(addrs), false) => {
                if !addrs.contains(&addr) {
                    addrs.push(addr)
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The address of `name`: its global definition, or its only local one.
    pub fn address(&self, name: &str) -> Result<VirtAddr, SymbolError> {
        match self.by_name.get(name) {
            None => Err(SymbolError::Missing(name.to_string())),
            Some(Entry::Global(addr)) => Ok(*addr),
            Some(Entry::Locals(addrs)) => match addrs.as_slice() {
                [addr] => Ok(*addr),
                _ => Err(SymbolError::Ambiguous { name: name.to_string(), count: addrs.len() }),
            },
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::test_elf::{elf, EM_PPC64, OBJECT, SECTION};

    #[test]
    fn system_map_gives_addresses_and_prefers_globals_over_statics() {
        let map = "\
ffffffff81000000 T _text
ffffffff825d5598 D vmemmap_base
ffffffff82c22000 D init_top_pgt
ffffffff81234000 t helper
ffffffff81235000 t helper
ffffffff81300000 t counter
ffffffff81400000 B counter
                 U not_here
0000000000000000 A fixed_percpu_data
";
        let s = KernelSymbols::from_system_map(map).unwrap();
        assert_eq!(s.address("vmemmap_base").unwrap(), VirtAddr(0xffff_ffff_825d_5598));
        assert_eq!(s.address("init_top_pgt").unwrap(), VirtAddr(0xffff_ffff_82c2_2000));
        assert_eq!(s.address("counter").unwrap(), VirtAddr(0xffff_ffff_8140_0000), "the global one");
        assert!(matches!(s.address("helper"), Err(SymbolError::Ambiguous { count: 2, .. })));
        assert!(matches!(s.address("swapper_pg_dir"), Err(SymbolError::Missing(n)) if n == "swapper_pg_dir"));
        assert_eq!(s.address("fixed_percpu_data").unwrap(), VirtAddr(0));
    }

    #[test]
    fn debians_stub_system_map_is_refused_with_its_own_words() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("System.map-6.12.117+deb12-amd64");
        std::fs::write(&path, "ffffffffffffffff B The real System.map is in the linux-image-6.12-dbg package\n")
            .unwrap();
        match KernelSymbols::load(&path) {
            Err(SymbolError::StubSystemMap { path: p, says }) => {
                assert_eq!(p, path);
                assert_eq!(says, "The real System.map is in the linux-image-6.12-dbg package");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(KernelSymbols::source_of(&path), Err(SymbolError::StubSystemMap { .. })));
    }

    #[test]
    fn malformed_and_empty_maps_are_errors() {
        for (text, line) in [("ffff T\n", 1), ("\nxyz T name\n", 2), ("ffff T name extra\n", 1), ("ffff TT n\n", 1)] {
            assert!(
                matches!(KernelSymbols::from_system_map(text), Err(SymbolError::BadLine { line: l, .. }) if l == line),
                "{text:?}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("System.map");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(KernelSymbols::load(&path), Err(SymbolError::Empty { .. })));
        let missing = dir.path().join("nope");
        assert!(matches!(KernelSymbols::load(&missing), Err(SymbolError::Read { .. })));
    }

    #[test]
    fn elf_symtab_gives_addresses_of_defined_symbols() {
        let bytes = elf(
            EM_PPC64,
            false,
            Some(&[
                ("swapper_pg_dir", 0xc000_0000_0277_0000, true, OBJECT),
                ("vmemmap", 0xc000_0000_0200_0008, true, OBJECT),
                ("only_local", 0xc000_0000_0200_0010, false, OBJECT),
                ("", 0xc000_0000_0200_0000, false, SECTION),
            ]),
        );
        let s = KernelSymbols::from_elf(&bytes).unwrap();
        assert_eq!(s.address("swapper_pg_dir").unwrap(), VirtAddr(0xc000_0000_0277_0000));
        assert_eq!(s.address("vmemmap").unwrap(), VirtAddr(0xc000_0000_0200_0008));
        assert_eq!(s.address("only_local").unwrap(), VirtAddr(0xc000_0000_0200_0010));
        assert_eq!(s.len(), 3, "section symbols name no variable");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmlinux");
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(KernelSymbols::source_of(&path).unwrap(), SymbolSource::ElfSymtab(path.clone()));
        assert!(KernelSymbols::load(&path).unwrap().contains("vmemmap"));
        assert_eq!(KernelSymbols::source_of_image(&path).unwrap(), SymbolSource::ElfSymtab(path.clone()));
        let bzimage = dir.path().join("vmlinuz");
        std::fs::write(&bzimage, b"MZ\0\0 a PE/COFF boot image").unwrap();
        assert!(matches!(KernelSymbols::source_of_image(&bzimage), Err(SymbolError::NotElf { .. })));
    }

    #[test]
    fn stripped_or_broken_elf_is_refused() {
        assert!(matches!(KernelSymbols::from_elf(&elf(EM_PPC64, false, None)), Err(SymbolError::NoSymbolTable)));
        let mut broken = elf(EM_PPC64, false, Some(&[("x", 1, true, OBJECT)]));
        broken.truncate(40);
        assert!(matches!(KernelSymbols::from_elf(&broken), Err(SymbolError::BadElf(_))));
    }

    #[test]
    fn kallsyms_lookups_become_symbols() {
        let s = KernelSymbols::from_lookups([("memstart_addr".to_string(), VirtAddr(0xffff_8000_81ce_b000))]);
        assert_eq!(s.address("memstart_addr").unwrap(), VirtAddr(0xffff_8000_81ce_b000));
    }
}
