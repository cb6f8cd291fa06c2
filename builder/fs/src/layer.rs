//! Applying one OCI layer (an uncompressed tar stream) onto the tree, per the
//! OCI image spec: whiteouts, opaque directories, hardlinks, replacement of a
//! file by a directory and the reverse. Nothing is written on the host but
//! file contents, appended to the spool.

use std::collections::BTreeMap;
use std::io::{self, Read};

use crate::spool::{Spool, SpoolWriter};
use crate::tree::{Entry, Kind, Meta, Node, NodeId, Tree};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
const MAX_SYMLINK_HOPS: usize = 40;

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("tar entry {path:?}: {reason}")]
    Entry { path: String, reason: String },
    #[error("cannot read the layer's tar stream")]
    Io(#[from] io::Error),
}

fn entry_err(path: &[u8], reason: impl Into<String>) -> LayerError {
    LayerError::Entry {
        path: String::from_utf8_lossy(path).into_owned(),
        reason: reason.into(),
    }
}

/// Splits a tar path into components; `./` and `.` are dropped, `..` and
/// absolute paths are refused.
pub fn split_path(path: &[u8]) -> Result<Vec<&[u8]>, &'static str> {
    if path.first() == Some(&b'/') {
        return Err("absolute path");
    }
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("path contains '..'"),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// One change a layer makes, parsed from a tar entry (contents already spooled).
#[derive(Debug, Clone)]
pub enum Op {
    /// The root directory's own metadata.
    RootMeta(Meta),
    /// `.wh..wh..opq`: hide everything lower layers put in the directory.
    Opaque { parents: Vec<Vec<u8>> },
    /// `.wh.NAME`: delete NAME from lower layers.
    Whiteout {
        parents: Vec<Vec<u8>>,
        name: Vec<u8>,
    },
    /// A directory (merged with an existing one).
    Dir {
        parents: Vec<Vec<u8>>,
        name: Vec<u8>,
        meta: Meta,
    },
    /// A file, symlink, device or fifo.
    Node {
        parents: Vec<Vec<u8>>,
        name: Vec<u8>,
        node: Node,
    },
    /// A hardlink to a path already in the tree.
    Hardlink {
        parents: Vec<Vec<u8>>,
        name: Vec<u8>,
        target: Vec<u8>,
    },
}

/// An [`Op`] with the tar path it came from (for error messages).
#[derive(Debug, Clone)]
pub struct OpAt {
    pub path: Vec<u8>,
    pub op: Op,
}

/// Reads a layer's tar stream into ops, spooling file contents into `spool`.
/// Needs no tree, so layers can be read in parallel.
pub fn parse(spool: &mut SpoolWriter, reader: impl Read) -> Result<Vec<OpAt>, LayerError> {
    let mut archive = tar::Archive::new(reader);
    let mut ops = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let raw_path = entry.path_bytes().into_owned();
        let comps = split_path(&raw_path).map_err(|r| entry_err(&raw_path, r))?;
        let et = entry.header().entry_type();
        if et.is_pax_global_extensions() {
            continue;
        }
        let Some((name, parents)) = comps.split_last() else {
            if et.is_dir() {
                let meta = meta_of(&mut entry, &raw_path)?;
                ops.push(OpAt {
                    path: raw_path,
                    op: Op::RootMeta(meta),
                });
            }
            continue;
        };
        let parents: Vec<Vec<u8>> = parents.iter().map(|c| c.to_vec()).collect();
        let name = name.to_vec();
        let op = if name == OPAQUE {
            Op::Opaque { parents }
        } else if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            Op::Whiteout {
                parents,
                name: hidden.to_vec(),
            }
        } else {
            let meta = meta_of(&mut entry, &raw_path)?;
            if et.is_file() || et.is_contiguous() || et.is_gnu_sparse() {
                Op::Node {
                    parents,
                    name,
                    node: Node {
                        meta,
                        kind: Kind::File(spool.append(&mut entry)?),
                    },
                }
            } else if et.is_dir() {
                Op::Dir {
                    parents,
                    name,
                    meta,
                }
            } else if et.is_symlink() {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| entry_err(&raw_path, "symlink without target"))?;
                Op::Node {
                    parents,
                    name,
                    node: Node {
                        meta,
                        kind: Kind::Symlink(target.into_owned()),
                    },
                }
            } else if et.is_hard_link() {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| entry_err(&raw_path, "hardlink without target"))?;
                Op::Hardlink {
                    parents,
                    name,
                    target: target.into_owned(),
                }
            } else if et.is_character_special() || et.is_block_special() {
                let h = entry.header();
                let major = h.device_major()?.unwrap_or(0);
                let minor = h.device_minor()?.unwrap_or(0);
                let kind = if et.is_character_special() {
                    Kind::CharDev { major, minor }
                } else {
                    Kind::BlockDev { major, minor }
                };
                Op::Node {
                    parents,
                    name,
                    node: Node { meta, kind },
                }
            } else if et.is_fifo() {
                Op::Node {
                    parents,
                    name,
                    node: Node {
                        meta,
                        kind: Kind::Fifo,
                    },
                }
            } else {
                return Err(entry_err(
                    &raw_path,
                    format!("unsupported tar entry type {:?}", et),
                ));
            }
        };
        ops.push(OpAt { path: raw_path, op });
    }
    Ok(ops)
}

