//! A writer of "newc" cpio archives, the format Linux unpacks as an
//! initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Device nodes and modes go straight into the headers, so building an
//! initramfs needs no host tools and no privileges. The archive is left
//! uncompressed: under TCG the kernel unpacks that fastest.

use std::collections::BTreeSet;

const MAGIC: &str = "070701";
/// Entry headers, names and file data all start on 4-byte boundaries.
const ALIGN: usize = 4;
/// The name of the entry that ends the archive.
pub const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InitramfsError {
    #[error("archive path {path:?} is not a relative path of plain components")]
    BadPath { path: String },
    #[error("{path} is added twice")]
    Duplicate { path: String },
    #[error("{path} needs its parent directory added first")]
    NoParent { path: String },
    #[error("{path}: {len} bytes do not fit a cpio entry (at most 4 GiB - 1)")]
    TooLarge { path: String, len: usize },
}

/// A device number, as `mknod` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceNumber {
    pub major: u32,
    pub minor: u32,
}

/// The terminal the kernel opens for init's stdin, stdout and stderr.
pub const CONSOLE: DeviceNumber = DeviceNumber { major: 5, minor: 1 };
pub const NULL: DeviceNumber = DeviceNumber { major: 1, minor: 3 };

/// An archive being written; [`Archive::finish`] ends it with the trailer.
#[derive(Debug, Default)]
pub struct Archive {
    bytes: Vec<u8>,
    paths: BTreeSet<String>,
    next_inode: u32,
}

/// What one header says besides the name and the data.
struct Header {
    mode: u32,
    nlink: u32,
    rdev: DeviceNumber,
}

impl Archive {
    pub fn new() -> Archive {
        Archive { bytes: Vec::new(), paths: BTreeSet::new(), next_inode: 1 }
    }

    /// A directory; `permissions` are the low 12 mode bits (0o755).
    pub fn directory(&mut self, path: &str, permissions: u32) -> Result<(), InitramfsError> {
        self.entry(path, Header { mode: S_IFDIR | permissions & 0o7777, nlink: 2, rdev: NO_DEVICE }, &[])
    }

    /// A regular file holding `data`.
    pub fn file(&mut self, path: &str, permissions: u32, data: &[u8]) -> Result<(), InitramfsError> {
        self.entry(path, Header { mode: S_IFREG | permissions & 0o7777, nlink: 1, rdev: NO_DEVICE }, data)
    }

    /// A symbolic link to `target` (stored as the entry's data, unterminated).
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), InitramfsError> {
        self.entry(path, Header { mode: S_IFLNK | 0o777, nlink: 1, rdev: NO_DEVICE }, target.as_bytes())
    }

    /// A character device node.
    pub fn char_device(&mut self, path: &str, permissions: u32, device: DeviceNumber) -> Result<(), InitramfsError> {
        self.entry(path, Header { mode: S_IFCHR | permissions & 0o7777, nlink: 1, rdev: device }, &[])
    }

    /// Ends the archive with the trailer entry and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.write_entry(TRAILER, Header { mode: 0, nlink: 1, rdev: NO_DEVICE }, &[], 0);
        self.bytes
    }

    fn entry(&mut self, path: &str, header: Header, data: &[u8]) -> Result<(), InitramfsError> {
        let bad = || InitramfsError::BadPath { path: path.to_string() };
        if path.is_empty() || path == TRAILER || path.contains('\0') {
            return Err(bad());
        }
        if path.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return Err(bad());
        }
        if u32::try_from(data.len()).is_err() {
            return Err(InitramfsError::TooLarge { path: path.to_string(), len: data.len() });
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            if !self.paths.contains(parent) {
                return Err(InitramfsError::NoParent { path: path.to_string() });
            }
        }
        if !self.paths.insert(path.to_string()) {
            return Err(InitramfsError::Duplicate { path: path.to_string() });
        }
        let inode = self.next_inode;
        self.next_inode += 1;
        self.write_entry(path, header, data, inode);
        Ok(())
    }

    fn write_entry(&mut self, name: &str, header: Header, data: &[u8], inode: u32) {
        // namesize counts the terminating NUL.
        let name_size = name.len() + 1;
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let fields = [
            inode,
            header.mode,
            0,
            0,
            header.nlink,
            0,
            data.len() as u32,
            0,
            0,
            header.rdev.major,
            header.rdev.minor,
            name_size as u32,
            0,
        ];
        self.bytes.extend_from_slice(MAGIC.as_bytes());
        for field in fields {
            self.bytes.extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        let len = self.bytes.len().next_multiple_of(ALIGN);
        self.bytes.resize(len, 0);
    }
}

