//! The only code the hvo-harness guest and host share: the manifest the guest
//! publishes in its memory, the update log it points at, and the line
//! protocol spoken on its console.
//!
//! Nothing about page tables lives here: the host's walker and verifier are an
//! independent oracle and must not reuse the guest's understanding of them.
#![cfg_attr(not(test), no_std)]

pub mod manifest;
pub mod model;
pub mod protocol;
pub mod refusal;
pub mod update_log;

/// The architectures a guest can be built for. The discriminant is what the
/// manifest stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Arch {
    X86_64 = 1,
    Aarch64 = 2,
    Ppc64le = 3,
    /// ppc64le with 64 KiB base pages (CONFIG_PPC_64K_PAGES), Linux's default there.
    Ppc64le64k = 4,
}

impl Arch {
    pub const ALL: [Arch; 4] = [Arch::X86_64, Arch::Aarch64, Arch::Ppc64le, Arch::Ppc64le64k];

    /// The name used on the console, in scenario files and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
            Arch::Ppc64le => "ppc64le",
            Arch::Ppc64le64k => "ppc64le-64k",
        }
    }

    pub fn from_name(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Every name, for error messages: "x86_64, aarch64, ...".
    pub fn known_names() -> impl core::fmt::Display {
        struct Names;
        impl core::fmt::Display for Names {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                for (i, a) in Arch::ALL.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(a.name())?;
                }
                Ok(())
            }
        }
        Names
    }

    pub const fn from_raw(raw: u32) -> Option<Arch> {
        match raw {
            1 => Some(Arch::X86_64),
            2 => Some(Arch::Aarch64),
            3 => Some(Arch::Ppc64le),
            4 => Some(Arch::Ppc64le64k),
            _ => None,
        }
    }
}

impl core::fmt::Display for Arch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}