/// Applies a parsed layer as layer number `layer` (0 is the lowest).
fn comps(p: &[Vec<u8>]) -> Vec<&[u8]> {
    p.iter().map(|c| c.as_slice()).collect()
}

pub fn apply_ops(tree: &mut Tree, layer: usize, ops: Vec<OpAt>) -> Result<(), LayerError> {
    for OpAt { path, op } in ops {
        let err = |r: String| entry_err(&path, r);
        match op {
            Op::RootMeta(meta) => tree.nodes[Tree::ROOT].meta = meta,
            Op::Opaque { parents } => {
                if let Some(dir) = resolve_dir(tree, &comps(&parents), layer, false).map_err(err)? {
                    tree.children_mut(dir)
                        .expect("a dir")
                        .retain(|_, e| e.layer >= layer);
                }
            }
            Op::Whiteout { parents, name } => {
                if let Some(dir) = resolve_dir(tree, &comps(&parents), layer, false).map_err(err)? {
                    tree.children_mut(dir).expect("a dir").remove(&name);
                }
            }
            Op::Dir {
                parents,
                name,
                meta,
            } => {
                let parent = resolve_dir(tree, &comps(&parents), layer, true)
                    .map_err(err)?
                    .expect("created when missing");
                // A directory over a directory keeps the children and takes the new metadata.
                match tree.children(parent).and_then(|c| c.get(&name)).copied() {
                    Some(e) if matches!(tree.nodes[e.node].kind, Kind::Dir(_)) => {
                        tree.nodes[e.node].meta = meta;
                        tree.children_mut(parent).expect("a dir").insert(
                            name,
                            Entry {
                                node: e.node,
                                layer,
                            },
                        );
                    }
                    _ => {
                        let node = tree.add(Node {
                            meta,
                            kind: Kind::Dir(BTreeMap::new()),
                        });
                        tree.children_mut(parent)
                            .expect("a dir")
                            .insert(name, Entry { node, layer });
                    }
                }
            }
            Op::Node {
                parents,
                name,
                node,
            } => {
                let parent = resolve_dir(tree, &comps(&parents), layer, true)
                    .map_err(err)?
                    .expect("created when missing");
                let node = tree.add(node);
                tree.children_mut(parent)
                    .expect("a dir")
                    .insert(name, Entry { node, layer });
            }
            Op::Hardlink {
                parents,
                name,
                target,
            } => {
                let parent = resolve_dir(tree, &comps(&parents), layer, true)
                    .map_err(err)?
                    .expect("created when missing");
                let node = hardlink_target(tree, &target).map_err(err)?;
                tree.children_mut(parent)
                    .expect("a dir")
                    .insert(name, Entry { node, layer });
            }
        }
    }
    Ok(())
}

/// Parses and applies the tar stream `reader` as layer number `layer`.
pub fn apply(
    tree: &mut Tree,
    spool: &mut Spool,
    layer: usize,
    reader: impl Read,
) -> Result<(), LayerError> {
    let ops = parse(spool.main_writer(), reader)?;
    apply_ops(tree, layer, ops)
}

