//! An in-process writer of EROFS images (the format the Linux kernel mounts
//! read-only; `fs/erofs/erofs_fs.h` is the on-disk reference).
//!
//! Layout: block 0 holds the superblock at byte 1024 and the metadata area
//! starts right after it (`meta_blkaddr` = 0): every inode is an extended
//! (64-byte) inode followed by its inline xattrs and, when it fits in the same
//! block, the tail of its data (`FLAT_INLINE`). Whole data blocks follow the
//! metadata area, in inode order. Inodes are numbered breadth-first from the
//! root in name order, so the output depends only on the tree.
//!
//! Files the spool compressed (see [`crate::spool::Compression`]) are
//! `COMPRESSED_FULL` inodes: after the inode and its xattrs come a map header
//! and one 8-byte index per 4 KiB of file. Each 128 KiB chunk is one
//! compressed extent (LZ4 or Zstandard): a `HEAD1` index with its first
//! block, then `NONHEAD` indexes, the first carrying the extent's block count
//! (big pclusters); its compressed bytes end its last block, zero-padded in
//! front. A chunk that did not compress is one `PLAIN` extent per block. The
//! superblock then records the algorithm in its compression configuration,
//! with zero padding and big pclusters on.

use std::collections::HashMap;
use std::io::{self, Write};

use crate::spool::Spool;
use crate::tree::{Kind, NodeId, Tree};

