//! Ctrl-C during a parallel run: every QEMU stops, every run directory goes,
//! and the command says it was interrupted. Needs QEMU (`cargo xtask setup`).

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The run directories of the QEMUs `parent` started (named in their command lines).
fn run_dirs_of(parent: u32) -> HashSet<PathBuf> {
    let mut dirs = HashSet::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:")).map(str::trim);
        if ppid != Some(parent.to_string().as_str()) {
            continue;
        }
        let cmdline = String::from_utf8_lossy(&std::fs::read(entry.path().join("cmdline")).unwrap_or_default())
            .replace('\0', " ");
        if let Some(at) = cmdline.find("mem-path=") {
            let path: String = cmdline[at + 9..].chars().take_while(|c| *c != ',' && *c != ' ').collect();
            if let Some(dir) = PathBuf::from(path).parent() {
                dirs.insert(dir.to_path_buf());
            }
        }
    }
    dirs
}

fn processes_naming(dir: &std::path::Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect()
}

#[test]
fn ctrl_c_during_a_parallel_run_stops_every_qemu_and_leaves_nothing() {
    interrupt_a_parallel_run("-INT");
}

#[test]
fn sigterm_during_a_parallel_run_stops_every_qemu_and_leaves_nothing() {
    interrupt_a_parallel_run("-TERM");
}

fn interrupt_a_parallel_run(signal: &str) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["run-scenarios", "-j", "2", "scenarios/scale-dax.toml", "scenarios/savings.toml"])
        .current_dir(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("xtask starts");

    // Wait until scenarios are running (their private directories exist).
    let started = Instant::now();
    let running: HashSet<PathBuf> = loop {
        let now = run_dirs_of(child.id());
        if now.len() >= 2 || started.elapsed() > Duration::from_secs(300) {
            break now;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!running.is_empty(), "no scenario started");
    std::thread::sleep(Duration::from_millis(300));
    let status = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(status.success());

    let interrupted = Instant::now();
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(interrupted.elapsed() < Duration::from_secs(20), "xtask still runs 20 s after {signal}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(exit.code(), Some(130), "{exit:?}");
    for dir in &running {
        assert!(!dir.exists(), "{} was left behind", dir.display());
        assert_eq!(processes_naming(dir), Vec::<String>::new(), "processes left for {}", dir.display());
    }
}
