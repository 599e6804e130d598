//! The parser's refusals, located, and what it accepts.

use super::*;

fn parse(src: &str) -> Result<Scenario, ScenarioError> {
    Scenario::parse(Path::new("scenarios/t.toml"), src)
}

fn err(src: &str) -> ScenarioError {
    parse(src).expect_err("should be rejected")
}

const GOOD: &str = r#"
name = "boot"
description = "boots"
architectures = ["x86_64", "ppc64le"]

[machine]
boot-memory = "1G"
slots = 2
max-memory = "4G"

[[step]]
action = "ping"

[[step]]
action = "verify-manifest"

[[step]]
action = "exit"
status = 0
"#;

#[test]
fn a_good_scenario_parses_with_its_lines() {
    let s = parse(GOOD).unwrap();
    assert_eq!(s.name, "boot");
    assert_eq!(s.architectures, vec![Arch::X86_64, Arch::Ppc64le]);
    assert_eq!(
        s.machine,
        MachineSpec { boot_memory: 1 << 30, slots: 2, max_memory: 4 << 30, nvdimm: false, boot_nvdimm: None }
    );
    assert_eq!(
        s.steps.iter().map(|s| s.step.clone()).collect::<Vec<_>>(),
        vec![Step::Ping, Step::VerifyManifest, Step::Exit { status: 0 }]
    );
    assert_eq!(s.steps[0].line, 11);
    assert_eq!(s.expect, Expect::Pass);
    assert_eq!(s.step_timeout_ms, DEFAULT_STEP_TIMEOUT_MS);
}

#[test]
fn defaults_fill_an_almost_empty_file() {
    let s = parse("[[step]]\naction = \"ping\"\n").unwrap();
    assert_eq!(s.name, "t");
    assert_eq!(s.architectures, Arch::ALL.to_vec());
    assert_eq!(s.machine.boot_memory, 512 << 20);
}

#[test]
fn unknown_fields_are_named_with_their_line() {
    let e = err("name = \"x\"\n[machine]\nboot-memory = \"1G\"\nbogus = 3\n");
    assert_eq!((e.line, e.field.as_str()), (4, "machine.bogus"), "{e}");
    assert!(e.message.contains("unknown field"), "{e}");
    assert!(e.to_string().starts_with("scenarios/t.toml:4:1: field `machine.bogus`"), "{e}");

    let e = err("[[step]]\naction = \"ping\"\n[[step]]\naction = \"exit\"\nstatus = 0\ncolour = 1\n");
    assert_eq!((e.line, e.field.as_str()), (6, "step[2].colour"), "{e}");
}

#[test]
fn wrong_types_and_unknown_steps_are_named() {
    let e = err("[machine]\nslots = \"four\"\n");
    assert_eq!((e.line, e.field.as_str()), (2, "machine.slots"), "{e}");

    let e = err("[[step]]\naction = \"launch-missiles\"\n");
    assert_eq!((e.line, e.field.as_str()), (2, "step[1].action"), "{e}");
    assert!(e.message.contains("launch-missiles"), "{e}");

    let e = err("[[step]]\naction = \"ping\"\nstatus = 1\n");
    assert_eq!((e.line, e.field.as_str()), (3, "step[1].status"), "{e}");
    assert!(e.message.contains("not a parameter of `ping`"), "{e}");

    let e = err("[[step]]\naction = \"exit\"\nstatus = 300\n");
    assert_eq!((e.line, e.field.as_str()), (3, "step[1].status"), "{e}");

    let e = err("[machine]\nboot-memory = \"12Q\"\n");
    assert_eq!((e.line, e.field.as_str()), (2, "machine.boot-memory"), "{e}");
    assert!(e.message.contains("unit"), "{e}");
}

