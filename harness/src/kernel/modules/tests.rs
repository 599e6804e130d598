//! Module resolution against hand-made modules directories: dependency
//! order, built-in modules, compressed files and their cache, and the
//! errors that name what is missing.

use super::*;

/// name, type, flags, addr, offset, size, link, info, align, entsize
type SectionHeader = (u32, u32, u64, u64, u64, u64, u32, u32, u64, u64);

/// A little-endian ELF64 relocatable file whose only content is a
/// `.modinfo` section holding `records` ("key=value"), as `modpost` lays
/// a module's out: NUL-terminated strings.
fn module_elf(records: &[&str]) -> Vec<u8> {
    let modinfo: Vec<u8> = records.iter().flat_map(|r| r.bytes().chain([0])).collect();
    let shstrtab = b"\0.modinfo\0.shstrtab\0";
    let mut out = vec![0u8; 64];
    let modinfo_off = out.len() as u64;
    out.extend_from_slice(&modinfo);
    let shstrtab_off = out.len() as u64;
    out.extend_from_slice(shstrtab);
    out.resize(out.len().next_multiple_of(8), 0);
    let shoff = out.len() as u64;
    let sections: [SectionHeader; 3] = [
        (0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        (1, 1, 2, 0, modinfo_off, modinfo.len() as u64, 0, 0, 1, 0),
        (10, 3, 0, 0, shstrtab_off, shstrtab.len() as u64, 0, 0, 1, 0),
    ];
    for (name, kind, flags, addr, offset, size, link, info, align, entsize) in sections {
        out.extend_from_slice(&name.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        for v in [flags, addr, offset, size] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&link.to_le_bytes());
        out.extend_from_slice(&info.to_le_bytes());
        out.extend_from_slice(&align.to_le_bytes());
        out.extend_from_slice(&entsize.to_le_bytes());
    }
    let mut h = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    h.extend_from_slice(&1u16.to_le_bytes()); // ET_REL
    h.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&[0; 16]); // entry, phoff
    h.extend_from_slice(&shoff.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    for v in [64u16, 0, 0, 64, 3, 2] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    out[..64].copy_from_slice(&h);
    out
}

/// Writes `kernel/<sub>/<file>` holding a module with these `depends=`;
/// compressed with the host's xz when the name ends in `.xz`.
fn add_module(dir: &Path, sub: &str, file: &str, depends: &str) {
    let path = dir.join("kernel").join(sub).join(file);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let name = file.split(".ko").next().unwrap().replace('-', "_");
    let bytes = module_elf(&["license=GPL", &format!("depends={depends}"), &format!("name={name}")]);
    if file.ends_with(".xz") {
        let plain = dir.join("plain.tmp");
        fs::write(&plain, &bytes).unwrap();
        let out = Command::new("xz").arg("-c").arg(&plain).output().expect("the host has xz");
        assert!(out.status.success());
        fs::write(&path, out.stdout).unwrap();
        fs::remove_file(plain).unwrap();
    } else {
        fs::write(&path, bytes).unwrap();
    }
}

/// A modules directory shaped like Debian's libnvdimm family.
fn nvdimm_family(dir: &Path) {
    add_module(dir, "drivers/nvdimm", "libnvdimm.ko.xz", "");
    add_module(dir, "drivers/nvdimm", "nd_btt.ko.xz", "libnvdimm");
    add_module(dir, "drivers/nvdimm", "nd_pmem.ko.xz", "libnvdimm,nd_btt");
    add_module(dir, "drivers/nvdimm", "nd_e820.ko.xz", "libnvdimm");
    add_module(dir, "drivers/dax", "dax_pmem.ko.xz", "libnvdimm");
    add_module(dir, "drivers/dax", "device_dax.ko", "");
    add_module(dir, "drivers/sound", "snd-dummy.ko.xz", "");
    fs::write(dir.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\nkernel/mm/zsmalloc.ko\n").unwrap();
}

fn names(modules: &[KernelModule]) -> Vec<&str> {
    modules.iter().map(|m| m.name.as_str()).collect()
}

#[test]
fn the_wanted_modules_come_with_their_dependencies_each_after_what_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    nvdimm_family(dir.path());
    let cache = dir.path().join("cache");
    let got = resolve_modules(dir.path(), &["nd_pmem", "dax_pmem", "device_dax", "nd_e820"], &cache).unwrap();
    assert_eq!(names(&got), ["libnvdimm", "nd_btt", "nd_pmem", "dax_pmem", "device_dax", "nd_e820"]);
    assert!(got.iter().all(|m| m.bytes.starts_with(b"\x7fELF")), "decompressed");
    let x86 = resolve_modules(dir.path(), wanted_modules(Arch::X86_64), &cache).unwrap();
    assert_eq!(names(&x86), ["libnvdimm", "nd_e820", "nd_btt", "nd_pmem", "dax_pmem", "device_dax"]);
    // Names are Linux's: a dash in a file name is an underscore.
    assert_eq!(names(&resolve_modules(dir.path(), &["snd-dummy"], &cache).unwrap()), ["snd_dummy"]);
}

#[test]
fn built_in_modules_need_no_file_and_an_empty_list_needs_no_directory() {
    let dir = tempfile::tempdir().unwrap();
    nvdimm_family(dir.path());
    add_module(dir.path(), "fs/extra", "needs_ext4.ko", "ext4,libnvdimm");
    let got = resolve_modules(dir.path(), &["needs_ext4", "zsmalloc"], &dir.path().join("cache")).unwrap();
    assert_eq!(names(&got), ["libnvdimm", "needs_ext4"]);
    let nowhere = dir.path().join("nowhere");
    assert_eq!(resolve_modules(&nowhere, &[], &nowhere).unwrap(), vec![]);
    for arch in [Arch::Ppc64le, Arch::Ppc64le64k] {
        assert!(wanted_modules(arch).is_empty(), "{arch}: Debian builds no LIBNVDIMM there");
    }
    assert!(wanted_modules(Arch::Aarch64).contains(&"nfit"), "arm64 sees an nvdimm through ACPI only");
}

#[test]
fn missing_modules_and_directories_are_named() {
    let dir = tempfile::tempdir().unwrap();
    nvdimm_family(dir.path());
    let cache = dir.path().join("cache");
    let e = resolve_modules(dir.path(), &["kmem"], &cache).unwrap_err();
    assert!(matches!(&e, ModuleError::Missing { module, needed_by: None, .. } if module == "kmem"), "{e:?}");
    assert!(e.to_string().contains(&dir.path().display().to_string()), "{e}");
    add_module(dir.path(), "x", "orphan.ko", "libnvdimm,gone");
    let e = resolve_modules(dir.path(), &["orphan"], &cache).unwrap_err().to_string();
    assert!(e.contains("module gone (which orphan depends on)"), "{e}");
    let e = resolve_modules(&dir.path().join("none"), &["libnvdimm"], &cache).unwrap_err();
    assert!(matches!(e, ModuleError::NoModulesDir { .. }), "{e:?}");
}

#[test]
fn dependency_loops_and_files_that_are_no_modules_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    add_module(dir.path(), "a", "ping.ko", "pong");
    add_module(dir.path(), "a", "pong.ko", "ping");
    let e = resolve_modules(dir.path(), &["ping"], &dir.path().join("cache")).unwrap_err().to_string();
    assert!(e.contains("ping -> pong -> ping"), "{e}");
    fs::write(dir.path().join("kernel/a/text.ko"), b"not an ELF file").unwrap();
    let e = resolve_modules(dir.path(), &["text"], &dir.path().join("cache")).unwrap_err();
    assert!(matches!(e, ModuleError::NotAModule { .. }), "{e:?}");
    fs::write(dir.path().join("kernel/a/broken.ko.xz"), b"not xz").unwrap();
    let e = resolve_modules(dir.path(), &["broken"], &dir.path().join("cache")).unwrap_err();
    assert!(matches!(e, ModuleError::Decompress { tool: "xz", .. }), "{e:?}");
}

#[test]
fn decompressed_modules_are_cached_until_the_source_changes() {
    let dir = tempfile::tempdir().unwrap();
    nvdimm_family(dir.path());
    let cache = dir.path().join("cache");
    let first = resolve_modules(dir.path(), &["nd_e820"], &cache).unwrap();
    let cached = cache.join("libnvdimm.ko");
    assert_eq!(fs::read(&cached).unwrap(), first[0].bytes);
    assert!(!cache.join("device_dax.ko").exists(), "only compressed modules are copied");
    // A cached copy newer than its source is used as it is.
    fs::write(&cached, module_elf(&["depends=", "name=libnvdimm", "note=from the cache"])).unwrap();
    let second = resolve_modules(dir.path(), &["nd_e820"], &cache).unwrap();
    assert_ne!(second[0].bytes, first[0].bytes);
    // A source newer than the copy is decompressed again.
    let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1);
    fs::File::options().write(true).open(&cached).unwrap().set_modified(old).unwrap();
    let third = resolve_modules(dir.path(), &["nd_e820"], &cache).unwrap();
    assert_eq!(third[0].bytes, first[0].bytes);
}