const BLOCK: u64 = 4096;
const SB_OFFSET: usize = 1024;
const SB_LEN: usize = 128;
const MAGIC: u32 = 0xE0F5_E1E2;
const INODE_LEN: usize = 64;
const DIRENT_LEN: usize = 12;
const LAYOUT_FLAT_PLAIN: u16 = 0;
const LAYOUT_FLAT_INLINE: u16 = 2;
const XATTR_HEADER_LEN: usize = 12;
const LAYOUT_COMPRESSED_FULL: u16 = 1;
const FEATURE_INCOMPAT_ZERO_PADDING: u32 = 0x1;
const FEATURE_INCOMPAT_COMPR_CFGS: u32 = 0x2; // also BIG_PCLUSTER
const ADVISE_BIG_PCLUSTER_1: u16 = 0x2;
const LCLUSTER_PLAIN: u16 = 0;
const LCLUSTER_HEAD1: u16 = 1;
const LCLUSTER_NONHEAD: u16 = 2;
const D0_CBLKCNT: u16 = 1 << 11;
/// The compression configuration record after the superblock (its length,
/// then the algorithm's settings), padded to a multiple of 4.
fn compr_cfgs(algorithm: u8) -> Vec<u8> {
    let chunk = crate::spool::CHUNK;
    match algorithm {
        // LZ4: max_distance, max_pclusterblks (one chunk at most), reserved.
        0 => {
            let blocks = (chunk / BLOCK) as u8;
            vec![14, 0, 0xff, 0xff, blocks, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        }
        // Zstandard: format 0, window log (less 10) covering one chunk, reserved.
        _ => {
            let window_log = (chunk.trailing_zeros() - 10) as u8;
            vec![6, 0, 0, window_log, 0, 0, 0, 0]
        }
    }
}

/// Why an image could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    #[error("name {0:?} is longer than 255 bytes")]
    NameTooLong(String),
    #[error("xattr {0:?} cannot be stored (unsupported prefix or too long)")]
    Xattr(String),
    #[error("the image would exceed EROFS limits")]
    TooLarge,
    #[error("cannot write the filesystem image")]
    Io(#[from] io::Error),
}

/// One directory's entries, sorted, with their file types.
struct DirEntry {
    name: Vec<u8>,
    nid: u64,
    ftype: u8,
}

struct Inode {
    node: NodeId,
    nlink: u32,
    xattrs: Vec<u8>,
    size: u64,
    inline: bool,
    /// A file stored chunk-based (4 KiB chunks, a block map) to keep its holes.
    chunked: bool,
    /// A file stored as compressed extents (`COMPRESSED_FULL`).
    packed: bool,
    nid: u64,
    blkaddr: u32,
    nblocks: u64,
}

/// Files with at least this many whole blocks of zeros keep them as holes.
const MIN_HOLES: u64 = 16;
const LAYOUT_CHUNK_BASED: u16 = 4;
const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;
const NULL_ADDR: u32 = u32::MAX;

/// Writes the reachable part of `tree` as an EROFS image. Returns its length.
pub fn write(tree: &Tree, spool: &Spool, out: &mut impl Write) -> Result<u64, ErofsError> {
    // 1. Inodes in breadth-first order; hardlinks collapse onto one inode.
    let mut order: Vec<NodeId> = vec![Tree::ROOT];
    let mut index: HashMap<NodeId, usize> = HashMap::from([(Tree::ROOT, 0)]);
    let mut links: Vec<u32> = vec![0];
    let mut parent: HashMap<NodeId, NodeId> = HashMap::from([(Tree::ROOT, Tree::ROOT)]);
    let mut i = 0;
    while i < order.len() {
        if let Some(children) = tree.children(order[i]) {
            for (name, e) in children {
                if name.len() > 255 {
                    return Err(ErofsError::NameTooLong(
                        String::from_utf8_lossy(name).into_owned(),
                    ));
                }
                let is_dir = matches!(tree.nodes[e.node].kind, Kind::Dir(_));
                match index.get(&e.node) {
                    Some(&j) if !is_dir => links[j] += 1,
                    Some(_) => {} // a directory cannot be reached twice (layer.rs refuses)
                    None => {
                        if is_dir {
                            parent.insert(e.node, order[i]);
                        }
                        index.insert(e.node, order.len());
                        order.push(e.node);
                        links.push(1);
                    }
                }
            }
        }
        i += 1;
    }

    // 2. Sizes and where each inode goes in the metadata area.
    let mut inodes = Vec::with_capacity(order.len());
    let compressed = order.iter().any(|&n| match &tree.nodes[n].kind {
        Kind::File(c) => c.packed != 0,
        _ => false,
    });
    let algorithm = spool.compression().erofs_algorithm().unwrap_or(0);
    let cfgs = compr_cfgs(algorithm);
    let mut pos = (SB_OFFSET + SB_LEN) as u64;
    if compressed {
        pos = (pos + cfgs.len() as u64).div_ceil(32) * 32;
    }
    for (i, &node) in order.iter().enumerate() {
        let n = &tree.nodes[node];
        let xattrs = encode_xattrs(&n.meta.xattrs)?;
        let (size, nlink) = match &n.kind {
            Kind::Dir(children) => {
                let subdirs = children
                    .values()
                    .filter(|e| matches!(tree.nodes[e.node].kind, Kind::Dir(_)))
                    .count();
                let names: Vec<&[u8]> = children
                    .keys()
                    .map(|k| k.as_slice())
                    .chain([&b"."[..], b".."])
                    .collect();
                (dir_size(&names), 2 + subdirs as u32)
            }
            Kind::File(c) => (c.len, links[i]),
            Kind::Symlink(t) => (t.len() as u64, links[i]),
            _ => (0, links[i]),
        };
        let ibody = (INODE_LEN + xattrs.len()) as u64;
        if let Kind::File(c) = &n.kind {
            if c.packed != 0 {
                // Inode, xattrs, map header (8-aligned), 8 reserved bytes, indexes.
                let nid = pos / 32;
                let index_at = ibody.div_ceil(8) * 8 + 16;
                pos = (pos + index_at + 8 * size.div_ceil(BLOCK)).div_ceil(32) * 32;
                let nblocks = spool.chunks(c).iter().map(|k| u64::from(k.blocks)).sum();
                inodes.push(Inode {
                    node,
                    nlink,
                    xattrs,
                    size,
                    inline: false,
                    chunked: false,
                    packed: true,
                    nid,
                    blkaddr: 0,
                    nblocks,
                });
                continue;
            }
        }
        let holes = match &n.kind {
            Kind::File(c) => spool.hole_count(c),
            _ => 0,
        };
        if holes >= MIN_HOLES {
            // Inode, xattrs, then one 4-byte block address per 4 KiB of file.
            let nid = pos / 32;
            pos = (ibody.div_ceil(4) * 4 + size.div_ceil(BLOCK) * 4 + pos).div_ceil(32) * 32;
            let nblocks = size.div_ceil(BLOCK) - holes;
            inodes.push(Inode {
                node,
                nlink,
                xattrs,
                size,
                inline: false,
                chunked: true,
                packed: false,
                nid,
                blkaddr: 0,
                nblocks,
            });
            continue;
        }
        let tail = size % BLOCK;
        let inline = tail > 0 && ibody + tail <= BLOCK;
        let total = ibody + if inline { tail } else { 0 };
        if inline && pos % BLOCK + total > BLOCK {
            pos = pos.div_ceil(BLOCK) * BLOCK;
        }
        let nid = pos / 32;
        pos = (pos + total).div_ceil(32) * 32;
        let nblocks = if inline {
            size / BLOCK
        } else {
            size.div_ceil(BLOCK)
        };
        inodes.push(Inode {
            node,
            nlink,
            xattrs,
            size,
            inline,
            chunked: false,
            packed: false,
            nid,
            blkaddr: 0,
            nblocks,
        });
    }
    if inodes[0].nid > u64::from(u16::MAX) {
        return Err(ErofsError::TooLarge);
    }
    let meta_len = pos.div_ceil(BLOCK) * BLOCK;
    let mut blk = meta_len / BLOCK;
    for ino in &mut inodes {
        if ino.nblocks > 0 {
            ino.blkaddr = u32::try_from(blk).map_err(|_| ErofsError::TooLarge)?;
            blk += ino.nblocks;
        }
    }
    let total_blocks = u32::try_from(blk).map_err(|_| ErofsError::TooLarge)?;

    let ctx = Ctx {
        tree,
        spool,
        inodes: &inodes,
        index: &index,
        parent: &parent,
    };
    // 3. The metadata area, superblock included.
    let mut meta = vec![0u8; meta_len as usize];
    let chunked = inodes.iter().any(|i| i.chunked);
    write_superblock(
        &mut meta[SB_OFFSET..SB_OFFSET + SB_LEN],
        inodes[0].nid as u16,
        inodes.len() as u64,
        total_blocks,
        chunked,
        compressed.then_some(algorithm),
    );
    if compressed {
        let at = SB_OFFSET + SB_LEN;
        meta[at..at + cfgs.len()].copy_from_slice(&cfgs);
    }
    for (i, ino) in inodes.iter().enumerate() {
        let off = (ino.nid * 32) as usize;
        let n = &tree.nodes[ino.node];
        let body = &mut meta[off..];
        write_inode(body, ino, n, i as u32 + 1);
        body[INODE_LEN..INODE_LEN + ino.xattrs.len()].copy_from_slice(&ino.xattrs);
        if ino.packed {
            let Kind::File(c) = &n.kind else {
                unreachable!("only files are compressed")
            };
            write_extent_map(body, ino, spool.chunks(c), algorithm);
        } else if ino.chunked {
            let Kind::File(c) = &n.kind else {
                unreachable!("only files are chunked")
            };
            let map_at = (INODE_LEN + ino.xattrs.len()).div_ceil(4) * 4;
            let mut next = ino.blkaddr;
            for block in 0..ino.size.div_ceil(BLOCK) {
                let addr = if spool.is_hole(c, block) {
                    NULL_ADDR
                } else {
                    next += 1;
                    next - 1
                };
                let at = map_at + 4 * block as usize;
                body[at..at + 4].copy_from_slice(&addr.to_le_bytes());
            }
        } else if ino.inline {
            let data = node_data(&ctx, ino)?;
            let tail_start = (ino.nblocks * BLOCK) as usize;
            let at = INODE_LEN + ino.xattrs.len();
            body[at..at + data.len() - tail_start].copy_from_slice(&data[tail_start..]);
        }
    }
    out.write_all(&meta)?;

    // 4. Whole data blocks, in inode order.
    let zeros = vec![0u8; BLOCK as usize];
    for ino in inodes.iter().filter(|i| i.nblocks > 0) {
        let want = ino.nblocks * BLOCK;
        let data_len = ino.size.min(want);
        if let (true, Kind::File(c)) = (ino.packed, &tree.nodes[ino.node].kind) {
            spool.copy_packed_to(c, out)?;
            continue;
        }
        if let (true, Kind::File(c)) = (ino.chunked, &tree.nodes[ino.node].kind) {
            // The stored blocks, in order, each padded to a whole block.
            let mut buf = vec![0u8; BLOCK as usize];
            let mut stored = 0u64;
            for block in 0..ino.size.div_ceil(BLOCK) {
                if spool.is_hole(c, block) {
                    continue;
                }
                let n = (ino.size - block * BLOCK).min(BLOCK) as usize;
                buf.fill(0);
                spool.read_stored_at(c, &mut buf[..n], stored)?;
                out.write_all(&buf)?;
                stored += n as u64;
            }
            continue;
        }
        if let Kind::File(c) = &tree.nodes[ino.node].kind {
            spool.copy_to(
                c,
                &mut LimitedWriter {
                    out: &mut *out,
                    left: data_len,
                },
            )?;
        } else {
            let data = node_data(&ctx, ino)?;
            out.write_all(&data[..data_len as usize])?;
        }
        let pad = (want - data_len) as usize;
        out.write_all(&zeros[..pad])?;
    }
    Ok(u64::from(total_blocks) * BLOCK)
}

/// The bytes of a non-file inode's data (directory blocks, symlink target) or
/// of a small file (read from the spool).
struct Ctx<'a> {
    tree: &'a Tree,
    spool: &'a Spool,
    inodes: &'a [Inode],
    index: &'a HashMap<NodeId, usize>,
    parent: &'a HashMap<NodeId, NodeId>,
}