/// Resolves the directory named by `comps`, following symlinks met on the way
/// inside the tree (never outside it: `..` stops at the root, absolute targets
/// start at the root). Missing directories are created when `create` is set,
/// otherwise `Ok(None)` is returned.
fn resolve_dir(
    tree: &mut Tree,
    comps: &[&[u8]],
    layer: usize,
    create: bool,
) -> Result<Option<NodeId>, String> {
    let mut stack: Vec<NodeId> = vec![Tree::ROOT];
    let mut todo: Vec<Vec<u8>> = comps.iter().rev().map(|c| c.to_vec()).collect();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        let cur = *stack.last().expect("root stays");
        match c.as_slice() {
            b"" | b"." => continue,
            b".." => {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            _ => {}
        }
        let existing = tree.children(cur).expect("a dir").get(&c).copied();
        match existing {
            None if create => {
                let node = tree.add(Node {
                    meta: Meta::implicit_dir(),
                    kind: Kind::Dir(BTreeMap::new()),
                });
                tree.children_mut(cur)
                    .expect("a dir")
                    .insert(c, Entry { node, layer });
                stack.push(node);
            }
            None => return Ok(None),
            Some(e) => match &tree.nodes[e.node].kind {
                Kind::Dir(_) => stack.push(e.node),
                Kind::Symlink(target) => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err("too many levels of symbolic links in its parent path".into());
                    }
                    if target.first() == Some(&b'/') {
                        stack.truncate(1);
                    }
                    todo.extend(target.split(|&b| b == b'/').rev().map(|s| s.to_vec()));
                }
                _ => {
                    return Err(format!(
                        "parent {:?} is not a directory",
                        String::from_utf8_lossy(&c)
                    ))
                }
            },
        }
    }
    Ok(Some(*stack.last().expect("root stays")))
}

fn hardlink_target(tree: &mut Tree, target: &[u8]) -> Result<NodeId, String> {
    let comps = split_path(target).map_err(|r| format!("hardlink target: {r}"))?;
    let (name, parents) = comps.split_last().ok_or("hardlink to the root")?;
    let missing = || {
        format!(
            "hardlink target {:?} does not exist",
            String::from_utf8_lossy(target)
        )
    };
    let dir = resolve_dir(tree, parents, 0, false)?.ok_or_else(missing)?;
    let node = tree
        .children(dir)
        .expect("a dir")
        .get(*name)
        .ok_or_else(missing)?
        .node;
    if matches!(tree.nodes[node].kind, Kind::Dir(_)) {
        return Err("hardlink to a directory".into());
    }
    Ok(node)
}

