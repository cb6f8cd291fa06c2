//! The spool: anonymous temporary files that file contents are appended to
//! while layers are read, so a build never holds contents in memory and never
//! extracts a tree onto the host. They disappear with the process.
//!
//! Each layer being read in parallel appends to its own [`SpoolWriter`]; a
//! [`Content`] names the file it lives in. Whole 4 KiB blocks of zeros are not
//! stored: they are recorded as holes, so a 1 GiB file of zeros costs a bitmap,
//! and the filesystem writer can keep them as holes too.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use crate::tree::Content;

/// Holes are tracked per 4 KiB block (the filesystem block size).
pub const BLOCK: u64 = 4096;

/// Every spool file, for reading contents back.
#[derive(Debug)]
pub struct Spool {
    files: Vec<File>,
    holes: Vec<Vec<Vec<u64>>>,
    main: SpoolWriter,
}

/// An append-only spool file, owned by one thread at a time.
#[derive(Debug)]
pub struct SpoolWriter {
    id: u32,
    file: File,
    len: u64,
    holes: Vec<Vec<u64>>,
}

fn is_hole(map: &[u64], block: u64) -> bool {
    map.get((block / 64) as usize)
        .is_some_and(|w| w & (1 << (block % 64)) != 0)
}

impl SpoolWriter {
    /// Copies all of `r` to the end of this spool file, leaving out whole
    /// blocks of zeros.
    pub fn append(&mut self, r: &mut impl Read) -> io::Result<Content> {
        let offset = self.len;
        let mut w = io::BufWriter::with_capacity(1 << 16, &mut self.file);
        let mut buf = vec![0u8; BLOCK as usize];
        let (mut len, mut stored, mut block) = (0u64, 0u64, 0u64);
        let mut map: Vec<u64> = Vec::new();
        loop {
            let mut n = 0;
            while n < buf.len() {
                match r.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if n == 0 {
                break;
            }
            if n == buf.len() && buf.iter().all(|&b| b == 0) {
                let word = (block / 64) as usize;
                if map.len() <= word {
                    map.resize(word + 1, 0);
                }
                map[word] |= 1 << (block % 64);
            } else {
                w.write_all(&buf[..n])?;
                stored += n as u64;
            }
            len += n as u64;
            block += 1;
            if n < buf.len() {
                break;
            }
        }
        w.flush()?;
        drop(w);
        self.len += stored;
        let holes = if map.is_empty() {
            0
        } else {
            self.holes.push(map);
            self.holes.len() as u32
        };
        Ok(Content {
            file: self.id,
            offset,
            len,
            holes,
        })
    }
}

impl Spool {
    pub fn new() -> io::Result<Self> {
        let file = tempfile::tempfile()?;
        Ok(Self {
            files: vec![file.try_clone()?],
            holes: vec![Vec::new()],
            main: SpoolWriter {
                id: 0,
                file,
                len: 0,
                holes: Vec::new(),
            },
        })
    }

    /// A new spool file for one more writer; give it back with [`adopt`](Self::adopt).
    pub fn writer(&mut self) -> io::Result<SpoolWriter> {
        let file = tempfile::tempfile()?;
        self.files.push(file.try_clone()?);
        self.holes.push(Vec::new());
        Ok(SpoolWriter {
            id: (self.files.len() - 1) as u32,
            file,
            len: 0,
            holes: Vec::new(),
        })
    }

    /// Takes back a writer's hole maps once it is done.
    pub fn adopt(&mut self, w: SpoolWriter) {
        self.holes[w.id as usize] = w.holes;
    }

    /// The spool's own writer (single-threaded use).
    pub fn main_writer(&mut self) -> &mut SpoolWriter {
        &mut self.main
    }

    /// Copies all of `r` into the main spool file.
    pub fn append(&mut self, r: &mut impl Read) -> io::Result<Content> {
        self.main.append(r)
    }

    fn hole_map(&self, c: &Content) -> &[u64] {
        if c.holes == 0 {
            return &[];
        }
        let tables = if c.file == 0 {
            &self.main.holes
        } else {
            &self.holes[c.file as usize]
        };
        tables
            .get(c.holes as usize - 1)
            .map_or(&[], |m| m.as_slice())
    }

    /// Whether logical block `block` of `c` is a hole.
    pub fn is_hole(&self, c: &Content, block: u64) -> bool {
        is_hole(self.hole_map(c), block)
    }

    /// How many of `c`'s blocks are holes.
    pub fn hole_count(&self, c: &Content) -> u64 {
        self.hole_map(c)
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Reads the stored (non-hole) bytes of `c` starting `at` bytes into them.
    pub fn read_stored_at(&self, c: &Content, buf: &mut [u8], at: u64) -> io::Result<()> {
        let file = self
            .files
            .get(c.file as usize)
            .ok_or_else(|| io::Error::other("content names no spool file"))?;
        file.read_exact_at(buf, c.offset + at)
    }

    /// Writes `c`'s logical bytes (holes as zeros) to `out`, reading runs of
    /// stored blocks up to 1 MiB at a time.
    pub fn copy_to(&self, c: &Content, out: &mut impl Write) -> io::Result<()> {
        const RUN: u64 = 256; // blocks per read
        let mut buf = vec![0u8; (RUN * BLOCK).min(c.len.max(1)) as usize];
        let (mut pos, mut stored) = (0u64, 0u64);
        let mut block = 0;
        while pos < c.len {
            let hole = self.is_hole(c, block);
            // The run of blocks of the same kind starting here.
            let mut blocks = 1;
            while blocks < RUN
                && pos + blocks * BLOCK < c.len
                && self.is_hole(c, block + blocks) == hole
            {
                blocks += 1;
            }
            let n = (c.len - pos).min(blocks * BLOCK) as usize;
            if hole {
                buf[..n].fill(0);
            } else {
                self.read_stored_at(c, &mut buf[..n], stored)?;
                stored += n as u64;
            }
            out.write_all(&buf[..n])?;
            pos += n as u64;
            block += blocks;
        }
        Ok(())
    }

    /// Reads one whole content, holes as zeros (for small files and tests).
    pub fn read(&self, c: Content) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(c.len as usize);
        self.copy_to(&c, &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_become_holes_and_read_back_as_zeros() {
        let mut s = Spool::new().unwrap();
        let mut data = vec![0u8; 10 * BLOCK as usize + 100];
        data[BLOCK as usize + 5] = 7; // block 1 has data
        data[10 * BLOCK as usize + 3] = 9; // the partial tail has data
        let c = s.append(&mut &data[..]).unwrap();
        assert_eq!(c.len, data.len() as u64);
        assert_eq!(s.hole_count(&c), 9);
        assert!(s.is_hole(&c, 0) && !s.is_hole(&c, 1) && !s.is_hole(&c, 10));
        assert_eq!(s.read(c).unwrap(), data);
        let dense = s.append(&mut &b"no holes here"[..]).unwrap();
        assert_eq!(
            (dense.holes, s.read(dense).unwrap()),
            (0, b"no holes here".to_vec())
        );
    }
}
