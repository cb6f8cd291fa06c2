//! The spool: anonymous temporary files that file contents are appended to
//! while layers are read, so a build never holds contents in memory and never
//! extracts a tree onto the host. They disappear with the process.
//!
//! Each layer being read in parallel appends to its own [`SpoolWriter`]; a
//! [`Content`] names the file it lives in.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use crate::tree::Content;

/// Every spool file, for reading contents back.
#[derive(Debug)]
pub struct Spool {
    files: Vec<File>,
    main: SpoolWriter,
}

/// An append-only spool file, owned by one thread at a time.
#[derive(Debug)]
pub struct SpoolWriter {
    id: u32,
    file: File,
    len: u64,
}

impl SpoolWriter {
    /// Copies all of `r` to the end of this spool file.
    pub fn append(&mut self, r: &mut impl Read) -> io::Result<Content> {
        let offset = self.len;
        let mut w = io::BufWriter::with_capacity(1 << 16, &mut self.file);
        let len = io::copy(r, &mut w)?;
        w.flush()?;
        drop(w);
        self.len += len;
        Ok(Content { file: self.id, offset, len })
    }
}

impl Spool {
    pub fn new() -> io::Result<Self> {
        let file = tempfile::tempfile()?;
        Ok(Self { files: vec![file.try_clone()?], main: SpoolWriter { id: 0, file, len: 0 } })
    }

    /// A new spool file for one more writer.
    pub fn writer(&mut self) -> io::Result<SpoolWriter> {
        let file = tempfile::tempfile()?;
        self.files.push(file.try_clone()?);
        Ok(SpoolWriter { id: (self.files.len() - 1) as u32, file, len: 0 })
    }

    /// The spool's own writer (single-threaded use).
    pub fn main_writer(&mut self) -> &mut SpoolWriter {
        &mut self.main
    }

    /// Copies all of `r` into the main spool file.
    pub fn append(&mut self, r: &mut impl Read) -> io::Result<Content> {
        self.main.append(r)
    }

    /// Reads `buf.len()` bytes of `c`, starting `at` bytes into it.
    pub fn read_exact_at(&self, c: Content, buf: &mut [u8], at: u64) -> io::Result<()> {
        let file = self.files.get(c.file as usize).ok_or_else(|| io::Error::other("content names no spool file"))?;
        file.read_exact_at(buf, c.offset + at)
    }

    /// Reads one whole content (for small files and tests).
    pub fn read(&self, c: Content) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; c.len as usize];
        self.read_exact_at(c, &mut buf, 0)?;
        Ok(buf)
    }
}
