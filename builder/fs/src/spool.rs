//! The spool: anonymous temporary files that file contents are appended to
//! while layers are read, so a build never holds contents in memory and never
//! extracts a tree onto the host. They disappear with the process.
//!
//! Each layer being read in parallel appends to its own [`SpoolWriter`]; a
//! [`Content`] names the file it lives in. Whole 4 KiB blocks of zeros are not
//! stored: they are recorded as holes, so a 1 GiB file of zeros costs a bitmap,
//! and the filesystem writer can keep them as holes too.
//!
//! With a [`Compression`] set, a file's contents are stored as the image will
//! hold them: cut into 128 KiB chunks, each LZ4-compressed into whole blocks
//! (zero-padded in front, as EROFS reads them) or kept plain when that saves
//! no block. The compression runs here, in the threads reading the layers, so
//! it overlaps with inflating them; [`Chunk`]s record where each one went.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use crate::tree::Content;

/// Holes are tracked per 4 KiB block (the filesystem block size).
pub const BLOCK: u64 = 4096;

/// How much of a file one compressed extent holds.
pub const CHUNK: u64 = 128 * 1024;

/// A file whose whole chunks of zeros are more than this and more than half
/// its chunks is sparse: it keeps them as holes (uncompressed, chunk-based in
/// the image). Otherwise they are compressed like data, a block each.
const MAX_ZERO_CHUNKS: usize = 64;

/// How file contents are stored in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Plain blocks, as the tar held them.
    None,
    /// LZ4, fast mode: no slower to build than plain (less to write).
    #[default]
    Lz4,
    /// LZ4 high compression (level 9): about 15% smaller, three times slower to build.
    Lz4hc,
    /// Zstandard (level 3): smaller still; the kernel decompresses it more slowly.
    Zstd,
}

impl Compression {
    /// Its name on the command line and in the layer cache.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Lz4hc => "lz4hc",
            Compression::Zstd => "zstd",
        }
    }

    /// The EROFS algorithm number (`Z_EROFS_COMPRESSION_*`).
    pub fn erofs_algorithm(self) -> Option<u8> {
        match self {
            Compression::None => None,
            Compression::Lz4 | Compression::Lz4hc => Some(0),
            Compression::Zstd => Some(3),
        }
    }

    /// Room for compressing one chunk.
    fn bound(self) -> usize {
        let n = CHUNK as usize;
        match self {
            Compression::Zstd => zstd::zstd_safe::compress_bound(n),
            _ => n + n / 255 + 16,
        }
    }

    /// Compresses `src` into `out`; returns the compressed length.
    fn compress(self, src: &[u8], out: &mut [u8]) -> io::Result<usize> {
        use lz4::block::{compress_to_buffer, CompressionMode};
        match self {
            Compression::None => Err(io::Error::other("no compression")),
            Compression::Lz4 => compress_to_buffer(src, Some(CompressionMode::DEFAULT), false, out),
            Compression::Lz4hc => {
                compress_to_buffer(src, Some(CompressionMode::HIGHCOMPRESSION(9)), false, out)
            }
            Compression::Zstd => zstd::bulk::compress_to_buffer(src, out, 3),
        }
    }

    /// Decompresses `src` into exactly `out`.
    fn decompress(self, src: &[u8], out: &mut [u8]) -> io::Result<()> {
        let n = match self {
            Compression::None => return Err(io::Error::other("no compression")),
            Compression::Lz4 | Compression::Lz4hc => {
                lz4::block::decompress_to_buffer(src, Some(out.len() as i32), out)?
            }
            Compression::Zstd => zstd::bulk::decompress_to_buffer(src, out)?,
        };
        if n != out.len() {
            return Err(io::Error::other("a spooled chunk did not decompress"));
        }
        Ok(())
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "lz4hc" => Ok(Compression::Lz4hc),
            "zstd" => Ok(Compression::Zstd),
            _ => Err(format!(
                "unknown compression {s:?} (none, lz4, lz4hc or zstd)"
            )),
        }
    }
}

/// One stored 128 KiB (or final, shorter) piece of a compressed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Where its blocks start in the spool file.
    pub at: u64,
    /// Whole blocks stored.
    pub blocks: u16,
    /// Compressed bytes at the end of those blocks; 0 when the chunk is stored plain.
    pub packed_len: u32,
}

/// Every spool file, for reading contents back.
#[derive(Debug)]
pub struct Spool {
    files: Vec<File>,
    holes: Vec<Vec<Vec<u64>>>,
    packs: Vec<Vec<Vec<Chunk>>>,
    main: SpoolWriter,
    compression: Compression,
}