fn node_data(ctx: &Ctx<'_>, ino: &Inode) -> io::Result<Vec<u8>> {
    let (tree, inodes, index) = (ctx.tree, ctx.inodes, ctx.index);
    Ok(match &tree.nodes[ino.node].kind {
        Kind::Dir(children) => {
            let parent_nid = inodes[index[&ctx.parent[&ino.node]]].nid;
            let mut entries: Vec<DirEntry> = children
                .iter()
                .map(|(name, e)| DirEntry {
                    name: name.clone(),
                    nid: inodes[index[&e.node]].nid,
                    ftype: file_type(&tree.nodes[e.node].kind),
                })
                .collect();
            entries.push(DirEntry {
                name: b".".to_vec(),
                nid: ino.nid,
                ftype: 2,
            });
            entries.push(DirEntry {
                name: b"..".to_vec(),
                nid: parent_nid,
                ftype: 2,
            });
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            let data = dir_blocks(&entries);
            debug_assert_eq!(data.len() as u64, ino.size);
            data
        }
        Kind::Symlink(t) => t.clone(),
        Kind::File(c) => ctx.spool.read(*c)?,
        _ => Vec::new(),
    })
}

fn file_type(kind: &Kind) -> u8 {
    match kind {
        Kind::File(_) => 1,
        Kind::Dir(_) => 2,
        Kind::CharDev { .. } => 3,
        Kind::BlockDev { .. } => 4,
        Kind::Fifo => 5,
        Kind::Symlink(_) => 7,
    }
}

