//! Guest-physical memory as the host reads it.
//!
//! Walkers and the verifier take any [`GuestMemory`], so they are tested on
//! hand-built page tables in a [`SparseMemory`] without QEMU. With QEMU, boot
//! RAM is a shared memory-backend file the host maps ([`MappedMemory`]); QMP's
//! `pmemsave` (see `qmp`) is the path that works with any backend.

use std::collections::BTreeMap;
use std::fs::File;
use std::num::NonZeroUsize;
use std::ptr::NonNull;

use crate::addr::PhysAddr;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MemoryError {
    #[error("guest-physical range {pa}+{len:#x} is not backed by any memory the host can read")]
    Unbacked { pa: PhysAddr, len: usize },
}

pub trait GuestMemory {
    /// Fills `buf` from guest-physical memory at `pa`.
    fn read(&self, pa: PhysAddr, buf: &mut [u8]) -> Result<(), MemoryError>;

    fn read_u64_le(&self, pa: PhysAddr) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read(pa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_u64_be(&self, pa: PhysAddr) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read(pa, &mut b)?;
        Ok(u64::from_be_bytes(b))
    }
}

const PAGE: u64 = 4096;

/// Memory built by hand for tests: 4 KiB pages, unwritten pages are unbacked.
#[derive(Default, Clone)]
pub struct SparseMemory {
    pages: BTreeMap<u64, Box<[u8; PAGE as usize]>>,
}

impl SparseMemory {
    pub fn new() -> SparseMemory {
        SparseMemory::default()
    }

    /// Writes `bytes` at `pa`, a page at a time.
    pub fn write(&mut self, pa: PhysAddr, bytes: &[u8]) {
        let mut done = 0;
        while done < bytes.len() {
            let a = pa.0 + done as u64;
            let offset = (a % PAGE) as usize;
            let n = (PAGE as usize - offset).min(bytes.len() - done);
            let page = self.pages.entry(a / PAGE).or_insert_with(|| Box::new([0; PAGE as usize]));
            page[offset..offset + n].copy_from_slice(&bytes[done..done + n]);
            done += n;
        }
    }

    pub fn write_u64_le(&mut self, pa: PhysAddr, v: u64) {
        self.write(pa, &v.to_le_bytes());
    }

    pub fn write_u64_be(&mut self, pa: PhysAddr, v: u64) {
        self.write(pa, &v.to_be_bytes());
    }
}

impl GuestMemory for SparseMemory {
    fn read(&self, pa: PhysAddr, buf: &mut [u8]) -> Result<(), MemoryError> {
        let unbacked = MemoryError::Unbacked { pa, len: buf.len() };
        let mut done = 0;
        while done < buf.len() {
            let a = pa.0.checked_add(done as u64).ok_or(unbacked.clone())?;
            let offset = (a % PAGE) as usize;
            let n = (PAGE as usize - offset).min(buf.len() - done);
            let page = self.pages.get(&(a / PAGE)).ok_or(unbacked.clone())?;
            buf[done..done + n].copy_from_slice(&page[offset..offset + n]);
            done += n;
        }
        Ok(())
    }
}

/// One guest-physical range backed by a file the host has mapped read-only.
struct Mapping {
    base: PhysAddr,
    len: usize,
    ptr: NonNull<u8>,
}

// SAFETY: the mapping is read-only for the host and lives as long as `Mapping`;
// the guest writing it concurrently is the point (we read its current state).
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
    }
}

/// Guest RAM read through shared memory-backend files.
#[derive(Default)]
pub struct MappedMemory {
    mappings: Vec<Mapping>,
}

impl MappedMemory {
    pub fn new() -> MappedMemory {
        MappedMemory::default()
    }

    /// Maps `len` bytes of `file` (a `memory-backend-file,share=on`) from
    /// `offset` as the guest-physical range starting at `base`.
    pub fn add_at_offset(&mut self, base: PhysAddr, file: &File, offset: u64, len: usize) -> std::io::Result<()> {
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        let size = NonZeroUsize::new(len)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty mapping"))?;
        // SAFETY: a fresh shared read-only mapping of a file we opened; Rust code
        // only ever reads it through volatile copies (`volatile_copy`).
        let offset = i64::try_from(offset)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "offset too large"))?;
        let ptr = unsafe { mmap(None, size, ProtFlags::PROT_READ, MapFlags::MAP_SHARED, file, offset) }
            .map_err(std::io::Error::from)?;
        self.mappings.push(Mapping { base, len, ptr: ptr.cast() });
        Ok(())
    }

    /// Unmaps the range mapped at `base` (memory unplugged).
    pub fn remove(&mut self, base: PhysAddr) {
        self.mappings.retain(|m| m.base != base);
    }
}

impl MappedMemory {
    /// The mapping holding `pa`, if any.
    fn mapping_at(&self, pa: u64) -> Option<&Mapping> {
        self.mappings.iter().find(|m| pa >= m.base.0 && pa - m.base.0 < m.len as u64)
    }
}