#[test]
fn impossible_values_are_refused() {
    let e = err("architectures = [\"x86_64\", \"sparc\"]\n");
    assert_eq!((e.line, e.field.as_str()), (1, "architectures"), "{e}");

    let e = err("architectures = [\"ppc64le\"]\n[machine]\nboot-memory = \"300M\"\n");
    assert!(e.message.contains("256M"), "{e}");
    assert_eq!(e.line, 3);

    let e = err("[machine]\nboot-memory = \"1M\"\n");
    assert!(e.message.contains("needs"), "{e}");

    let e = err("[machine]\nboot-memory = \"1G\"\nmax-memory = \"512M\"\n");
    assert_eq!(e.field, "machine.max-memory", "{e}");

    let e = err("[machine]\nmax-memory = \"1000T\"\n");
    assert!(e.message.contains("beyond"), "{e}");

    let e = err("[machine]\nslots = 9999\n");
    assert_eq!(e.field, "machine.slots", "{e}");

    let e = err("step-timeout-ms = 0\n");
    assert_eq!(e.field, "step-timeout-ms", "{e}");

    let e = err("name = \"../../etc\"\n");
    assert_eq!(e.field, "name", "{e}");

    let e = err("[[step]]\naction = \"exit\"\n[[step]]\naction = \"ping\"\n");
    assert_eq!(e.line, 3, "{e}");
}

#[test]
fn hugetlb_steps_parse_with_defaults_and_are_checked() {
    let s = parse(
        "[[step]]\naction = \"hugetlb-alloc\"\nregion = \"a\"\nsize = \"1G\"\ncount = 2\nzone = \"movable\"\n\
             [[step]]\naction = \"optimize\"\nregion = \"a\"\n[[step]]\naction = \"verify\"\n",
    )
    .unwrap();
    assert_eq!(
        s.steps[0].step,
        Step::HugetlbAlloc { region: "a".into(), folio_size: 1 << 30, count: 2, zone: Zone::Movable, from: None }
    );
    assert_eq!(s.steps[1].step, Step::Optimize { region: "a".into(), layout: Layout::Unified });

    let e = err("[[step]]\naction = \"hugetlb-alloc\"\nregion = \"a\"\nsize = \"3M\"\n");
    assert_eq!((e.line, e.field.as_str()), (4, "step[1].size"), "{e}");
    let e = err("[[step]]\naction = \"hugetlb-alloc\"\nregion = \"a\"\nsize = \"2M\"\ncount = 0\n");
    assert_eq!(e.field, "step[1].count", "{e}");
    let e = err("[[step]]\naction = \"hugetlb-alloc\"\nregion = \"a\"\nsize = \"2M\"\nzone = \"dma\"\n");
    assert_eq!(e.field, "step[1].zone", "{e}");
    let e = err("[[step]]\naction = \"optimize\"\nregion = \"nope\"\n");
    assert!(e.message.contains("no earlier step allocates"), "{e}");
    let e = err("[[step]]\naction = \"hugetlb-alloc\"\nregion = \"a\"\nsize = \"2M\"\n[[step]]\naction = \"optimize\"\nregion = \"a\"\nlayout = \"sideways\"\n");
    assert_eq!((e.line, e.field.as_str()), (8, "step[2].layout"), "{e}");
    let e = err("[[step]]\naction = \"optimize\"\n");
    assert_eq!(e.field, "step[1].region", "{e}");
}

#[test]
fn nvdimms_need_a_machine_that_hotplugs_them_and_never_go() {
    let add = "[[step]]\naction = \"hot-add\"\nregion = \"pm\"\ndevice = \"nvdimm\"\nsize = \"1G\"\n";
    let e = err(add);
    assert!(e.message.contains("ppc64le cannot hotplug an nvdimm"), "{e}");
    let s = parse(&format!("architectures = [\"x86_64\"]\n{add}")).unwrap();
    assert!(s.machine.nvdimm);
    let e = err(&format!("architectures = [\"x86_64\"]\n{add}[[step]]\naction = \"hot-remove\"\nregion = \"pm\"\n"));
    assert!(e.message.contains("cannot unplug an nvdimm"), "{e}");
    let e = err("[[step]]\naction = \"hot-add\"\nregion = \"x\"\ndevice = \"floppy\"\nsize = \"1G\"\n");
    assert_eq!(e.field, "step[1].device", "{e}");
}