/// An append-only spool file, owned by one thread at a time.
#[derive(Debug)]
pub struct SpoolWriter {
    id: u32,
    file: File,
    len: u64,
    holes: Vec<Vec<u64>>,
    packs: Vec<Vec<Chunk>>,
    compression: Compression,
}

fn is_hole(map: &[u64], block: u64) -> bool {
    map.get((block / 64) as usize)
        .is_some_and(|w| w & (1 << (block % 64)) != 0)
}

impl SpoolWriter {
    /// The spool file number its contents name.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its hole maps, as contents index them.
    pub fn holes(&self) -> &[Vec<u64>] {
        &self.holes
    }

    /// Its compressed chunk tables, as contents index them.
    pub fn packs(&self) -> &[Vec<Chunk>] {
        &self.packs
    }

    /// Copies all of `r` to the end of this spool file: compressed when the
    /// spool compresses, else leaving out whole blocks of zeros.
    pub fn append(&mut self, r: &mut impl Read) -> io::Result<Content> {
        if self.compression == Compression::None {
            self.append_plain(r)
        } else {
            self.append_packed(r)
        }
    }

    /// Stores `r` uncompressed; whole blocks of zeros become holes.
    fn append_plain(&mut self, r: &mut impl Read) -> io::Result<Content> {
        let offset = self.len;
        let mut w = io::BufWriter::with_capacity(1 << 16, &mut self.file);
        let mut buf = vec![0u8; BLOCK as usize];
        let (mut len, mut stored, mut block) = (0u64, 0u64, 0u64);
        let mut map: Vec<u64> = Vec::new();
        loop {
            let n = read_full(r, &mut buf)?;
            if n == 0 {
                break;
            }
            if n == buf.len() && buf.iter().all(|&b| b == 0) {
                set_hole(&mut map, block);
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
            packed: 0,
        })
    }

    /// Stores `r` as compressed chunks. A file where nothing compressed is
    /// kept plain (its chunks are contiguous, so it reads as plain data), and
    /// a sparse one is expanded back to plain data with holes.
    fn append_packed(&mut self, r: &mut impl Read) -> io::Result<Content> {
        let algo = self.compression;
        let mut buf = vec![0u8; CHUNK as usize];
        let mut out = vec![0u8; algo.bound()];
        let zeros = [0u8; BLOCK as usize];
        let start = self.len;
        // `None` marks a whole chunk of zeros, not stored (yet).
        let mut chunks: Vec<Option<Chunk>> = Vec::new();
        let mut len = 0u64;
        let mut w = io::BufWriter::with_capacity(1 << 17, &mut self.file);
        loop {
            let n = read_full(r, &mut buf)?;
            if n == 0 {
                break;
            }
            let data = &buf[..n];
            let blocks = (n as u64).div_ceil(BLOCK);
            len += n as u64;
            if n as u64 == CHUNK && data.iter().all(|&b| b == 0) {
                chunks.push(None);
                continue;
            }
            let packed = if blocks >= 2 {
                algo.compress(data, &mut out)?
            } else {
                usize::MAX
            };
            let at = self.len;
            let chunk = if (packed as u64).div_ceil(BLOCK) < blocks {
                let stored = (packed as u64).div_ceil(BLOCK);
                let pad = (stored * BLOCK) as usize - packed;
                w.write_all(&zeros[..pad])?;
                w.write_all(&out[..packed])?;
                self.len += stored * BLOCK;
                Chunk {
                    at,
                    blocks: stored as u16,
                    packed_len: packed as u32,
                }
            } else {
                w.write_all(data)?;
                w.write_all(&zeros[..(blocks * BLOCK) as usize - n])?;
                self.len += blocks * BLOCK;
                Chunk {
                    at,
                    blocks: blocks as u16,
                    packed_len: 0,
                }
            };
            chunks.push(Some(chunk));
            if (n as u64) < CHUNK {
                break;
            }
        }
        let zero_chunks = chunks.iter().filter(|c| c.is_none()).count();
        let compressed = chunks.iter().flatten().any(|c| c.packed_len > 0);
        let sparse = zero_chunks > MAX_ZERO_CHUNKS && zero_chunks * 2 > chunks.len();
        if !compressed || sparse {
            w.flush()?;
            drop(w);
            return if compressed {
                self.expand(&chunks, len)
            } else {
                Ok(self.plain_content(start, len, &chunks))
            };
        }
        // A few chunks of zeros: compressed like any data (one block each).
        if zero_chunks > 0 {
            buf.fill(0);
            let packed = algo.compress(&buf, &mut out)?;
            let stored = (packed as u64).div_ceil(BLOCK);
            for slot in chunks.iter_mut().filter(|c| c.is_none()) {
                let pad = (stored * BLOCK) as usize - packed;
                w.write_all(&zeros[..pad])?;
                w.write_all(&out[..packed])?;
                *slot = Some(Chunk {
                    at: self.len,
                    blocks: stored as u16,
                    packed_len: packed as u32,
                });
                self.len += stored * BLOCK;
            }
        }
        w.flush()?;
        drop(w);
        self.packs.push(chunks.into_iter().flatten().collect());
        Ok(Content {
            file: self.id,
            offset: start,
            len,
            holes: 0,
            packed: self.packs.len() as u32,
        })
    }

