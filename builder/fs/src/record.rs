//! A layer once read, kept for the next build: its ops and the tables of its
//! spool file (hole maps, compressed chunk tables), as compact bytes.
//!
//! A rebuild where only the top layer changed loads the lower layers from
//! these records and their spool files instead of inflating and parsing them
//! again. Records come from disk, so [`decode`] checks every length and every
//! reference into the spool file; anything wrong is an error (the caller then
//! reads the layer afresh), never a panic or a read outside the file.

use std::collections::BTreeMap;

use crate::layer::{Op, OpAt};
use crate::spool::{Chunk, BLOCK};
use crate::tree::{Content, Kind, Meta, Node};

const MAGIC: &[u8; 8] = b"HYPLAYR1";

/// A decoded record: the ops (contents pointing at spool file `file`) and
/// that file's tables.
#[derive(Debug)]
pub struct Record {
    pub ops: Vec<OpAt>,
    pub holes: Vec<Vec<u64>>,
    pub packs: Vec<Vec<Chunk>>,
}

/// Why a record was refused.
#[derive(Debug, thiserror::Error)]
#[error("layer record: {0}")]
pub struct RecordError(&'static str);

/// Encodes a layer's ops and its spool file's tables; `spool_len` is the
/// spool file's length, checked again on load.
pub fn encode(
    ops: &[OpAt],
    holes: &[Vec<u64>],
    packs: &[Vec<Chunk>],
    spool_len: u64,
) -> Result<Vec<u8>, RecordError> {
    let mut w = Vec::with_capacity(64 * ops.len() + 64);
    w.extend_from_slice(MAGIC);
    w.extend_from_slice(&spool_len.to_le_bytes());
    put_u32(&mut w, ops.len());
    for op in ops {
        put_bytes(&mut w, &op.path);
        match &op.op {
            Op::RootMeta(meta) => {
                w.push(0);
                put_meta(&mut w, meta);
            }
            Op::Opaque { parents } => {
                w.push(1);
                put_list(&mut w, parents);
            }
            Op::Whiteout { parents, name } => {
                w.push(2);
                put_list(&mut w, parents);
                put_bytes(&mut w, name);
            }
            Op::Dir {
                parents,
                name,
                meta,
            } => {
                w.push(3);
                put_list(&mut w, parents);
                put_bytes(&mut w, name);
                put_meta(&mut w, meta);
            }
            Op::Node {
                parents,
                name,
                node,
            } => {
                w.push(4);
                put_list(&mut w, parents);
                put_bytes(&mut w, name);
                put_meta(&mut w, &node.meta);
                put_kind(&mut w, &node.kind)?;
            }
            Op::Hardlink {
                parents,
                name,
                target,
            } => {
                w.push(5);
                put_list(&mut w, parents);
                put_bytes(&mut w, name);
                put_bytes(&mut w, target);
            }
        }
    }
    put_u32(&mut w, holes.len());
    for map in holes {
        put_u32(&mut w, map.len());
        for word in map {
            w.extend_from_slice(&word.to_le_bytes());
        }
    }
    put_u32(&mut w, packs.len());
    for table in packs {
        put_u32(&mut w, table.len());
        for c in table {
            w.extend_from_slice(&c.at.to_le_bytes());
            w.extend_from_slice(&c.blocks.to_le_bytes());
            w.extend_from_slice(&c.packed_len.to_le_bytes());
        }
    }
    Ok(w)
}

/// Decodes a record whose spool file is `spool_len` bytes long and becomes
/// spool file number `file`.
pub fn decode(bytes: &[u8], file: u32, spool_len: u64) -> Result<Record, RecordError> {
    let mut r = Reader { b: bytes };
    if r.take(8)? != MAGIC {
        return Err(RecordError("not a layer record of this version"));
    }
    if r.u64()? != spool_len {
        return Err(RecordError("its spool file has another length"));
    }
    let n = r.count(16)?;
    let mut ops = Vec::with_capacity(n);
    for _ in 0..n {
        let path = r.bytes()?;
        let op = match r.u8()? {
            0 => Op::RootMeta(r.meta()?),
            1 => Op::Opaque { parents: r.list()? },
            2 => Op::Whiteout {
                parents: r.list()?,
                name: r.bytes()?,
            },
            3 => Op::Dir {
                parents: r.list()?,
                name: r.bytes()?,
                meta: r.meta()?,
            },
            4 => {
                let (parents, name, meta) = (r.list()?, r.bytes()?, r.meta()?);
                let kind = r.kind(file)?;
                Op::Node {
                    parents,
                    name,
                    node: Node { meta, kind },
                }
            }
            5 => Op::Hardlink {
                parents: r.list()?,
                name: r.bytes()?,
                target: r.bytes()?,
            },
            _ => return Err(RecordError("unknown op")),
        };
        ops.push(OpAt { path, op });
    }
    let mut holes = Vec::new();
    for _ in 0..r.count(4)? {
        let words = r.count(8)?;
        holes.push((0..words).map(|_| r.u64()).collect::<Result<_, _>>()?);
    }
    let mut packs = Vec::new();
    for _ in 0..r.count(4)? {
        let chunks = r.count(14)?;
        let mut table = Vec::with_capacity(chunks);
        for _ in 0..chunks {
            let c = Chunk {
                at: r.u64()?,
                blocks: r.u16()?,
                packed_len: r.u32()?,
            };
            let end = c.at.checked_add(u64::from(c.blocks) * BLOCK);
            if end.is_none_or(|e| e > spool_len)
                || u64::from(c.packed_len) > u64::from(c.blocks) * BLOCK
            {
                return Err(RecordError("a chunk lies outside its spool file"));
            }
            table.push(c);
        }
        packs.push(table);
    }
    if !r.b.is_empty() {
        return Err(RecordError("trailing bytes"));
    }
    // Every content must name tables that exist and bytes inside the file.
    for op in &ops {
        if let Op::Node {
            node: Node {
                kind: Kind::File(c),
                ..
            },
            ..
        } = &op.op
        {
            let table_ok = |i: u32, n: usize| i == 0 || (i as usize) <= n;
            if !table_ok(c.holes, holes.len()) || !table_ok(c.packed, packs.len()) {
                return Err(RecordError("a file names a table that is not there"));
            }
            if c.packed != 0 {
                let table = &packs[c.packed as usize - 1];
                if table.len() as u64 != c.len.div_ceil(crate::spool::CHUNK) {
                    return Err(RecordError("a chunk table does not fit its file"));
                }
            } else if c.offset.checked_add(c.len).is_none_or(|e| e > spool_len) && c.holes == 0 {
                return Err(RecordError("a file lies outside its spool file"));
            }
        }
    }
    Ok(Record { ops, holes, packs })
}

fn put_u32(w: &mut Vec<u8>, n: usize) {
    w.extend_from_slice(&(n as u32).to_le_bytes());
}

fn put_bytes(w: &mut Vec<u8>, b: &[u8]) {
    put_u32(w, b.len());
    w.extend_from_slice(b);
}

fn put_list(w: &mut Vec<u8>, l: &[Vec<u8>]) {
    put_u32(w, l.len());
    for b in l {
        put_bytes(w, b);
    }
}

fn put_meta(w: &mut Vec<u8>, m: &Meta) {
    for v in [m.perm, m.uid, m.gid] {
        w.extend_from_slice(&v.to_le_bytes());
    }
    w.extend_from_slice(&m.mtime.to_le_bytes());
    put_u32(w, m.xattrs.len());
    for (k, v) in &m.xattrs {
        put_bytes(w, k);
        put_bytes(w, v);
    }
}

fn put_kind(w: &mut Vec<u8>, k: &Kind) -> Result<(), RecordError> {
    match k {
        Kind::File(c) => {
            w.push(0);
            w.extend_from_slice(&c.offset.to_le_bytes());
            w.extend_from_slice(&c.len.to_le_bytes());
            w.extend_from_slice(&c.holes.to_le_bytes());
            w.extend_from_slice(&c.packed.to_le_bytes());
        }
        Kind::Symlink(t) => {
            w.push(1);
            put_bytes(w, t);
        }
        Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => {
            w.push(if matches!(k, Kind::CharDev { .. }) {
                2
            } else {
                3
            });
            w.extend_from_slice(&major.to_le_bytes());
            w.extend_from_slice(&minor.to_le_bytes());
        }
        Kind::Fifo => w.push(4),
        Kind::Dir(_) => return Err(RecordError("a directory node in an op")),
    }
    Ok(())
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if n > self.b.len() {
            return Err(RecordError("truncated"));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    /// A count of items at least `min_len` bytes each, checked against what is left.
    fn count(&mut self, min_len: usize) -> Result<usize, RecordError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_len) > self.b.len() {
            return Err(RecordError("a count larger than the record"));
        }
        Ok(n)
    }
    fn bytes(&mut self) -> Result<Vec<u8>, RecordError> {
        let n = self.count(1)?;
        Ok(self.take(n)?.to_vec())
    }
    fn list(&mut self) -> Result<Vec<Vec<u8>>, RecordError> {
        let n = self.count(4)?;
        (0..n).map(|_| self.bytes()).collect()
    }
    fn meta(&mut self) -> Result<Meta, RecordError> {
        let (perm, uid, gid, mtime) = (self.u32()?, self.u32()?, self.u32()?, self.u64()?);
        let mut xattrs = BTreeMap::new();
        for _ in 0..self.count(8)? {
            xattrs.insert(self.bytes()?, self.bytes()?);
        }
        Ok(Meta {
            perm,
            uid,
            gid,
            mtime,
            xattrs,
        })
    }
    fn kind(&mut self, file: u32) -> Result<Kind, RecordError> {
        Ok(match self.u8()? {
            0 => Kind::File(Content {
                file,
                offset: self.u64()?,
                len: self.u64()?,
                holes: self.u32()?,
                packed: self.u32()?,
            }),
            1 => Kind::Symlink(self.bytes()?),
            2 => Kind::CharDev {
                major: self.u32()?,
                minor: self.u32()?,
            },
            3 => Kind::BlockDev {
                major: self.u32()?,
                minor: self.u32()?,
            },
            4 => Kind::Fifo,
            _ => return Err(RecordError("unknown node kind")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{Compression, Spool};

    fn layer() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, data: &[u8], kind: tar::EntryType, link: Option<&str>| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o4755);
            h.set_uid(70_000);
            h.set_gid(0);
            h.set_mtime(5);
            match link {
                Some(l) => b.append_link(&mut h, path, l).unwrap(),
                None => b.append_data(&mut h, path, data).unwrap(),
            }
        };
        let text: Vec<u8> = (0..300_000u32).map(|i| (i % 13) as u8 + b'a').collect();
        add("big", &text, tar::EntryType::Regular, None);
        add("small", b"hi", tar::EntryType::Regular, None);
        add("dir/", b"", tar::EntryType::Directory, None);
        add("dir/ln", b"", tar::EntryType::Symlink, Some("../big"));
        add("hard", b"", tar::EntryType::Link, Some("big"));
        add(".wh.gone", b"", tar::EntryType::Regular, None);
        b.into_inner().unwrap()
    }

    #[test]
    fn a_record_round_trips_and_reads_the_same_contents() {
        let mut spool = Spool::with_compression(Compression::Lz4).unwrap();
        let mut w = spool.writer().unwrap();
        let ops = crate::layer::parse(&mut w, &layer()[..]).unwrap();
        let (holes, packs, len) = (w.holes().to_vec(), w.packs().to_vec(), w.len());
        let bytes = encode(&ops, &holes, &packs, len).unwrap();
        let back = decode(&bytes, 7, len).unwrap();
        assert_eq!(
            format!("{:?}", back.ops).replace("file: 7", "file: 1"),
            format!("{ops:?}")
        );
        assert_eq!((back.holes, back.packs), (holes, packs));
        // Every truncation and a wrong spool length are refused, never a panic.
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut], 7, len).is_err(), "cut at {cut}");
        }
        assert!(decode(&bytes, 7, len - 1).is_err());
    }
}