#[test]
fn boot_pmem_is_added_once_whole_and_without_a_backend() {
    let machine = "[machine]\nboot-memory = \"512M\"\nboot-pmem = \"8M\"\n";
    let add = "[[step]]\naction = \"hot-add\"\nregion = \"pm\"\ndevice = \"pmem\"\nsize = \"8M\"\n";
    let s = parse(&format!("{machine}{add}")).unwrap();
    assert_eq!(s.boot_pmem, 8 << 20);
    assert!(matches!(s.steps[0].step, Step::HotAdd { device: DaxDevice::Pmem, .. }));
    let e = err(add);
    assert!(e.message.contains("set `machine.boot-pmem`"), "{e}");
    let e = err(&format!("{machine}{}", add.replace("8M", "4M")));
    assert_eq!(e.field, "size", "{e}");
    let e = err(&format!("{machine}{add}{}", add.replace("\"pm\"", "\"again\"")));
    assert!(e.message.contains("add it once"), "{e}");
    let e = err(&format!("{machine}{add}backend = \"file\"\n"));
    assert_eq!((e.line, e.field.as_str()), (9, "step[1].backend"), "{e}");
    let e = err("[machine]\nboot-memory = \"512M\"\nboot-pmem = \"3M\"\n");
    assert_eq!((e.line, e.field.as_str()), (3, "machine.boot-pmem"), "{e}");
    let e = err("[machine]\nboot-memory = \"512M\"\nboot-pmem = \"500M\"\n");
    assert!(e.message.contains("leaves less than"), "{e}");
}

#[test]
fn an_altmap_lives_on_a_file_backed_device() {
    let add = "[[step]]\naction = \"hot-add\"\nregion = \"d\"\nsize = \"1G\"\naltmap = true\n";
    let s = parse(add).unwrap();
    assert!(matches!(s.steps[0].step, Step::HotAdd { altmap: true, backend: Backend::File, .. }));
    let e = err(&format!("{add}backend = \"ram\"\n"));
    assert_eq!((e.line, e.field.as_str()), (6, "step[1].backend"), "{e}");
    let e = err(&add.replace("size = \"1G\"", "size = \"1G\"\nbackend = \"tape\""));
    assert!(e.message.contains("unknown backend"), "{e}");
}

#[test]
fn only_scenarios_that_touch_the_vmemmap_get_one_populated() {
    assert!(!parse("[[step]]\naction = \"verify-manifest\"\n[[step]]\naction = \"exit\"\n").unwrap().needs_vmemmap());
    assert!(parse("[[step]]\naction = \"verify\"\n").unwrap().needs_vmemmap());
    let gigantic = "[machine]\nboot-memory = \"2G\"\n[[boot-gigantic]]\nregion = \"g\"\nsize = \"1G\"\n";
    assert!(parse(gigantic).unwrap().needs_vmemmap());
}

#[test]
fn a_bug_knob_scenario_has_a_knobs_off_control_expecting_a_pass() {
    let s =
        parse("bug-knobs = [\"no-tlb-flush\"]\n[expect]\noutcome = \"fail\"\ninvariant = \"write-faults\"\n").unwrap();
    let control = s.knobs_off().unwrap();
    assert_eq!((control.expect, control.bug_knobs.len()), (Expect::Pass, 0));
    assert!(control.name.ends_with(KNOBS_OFF_SUFFIX));
    assert!(parse("").unwrap().knobs_off().is_none());
}

#[test]
fn expectations_must_be_coherent() {
    let e = err("[expect]\noutcome = \"fail\"\n");
    assert_eq!(e.field, "expect.invariant", "{e}");
    let e = err("[expect]\noutcome = \"fail\"\ninvariant = \"made-up\"\n");
    assert!(e.message.contains("unknown invariant"), "{e}");
    let s = parse("[expect]\noutcome = \"fail\"\ninvariant = \"exit-status\"\n").unwrap();
    assert_eq!(s.expect, Expect::Fail { invariant: "exit-status".into(), also: vec![] });
    let s = parse(
            "bug-knobs = [\"no-tlb-flush\"]\n[expect]\noutcome = \"fail\"\ninvariant = \"write-faults\"\nalso = [\"contents\"]\n",
        )
        .unwrap();
    assert_eq!(s.expect, Expect::Fail { invariant: "write-faults".into(), also: vec!["contents".into()] });
    assert_eq!(s.bug_knobs, vec![Knob::NoTlbFlush]);
    let e = err("bug-knobs = [\"flip-bits\"]\n");
    assert_eq!((e.line, e.field.as_str()), (1, "bug-knobs"), "{e}");
    let e = err("[expect]\noutcome = \"fail\"\ninvariant = \"contents\"\nalso = [\"nonsense\"]\n");
    assert_eq!((e.line, e.field.as_str()), (4, "expect.also"), "{e}");
}