/// Splits sorted names into directory blocks; returns the block partition.
fn dir_partition<'a>(names: impl Iterator<Item = &'a [u8]>) -> Vec<(usize, usize)> {
    let mut blocks = Vec::new();
    let (mut used, mut count) = (0usize, 0usize);
    for name in names {
        let cost = DIRENT_LEN + name.len();
        if used + cost > BLOCK as usize {
            blocks.push((count, used));
            used = 0;
            count = 0;
        }
        used += cost;
        count += 1;
    }
    blocks.push((count, used));
    blocks
}

fn dir_size(names: &[&[u8]]) -> u64 {
    let mut sorted = names.to_vec();
    sorted.sort();
    let blocks = dir_partition(sorted.into_iter());
    (blocks.len() as u64 - 1) * BLOCK + blocks.last().expect("one block").1 as u64
}

fn dir_blocks(entries: &[DirEntry]) -> Vec<u8> {
    let blocks = dir_partition(entries.iter().map(|e| e.name.as_slice()));
    let mut out = Vec::new();
    let mut it = entries.iter();
    for (bi, &(count, used)) in blocks.iter().enumerate() {
        let start = out.len();
        let chunk: Vec<&DirEntry> = it.by_ref().take(count).collect();
        let mut nameoff = DIRENT_LEN * count;
        for e in &chunk {
            out.extend_from_slice(&e.nid.to_le_bytes());
            out.extend_from_slice(&(nameoff as u16).to_le_bytes());
            out.push(e.ftype);
            out.push(0);
            nameoff += e.name.len();
        }
        for e in &chunk {
            out.extend_from_slice(&e.name);
        }
        debug_assert_eq!(out.len() - start, used);
        if bi + 1 < blocks.len() {
            out.resize(start + BLOCK as usize, 0);
        }
    }
    out
}

