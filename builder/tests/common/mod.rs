//! Builds crafted tar layers for the filesystem tests.
#![allow(dead_code)]

use tar::{EntryType, Header};

/// A tar layer being written, with fixed ownership and mtime unless asked.
pub struct TarLayer(tar::Builder<Vec<u8>>);

impl Default for TarLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl TarLayer {
    pub fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }

    fn header(et: EntryType, mode: u32, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(et);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        h
    }

    pub fn file(mut self, path: &str, mode: u32, data: &[u8]) -> Self {
        let mut h = Self::header(EntryType::Regular, mode, data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn owned_file(mut self, path: &str, uid: u64, gid: u64, data: &[u8]) -> Self {
        let mut h = Self::header(EntryType::Regular, 0o640, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = Self::header(EntryType::Directory, mode, 0);
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    pub fn link(mut self, et: EntryType, path: &str, target: &str) -> Self {
        let mut h = Self::header(et, 0o777, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn special(mut self, et: EntryType, path: &str, major: u32, minor: u32) -> Self {
        let mut h = Self::header(et, 0o644, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    /// A file carrying one extended attribute as a PAX `SCHILY.xattr.` record.
    pub fn xattr_file(mut self, path: &str, name: &str, value: &[u8], data: &[u8]) -> Self {
        let key = format!("SCHILY.xattr.{name}");
        self.0
            .append_pax_extensions([(key.as_str(), value)])
            .unwrap();
        self.file_inner(path, data)
    }

    fn file_inner(mut self, path: &str, data: &[u8]) -> Self {
        let mut h = Self::header(EntryType::Regular, 0o644, data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// Fails the test unless `tool` runs (`--version` or `-V`): it is an oracle.
pub fn need(tool: &str, package: &str) {
    let runs = |flag: &str| {
        std::process::Command::new(tool)
            .arg(flag)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(
        runs("--version") || runs("-V"),
        "{tool} is missing: apt-get install {package} (it is this test's oracle)"
    );
}