#[test]
fn not_toml_at_all_is_located() {
    let e = err("name = \"x\"\nthis is not toml\n");
    assert_eq!(e.line, 2, "{e}");
}

#[test]
fn sizes_read_like_people_write_them() {
    assert_eq!(Size::parse("512M"), Ok(Size(512 << 20)));
    assert_eq!(Size::parse("2MiB"), Ok(Size(2 << 20)));
    assert_eq!(Size::parse("1T"), Ok(Size(1 << 40)));
    assert_eq!(Size::parse("4096"), Ok(Size(4096)));
    assert!(Size::parse("99999999999999T").is_err());
    assert!(Size::parse("M").is_err());
    assert_eq!(Size(3 << 30).to_string(), "3G");
    assert_eq!(Size(4097).to_string(), "4097");
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    let deep = format!("bug-knobs = {}{}\n", "[".repeat(50_000), "]".repeat(50_000));
    let e = err(&deep);
    assert_eq!(e.line, 1, "{e}");
    let tables = "[a.".repeat(20_000) + "b]\n";
    let e = err(&tables);
    assert_eq!(e.line, 1, "{e}");
}

#[test]
fn huge_sizes_and_counts_are_refused_with_their_field() {
    let e = err("[machine]\nboot-memory = \"99999999999999T\"\n");
    assert_eq!(e.field, "machine.boot-memory", "{e}");
    let e = err("[machine]\nmax-memory = 18446744073709551615\n");
    assert_eq!(e.field, "machine.max-memory", "{e}");
    let e = err("[[step]]\naction = \"hugetlb-alloc\"\nregion = \"a\"\nsize = \"2M\"\ncount = 99999999999\n");
    assert_eq!(e.field, "step[1].count", "{e}");
    let e = err("[[step]]\naction = \"hot-add\"\nregion = \"a\"\nsize = \"1T\"\n");
    assert!(e.message.contains("do not fit"), "{e}");
}

#[test]
fn overlapping_and_unknown_things_are_refused() {
    // The same region twice, and persistent memory added twice, would overlap.
    let e = err("[[step]]\naction = \"hot-add\"\nregion = \"a\"\nsize = \"1G\"\n[[step]]\naction = \"hot-add\"\nregion = \"a\"\nsize = \"1G\"\n");
    assert!(e.message.contains("allocated twice"), "{e}");
    let e = err("[[step]]\naction = \"format-disk\"\n");
    assert_eq!(e.field, "step[1].action", "{e}");
    let e = err("[[step]]\naction = \"ping\"\ncommand = \"rm -rf /\"\n");
    assert_eq!(e.line, 3, "{e}");
    let e = err("[machine]\nqemu-args = [\"-monitor\", \"stdio\"]\n");
    assert_eq!(e.line, 2, "{e}");
}

/// Names of every value of a `Named` type.
fn all_names<T: names::Named>() -> Vec<String> {
    T::ALL.iter().map(|v| v.name().to_string()).collect()
}

/// A field with a "known: ..." list: a file with `{}` where the name goes,
/// the field its errors name, and every name the field could conceivably take.
struct KnownList {
    template: &'static str,
    field: &'static str,
    universe: Vec<String>,
}

impl KnownList {
    fn with(&self, name: &str) -> String {
        self.template.replace("{}", name)
    }

    /// Whether the parser takes `name` for the field (it may refuse the file
    /// for something else, like an action's missing parameter).
    fn accepts(&self, name: &str) -> bool {
        parse(&self.with(name)).err().is_none_or(|e| e.field != self.field)
    }

    /// The list the error for an unknown name shows.
    fn listed(&self) -> Vec<String> {
        let e = err(&self.with("no-such-name"));
        assert_eq!(e.field, self.field, "{e}");
        let known = e.message.split("(known: ").nth(1).and_then(|r| r.strip_suffix(')'));
        let known = known.unwrap_or_else(|| panic!("no known list in: {e}"));
        known.split(", ").map(str::to_string).collect()
    }
}

