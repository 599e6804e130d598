//! The device verbs on both sides: module loading at start, `dax-create`
//! and `dax-destroy` against a fake nvdimm bus laid out as Debian's 6.12
//! and 7.2 show it for `memmap=2G!4G`, and `mem-online`/`mem-gone` against
//! fake memory blocks. A fake sysfs does not react to writes, so the
//! script's writes are read back from the files it wrote, and the kernel's
//! reactions (a device appearing) are laid out beforehand.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};

use super::*;

fn file(root: &Path, path: &str, text: &str) {
    let path = root.join(path);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

fn link(root: &Path, path: &str, target: &str) {
    let path = root.join(path);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    symlink(target, path).unwrap();
}

fn read(root: &Path, path: &str) -> String {
    fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

const REGION: &str = "sys/devices/platform/e820_pmem/ndbus0/region0";

/// The nvdimm bus after the modules loaded: region0 over 4 GiB..6 GiB, its
/// namespace bound to nd_pmem, the dax seed dax0.0, and (as the kernel
/// would make it on bind) the device-dax instance dax0.0 under the seed.
fn fake_nvdimm(root: &Path) {
    file(root, "sys/devices/platform/e820_pmem/ndbus0/wait_probe", "1\n");
    file(root, &format!("{REGION}/dax_seed"), "dax0.0\n");
    let ns = format!("{REGION}/namespace0.0");
    file(root, &format!("{ns}/size"), "2147483648\n");
    file(root, &format!("{ns}/resource"), "0x100000000\n");
    file(root, &format!("{ns}/holder"), "\n");
    link(root, &format!("{ns}/driver"), "../../../../../../bus/nd/drivers/nd_pmem");
    let seed = format!("{REGION}/dax0.0");
    for (attr, text) in [("uuid", "\n"), ("mode", "none\n"), ("align", "2097152\n"), ("namespace", "\n")] {
        file(root, &format!("{seed}/{attr}"), text);
    }
    file(root, &format!("{seed}/supported_alignments"), "4096 2097152 1073741824\n");
    for (attr, text) in [("resource", "0x100200000\n"), ("size", "2145386496\n"), ("align", "2097152\n")] {
        file(root, &format!("{seed}/dax0.0/{attr}"), text);
    }
    for (name, target) in [
        ("ndbus0", "../../../devices/platform/e820_pmem/ndbus0"),
        ("region0", "../../../devices/platform/e820_pmem/ndbus0/region0"),
        ("namespace0.0", "../../../devices/platform/e820_pmem/ndbus0/region0/namespace0.0"),
        ("dax0.0", "../../../devices/platform/e820_pmem/ndbus0/region0/dax0.0"),
    ] {
        link(root, &format!("sys/bus/nd/devices/{name}"), target);
    }
    for f in ["nd_pmem/unbind", "dax_pmem/bind", "dax_pmem/unbind"] {
        file(root, &format!("sys/bus/nd/drivers/{f}"), "");
    }
    fs::create_dir_all(root.join("sys/bus/dax/drivers/device_dax")).unwrap();
    link(root, "sys/bus/dax/devices/dax0.0", "../../../devices/platform/e820_pmem/ndbus0/region0/dax0.0/dax0.0");
    file(root, "proc/sys/kernel/random/uuid", "ca09103f-b13b-40ea-9ade-c57fb5d3af7e\n");
}

#[test]
fn device_command_lines_carry_modes_sizes_and_addresses() {
    let create = AgentCommand::DaxCreate { mode: DaxMode::Pmem, align: 2 << 20 };
    assert_eq!(create.line(7), "7 dax-create pmem 2097152");
    assert_eq!(AgentCommand::DaxDestroy { dev: "dax0.0" }.line(8), "8 dax-destroy dax0.0");
    let online = AgentCommand::MemOnline { start: PhysAddr(0x1_8000_0000), size: 1 << 30, wait_s: MEM_WAIT_S };
    assert_eq!(online.line(9), "9 mem-online 0x180000000 0x40000000 20");
    let gone = AgentCommand::MemGone { start: PhysAddr(0x1_8000_0000), size: 1 << 30, wait_s: 5 };
    assert_eq!(gone.line(10), "10 mem-gone 0x180000000 0x40000000 5");
    assert_eq!(DaxMode::from_name("ram"), Some(DaxMode::Ram));
    assert_eq!(DaxMode::from_name("none"), None);
}

#[test]
fn device_replies_parse_and_malformed_ones_are_refused() {
    // As Debian's 7.2 answered for mode=pmem align=2M over memmap=2G!4G.
    let dax = DaxDevice::parse(
        "dev=dax0.0 nd=dax0.1 start=0x102200000 size=0x7de00000 align=2097152 mode=pmem \
         ns_start=0x100000000 ns_size=0x80000000",
    )
    .unwrap();
    assert_eq!((dax.dev.as_str(), dax.nd.as_str(), dax.mode), ("dax0.0", "dax0.1", DaxMode::Pmem));
    assert_eq!((dax.start, dax.size, dax.align), (PhysAddr(0x1_0220_0000), 0x7de0_0000, 2 << 20));
    assert_eq!((dax.namespace_start, dax.namespace_size), (PhysAddr(0x1_0000_0000), 2 << 30));
    let good = "dev=dax0.0 nd=dax0.0 start=0x1 size=0x2 align=4096 mode=ram ns_start=0x0 ns_size=0x3";
    assert!(DaxDevice::parse(good).is_ok());
    for bad in
        [good.replace("mode=ram", "mode=none"), good.replace("start=0x1", "start=1"), good.replace("nd=dax0.0 ", "")]
    {
        assert!(matches!(DaxDevice::parse(&bad), Err(AgentError::BadReply { verb: "dax-create", .. })), "{bad}");
    }
    let online = MemOnline::parse("blocks=8 zone=Movable waited_ms=300").unwrap();
    assert_eq!((online.blocks, online.zones, online.waited_ms), (8, vec!["Movable".to_string()], 300));
    assert_eq!(MemOnline::parse("blocks=2 zone=Normal,Movable waited_ms=0").unwrap().zones, ["Normal", "Movable"]);
    assert_eq!(MemGone::parse("blocks=8 waited_ms=160").unwrap(), MemGone { blocks: 8, waited_ms: 160 });
    assert!(MemGone::parse("blocks=8").is_err());
    assert!(MemOnline::parse("blocks=x zone=Movable waited_ms=1").is_err());
}

#[test]
fn the_agent_loads_its_modules_in_order_and_names_those_insmod_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fake_kernel(&root);
    file(&root, "lib/modules/load-order", "libnvdimm\nnd_e820\nbroken\ndax_pmem\n");
    // Stands in for busybox insmod: logs the file it loads, refuses "broken".
    let log = dir.path().join("insmod.log");
    let insmod = dir.path().join("insmod");
    let script = format!(
        "#!/bin/sh\ncase \"$1\" in *broken*) echo \"insmod: can't insert '$1': Invalid module format\" >&2; exit 1 ;; esac\n\
         echo \"$1\" >> {}\n",
        log.display()
    );
    fs::write(&insmod, script).unwrap();
    fs::set_permissions(&insmod, fs::Permissions::from_mode(0o755)).unwrap();
    let (_, replies) = converse_with(&root, "1 kernel\n2 exit\n", &[("HVO_AGENT_INSMOD", &insmod)]);
    let facts = KernelFacts::parse(&reply_to(&replies, 1).unwrap()).unwrap();
    assert_eq!(facts.modules, ["libnvdimm", "nd_e820", "dax_pmem"]);
    assert_eq!(facts.modules_failed, ["broken"]);
    let modules = root.join("lib/modules");
    let loaded: Vec<String> = ["libnvdimm", "nd_e820", "dax_pmem"]
        .iter()
        .map(|m| format!("{}\n", modules.join(format!("{m}.ko")).display()))
        .collect();
    assert_eq!(fs::read_to_string(&log).unwrap(), loaded.concat(), "in load order, by file");
}

#[test]
fn dax_create_frees_the_namespace_configures_the_seed_binds_it_and_reports_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fake_kernel(root);
    fake_nvdimm(root);
    let (_, replies) = converse(root, "1 dax-create ram 2097152\n2 exit\n");
    let dax = DaxDevice::parse(&reply_to(&replies, 1).unwrap()).unwrap();
    assert_eq!(
        dax,
        DaxDevice {
            dev: "dax0.0".into(),
            nd: "dax0.0".into(),
            start: PhysAddr(0x1_0020_0000),
            size: 0x7fe0_0000,
            align: 2 << 20,
            mode: DaxMode::Ram,
            namespace_start: PhysAddr(0x1_0000_0000),
            namespace_size: 2 << 30,
        }
    );
    assert_eq!(read(root, "sys/bus/nd/drivers/nd_pmem/unbind"), "namespace0.0\n", "nd_pmem let go first");
    let seed = format!("{REGION}/dax0.0");
    assert_eq!(read(root, &format!("{seed}/uuid")), "ca09103f-b13b-40ea-9ade-c57fb5d3af7e\n");
    assert_eq!(read(root, &format!("{seed}/mode")), "ram\n");
    assert_eq!(read(root, &format!("{seed}/align")), "2097152\n");
    assert_eq!(read(root, &format!("{seed}/namespace")), "namespace0.0\n");
    assert_eq!(read(root, "sys/bus/nd/drivers/dax_pmem/bind"), "dax0.0\n");
}

