//! What `--kernel` names among Debian's kernels (a series, or one stable
//! release of it), and where each series' packages keep their files.

use anyhow::{bail, Result};

/// A Debian kernel series the harness knows how to fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebianSeries {
    /// bookworm-security (trixie on ppc64el): `linux-image-6.12.*` holds the
    /// image, a stub System.map and the config in `boot/`.
    Debian612,
    /// sid: `linux-binary-7.2.*` holds the image, `linux-base-7.2.*` the
    /// config and System.map, in `usr/lib/modules/<release>/`.
    Debian72,
}

/// What `--kernel` names: a series' newest kernel the mirror serves
/// (`debian-6.12`), or one stable release of it (`debian-6.12.100`, to
/// check a kernel from before a fix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DebianSpec {
    pub series: DebianSeries,
    /// The stable patch level pinned, if any.
    pub point: Option<u32>,
}

impl DebianSpec {
    pub fn name(self) -> String {
        match self.point {
            Some(point) => format!("{}.{point}", self.series.name()),
            None => self.series.name().to_string(),
        }
    }

    pub fn from_name(name: &str) -> Result<DebianSpec> {
        let known = || {
            let known: Vec<&str> = DebianSeries::ALL.iter().map(|s| s.name()).collect();
            format!(
                "unknown kernel spec {name:?}: known specs are {} (each optionally .<stable release>)",
                known.join(", ")
            )
        };
        for series in DebianSeries::ALL {
            let Some(rest) = name.strip_prefix(series.name()) else { continue };
            if rest.is_empty() {
                return Ok(DebianSpec { series, point: None });
            }
            if let Some(point) = rest.strip_prefix('.').and_then(|p| p.parse().ok()) {
                return Ok(DebianSpec { series, point: Some(point) });
            }
        }
        bail!(known())
    }
}

impl DebianSeries {
    pub(super) const ALL: [DebianSeries; 2] = [DebianSeries::Debian612, DebianSeries::Debian72];

    pub fn name(self) -> &'static str {
        match self {
            DebianSeries::Debian612 => "debian-6.12",
            DebianSeries::Debian72 => "debian-7.2",
        }
    }

    /// The upstream series in package names.
    pub(super) fn series(self) -> &'static str {
        match self {
            DebianSeries::Debian612 => "6.12",
            DebianSeries::Debian72 => "7.2",
        }
    }

    /// The package holding the image.
    pub(super) fn image_kind(self) -> &'static str {
        match self {
            DebianSeries::Debian612 => "linux-image",
            DebianSeries::Debian72 => "linux-binary",
        }
    }

    /// The packages of the same version the image needs beside it (other
    /// prefixes): the one with config and System.map, and the one with the
    /// modules when `with_modules` (6.12's image package holds both).
    pub(super) fn companion_kinds(self, with_modules: bool) -> &'static [&'static str] {
        match (self, with_modules) {
            (DebianSeries::Debian612, _) => &[],
            (DebianSeries::Debian72, false) => &["linux-base"],
            (DebianSeries::Debian72, true) => &["linux-base", "linux-modules"],
        }
    }

    /// Where the unpacked packages keep their files, relative to the unpack root.
    pub(super) fn layout(self, release: &str) -> KernelLayout {
        match self {
            DebianSeries::Debian612 => KernelLayout {
                images: vec![format!("boot/vmlinuz-{release}"), format!("boot/vmlinux-{release}")],
                config: format!("boot/config-{release}"),
                system_map: format!("boot/System.map-{release}"),
                modules: format!("lib/modules/{release}"),
            },
            DebianSeries::Debian72 => {
                let dir = format!("usr/lib/modules/{release}");
                KernelLayout {
                    images: vec![format!("{dir}/vmlinuz")],
                    config: format!("{dir}/config"),
                    system_map: format!("{dir}/System.map"),
                    modules: dir,
                }
            }
        }
    }
}

/// Where an unpacked kernel's files are, relative to its unpack root.
pub(super) struct KernelLayout {
    /// The image: the first of these that exists.
    pub images: Vec<String>,
    pub config: String,
    pub system_map: String,
    /// `lib/modules/<release>`, whose `kernel/` holds the module files.
    pub modules: String,
}
