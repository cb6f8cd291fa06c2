//! The spool: an anonymous temporary file that file contents are appended to
//! while layers are read, so a build never holds contents in memory and never
//! extracts a tree onto the host. It disappears with the process.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use crate::tree::Content;

/// Append-only content store.
#[derive(Debug)]
pub struct Spool {
    file: File,
    len: u64,
}

impl Spool {
    pub fn new() -> io::Result<Self> {
        Ok(Self { file: tempfile::tempfile()?, len: 0 })
    }

    /// Copies all of `r` to the end of the spool.
    pub fn append(&mut self, r: &mut impl Read) -> io::Result<Content> {
        let offset = self.len;
        let mut w = io::BufWriter::with_capacity(1 << 16, &mut self.file);
        let len = io::copy(r, &mut w)?;
        w.flush()?;
        drop(w);
        self.len += len;
        Ok(Content { offset, len })
    }

    /// Reads a content range into `buf` (which must not be longer than the range).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Reads one whole content (for tests and small files).
    pub fn read(&self, c: Content) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; c.len as usize];
        self.read_exact_at(&mut buf, c.offset)?;
        Ok(buf)
    }
}