    /// Plain chunks lie back to back from `start`; chunks of zeros are holes.
    fn plain_content(&mut self, start: u64, len: u64, chunks: &[Option<Chunk>]) -> Content {
        let per_chunk = CHUNK / BLOCK;
        let mut map: Vec<u64> = Vec::new();
        for (i, _) in chunks.iter().enumerate().filter(|(_, c)| c.is_none()) {
            for block in i as u64 * per_chunk..(i as u64 + 1) * per_chunk {
                set_hole(&mut map, block);
            }
        }
        let holes = if map.is_empty() {
            0
        } else {
            self.holes.push(map);
            self.holes.len() as u32
        };
        Content {
            file: self.id,
            offset: start,
            len,
            holes,
            packed: 0,
        }
    }

    /// Rewrites a sparse file's chunks as plain data after them, the zero
    /// chunks as holes.
    fn expand(&mut self, chunks: &[Option<Chunk>], len: u64) -> io::Result<Content> {
        let start = self.len;
        let mut data = vec![0u8; CHUNK as usize];
        let mut stored = Vec::new();
        for (i, slot) in chunks.iter().enumerate() {
            let Some(c) = slot else { continue };
            let n = (len - i as u64 * CHUNK).min(CHUNK) as usize;
            stored.resize(c.blocks as usize * BLOCK as usize, 0);
            self.file.read_exact_at(&mut stored, c.at)?;
            if c.packed_len == 0 {
                data[..n].copy_from_slice(&stored[..n]);
            } else {
                let src = &stored[stored.len() - c.packed_len as usize..];
                self.compression.decompress(src, &mut data[..n])?;
            }
            self.file.write_all(&data[..n])?;
            self.len += n as u64;
        }
        Ok(self.plain_content(start, len, chunks))
    }
}

fn set_hole(map: &mut Vec<u64>, block: u64) {
    let word = (block / 64) as usize;
    if map.len() <= word {
        map.resize(word + 1, 0);
    }
    map[word] |= 1 << (block % 64);
}