#[test]
fn dax_steps_name_what_is_missing_or_in_the_way() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fake_kernel(root);
    let (_, replies) = converse(root, "1 dax-create ram 2097152\n2 dax-create mem 4096\n3 dax-create ram 2M\n");
    assert_eq!(
        reply_to(&replies, 1).unwrap_err(),
        "dax-create: no /sys/bus/nd/devices: libnvdimm is not loaded (modules loaded: none)"
    );
    assert_eq!(reply_to(&replies, 2).unwrap_err(), "dax-create: mode must be ram or pmem");
    assert_eq!(reply_to(&replies, 3).unwrap_err(), "dax-create: bad align");

    fake_nvdimm(root);
    file(root, &format!("{REGION}/namespace0.0/holder"), "dax0.0\n");
    let (_, replies) =
        converse(root, "1 dax-create pmem 2097152\n2 dax-destroy dax0.0\n3 dax-destroy dax1.0\n4 dax-destroy x\n");
    assert_eq!(
        reply_to(&replies, 1).unwrap_err(),
        "dax-create: no pmem region with a free namespace under /sys/bus/nd/devices (namespace0.0 is held by dax0.0)"
    );
    // The fake's device stays where the kernel would have removed it.
    assert_eq!(reply_to(&replies, 2).unwrap_err(), "dax-destroy: /sys/bus/dax/devices/dax0.0 is still there");
    assert_eq!(read(root, "sys/bus/nd/drivers/dax_pmem/unbind"), "dax0.0\n");
    assert_eq!(read(root, &format!("{REGION}/dax0.0/namespace")), "\n", "the namespace is let go");
    assert_eq!(reply_to(&replies, 3).unwrap_err(), "dax-destroy: no /sys/bus/dax/devices/dax1.0");
    assert_eq!(reply_to(&replies, 4).unwrap_err(), "dax-destroy: 'x' is no daxX.Y name");

    // A write the kernel refuses is named with the kernel's reason.
    file(root, &format!("{REGION}/namespace0.0/holder"), "\n");
    fs::remove_file(root.join(format!("{REGION}/dax0.0/align"))).unwrap();
    fs::create_dir(root.join(format!("{REGION}/dax0.0/align"))).unwrap();
    let (_, replies) = converse(root, "1 dax-create ram 12345\n");
    let e = reply_to(&replies, 1).unwrap_err();
    assert!(e.starts_with("dax-create: writing '12345' to /sys/bus/nd/devices/region0/dax0.0/align: "), "{e}");
    assert!(e.ends_with("(supported: 4096 2097152 1073741824)"), "{e}");
}

