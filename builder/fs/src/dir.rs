//! A directory tree read as a layer: how containerd's overlay snapshotter
//! stores a committed snapshot (its `fs` directory). The result is the same
//! ops a layer's tar stream gives, so [`crate::layer::apply_ops`] flattens
//! snapshots exactly as it flattens tar layers. overlayfs marks deletions its
//! own way, and those become the OCI ones: a character device 0:0 is a
//! whiteout, a directory with the `trusted.overlay.opaque` (or, mounted with
//! `userxattr`, `user.overlay.opaque`) attribute set to `y` is opaque.
//!
//! Nothing under `root` is followed: symlinks are read as links, and the
//! walk stays on the directory's own tree.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::layer::{LayerError, Op, OpAt};
use crate::spool::SpoolWriter;
use crate::tree::{Kind, Meta, Node};

const OPAQUE_XATTRS: [&[u8]; 2] = [b"trusted.overlay.opaque", b"user.overlay.opaque"];
/// overlayfs' own bookkeeping; never part of the image.
const OVERLAY_XATTR_PREFIXES: [&[u8]; 2] = [b"trusted.overlay.", b"user.overlay."];

/// Reads the tree under `root` into ops, spooling file contents into `spool`.
pub fn read(spool: &mut SpoolWriter, root: &Path) -> Result<Vec<OpAt>, LayerError> {
    let io_err = |path: &Path, e: io::Error| LayerError::Entry {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let top = fs::symlink_metadata(root).map_err(|e| io_err(root, e))?;
    if !top.is_dir() {
        return Err(LayerError::Entry {
            path: root.display().to_string(),
            reason: "not a directory".into(),
        });
    }
    let mut walk = Walk {
        spool,
        ops: vec![OpAt {
            path: b"/".to_vec(),
            op: Op::RootMeta(meta(root, &top).map_err(|e| io_err(root, e))?),
        }],
        links: HashMap::new(),
        device: top.dev(),
    };
    walk.dir(root, &mut Vec::new())
        .map_err(|(path, e)| io_err(&path, e))?;
    Ok(walk.ops)
}

struct Walk<'a> {
    spool: &'a mut SpoolWriter,
    ops: Vec<OpAt>,
    /// Files with more than one link, by inode: the path first seen.
    links: HashMap<u64, Vec<u8>>,
    device: u64,
}

type WalkError = (std::path::PathBuf, io::Error);

impl Walk<'_> {
    /// Adds the entries of the directory `dir`, whose path in the tree is
    /// `parents` (the directory itself is already added).
    fn dir(&mut self, dir: &Path, parents: &mut Vec<Vec<u8>>) -> Result<(), WalkError> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .and_then(|it| it.map(|e| e.map(|e| e.file_name())).collect())
            .map_err(|e| (dir.to_owned(), e))?;
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let name = name.as_bytes().to_vec();
            let md = fs::symlink_metadata(&path).map_err(|e| (path.clone(), e))?;
            let tree_path = tree_path(parents, &name);
            let at = |op| OpAt {
                path: tree_path.clone(),
                op,
            };
            let ft = md.file_type();
            if ft.is_char_device() && md.rdev() == 0 {
                self.ops.push(at(Op::Whiteout {
                    parents: parents.clone(),
                    name,
                }));
                continue;
            }
            if ft.is_socket() {
                // A tar layer cannot hold one either.
                continue;
            }
            let meta = meta(&path, &md).map_err(|e| (path.clone(), e))?;
            if ft.is_dir() {
                let opaque = is_opaque(&path);
                self.ops.push(at(Op::Dir {
                    parents: parents.clone(),
                    name: name.clone(),
                    meta,
                }));
                parents.push(name);
                if opaque {
                    self.ops.push(at(Op::Opaque {
                        parents: parents.clone(),
                    }));
                }
                if md.dev() == self.device {
                    self.dir(&path, parents)?;
                }
                parents.pop();
                continue;
            }
            if md.nlink() > 1 && !ft.is_symlink() {
                if let Some(first) = self.links.get(&md.ino()) {
                    self.ops.push(at(Op::Hardlink {
                        parents: parents.clone(),
                        name,
                        target: first.clone(),
                    }));
                    continue;
                }
                self.links.insert(md.ino(), tree_path.clone());
            }
            let kind = if ft.is_file() {
                let mut f = File::open(&path).map_err(|e| (path.clone(), e))?;
                Kind::File(self.spool.append(&mut f).map_err(|e| (path.clone(), e))?)
            } else if ft.is_symlink() {
                let target = fs::read_link(&path).map_err(|e| (path.clone(), e))?;
                Kind::Symlink(target.as_os_str().as_bytes().to_vec())
            } else if ft.is_char_device() || ft.is_block_device() {
                let (major, minor) = split_dev(md.rdev());
                if ft.is_char_device() {
                    Kind::CharDev { major, minor }
                } else {
                    Kind::BlockDev { major, minor }
                }
            } else if ft.is_fifo() {
                Kind::Fifo
            } else {
                continue;
            };
            self.ops.push(at(Op::Node {
                parents: parents.clone(),
                name,
                node: Node { meta, kind },
            }));
        }
        Ok(())
    }
}

