//! The agent on both sides: the initramfs that carries it, the lines the
//! host sends, the replies it parses, and the script itself, run under the
//! host's sh against a fake /proc and /sys.

use std::io::Write;
use std::process::{Command as Process, Stdio};

use hvo_abi::protocol::{parse_guest_line, GuestLine};

use super::*;
use crate::kernel::initramfs::tests::read_back;
use crate::kernel::test_elf::{elf, EM_AARCH64, EM_PPC64, EM_X86_64};

fn write_temp(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn the_initramfs_holds_busybox_its_applets_the_devices_and_the_agent_as_init() {
    let dir = tempfile::tempdir().unwrap();
    let busybox = write_temp(dir.path(), "busybox", &elf(EM_PPC64, false, None));
    let modules = [
        KernelModule { name: "libnvdimm".into(), bytes: b"\x7fELF lib".to_vec() },
        KernelModule { name: "nd_e820".into(), bytes: b"\x7fELF e820".to_vec() },
    ];
    let bytes = build_initramfs(&busybox, Arch::Ppc64le64k, &modules).unwrap();
    let entries = read_back(&bytes);
    let find = |name: &str| entries.iter().find(|e| e.name == name).unwrap_or_else(|| panic!("no {name}"));
    assert_eq!(find("bin/busybox").data, std::fs::read(&busybox).unwrap());
    assert_eq!(find("dev/console").rdev, (5, 1));
    assert_eq!(find("dev/null").rdev, (1, 3));
    let init = find("init");
    assert_eq!(init.mode, 0o100755);
    let script = String::from_utf8(init.data.clone()).unwrap();
    assert!(script.contains(&format!("ABI={ABI_VERSION}\n")), "the protocol version is filled in");
    assert!(!script.contains("@ABI@"));
    for applet in APPLETS {
        assert_eq!(find(&format!("bin/{applet}")).data, b"busybox", "{applet}");
    }
    assert_eq!(find("lib/modules/nd_e820.ko").data, b"\x7fELF e820");
    assert_eq!(find("lib/modules/load-order").data, b"libnvdimm\nnd_e820\n", "dependencies first");
    let bare = read_back(&build_initramfs(&busybox, Arch::Ppc64le64k, &[]).unwrap());
    let order = bare.iter().find(|e| e.name == "lib/modules/load-order").unwrap();
    assert!(order.data.is_empty(), "a kernel without modules loads none");
}

#[test]
fn a_busybox_for_another_machine_a_dynamic_one_or_no_program_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let arm = write_temp(dir.path(), "arm", &elf(EM_AARCH64, false, None));
    match build_initramfs(&arm, Arch::X86_64, &[]) {
        Err(AgentError::BusyboxArch { arch: Arch::X86_64, found, .. }) => assert!(found.contains("Aarch64"), "{found}"),
        other => panic!("{other:?}"),
    }
    let dynamic = write_temp(dir.path(), "dynamic", &elf(EM_X86_64, true, None));
    assert!(matches!(build_initramfs(&dynamic, Arch::X86_64, &[]), Err(AgentError::BusyboxDynamic { .. })));
    let text = write_temp(dir.path(), "text", b"#!/bin/sh\n");
    assert!(matches!(build_initramfs(&text, Arch::Aarch64, &[]), Err(AgentError::BusyboxNotElf { .. })));
    let missing = dir.path().join("missing");
    assert!(matches!(build_initramfs(&missing, Arch::Aarch64, &[]), Err(AgentError::ReadBusybox { .. })));
}

#[test]
fn command_lines_carry_sizes_counts_and_names() {
    let mb2 = HstateSize::from_kib(2048);
    assert_eq!(AgentCommand::HugetlbAlloc { size: mb2, count: 64 }.line(3), "3 hugetlb-alloc 2048 64");
    assert_eq!(AgentCommand::HugetlbFree { size: mb2, count: 1 }.line(4), "4 hugetlb-free 2048 1");
    assert_eq!(AgentCommand::Ping { token: Some("t") }.line(1), "1 ping t");
    assert_eq!(AgentCommand::Ksyms(vec!["a", "b"]).line(2), "2 ksyms a b");
    assert_eq!(AgentCommand::BtfHas("vmemmap_tails").line(5), "5 btf-has vmemmap_tails");
    assert_eq!(AgentCommand::Exit.line(6), "6 exit");
    assert_eq!(mb2.bytes(), 2 << 20);
}

#[test]
fn ksyms_requests_are_split_so_every_reply_fits_one_line() {
    let long: Vec<String> = (0..40).map(|i| format!("a_rather_long_kernel_symbol_name_{i:02}")).collect();
    let names: Vec<&str> = long.iter().map(String::as_str).collect();
    let commands = ksyms_commands(&names);
    assert!(commands.len() > 1);
    let mut asked = Vec::new();
    for c in &commands {
        let AgentCommand::Ksyms(batch) = c else { panic!("{c:?}") };
        let reply: String = batch.iter().map(|n| format!(" {n}=0xffffffff82c22000")).collect();
        assert!(format!("@hvo 4294967295 ok{reply}").len() <= MAX_LINE, "{reply}");
        asked.extend(batch.iter().copied());
    }
    assert_eq!(asked, names, "every name once, in order");
    assert!(ksyms_commands(&[]).is_empty());
}