fn encode_xattrs(
    xattrs: &std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
) -> Result<Vec<u8>, ErofsError> {
    if xattrs.is_empty() {
        return Ok(Vec::new());
    }
    const PREFIXES: [(&[u8], u8); 5] = [
        (b"user.", 1),
        (b"system.posix_acl_access", 2),
        (b"system.posix_acl_default", 3),
        (b"trusted.", 4),
        (b"security.", 6),
    ];
    let mut out = vec![0u8; XATTR_HEADER_LEN];
    for (name, value) in xattrs {
        let bad = || ErofsError::Xattr(String::from_utf8_lossy(name).into_owned());
        let (suffix, index) = PREFIXES
            .iter()
            .find_map(|(p, i)| name.strip_prefix(*p).map(|s| (s, *i)))
            .ok_or_else(bad)?;
        let name_len = u8::try_from(suffix.len()).map_err(|_| bad())?;
        let value_len = u16::try_from(value.len()).map_err(|_| bad())?;
        out.push(name_len);
        out.push(index);
        out.extend_from_slice(&value_len.to_le_bytes());
        out.extend_from_slice(suffix);
        out.extend_from_slice(value);
        out.resize(out.len().div_ceil(4) * 4, 0);
    }
    if out.len() > 4096 - INODE_LEN {
        return Err(ErofsError::Xattr(
            "(all xattrs of one file together)".into(),
        ));
    }
    Ok(out)
}

/// Passes on the first `left` bytes written to it and drops the rest.
struct LimitedWriter<'a, W: Write> {
    out: &'a mut W,
    left: u64,
}

impl<W: Write> Write for LimitedWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        self.out.write_all(&buf[..n])?;
        self.left -= n as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A compressed file's map header and lcluster indexes, after its inode and
/// xattrs in `body`.
fn write_extent_map(body: &mut [u8], ino: &Inode, chunks: &[crate::spool::Chunk], algorithm: u8) {
    let header_at = (INODE_LEN + ino.xattrs.len()).div_ceil(8) * 8;
    body[header_at + 4..header_at + 6].copy_from_slice(&ADVISE_BIG_PCLUSTER_1.to_le_bytes());
    // h_algorithmtype: HEAD1's algorithm; h_clusterbits 0 (4 KiB lclusters).
    body[header_at + 6] = algorithm;
    let mut at = header_at + 16;
    let mut put = |advise: u16, u: [u8; 4]| {
        body[at..at + 2].copy_from_slice(&advise.to_le_bytes());
        // di_clusterofs stays 0: every extent starts on an lcluster.
        body[at + 4..at + 8].copy_from_slice(&u);
        at += 8;
    };
    let per_chunk = crate::spool::CHUNK / BLOCK;
    let mut blkaddr = ino.blkaddr;
    for (i, chunk) in chunks.iter().enumerate() {
        let lclusters = (ino.size - i as u64 * crate::spool::CHUNK)
            .div_ceil(BLOCK)
            .min(per_chunk) as u16;
        if chunk.packed_len == 0 {
            for j in 0..u32::from(lclusters) {
                put(LCLUSTER_PLAIN, (blkaddr + j).to_le_bytes());
            }
        } else {
            put(LCLUSTER_HEAD1, blkaddr.to_le_bytes());
            for j in 1..lclusters {
                let d0 = if j == 1 { D0_CBLKCNT | chunk.blocks } else { j };
                let d1 = lclusters - j;
                let mut u = [0u8; 4];
                u[..2].copy_from_slice(&d0.to_le_bytes());
                u[2..].copy_from_slice(&d1.to_le_bytes());
                put(LCLUSTER_NONHEAD, u);
            }
        }
        blkaddr += u32::from(chunk.blocks);
    }
}