/// Every check a scenario could name as failing.
fn check_names() -> Vec<String> {
    RUN_CHECKS
        .iter()
        .map(|c| c.to_string())
        .chain(crate::invariant::Invariant::ALL.map(|i| i.name().to_string()))
        .collect()
}

#[test]
fn every_known_list_is_exactly_what_its_field_accepts() {
    let zones = all_names::<Zone>;
    let lists = [
        KnownList { template: "architectures = [\"{}\"]\n", field: "architectures", universe: all_names::<Arch>() },
        KnownList { template: "bug-knobs = [\"{}\"]\n", field: "bug-knobs", universe: all_names::<Knob>() },
        KnownList {
            template: "[[step]]\naction = \"{}\"\n",
            field: "step[1].action",
            universe: all_names::<names::Action>(),
        },
        KnownList {
            template: "[[step]]\naction = \"hugetlb-alloc\"\nregion = \"a\"\nsize = \"2M\"\nzone = \"{}\"\n",
            field: "step[1].zone",
            universe: zones(),
        },
        KnownList {
            template: "[[boot-gigantic]]\nregion = \"g\"\nsize = \"1G\"\nzone = \"{}\"\n",
            field: "boot-gigantic[1].zone",
            universe: zones(),
        },
        KnownList {
            template:
                "[[step]]\naction = \"hot-add\"\nkind = \"memory\"\nregion = \"a\"\nsize = \"1G\"\nzone = \"{}\"\n",
            field: "step[1].zone",
            universe: zones(),
        },
        KnownList {
            template: "[[step]]\naction = \"hot-add\"\nregion = \"a\"\nsize = \"1G\"\nzone = \"{}\"\n",
            field: "step[1].zone",
            universe: zones(),
        },
        KnownList {
            template: "[[step]]\naction = \"hugetlb-alloc\"\nregion = \"a\"\nsize = \"2M\"\n\
                       [[step]]\naction = \"optimize\"\nregion = \"a\"\nlayout = \"{}\"\n",
            field: "step[2].layout",
            universe: all_names::<Layout>(),
        },
        KnownList {
            template: "[[step]]\naction = \"hot-add\"\nregion = \"a\"\nsize = \"1G\"\nlayout = \"{}\"\n",
            field: "step[1].layout",
            universe: all_names::<Layout>(),
        },
        KnownList {
            template:
                "[[step]]\naction = \"hot-add\"\nkind = \"memory\"\nregion = \"a\"\nsize = \"1G\"\nbackend = \"{}\"\n",
            field: "step[1].backend",
            universe: all_names::<Backend>(),
        },
        KnownList {
            template: "[[step]]\naction = \"hot-add\"\nregion = \"a\"\nsize = \"1G\"\nbackend = \"{}\"\n",
            field: "step[1].backend",
            universe: all_names::<Backend>(),
        },
        KnownList {
            template: "[[step]]\naction = \"hot-add\"\nregion = \"a\"\nsize = \"1G\"\nkind = \"{}\"\n",
            field: "step[1].kind",
            universe: all_names::<names::HotAddKind>(),
        },
        KnownList {
            template: "architectures = [\"x86_64\"]\n[machine]\nboot-memory = \"2G\"\nboot-pmem = \"1G\"\n\
                       [[step]]\naction = \"hot-add\"\nregion = \"a\"\nsize = \"1G\"\ndevice = \"{}\"\n",
            field: "step[1].device",
            universe: all_names::<DaxDevice>(),
        },
        KnownList {
            template: "[expect]\noutcome = \"fail\"\ninvariant = \"{}\"\n",
            field: "expect.invariant",
            universe: check_names(),
        },
        KnownList {
            template: "[expect]\noutcome = \"fail\"\ninvariant = \"contents\"\nalso = [\"{}\"]\n",
            field: "expect.also",
            universe: check_names(),
        },
    ];
    for list in &lists {
        let listed = list.listed();
        let mut distinct = listed.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), listed.len(), "{} lists a name twice: {listed:?}", list.field);
        for name in &list.universe {
            assert_eq!(
                list.accepts(name),
                listed.contains(name),
                "{}: `{name}` accepted and listed disagree in {}",
                list.field,
                list.with(name)
            );
        }
        for name in &listed {
            assert!(list.universe.contains(name), "{} lists `{name}`, which names nothing", list.field);
        }
    }
}