#[test]
fn replies_parse_into_facts_and_reports() {
    let facts = KernelFacts::parse(
        "release=6.12.117+deb12-amd64 machine=x86_64 page_kb=4 hvo=1 hstates=1048576,2048 btf=yes \
         modules=libnvdimm,nd_e820 modules_failed=",
    )
    .unwrap();
    assert_eq!(facts.release, "6.12.117+deb12-amd64");
    assert_eq!((facts.modules, facts.modules_failed), (vec!["libnvdimm".to_string(), "nd_e820".into()], vec![]));
    assert_eq!((facts.page_kib, facts.hvo_sysctl, facts.btf), (4, HvoSysctl::On, true));
    assert_eq!(facts.hstates, vec![HstateSize::from_kib(1 << 20), HstateSize::from_kib(2048)]);

    let report =
        KernelReport::parse("hvo=absent nr_memmap_pages=0 nr_memmap_boot_pages=16384 hstates=2048:64:60,1048576:1:1")
            .unwrap();
    assert_eq!(report.hvo_sysctl, HvoSysctl::Absent);
    assert_eq!((report.nr_memmap_pages, report.nr_memmap_boot_pages), (Some(0), Some(16384)));
    let mb2 = report.hstate(HstateSize::from_kib(2048)).unwrap();
    assert_eq!((mb2.pages, mb2.free), (64, 60));
    let old = KernelReport::parse("hvo=0 hstates=").unwrap();
    assert_eq!((old.nr_memmap_pages, old.hstates.len()), (None, 0), "kernels before 6.9 have no counters");

    for bad in ["hvo=2 hstates=", "hstates=", "hvo=1 hstates=2048:64", "hvo=1 hstates=2048:x:1"] {
        assert!(matches!(KernelReport::parse(bad), Err(AgentError::BadReply { verb: "report", .. })), "{bad}");
    }
    assert!(
        KernelFacts::parse("release=x machine=y page_kb=four hvo=1 hstates= btf=no modules= modules_failed=").is_err()
    );
    assert!(KernelFacts::parse("release=x machine=y page_kb=4 hvo=1 hstates= btf=no").is_err(), "no modules=");

    let syms = parse_ksyms("init_top_pgt=0xffffffff82c22000 vmemmap_base=0xffffffff825d5598").unwrap();
    assert_eq!(syms[1], ("vmemmap_base".to_string(), VirtAddr(0xffff_ffff_825d_5598)));
    assert!(parse_ksyms("x=123").is_err());
    assert!(parse_btf_has("vmemmap_tails", "vmemmap_tails=yes").unwrap());
    assert!(parse_btf_has("vmemmap_tails", "other=yes").is_err());
}

