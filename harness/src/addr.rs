//! Address types of the host's view of a guest. They are the harness's own,
//! not the guest's: the host is an independent oracle.

use std::fmt;

/// A guest-physical address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PhysAddr(pub u64);

/// A guest-virtual address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VirtAddr(pub u64);

impl PhysAddr {
    pub fn checked_add(self, bytes: u64) -> Option<PhysAddr> {
        self.0.checked_add(bytes).map(PhysAddr)
    }
}

/// A page frame number: a physical address counted in base pages. The page
/// size is not part of it, so every conversion to or from bytes names it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pfn(pub u64);

impl Pfn {
    /// The frame holding `pa`, with pages of `page` bytes.
    pub fn containing(pa: PhysAddr, page: u64) -> Pfn {
        Pfn(pa.0 / page)
    }

    /// The frame's first byte, with pages of `page` bytes.
    pub fn addr(self, page: u64) -> PhysAddr {
        PhysAddr(self.0 * page)
    }
}

/// The frame `pages` frames on.
impl std::ops::Add<u64> for Pfn {
    type Output = Pfn;
    fn add(self, pages: u64) -> Pfn {
        Pfn(self.0 + pages)
    }
}

/// Debug names the kind ("PA 0x1000"); Display is the bare hex number
/// messages print.
macro_rules! hex_formats {
    ($($ty:ident: $kind:literal),*) => {$(
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($kind, " {:#x}"), self.0)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    )*};
}

hex_formats!(PhysAddr: "PA", VirtAddr: "VA", Pfn: "pfn");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pfns_convert_with_the_page_size_they_are_given() {
        assert_eq!(Pfn::containing(PhysAddr(0x1_2345), 4096), Pfn(0x12));
        assert_eq!(Pfn::containing(PhysAddr(0x1_2345), 0x1_0000), Pfn(1));
        assert_eq!(Pfn(3).addr(0x1_0000), PhysAddr(0x3_0000));
        assert_eq!(Pfn(3) + 2, Pfn(5));
        assert_eq!(format!("{:?}", Pfn(5)), "pfn 0x5");
        assert_eq!(Pfn(0x100200).to_string(), "0x100200");
    }
}