#[test]
fn defaults_follow_what_the_file_writes() {
    // Boot memory alone: the default maximum leaves room above it.
    let s = parse("[machine]\nboot-memory = \"8G\"\n").unwrap();
    assert_eq!((s.machine.boot_memory, s.machine.slots, s.machine.max_memory), (8 << 30, 4, 9 << 30));
    let s = parse("[machine]\nboot-memory = \"1G\"\n").unwrap();
    assert_eq!(s.machine.max_memory, 8 << 30, "small machines keep the 8G default");

    // A maximum equal to boot memory means no hotplug, not a refusal about slots.
    let s = parse("[machine]\nboot-memory = \"1G\"\nmax-memory = \"1G\"\n").unwrap();
    assert_eq!((s.machine.slots, s.machine.max_memory), (0, 1 << 30));
    let s = parse("[machine]\nmax-memory = \"512M\"\n").unwrap();
    assert_eq!(s.machine.slots, 0);

    // More hot-adds than the default slots get a slot each.
    let adds: String =
        (0..6).map(|i| format!("[[step]]\naction = \"hot-add\"\nregion = \"r{i}\"\nsize = \"256M\"\n")).collect();
    assert_eq!(parse(&adds).unwrap().machine.slots, 6);

    // The default deadline leaves room for the written boot and step timeouts.
    let s = parse("boot-timeout-ms = 300000\nstep-timeout-ms = 60000\n").unwrap();
    assert_eq!(s.deadline_ms, 360_000);
    assert_eq!(parse("").unwrap().deadline_ms, DEFAULT_DEADLINE_MS);
}

#[test]
fn refusals_name_a_field_the_file_writes() {
    // Boot memory beyond any machine is refused at boot-memory, not at the
    // default max-memory.
    let e = err("[machine]\nboot-memory = \"100T\"\n");
    assert_eq!((e.line, e.field.as_str()), (2, "machine.boot-memory"), "{e}");
    // Both written and contradicting: refused at the one that must change.
    let e = err("[machine]\nboot-memory = \"1G\"\nslots = 2\nmax-memory = \"1G\"\n");
    assert_eq!((e.line, e.field.as_str()), (4, "machine.max-memory"), "{e}");
    let e = err("[machine]\nslots = 0\nmax-memory = \"4G\"\n");
    assert_eq!((e.line, e.field.as_str()), (3, "machine.max-memory"), "{e}");
    // Too much hot-added memory for the default maximum: at the step's size.
    let e = err("[machine]\nboot-memory = \"1G\"\n[[step]]\naction = \"hot-add\"\nregion = \"a\"\nsize = \"16G\"\n");
    assert_eq!((e.line, e.field.as_str()), (3, "size"), "{e}");
    // Hot-adds where the file turned hotplug off: at the step's size.
    let e = err("[machine]\nslots = 0\n[[step]]\naction = \"hot-add\"\nregion = \"a\"\nsize = \"1G\"\n");
    assert_eq!((e.line, e.field.as_str()), (3, "size"), "{e}");
}