const NO_DEVICE: DeviceNumber = DeviceNumber { major: 0, minor: 0 };

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One entry as read back.
    #[derive(Debug, PartialEq)]
    pub(crate) struct Entry {
        pub name: String,
        pub mode: u32,
        nlink: u32,
        pub rdev: (u32, u32),
        pub data: Vec<u8>,
        header_offset: usize,
        data_offset: usize,
    }

    /// A reader of our own archives, independent of the writer's code: it
    /// walks the bytes field by field as the kernel's unpacker does.
    pub(crate) fn read_back(bytes: &[u8]) -> Vec<Entry> {
        let mut at = 0;
        let mut out = Vec::new();
        loop {
            assert_eq!(&bytes[at..at + 6], b"070701", "magic at {at}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&bytes[at + 6 + 8 * i..at + 14 + 8 * i]).unwrap();
                assert!(s.bytes().all(|b| b.is_ascii_hexdigit()), "{s}");
                u32::from_str_radix(s, 16).unwrap()
            };
            let (mode, nlink, filesize, namesize) = (field(1), field(4), field(6), field(11) as usize);
            let rdev = (field(9), field(10));
            let name_at = at + 110;
            assert_eq!(bytes[name_at + namesize - 1], 0, "names are NUL-terminated");
            let name = String::from_utf8(bytes[name_at..name_at + namesize - 1].to_vec()).unwrap();
            let data_at = (name_at + namesize).next_multiple_of(4);
            assert!(bytes[name_at + namesize..data_at].iter().all(|&b| b == 0), "name padding is zeros");
            let data = bytes[data_at..data_at + filesize as usize].to_vec();
            let next = (data_at + filesize as usize).next_multiple_of(4);
            let done = name == TRAILER;
            out.push(Entry { name, mode, nlink, rdev, data, header_offset: at, data_offset: data_at });
            at = next;
            if done {
                assert_eq!(at, bytes.len(), "nothing after the trailer");
                return out;
            }
        }
    }

    #[test]
    fn entries_read_back_with_their_types_modes_devices_and_data() {
        let mut a = Archive::new();
        a.directory("bin", 0o755).unwrap();
        a.directory("dev", 0o755).unwrap();
        a.char_device("dev/console", 0o600, CONSOLE).unwrap();
        a.char_device("dev/null", 0o666, NULL).unwrap();
        a.file("bin/busybox", 0o755, b"\x7fELF odd length").unwrap();
        a.symlink("bin/sh", "busybox").unwrap();
        a.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        let entries = read_back(&a.finish());
        type Summary<'a> = (&'a str, u32, (u32, u32), &'a [u8]);
        let summary: Vec<Summary> =
            entries.iter().map(|e| (e.name.as_str(), e.mode, e.rdev, e.data.as_slice())).collect();
        assert_eq!(
            summary,
            vec![
                ("bin", 0o040755, (0, 0), &b""[..]),
                ("dev", 0o040755, (0, 0), b""),
                ("dev/console", 0o020600, (5, 1), b""),
                ("dev/null", 0o020666, (1, 3), b""),
                ("bin/busybox", 0o100755, (0, 0), b"\x7fELF odd length"),
                ("bin/sh", 0o120777, (0, 0), b"busybox"),
                ("init", 0o100755, (0, 0), b"#!/bin/sh\n"),
                (TRAILER, 0, (0, 0), b""),
            ]
        );
        assert_eq!(entries[0].nlink, 2, "a directory links to itself and its parent");
        for e in &entries {
            assert_eq!(e.header_offset % 4, 0, "{} header", e.name);
            assert_eq!(e.data_offset % 4, 0, "{} data", e.name);
        }
    }

    #[test]
    fn an_empty_archive_is_just_the_trailer() {
        let bytes = Archive::new().finish();
        assert_eq!(bytes.len() % 4, 0);
        let entries = read_back(&bytes);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].name, TRAILER);
    }

    #[test]
    fn bad_paths_duplicates_and_orphans_are_refused() {
        let mut a = Archive::new();
        for path in ["", "/init", "a//b", "../x", "bin/.", TRAILER, "nul\0"] {
            assert_eq!(a.file(path, 0o644, b""), Err(InitramfsError::BadPath { path: path.to_string() }), "{path:?}");
        }
        assert_eq!(a.symlink("bin/sh", "busybox"), Err(InitramfsError::NoParent { path: "bin/sh".into() }));
        a.directory("bin", 0o755).unwrap();
        a.symlink("bin/sh", "busybox").unwrap();
        assert_eq!(a.file("bin/sh", 0o755, b"x"), Err(InitramfsError::Duplicate { path: "bin/sh".into() }));
    }
}