fn tree_path(parents: &[Vec<u8>], name: &[u8]) -> Vec<u8> {
    let mut p = parents.join(&b'/');
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn meta(path: &Path, md: &fs::Metadata) -> io::Result<Meta> {
    Ok(Meta {
        perm: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: u64::try_from(md.mtime()).unwrap_or(0),
        xattrs: xattrs(path)?,
    })
}

/// The node's extended attributes but overlayfs' own.
fn xattrs(path: &Path) -> io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut names = vec![0u8; 4096];
    let n = loop {
        match rustix::fs::llistxattr(path, &mut names) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) if names.len() < 1 << 20 => {
                names.resize(names.len() * 4, 0)
            }
            Err(rustix::io::Errno::NOTSUP) => return Ok(out),
            Err(e) => return Err(e.into()),
        }
    };
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if OVERLAY_XATTR_PREFIXES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        out.insert(name.to_vec(), get_xattr(path, name)?.unwrap_or_default());
    }
    Ok(out)
}

fn get_xattr(path: &Path, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    let mut value = vec![0u8; 256];
    loop {
        match rustix::fs::lgetxattr(path, name.as_c_str(), &mut value) {
            Ok(n) => {
                value.truncate(n);
                return Ok(Some(value));
            }
            Err(rustix::io::Errno::RANGE) if value.len() < 1 << 20 => {
                let len = value.len() * 4;
                value.resize(len, 0)
            }
            Err(rustix::io::Errno::NODATA) | Err(rustix::io::Errno::NOTSUP) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

fn is_opaque(path: &Path) -> bool {
    OPAQUE_XATTRS
        .iter()
        .any(|name| matches!(get_xattr(path, name), Ok(Some(v)) if v == b"y"))
}

/// A `dev_t` as Linux encodes it: (major, minor).
fn split_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::apply_ops;
    use crate::spool::Spool;
    use crate::tree::Tree;

    fn names(tree: &Tree, path: &[&[u8]]) -> Vec<String> {
        let dir = tree.lookup(path).expect("present");
        tree.children(dir)
            .expect("a dir")
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }

    #[test]
    fn snapshots_flatten_with_overlay_whiteouts_and_hardlinks() {
        let lower = tempfile::tempdir().unwrap();
        let upper = tempfile::tempdir().unwrap();
        let l = lower.path();
        fs::create_dir_all(l.join("etc/app")).unwrap();
        fs::write(l.join("etc/app/a"), b"a").unwrap();
        fs::write(l.join("etc/gone"), b"x").unwrap();
        fs::write(l.join("bin"), b"binary").unwrap();
        fs::hard_link(l.join("bin"), l.join("bin2")).unwrap();
        std::os::unix::fs::symlink("bin", l.join("link")).unwrap();
        let u = upper.path();
        fs::create_dir_all(u.join("etc")).unwrap();
        fs::write(u.join("etc/new"), b"new").unwrap();
        // A whiteout as overlayfs makes it: a character device 0:0.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            u.join("etc/gone"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();

        let mut spool = Spool::new().unwrap();
        let mut tree = Tree::new();
        for (i, dir) in [l, u].into_iter().enumerate() {
            let ops = read(spool.main_writer(), dir).unwrap();
            apply_ops(&mut tree, i, ops).unwrap();
        }
        assert_eq!(names(&tree, &[]), ["bin", "bin2", "etc", "link"]);
        assert_eq!(names(&tree, &[b"etc".as_slice()]), ["app", "new"]);
        let bin = tree.lookup(&[b"bin".as_slice()]).unwrap();
        assert_eq!(
            tree.lookup(&[b"bin2".as_slice()]),
            Some(bin),
            "hardlinks share a node"
        );
        let Kind::File(c) = &tree.nodes[bin].kind else {
            panic!("a file")
        };
        assert_eq!(spool.read(*c).unwrap(), b"binary");
        let link = tree.lookup(&[b"link".as_slice()]).unwrap();
        assert!(matches!(&tree.nodes[link].kind, Kind::Symlink(t) if t == b"bin"));
    }

    #[test]
    fn an_opaque_directory_hides_the_lower_one() {
        let lower = tempfile::tempdir().unwrap();
        let upper = tempfile::tempdir().unwrap();
        fs::create_dir_all(lower.path().join("data")).unwrap();
        fs::write(lower.path().join("data/old"), b"old").unwrap();
        fs::create_dir_all(upper.path().join("data")).unwrap();
        fs::write(upper.path().join("data/fresh"), b"fresh").unwrap();
        let set = rustix::fs::setxattr(
            upper.path().join("data"),
            "trusted.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        );
        if let Err(e) = set {
            // trusted.* needs CAP_SYS_ADMIN; user.* is what overlayfs reads
            // with `userxattr`, and any user may set it.
            assert_eq!(e, rustix::io::Errno::PERM, "unexpected error");
            rustix::fs::setxattr(
                upper.path().join("data"),
                "user.overlay.opaque",
                b"y",
                rustix::fs::XattrFlags::empty(),
            )
            .expect("user.* xattrs where the tests run");
        }
        let mut spool = Spool::new().unwrap();
        let mut tree = Tree::new();
        for (i, dir) in [lower.path(), upper.path()].into_iter().enumerate() {
            let ops = read(spool.main_writer(), dir).unwrap();
            apply_ops(&mut tree, i, ops).unwrap();
        }
        assert_eq!(names(&tree, &[b"data".as_slice()]), ["fresh"]);
        let data = tree.lookup(&[b"data".as_slice()]).unwrap();
        assert!(
            tree.nodes[data].meta.xattrs.is_empty(),
            "overlayfs' own attributes stay out of the image"
        );
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let mut spool = Spool::new().unwrap();
        let e = read(spool.main_writer(), Path::new("/nonexistent/snapshot")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/snapshot"), "{e}");
    }
}