fn write_superblock(
    sb: &mut [u8],
    root_nid: u16,
    inos: u64,
    blocks: u32,
    chunked: bool,
    algorithm: Option<u8>,
) {
    sb[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    sb[12] = 12; // blkszbits: 4096-byte blocks
    sb[14..16].copy_from_slice(&root_nid.to_le_bytes());
    sb[16..24].copy_from_slice(&inos.to_le_bytes());
    sb[36..40].copy_from_slice(&blocks.to_le_bytes());
    let mut incompat = 0;
    if chunked {
        incompat |= FEATURE_INCOMPAT_CHUNKED_FILE;
    }
    if let Some(a) = algorithm {
        incompat |= FEATURE_INCOMPAT_ZERO_PADDING | FEATURE_INCOMPAT_COMPR_CFGS;
        sb[84..86].copy_from_slice(&(1u16 << a).to_le_bytes()); // available_compr_algs
    }
    sb[80..84].copy_from_slice(&incompat.to_le_bytes());
    // meta_blkaddr, xattr_blkaddr, uuid: zero.
}

fn write_inode(b: &mut [u8], ino: &Inode, n: &crate::tree::Node, ino_no: u32) {
    let (mode_type, rdev) = match &n.kind {
        Kind::Dir(_) => (0o040000, 0),
        Kind::File(_) => (0o100000, 0),
        Kind::Symlink(_) => (0o120000, 0),
        Kind::CharDev { major, minor } => (0o020000, encode_dev(*major, *minor)),
        Kind::BlockDev { major, minor } => (0o060000, encode_dev(*major, *minor)),
        Kind::Fifo => (0o010000, 0),
    };
    let layout = if ino.packed {
        LAYOUT_COMPRESSED_FULL
    } else if ino.chunked {
        LAYOUT_CHUNK_BASED
    } else if ino.inline {
        LAYOUT_FLAT_INLINE
    } else {
        LAYOUT_FLAT_PLAIN
    };
    let i_format: u16 = 1 | (layout << 1); // extended inode
    let xattr_icount: u16 = if ino.xattrs.is_empty() {
        0
    } else {
        (1 + (ino.xattrs.len() - XATTR_HEADER_LEN) / 4) as u16
    };
    // Chunk-based: i_u holds the chunk format (0: 4 KiB chunks, 4-byte block
    // map); compressed: the blocks its extents take.
    let i_u = if ino.packed {
        ino.nblocks as u32
    } else if ino.chunked {
        0
    } else if matches!(n.kind, Kind::CharDev { .. } | Kind::BlockDev { .. }) {
        rdev
    } else {
        ino.blkaddr
    };
    b[0..2].copy_from_slice(&i_format.to_le_bytes());
    b[2..4].copy_from_slice(&xattr_icount.to_le_bytes());
    b[4..6].copy_from_slice(&((mode_type | (n.meta.perm & 0o7777)) as u16).to_le_bytes());
    b[8..16].copy_from_slice(&ino.size.to_le_bytes());
    b[16..20].copy_from_slice(&i_u.to_le_bytes());
    b[20..24].copy_from_slice(&ino_no.to_le_bytes());
    b[24..28].copy_from_slice(&n.meta.uid.to_le_bytes());
    b[28..32].copy_from_slice(&n.meta.gid.to_le_bytes());
    b[32..40].copy_from_slice(&n.meta.mtime.to_le_bytes());
    b[44..48].copy_from_slice(&ino.nlink.to_le_bytes());
}

fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_blocks_never_split_an_entry() {
        let names: Vec<Vec<u8>> = (0..400)
            .map(|i| format!("file-with-a-longish-name-{i:04}").into_bytes())
            .collect();
        let mut entries: Vec<DirEntry> = names
            .iter()
            .map(|n| DirEntry {
                name: n.clone(),
                nid: 40,
                ftype: 1,
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let data = dir_blocks(&entries);
        let refs: Vec<&[u8]> = names.iter().map(|n| n.as_slice()).collect();
        assert_eq!(data.len() as u64, dir_size(&refs));
        // Each block starts with a dirent whose nameoff is 12 × its entry count.
        let mut seen = 0;
        for block in data.chunks(BLOCK as usize) {
            let nameoff = u16::from_le_bytes([block[8], block[9]]) as usize;
            assert_eq!(nameoff % DIRENT_LEN, 0);
            seen += nameoff / DIRENT_LEN;
        }
        assert_eq!(seen, 400);
    }

    #[test]
    fn device_numbers_use_the_kernel_encoding() {
        assert_eq!(encode_dev(1, 3), 0x103);
        assert_eq!(
            encode_dev(259, 0x12345),
            0x12345 & 0xff | 259 << 8 | (0x12300 << 12)
        );
    }
}