#[test]
fn a_linux_bug_names_the_releases_that_fixed_it_and_fixed_kernels_must_pass() {
    let bug = "[expect]\noutcome = \"fail\"\ninvariant = \"accounting\"\nfixed-in = [\"7.1\", \"6.12.90\"]\n";
    let s = parse(bug).unwrap();
    let fixed_in = s.fixed_in.clone().unwrap();
    assert!(s.kernel_only_because().unwrap().contains("Linux bug fixed in 7.1, 6.12.90"));
    assert_eq!(s.firmware_only_because(), None);
    let old = LinuxRelease::parse("6.12.80+deb12-amd64").unwrap();
    let (expect, note) = fixed_in.expectation(&s.expect, old);
    assert_eq!(expect, s.expect);
    assert!(note.contains("6.12.80 predates the fix"), "{note}");
    let backported = LinuxRelease::parse("6.12.117+deb12-amd64").unwrap();
    assert_eq!(fixed_in.expectation(&s.expect, backported).0, Expect::Pass);

    let e = err("[expect]\noutcome = \"pass\"\nfixed-in = [\"7.1\"]\n");
    assert_eq!((e.line, e.field.as_str()), (3, "expect.fixed-in"), "{e}");
    let e = err("[expect]\noutcome = \"fail\"\ninvariant = \"accounting\"\nfixed-in = [\"soon\"]\n");
    assert_eq!((e.line, e.field.as_str()), (4, "expect.fixed-in"), "{e}");
    assert!(e.message.contains("major.minor"), "{e}");
    let e = err("[expect]\noutcome = \"fail\"\ninvariant = \"accounting\"\nfixed-in = [\"6.12.90\"]\n");
    assert!(e.message.contains("exactly one mainline release"), "{e}");
}

#[test]
fn a_step_names_the_refusal_it_expects_and_nothing_else() {
    let steps = r#"
description = "refusals"
[[step]]
action = "hugetlb-alloc"
region = "pool"
size = "2M"
[[step]]
action = "optimize"
region = "pool"
[[step]]
action = "optimize"
region = "pool"
"#;
    let s = parse(&format!("{steps}expect-refusal = \"already-optimized\"\n")).unwrap();
    assert_eq!(s.steps[2].expect_refusal, Some(Refusal::AlreadyOptimized));
    let s = parse(&format!("{steps}expect-failure = true\n")).unwrap();
    assert_eq!(s.steps[2].expect_refusal, Some(Refusal::InjectedFailure));
    assert_eq!(s.steps[1].expect_refusal, None);

    let e = err(&format!("{steps}expect-refusal = \"sideways\"\n"));
    assert_eq!((e.line, e.field.as_str()), (13, "step[3].expect-refusal"), "{e}");
    assert!(e.message.contains("already-optimized") && e.message.contains("injected-failure"), "{e}");
    let e = err(&format!("{steps}expect-refusal = \"busy\"\nexpect-failure = true\n"));
    assert_eq!((e.line, e.field.as_str()), (13, "step[3].expect-refusal"), "{e}");
    let e = err(&format!("{steps}expect-refusal = \"busy\"\nsweep-failures = true\n"));
    assert_eq!((e.line, e.field.as_str()), (14, "step[3].sweep-failures"), "{e}");
    assert!(e.message.contains("drop `expect-refusal`"), "{e}");
    let e = err(&format!("{steps}[[step]]\naction = \"verify\"\nexpect-refusal = \"busy\"\n"));
    assert_eq!(e.field.as_str(), "step[4].expect-refusal", "{e}");
}

#[test]
fn boot_gigantic_pages_that_cannot_fit_boot_memory_are_refused_at_load() {
    let two = "[machine]\nboot-memory = \"2G\"\n[[boot-gigantic]]\nregion = \"g\"\nsize = \"1G\"\n";
    assert!(parse(two).is_ok(), "one 1G folio fits 2G beside the firmware");
    let e = err(&format!("{two}count = 2\n"));
    assert_eq!((e.line, e.field.as_str()), (6, "boot-gigantic[1].count"), "{e}");
    assert!(e.message.contains("2 folios of 1G do not fit the 2G of boot memory on x86_64"), "{e}");
    let e = err(&format!("{two}[[boot-gigantic]]\nregion = \"h\"\nsize = \"1G\"\n"));
    assert_eq!(e.field.as_str(), "boot-gigantic[2].count", "{e}");
    let pmem =
        "[machine]\nboot-memory = \"2G\"\nboot-pmem = \"1G\"\n[[boot-gigantic]]\nregion = \"g\"\nsize = \"1G\"\n";
    assert!(err(pmem).message.contains("a folio of 1G does not fit"), "persistent memory set aside is no RAM");
    let arm = "architectures = [\"aarch64\"]\n[machine]\nboot-memory = \"1536M\"\n[[boot-gigantic]]\nregion = \"g\"\nsize = \"512M\"\n";
    assert!(parse(arm).is_ok(), "arm64 RAM from 1G: 1.5G..2G is free");
}