/// Reads until `buf` is full or the reader ends.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl Spool {
    pub fn new() -> io::Result<Self> {
        let file = tempfile::tempfile()?;
        Ok(Self {
            files: vec![file.try_clone()?],
            holes: vec![Vec::new()],
            packs: vec![Vec::new()],
            main: SpoolWriter {
                id: 0,
                file,
                len: 0,
                holes: Vec::new(),
                packs: Vec::new(),
                compression: Compression::None,
            },
            compression: Compression::None,
        })
    }

    /// A spool that stores file contents compressed as `c` says.
    pub fn with_compression(c: Compression) -> io::Result<Self> {
        let mut s = Self::new()?;
        s.compression = c;
        s.main.compression = c;
        Ok(s)
    }

    /// A new spool file for one more writer; give it back with [`adopt`](Self::adopt).
    pub fn writer(&mut self) -> io::Result<SpoolWriter> {
        self.writer_on(tempfile::tempfile()?)
    }

    /// A writer appending to `file` (empty, open for reading and writing),
    /// for a spool file to be kept after the build.
    pub fn writer_on(&mut self, file: File) -> io::Result<SpoolWriter> {
        self.files.push(file.try_clone()?);
        self.holes.push(Vec::new());
        self.packs.push(Vec::new());
        Ok(SpoolWriter {
            id: (self.files.len() - 1) as u32,
            file,
            len: 0,
            holes: Vec::new(),
            packs: Vec::new(),
            compression: self.compression,
        })
    }

    /// How it stores contents.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Takes back a writer's hole maps once it is done.
    pub fn adopt(&mut self, w: SpoolWriter) {
        self.holes[w.id as usize] = w.holes;
        self.packs[w.id as usize] = w.packs;
    }

    /// The number the next spool file added will have.
    pub fn next_id(&self) -> u32 {
        self.files.len() as u32
    }

    /// Adds a finished spool file kept from an earlier build, with its tables;
    /// returns the number its contents must name.
    pub fn add_stored(&mut self, file: File, holes: Vec<Vec<u64>>, packs: Vec<Vec<Chunk>>) -> u32 {
        self.files.push(file);
        self.holes.push(holes);
        self.packs.push(packs);
        (self.files.len() - 1) as u32
    }

    /// A compressed content's chunks, in file order; empty for plain content.
    pub fn chunks(&self, c: &Content) -> &[Chunk] {
        if c.packed == 0 {
            return &[];
        }
        let tables = if c.file == 0 {
            &self.main.packs
        } else {
            &self.packs[c.file as usize]
        };
        tables
            .get(c.packed as usize - 1)
            .map_or(&[], |t| t.as_slice())
    }

    /// Reads `buf.len()` raw spool bytes at `at` in `c`'s spool file.
    pub fn read_raw_at(&self, c: &Content, buf: &mut [u8], at: u64) -> io::Result<()> {
        let file = self
            .files
            .get(c.file as usize)
            .ok_or_else(|| io::Error::other("content names no spool file"))?;
        file.read_exact_at(buf, at)
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
        self.read_raw_at(c, buf, c.offset + at)
    }

    /// Writes `c`'s logical bytes (holes as zeros) to `out`, reading runs of
    /// stored blocks up to 1 MiB at a time.
    pub fn copy_to(&self, c: &Content, out: &mut impl Write) -> io::Result<()> {
        const RUN: u64 = 256; // blocks per read
        if c.packed != 0 {
            return self.unpack_to(c, out);
        }
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

    /// Decompresses a compressed content's chunks to `out`.
    fn unpack_to(&self, c: &Content, out: &mut impl Write) -> io::Result<()> {
        let mut stored = Vec::new();
        let mut data = vec![0u8; CHUNK as usize];
        for (i, chunk) in self.chunks(c).iter().enumerate() {
            let n = c.len.saturating_sub(i as u64 * CHUNK).min(CHUNK) as usize;
            stored.resize(usize::from(chunk.blocks) * BLOCK as usize, 0);
            self.read_raw_at(c, &mut stored, chunk.at)?;
            if chunk.packed_len == 0 {
                out.write_all(&stored[..n])?;
                continue;
            }
            let src = &stored[stored.len() - chunk.packed_len as usize..];
            self.compression.decompress(src, &mut data[..n])?;
            out.write_all(&data[..n])?;
        }
        Ok(())
    }

    /// Writes a compressed content's stored blocks, as the image holds them,
    /// reading contiguous chunks up to 1 MiB at a time.
    pub fn copy_packed_to(&self, c: &Content, out: &mut impl Write) -> io::Result<()> {
        const RUN: u64 = 1 << 20;
        let chunks = self.chunks(c);
        let mut buf = Vec::new();
        let mut i = 0;
        while i < chunks.len() {
            let (at, mut len) = (chunks[i].at, u64::from(chunks[i].blocks) * BLOCK);
            i += 1;
            while i < chunks.len() && chunks[i].at == at + len && len < RUN {
                len += u64::from(chunks[i].blocks) * BLOCK;
                i += 1;
            }
            buf.resize(len as usize, 0);
            self.read_raw_at(c, &mut buf, at)?;
            out.write_all(&buf)?;
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

    #[test]
    fn compressed_contents_read_back_and_keep_their_chunk_table() {
        for c in [Compression::Lz4, Compression::Lz4hc, Compression::Zstd] {
            packs_and_reads_back(c);
        }
    }

    fn packs_and_reads_back(compression: Compression) {
        let mut s = Spool::with_compression(compression).unwrap();
        // Chunk 0 compresses, chunk 1 does not, chunk 2 is zeros, then a tail.
        let mut data: Vec<u8> = (0..CHUNK).map(|i| (i % 7) as u8).collect();
        let mut x = 1u32;
        data.extend((0..CHUNK).map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        }));
        data.extend(std::iter::repeat_n(0u8, CHUNK as usize));
        data.extend(b"tail".iter().copied());
        let c = s.append(&mut &data[..]).unwrap();
        assert_ne!(c.packed, 0);
        let chunks = s.chunks(&c).to_vec();
        assert_eq!(chunks.len(), 4);
        assert!(chunks[0].packed_len > 0 && chunks[0].blocks < 32);
        assert_eq!((chunks[1].packed_len, chunks[1].blocks), (0, 32));
        assert!(chunks[2].packed_len > 0 && chunks[2].blocks == 1);
        assert_eq!((chunks[3].packed_len, chunks[3].blocks), (0, 1));
        assert_eq!(s.read(c).unwrap(), data);
        // Nothing compressible: stored plain, as an uncompressed spool would.
        let noise = data[CHUNK as usize..2 * CHUNK as usize].to_vec();
        let c = s.append(&mut &noise[..]).unwrap();
        assert_eq!((c.packed, c.holes), (0, 0));
        assert_eq!(s.read(c).unwrap(), noise);
    }
}
