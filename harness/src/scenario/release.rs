//! Linux releases, and where a Linux bug is fixed: the mainline release
//! that first has the fix and the stable releases it was backported to, so
//! a scenario reproducing the bug knows whether the kernel it runs on must
//! show it.

use std::fmt;

use super::Expect;

/// A Linux release: `major.minor`, and the stable patch level when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxRelease {
    pub major: u32,
    pub minor: u32,
    pub patch: Option<u32>,
}

impl LinuxRelease {
    /// `"7.1"`, `"6.12.117"`, or a `uname -r` (`"6.12.117+deb12-amd64"`,
    /// `"7.3.0-rc7"`).
    pub fn parse(text: &str) -> Option<LinuxRelease> {
        let (numbers, _) = text.split_once(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or((text, ""));
        let mut parts = numbers.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = match parts.next() {
            Some(p) => Some(p.parse().ok()?),
            None => None,
        };
        Some(LinuxRelease { major, minor, patch })
    }

    fn series(self) -> (u32, u32) {
        (self.major, self.minor)
    }
}

impl fmt::Display for LinuxRelease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        match self.patch {
            Some(p) => write!(f, ".{p}"),
            None => Ok(()),
        }
    }
}

/// Where a Linux bug is fixed (`expect.fixed-in`): one mainline release
/// (`major.minor`), and stable releases (`major.minor.patch`) of older
/// series that got the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxFix {
    pub mainline: LinuxRelease,
    pub stable: Vec<LinuxRelease>,
}

impl LinuxFix {
    /// From the releases a scenario lists; why not, if they do not make one.
    pub fn new(releases: Vec<LinuxRelease>) -> Result<LinuxFix, String> {
        let (mainline, stable): (Vec<_>, Vec<_>) = releases.into_iter().partition(|r| r.patch.is_none());
        let [mainline] = mainline[..] else {
            return Err("name exactly one mainline release (major.minor, such as \"7.1\")".into());
        };
        if let Some(late) = stable.iter().find(|s| s.series() >= mainline.series()) {
            return Err(format!("{late} is not an older stable series than the mainline fix in {mainline}"));
        }
        Ok(LinuxFix { mainline, stable })
    }

    /// Whether a kernel of `release` has the fix.
    pub fn fixes(&self, release: LinuxRelease) -> bool {
        if release.series() >= self.mainline.series() {
            return true;
        }
        let backport = self.stable.iter().find(|s| s.series() == release.series());
        backport.is_some_and(|s| release.patch.unwrap_or(0) >= s.patch.unwrap_or(0))
    }

    /// What `expect` means on a kernel of `release`: as written without
    /// the fix, a pass with it; and a note saying which, for the verdict.
    pub fn expectation(&self, expect: &Expect, release: LinuxRelease) -> (Expect, String) {
        if self.fixes(release) {
            (Expect::Pass, format!("Linux {release} has the fix (in {self}): every invariant must hold"))
        } else {
            (expect.clone(), format!("Linux {release} predates the fix (in {self})"))
        }
    }
}

impl fmt::Display for LinuxFix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.mainline)?;
        for s in &self.stable {
            write!(f, ", {s}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(text: &str) -> LinuxRelease {
        LinuxRelease::parse(text).unwrap_or_else(|| panic!("{text} parses"))
    }

    #[test]
    fn releases_parse_from_versions_and_uname() {
        assert_eq!(release("7.1"), LinuxRelease { major: 7, minor: 1, patch: None });
        assert_eq!(release("6.12.117+deb12-amd64"), LinuxRelease { major: 6, minor: 12, patch: Some(117) });
        assert_eq!(release("7.3.0-rc7"), LinuxRelease { major: 7, minor: 3, patch: Some(0) });
        assert_eq!(release("7.2-rc3").patch, None);
        assert_eq!(LinuxRelease::parse("soon"), None);
        assert_eq!(LinuxRelease::parse("7"), None);
    }

    #[test]
    fn a_fix_covers_its_mainline_release_on_and_the_stable_releases_it_was_backported_to() {
        let fix = LinuxFix::new(vec![release("7.1"), release("6.12.90")]).unwrap();
        assert!(fix.fixes(release("7.1.0")));
        assert!(fix.fixes(release("7.2.13+deb14-amd64")));
        assert!(fix.fixes(release("6.12.117+deb12-amd64")));
        assert!(!fix.fixes(release("6.12.80")));
        assert!(!fix.fixes(release("6.6.100")));
        assert!(!fix.fixes(release("7.0.5")));
        assert_eq!(fix.to_string(), "7.1, 6.12.90");
        assert!(LinuxFix::new(vec![release("6.12.90")]).is_err());
        assert!(LinuxFix::new(vec![release("7.1"), release("7.2.3")]).is_err());
    }
}
