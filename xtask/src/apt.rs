//! A private apt configuration: its own sources, lists, cache, log and an
//! empty dpkg status under one directory of `target/`, passed to apt with
//! `APT_CONFIG`. The machine's sources, dpkg state and architectures are never
//! read or changed. Kernels (`kernels.rs`) and backports' QEMU
//! (`setup/backports.rs`) are both fetched through it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

pub const ARCHIVE: &str = "http://deb.debian.org/debian";
pub const SECURITY: &str = "http://deb.debian.org/debian-security";
/// The keyring Debian's archive is signed with (on Ubuntu, from the
/// `debian-archive-keyring` package).
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Bounded network waits: apt gives up on a silent server after this many
/// seconds and retries once, so a missing network is an error, not a hang.
const NETWORK: [&str; 4] = ["-o", "Acquire::http::Timeout=20", "-o", "Acquire::Retries=1"];

/// One private apt set-up, for one Debian architecture and a list of suites.
pub struct PrivateApt {
    pub dir: PathBuf,
    pub debian_arch: &'static str,
    /// (archive URL, suite), each with its `main` component.
    suites: &'static [(&'static str, &'static str)],
}

impl PrivateApt {
    pub fn new(dir: PathBuf, debian_arch: &'static str, suites: &'static [(&'static str, &'static str)]) -> PrivateApt {
        PrivateApt { dir, debian_arch, suites }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("apt.conf")
    }

    pub fn sources(&self) -> String {
        self.suites
            .iter()
            .map(|(url, suite)| {
                format!("deb [arch={} check-valid-until=no signed-by={KEYRING}] {url} {suite} main\n", self.debian_arch)
            })
            .collect()
    }

    /// apt.conf pointing every directory apt reads or writes into `dir`.
    pub fn config(&self) -> String {
        let d = self.dir.display();
        let a = self.debian_arch;
        format!(
            "Dir::Etc \"{d}/etc/\";\nDir::Etc::SourceList \"{d}/etc/sources.list\";\n\
             Dir::Etc::SourceParts \"{d}/etc/sources.list.d\";\nDir::Etc::Preferences \"{d}/etc/preferences\";\n\
             Dir::Etc::PreferencesParts \"{d}/etc/preferences.d\";\nDir::Etc::Parts \"{d}/etc/apt.conf.d\";\n\
             Dir::State \"{d}/state/\";\nDir::State::Lists \"{d}/state/lists/\";\n\
             Dir::State::status \"{d}/state/status\";\nDir::Cache \"{d}/cache/\";\nDir::Log \"{d}/log/\";\n\
             Debug::NoLocking \"true\";\nAPT::Architecture \"{a}\";\nAPT::Architectures {{ \"{a}\"; }};\n\
             Acquire::Check-Valid-Until \"false\";\nAcquire::Languages \"none\";\n\
             Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled \"false\";\nAPT::Sandbox::User \"root\";\n"
        )
    }

    fn write_config(&self) -> Result<()> {
        if !Path::new(KEYRING).exists() {
            bail!("{KEYRING} is missing: install the debian-archive-keyring package to check Debian's signatures");
        }
        for sub in ["etc/sources.list.d", "etc/preferences.d", "etc/apt.conf.d", "state/lists/partial", "cache", "log"]
        {
            fs::create_dir_all(self.dir.join(sub))?;
        }
        fs::write(self.dir.join("etc/sources.list"), self.sources())?;
        let status = self.dir.join("state/status");
        if !status.exists() {
            fs::write(status, "")?;
        }
        fs::write(self.config_path(), self.config())?;
        Ok(())
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("APT_CONFIG", self.config_path()).args(NETWORK);
        c
    }

    /// Shows the command, runs it, and fails with `what` when it fails,
    /// or when apt only warns that it could not fetch something (`apt-get
    /// update` exits 0 when every index failed to download).
    fn run(&self, mut c: Command, what: &str) -> Result<String> {
        eprintln!("running: {c:?}");
        let out = c.output().with_context(|| format!("starting {c:?}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let fetch_failures: Vec<&str> =
            stderr.lines().filter(|l| l.starts_with("W: Failed to fetch") || l.starts_with("E: ")).collect();
        if !out.status.success() || !fetch_failures.is_empty() {
            let why = if fetch_failures.is_empty() { stderr.trim().to_string() } else { fetch_failures.join("\n") };
            let status = if out.status.success() { String::new() } else { format!(" ({})", out.status) };
            bail!("{what} failed{status}; is deb.debian.org reachable?\n{why}");
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether the package indexes were downloaded before.
    pub fn has_indexes(&self) -> bool {
        self.dir.join("state/lists").read_dir().is_ok_and(|mut d| d.next().is_some())
    }

    /// Downloads the package indexes of the sources.
    pub fn update(&self) -> Result<()> {
        self.write_config()?;
        let mut c = self.command("apt-get");
        c.args(["-q", "update"]);
        self.run(c, "downloading Debian's package indexes")?;
        Ok(())
    }

    pub fn package_names(&self, prefix: &str) -> Result<Vec<String>> {
        let mut c = self.command("apt-cache");
        c.args(["pkgnames", prefix]);
        Ok(self.run(c, "listing packages")?.lines().map(str::to_string).collect())
    }

    /// `apt-get download` of `specs` (apt's `name[:arch][=version|/suite]`) into `into`.
    pub fn download(&self, specs: &[String], into: &Path) -> Result<()> {
        fs::create_dir_all(into)?;
        eprintln!("downloading {} into {}", specs.join(" "), into.display());
        let mut c = self.command("apt-get");
        c.args(["-q", "download"]).args(specs).current_dir(into);
        self.run(c, &format!("downloading {}", specs.join(" ")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_names_only_its_own_directories_and_architecture() {
        const SUITES: &[(&str, &str)] = &[(ARCHIVE, "bookworm"), (ARCHIVE, "trixie")];
        let apt = PrivateApt::new(PathBuf::from("/tmp/hvo-apt-test"), "ppc64el", SUITES);
        let config = apt.config();
        let d = apt.dir.display().to_string();
        for line in config.lines().filter(|l| l.starts_with("Dir::")) {
            assert!(line.contains(&d), "{line}");
        }
        assert!(config.contains("APT::Architectures { \"ppc64el\"; };"));
        let sources = apt.sources();
        assert_eq!(sources.lines().count(), 2);
        assert!(sources.lines().all(|l| l.starts_with("deb [arch=ppc64el ")), "{sources}");
    }
}