impl GuestMemory for MappedMemory {
    /// Reads across adjacent mappings (the pieces of q35's boot RAM, a DIMM
    /// next to boot RAM) as one range.
    fn read(&self, pa: PhysAddr, buf: &mut [u8]) -> Result<(), MemoryError> {
        let unbacked = MemoryError::Unbacked { pa, len: buf.len() };
        let mut done = 0;
        while done < buf.len() {
            let at = pa.0.checked_add(done as u64).ok_or(unbacked.clone())?;
            let m = self.mapping_at(at).ok_or(unbacked.clone())?;
            let offset = (at - m.base.0) as usize;
            let n = (m.len - offset).min(buf.len() - done);
            // SAFETY: offset..offset+n lies inside the mapping (`mapping_at`
            // and the `min` above), which stays mapped while `self` lives.
            unsafe { volatile_copy(m.ptr.as_ptr().add(offset), &mut buf[done..done + n]) };
            done += n;
        }
        Ok(())
    }
}

/// Copies guest RAM the vCPUs may be writing at the same time. The compiler
/// may not assume the bytes stay put (which a plain copy from a `&[u8]`
/// would let it), so every load is volatile: whole aligned words where it
/// can, single bytes at the unaligned ends.
///
/// # Safety
/// `src..src + buf.len()` must be mapped and readable.
unsafe fn volatile_copy(src: *const u8, buf: &mut [u8]) {
    const WORD: usize = std::mem::size_of::<u64>();
    let (len, dst) = (buf.len(), buf.as_mut_ptr());
    let mut i = 0;
    while i < len && !(src.add(i) as usize).is_multiple_of(WORD) {
        dst.add(i).write(std::ptr::read_volatile(src.add(i)));
        i += 1;
    }
    while len - i >= WORD {
        let word = std::ptr::read_volatile(src.add(i).cast::<u64>());
        dst.add(i).cast::<u64>().write_unaligned(word);
        i += WORD;
    }
    while i < len {
        dst.add(i).write(std::ptr::read_volatile(src.add(i)));
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sparse_memory_reads_back_what_was_written_and_refuses_holes() {
        let mut m = SparseMemory::new();
        m.write_u64_be(PhysAddr(0x1ffc), 0x0102_0304_0506_0708); // straddles two pages
        assert_eq!(m.read_u64_be(PhysAddr(0x1ffc)), Ok(0x0102_0304_0506_0708));
        assert_eq!(m.read_u64_le(PhysAddr(0x1ffc)), Ok(0x0807_0605_0403_0201));
        assert_eq!(m.read_u64_le(PhysAddr(0x5000)), Err(MemoryError::Unbacked { pa: PhysAddr(0x5000), len: 8 }));
    }

    #[test]
    fn mapped_memory_sees_the_file_and_its_later_writes() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[0u8; 8192]).unwrap();
        let mut mem = MappedMemory::new();
        mem.add_at_offset(PhysAddr(0x4000_0000), &file, 4096, 4096).unwrap();

        use std::io::{Seek, SeekFrom};
        file.seek(SeekFrom::Start(0x1008)).unwrap();
        file.write_all(&0xdead_beef_u64.to_le_bytes()).unwrap();
        assert_eq!(mem.read_u64_le(PhysAddr(0x4000_0008)), Ok(0xdead_beef));
        assert!(mem.read_u64_le(PhysAddr(0x4000_0ffc)).is_err(), "crosses the end");
        assert!(mem.read_u64_le(PhysAddr(0x3fff_f000)).is_err(), "below the range");
    }

    #[test]
    fn a_read_across_two_adjacent_mappings_is_one_read() {
        let mut low = tempfile::tempfile().unwrap();
        low.write_all(&[0x11u8; 4096]).unwrap();
        let mut high = tempfile::tempfile().unwrap();
        high.write_all(&[0x22u8; 4096]).unwrap();
        let mut mem = MappedMemory::new();
        mem.add_at_offset(PhysAddr(0x1_0000), &low, 0, 4096).unwrap();
        mem.add_at_offset(PhysAddr(0x1_1000), &high, 0, 4096).unwrap();

        let mut across = [0u8; 16];
        mem.read(PhysAddr(0x1_0ff8), &mut across).unwrap();
        assert_eq!(across, [[0x11u8; 8], [0x22u8; 8]].concat()[..]);
        let mut whole = vec![0u8; 8192];
        mem.read(PhysAddr(0x1_0000), &mut whole).unwrap();
        assert!(whole[..4096].iter().all(|b| *b == 0x11) && whole[4096..].iter().all(|b| *b == 0x22));
        assert!(mem.read(PhysAddr(0x1_1ff8), &mut across).is_err(), "runs past the upper mapping");
    }

    #[test]
    fn unaligned_reads_of_every_length_copy_exactly_the_bytes_asked() {
        let mut file = tempfile::tempfile().unwrap();
        let bytes: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        file.write_all(&bytes).unwrap();
        let mut mem = MappedMemory::new();
        mem.add_at_offset(PhysAddr(0), &file, 0, 4096).unwrap();
        for start in 0..9 {
            for len in 0..33 {
                let mut buf = vec![0u8; len];
                mem.read(PhysAddr(start as u64), &mut buf).unwrap();
                assert_eq!(buf, bytes[start..start + len], "{start}+{len}");
            }
        }
    }
}
