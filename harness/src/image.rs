//! The guest image on the host: where its manifest is, found through the ELF
//! symbol table. The firmware is linked at its physical load address, so a
//! symbol's value is its guest-physical address; the load segments are checked
//! to make sure that stays true.

use std::path::{Path, PathBuf};

use hvo_abi::manifest::MANIFEST_SIZE;
use object::{Object, ObjectSegment, ObjectSymbol};

use crate::addr::PhysAddr;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read guest image {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("guest image {path} is not an ELF file we can read: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("guest image {path} has no symbol {symbol}")]
    NoSymbol { path: PathBuf, symbol: &'static str },
    #[error("guest image {path}: {symbol} at {vaddr:#x} is not inside a segment loaded at its own address")]
    NotIdentityLinked { path: PathBuf, symbol: &'static str, vaddr: u64 },
}

#[derive(Clone, Debug)]
pub struct GuestImage {
    pub path: PathBuf,
    /// Guest-physical address of the manifest.
    pub manifest: PhysAddr,
}

impl GuestImage {
    pub fn load(path: &Path) -> Result<GuestImage, ImageError> {
        let data = std::fs::read(path).map_err(|source| ImageError::Read { path: path.into(), source })?;
        GuestImage::parse(path, &data)
    }

    pub fn parse(path: &Path, data: &[u8]) -> Result<GuestImage, ImageError> {
        let symbol = hvo_abi::manifest::MANIFEST_SYMBOL;
        let file =
            object::File::parse(data).map_err(|e| ImageError::Parse { path: path.into(), message: e.to_string() })?;
        let vaddr = file
            .symbols()
            .find(|s| s.name() == Ok(symbol))
            .map(|s| s.address())
            .ok_or(ImageError::NoSymbol { path: path.into(), symbol })?;
        let loaded_at_own_address = file.segments().any(|seg| {
            let start = seg.address();
            vaddr >= start && vaddr + MANIFEST_SIZE as u64 <= start + seg.size()
        });
        if !loaded_at_own_address {
            return Err(ImageError::NotIdentityLinked { path: path.into(), symbol, vaddr });
        }
        Ok(GuestImage { path: path.into(), manifest: PhysAddr(vaddr) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test binary carries a manifest symbol of its own, so the symbol
    /// lookup is tested on a real ELF file without building a guest.
    #[no_mangle]
    #[used]
    static HVO_MANIFEST: [u8; MANIFEST_SIZE] = [0; MANIFEST_SIZE];

    #[test]
    fn finds_the_manifest_symbol_in_a_real_elf() {
        let exe = std::env::current_exe().unwrap();
        let image = GuestImage::load(&exe).unwrap();
        assert_ne!(image.manifest.0, 0);
    }

    #[test]
    fn says_what_is_wrong_with_a_bad_image() {
        let err = GuestImage::parse(Path::new("x.elf"), b"not an elf").unwrap_err();
        assert!(err.to_string().contains("x.elf"), "{err}");
        let err = GuestImage::load(Path::new("/nonexistent/guest")).unwrap_err();
        assert!(matches!(err, ImageError::Read { .. }));
    }
}