/// A fake kernel for the script: what /proc and /sys show of a 4 KiB-page
/// kernel with the optimization sysctl off and two hstates.
fn fake_kernel(root: &Path) {
    let file = |path: &str, text: &[u8]| {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    file("proc/self/smaps", b"00400000-00401000 r-xp 0 0:0 0 /bin/busybox\nSize: 4 kB\nKernelPageSize: 4 kB\n");
    file("proc/sys/kernel/osrelease", b"6.12.117+deb12-amd64\n");
    file("proc/sys/vm/hugetlb_optimize_vmemmap", b"0\n");
    file("proc/vmstat", b"nr_free_pages 1000\nnr_memmap_pages 65\nnr_memmap_boot_pages 11776\nnr_other 1\n");
    file(
        "proc/kallsyms",
        b"ffffffff81000000 T _text\nffffffff825d5598 D vmemmap_base\nffffffff82c22000 D init_top_pgt\n\
          ffffffff82c22000 d init_top_pgt\n",
    );
    for (kb, nr) in [(2048, &b"64\n"[..]), (1048576, b"1\n")] {
        file(&format!("sys/kernel/mm/hugepages/hugepages-{kb}kB/nr_hugepages"), nr);
        file(&format!("sys/kernel/mm/hugepages/hugepages-{kb}kB/free_hugepages"), nr);
    }
    file("sys/kernel/btf/vmlinux", b"\x9f\xeb\x01\0zone\0vmemmap_tails\0page\0");
}

/// Runs the agent under the host's sh on `root` with `input` lines; returns
/// the ready banner and the reply to each line, by sequence number.
fn converse(root: &Path, input: &str) -> (GuestLine<'static>, Vec<String>) {
    converse_with(root, input, &[])
}

/// [`converse`] with more environment (`HVO_AGENT_INSMOD`).
fn converse_with(root: &Path, input: &str, env: &[(&str, &Path)]) -> (GuestLine<'static>, Vec<String>) {
    let mut child = Process::new("sh")
        .arg("-c")
        .arg(agent_script())
        .env("HVO_AGENT_ROOT", root)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the host has sh");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout: &'static str = String::from_utf8(out.stdout).unwrap().leak();
    let mut lines = stdout.lines();
    let ready = parse_guest_line(lines.next().unwrap_or_default());
    (ready, lines.map(str::to_string).collect())
}

#[test]
fn the_agent_script_answers_every_verb_against_a_fake_kernel() {
    let dir = tempfile::tempdir().unwrap();
    fake_kernel(dir.path());
    let (ready, replies) = converse(
        dir.path(),
        "1 ping tok\n2 kernel\n3 report\n4 hugetlb-alloc 2048 8\n5 hugetlb-free 1048576 1\n\
         6 hugetlb-alloc 32768 1\n7 ksyms init_top_pgt vmemmap_base swapper_pg_dir\n8 btf-has vmemmap_tails\n\
         9 btf-has vmemmap\nten ping\n11 frob\n12 hugetlb-free 2048 x\n13 report\n14 exit\n15 ping\n",
    );
    let GuestLine::Ready { abi, arch } = ready else { panic!("{ready:?}") };
    assert_eq!(abi, ABI_VERSION);
    if let Some(host) = Arch::from_name(std::env::consts::ARCH) {
        assert_eq!(arch, host.name(), "a 4 KiB-page kernel on the host's machine");
    }
    let reply = |seq: u64| -> Result<String, String> {
        for line in &replies {
            if let GuestLine::Reply { seq: Some(s), outcome } = parse_guest_line(line) {
                if s == seq {
                    return outcome.map(str::to_string).map_err(str::to_string);
                }
            }
        }
        panic!("no reply to {seq} in {replies:?}")
    };
    assert_eq!(reply(1).unwrap(), "pong tok");
    let facts = KernelFacts::parse(&reply(2).unwrap()).unwrap();
    assert_eq!((facts.release.as_str(), facts.page_kib, facts.btf), ("6.12.117+deb12-amd64", 4, true));
    assert!(facts.modules.is_empty() && facts.modules_failed.is_empty(), "the fake has no modules");
    assert_eq!(facts.hvo_sysctl, HvoSysctl::Off);
    assert_eq!(facts.hstates, vec![HstateSize::from_kib(1048576), HstateSize::from_kib(2048)]);
    let before = KernelReport::parse(&reply(3).unwrap()).unwrap();
    assert_eq!((before.nr_memmap_pages, before.nr_memmap_boot_pages), (Some(65), Some(11776)));
    assert_eq!(before.hstate(HstateSize::from_kib(2048)).map(|h| h.pages), Some(64));
    assert_eq!(reply(4).unwrap(), "size_kb=2048 nr=72");
    assert_eq!(reply(5).unwrap(), "size_kb=1048576 nr=0");
    assert_eq!(reply(6).unwrap_err(), "hugetlb-alloc: no 32768kB hstate");
    let syms = parse_ksyms(&reply(7).unwrap()).unwrap();
    assert_eq!(
        syms,
        vec![
            ("vmemmap_base".to_string(), VirtAddr(0xffff_ffff_825d_5598)),
            ("init_top_pgt".to_string(), VirtAddr(0xffff_ffff_82c2_2000)),
        ],
        "in kallsyms order, the first of each name, the missing one left out"
    );
    assert!(parse_btf_has("vmemmap_tails", &reply(8).unwrap()).unwrap());
    assert!(!parse_btf_has("vmemmap", &reply(9).unwrap()).unwrap(), "whole names only");
    assert!(replies.iter().any(|l| l == "@hvo - err command must start with a sequence number"), "{replies:?}");
    assert_eq!(reply(11).unwrap_err(), "unknown command 'frob'");
    assert_eq!(reply(12).unwrap_err(), "hugetlb-free: bad size or count");
    let after = KernelReport::parse(&reply(13).unwrap()).unwrap();
    assert_eq!(after.hvo_sysctl, HvoSysctl::On, "allocating turned the optimization on first");
    assert_eq!(after.hstate(HstateSize::from_kib(2048)).map(|h| h.pages), Some(72));
    assert_eq!(reply(14).unwrap(), "");
    assert!(!replies.iter().any(|l| l.starts_with("@hvo 15 ")), "nothing is read after exit");
}

#[test]
fn the_agent_script_says_so_when_the_console_closes() {
    let dir = tempfile::tempdir().unwrap();
    fake_kernel(dir.path());
    let (_, replies) = converse(dir.path(), "1 ping\n");
    assert_eq!(replies.last().map(String::as_str), Some("@hvo crash: console closed"));
}

/// The reply to `seq` among `replies`: Ok(payload) or Err(message).
fn reply_to(replies: &[String], seq: u64) -> Result<String, String> {
    for line in replies {
        if let GuestLine::Reply { seq: Some(s), outcome } = parse_guest_line(line) {
            if s == seq {
                return outcome.map(str::to_string).map_err(str::to_string);
            }
        }
    }
    panic!("no reply to {seq} in {replies:?}")
}

mod devices;