fn meta_of<R: Read>(entry: &mut tar::Entry<'_, R>, path: &[u8]) -> Result<Meta, LayerError> {
    let h = entry.header();
    let bad = |what: &str| entry_err(path, format!("bad {what} field"));
    let mut meta = Meta {
        perm: h.mode().map_err(|_| bad("mode"))? & 0o7777,
        uid: u32::try_from(h.uid().map_err(|_| bad("uid"))?).map_err(|_| bad("uid"))?,
        gid: u32::try_from(h.gid().map_err(|_| bad("gid"))?).map_err(|_| bad("gid"))?,
        mtime: h.mtime().map_err(|_| bad("mtime"))?,
        xattrs: BTreeMap::new(),
    };
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            let num = |v: &[u8]| -> Option<u64> {
                std::str::from_utf8(v).ok()?.split('.').next()?.parse().ok()
            };
            match key {
                b"uid" => {
                    meta.uid = num(value)
                        .and_then(|v| u32::try_from(v).ok())
                        .ok_or_else(|| bad("PAX uid"))?
                }
                b"gid" => {
                    meta.gid = num(value)
                        .and_then(|v| u32::try_from(v).ok())
                        .ok_or_else(|| bad("PAX gid"))?
                }
                b"mtime" => meta.mtime = num(value).unwrap_or(0),
                k if k.starts_with(b"SCHILY.xattr.") => {
                    meta.xattrs
                        .insert(k[b"SCHILY.xattr.".len()..].to_vec(), value.to_vec());
                }
                _ => {}
            }
        }
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for &(path, et, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(et);
            h.set_mode(if et.is_dir() { 0o755 } else { 0o644 });
            h.set_mtime(1);
            h.set_uid(0);
            h.set_gid(0);
            if et.is_symlink() || et.is_hard_link() {
                h.set_size(0);
                b.append_link(&mut h, path, data).unwrap();
            } else {
                h.set_size(data.len() as u64);
                // Bypass the builder's own path checks so hostile names reach us.
                let name = h.as_old_mut().name.as_mut();
                name[..path.len()].copy_from_slice(path.as_bytes());
                h.set_cksum();
                b.append(&h, data.as_bytes()).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    fn build(layers: &[Vec<u8>]) -> Result<(Tree, Spool), LayerError> {
        let mut tree = Tree::new();
        let mut spool = Spool::new().unwrap();
        for (i, l) in layers.iter().enumerate() {
            apply(&mut tree, &mut spool, i, l.as_slice())?;
        }
        Ok((tree, spool))
    }

    fn paths(tree: &Tree) -> Vec<String> {
        let mut v = Vec::new();
        tree.walk(|p, _| v.push(String::from_utf8_lossy(p).into_owned()));
        v
    }

    use tar::EntryType as T;

    #[test]
    fn whiteouts_and_opaque_dirs() {
        let l0 = layer(&[
            ("a/", T::Directory, ""),
            ("a/x", T::Regular, "x"),
            ("a/y", T::Regular, "y"),
            ("b/z", T::Regular, "z"),
            ("c", T::Regular, "c"),
        ]);
        let l1 = layer(&[
            ("a/new", T::Regular, "n"),
            ("a/.wh..wh..opq", T::Regular, ""),
            ("b/.wh.z", T::Regular, ""),
            (".wh.c", T::Regular, ""),
        ]);
        let (t, _) = build(&[l0, l1]).unwrap();
        assert_eq!(paths(&t), ["/", "/a", "/a/new", "/b"]);
    }

    #[test]
    fn file_and_directory_replace_each_other() {
        let l0 = layer(&[("d/f", T::Regular, "1"), ("f", T::Regular, "2")]);
        let l1 = layer(&[
            ("d", T::Regular, "now a file"),
            ("f/", T::Directory, ""),
            ("f/inner", T::Regular, "3"),
        ]);
        let (t, spool) = build(&[l0, l1]).unwrap();
        assert_eq!(paths(&t), ["/", "/d", "/f", "/f/inner"]);
        let d = t.lookup(&[b"d"]).unwrap();
        let Kind::File(c) = t.nodes[d].kind else {
            panic!("d is not a file")
        };
        assert_eq!(spool.read(c).unwrap(), b"now a file");
    }

    #[test]
    fn hardlinks_share_one_node_across_layers() {
        let l0 = layer(&[("bin/busybox", T::Regular, "bb")]);
        let l1 = layer(&[
            ("bin/sh", T::Link, "bin/busybox"),
            ("./bin/ash", T::Link, "./bin/busybox"),
        ]);
        let (t, _) = build(&[l0, l1]).unwrap();
        let bb = t.lookup(&[b"bin", b"busybox"]).unwrap();
        assert_eq!(t.lookup(&[b"bin", b"sh"]), Some(bb));
        assert_eq!(t.lookup(&[b"bin", b"ash"]), Some(bb));
    }

    #[test]
    fn parents_through_symlinks_stay_in_the_tree() {
        let l0 = layer(&[
            ("usr/lib/", T::Directory, ""),
            ("lib", T::Symlink, "usr/lib"),
            ("evil", T::Symlink, "/../../../usr"),
        ]);
        let l1 = layer(&[
            ("lib/libc.so", T::Regular, "c"),
            ("evil/x", T::Regular, "x"),
        ]);
        let (t, _) = build(&[l0, l1]).unwrap();
        assert!(t.lookup(&[b"usr", b"lib", b"libc.so"]).is_some());
        assert!(t.lookup(&[b"usr", b"x"]).is_some());
    }

    #[test]
    fn hostile_entries_get_clear_errors() {
        let cases = [
            (layer(&[("../escape", T::Regular, "x")]), "'..'"),
            (layer(&[("/etc/passwd", T::Regular, "x")]), "absolute path"),
            (layer(&[("a", T::Link, "missing")]), "does not exist"),
            (layer(&[("a", T::Link, "../../etc/shadow")]), "'..'"),
            (
                layer(&[("loop", T::Symlink, "loop"), ("loop/x", T::Regular, "")]),
                "too many levels",
            ),
            (
                layer(&[("f", T::Regular, ""), ("f/x", T::Regular, "")]),
                "not a directory",
            ),
        ];
        for (l, want) in cases {
            let err = build(&[l]).map(|_| ()).unwrap_err().to_string();
            assert!(err.contains(want), "{err} does not contain {want}");
        }
    }
}