/// Memory blocks of 128 MiB: memory48..55 (6 GiB..7 GiB) in `state`.
fn fake_blocks(root: &Path, state: &str) {
    file(root, "sys/devices/system/memory/block_size_bytes", "8000000\n");
    file(root, "proc/uptime", "12.34 20.00\n");
    for n in 48..56 {
        file(root, &format!("sys/devices/system/memory/memory{n}/state"), &format!("{state}\n"));
        file(root, &format!("sys/devices/system/memory/memory{n}/valid_zones"), "Movable\n");
    }
}

#[test]
fn mem_online_and_mem_gone_wait_for_every_block_of_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fake_kernel(root);
    fake_blocks(root, "online");
    let (_, replies) = converse(
        root,
        "1 mem-online 0x180000000 0x40000000 0\n2 mem-online 6442450944 134217728 0\n\
         3 mem-gone 0x1c0000000 0x40000000 0\n4 mem-gone 0x180000000 0x40000000 0\n\
         5 mem-online 0x180000000 0x80000000 0\n6 mem-online 0x180000001 0x8000000\n7 mem-online 0x18000000g 1\n\
         8 mem-online 0x180000000 0\n",
    );
    let online = MemOnline::parse(&reply_to(&replies, 1).unwrap()).unwrap();
    assert_eq!((online.blocks, online.zones, online.waited_ms), (8, vec!["Movable".to_string()], 0));
    assert_eq!(MemOnline::parse(&reply_to(&replies, 2).unwrap()).unwrap().blocks, 1, "decimal works too");
    assert_eq!(MemGone::parse(&reply_to(&replies, 3).unwrap()).unwrap().blocks, 8, "nothing above 7 GiB");
    assert_eq!(
        reply_to(&replies, 4).unwrap_err(),
        "mem-gone: after 0s still there: memory48 memory49 memory50 memory51 and 4 more"
    );
    assert_eq!(
        reply_to(&replies, 5).unwrap_err(),
        "mem-online: after 0s not online: memory56(missing) memory57(missing) memory58(missing) \
         memory59(missing) and 4 more"
    );
    let not_whole = "mem-online: 0x180000001+0x8000000 is not whole memory blocks of 0x8000000";
    assert_eq!(reply_to(&replies, 6).unwrap_err(), not_whole);
    assert_eq!(reply_to(&replies, 7).unwrap_err(), "mem-online: bad start, size or seconds");
    assert!(reply_to(&replies, 8).unwrap_err().contains("not whole memory blocks"), "an empty range");

    file(root, "sys/devices/system/memory/memory50/state", "offline\n");
    file(root, "sys/devices/system/memory/memory51/valid_zones", "Normal\n");
    let (_, replies) = converse(root, "1 mem-online 0x180000000 0x40000000 0\n2 mem-online 0x198000000 0x8000000 0\n");
    assert_eq!(reply_to(&replies, 1).unwrap_err(), "mem-online: after 0s not online: memory50(offline)");
    assert_eq!(MemOnline::parse(&reply_to(&replies, 2).unwrap()).unwrap().zones, ["Normal"]);
}
