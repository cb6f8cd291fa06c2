//! The flattened filesystem tree, as inodes and directory entries.
//!
//! Nodes are inodes: a hardlink is two directory entries naming the same
//! [`NodeId`]. File contents live in a spool (see [`crate::spool`]); the tree
//! holds only where they are.

use std::collections::BTreeMap;

/// Index of a node in [`Tree::nodes`].
pub type NodeId = usize;

/// Ownership, permissions, time and extended attributes of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    /// Full xattr names (`security.capability`) to values, sorted.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Meta {
    /// Metadata for a directory that no tar entry described.
    pub fn implicit_dir() -> Self {
        Self {
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: BTreeMap::new(),
        }
    }
}

/// Where a regular file's bytes are in the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Content {
    /// Which spool file.
    pub file: u32,
    pub offset: u64,
    /// Logical length, holes included.
    pub len: u64,
    /// 1-based index of its hole map in the spool; 0 when it has no holes.
    pub holes: u32,
    /// 1-based index of its compressed chunk table in the spool; 0 when plain.
    pub packed: u32,
}

/// A directory entry: the node it names and the layer that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub node: NodeId,
    pub layer: usize,
}

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir(BTreeMap<Vec<u8>, Entry>),
    File(Content),
    Symlink(Vec<u8>),
    CharDev { major: u32, minor: u32 },
    BlockDev { major: u32, minor: u32 },
    Fifo,
}

/// One inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub meta: Meta,
    pub kind: Kind,
}

/// The whole tree; node 0 is the root directory.
#[derive(Debug, Clone)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    pub const ROOT: NodeId = 0;

    pub fn new() -> Self {
        Self {
            nodes: vec![Node {
                meta: Meta::implicit_dir(),
                kind: Kind::Dir(BTreeMap::new()),
            }],
        }
    }

    pub fn add(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    pub fn children(&self, dir: NodeId) -> Option<&BTreeMap<Vec<u8>, Entry>> {
        match &self.nodes[dir].kind {
            Kind::Dir(c) => Some(c),
            _ => None,
        }
    }

    pub fn children_mut(&mut self, dir: NodeId) -> Option<&mut BTreeMap<Vec<u8>, Entry>> {
        match &mut self.nodes[dir].kind {
            Kind::Dir(c) => Some(c),
            _ => None,
        }
    }

    /// Looks up a path given as components, without following symlinks.
    pub fn lookup(&self, components: &[&[u8]]) -> Option<NodeId> {
        let mut cur = Self::ROOT;
        for c in components {
            cur = self.children(cur)?.get(*c)?.node;
        }
        Some(cur)
    }

    /// Visits every reachable entry depth-first in name order, with its path.
    pub fn walk(&self, mut f: impl FnMut(&[u8], NodeId)) {
        fn rec(t: &Tree, dir: NodeId, path: &mut Vec<u8>, f: &mut dyn FnMut(&[u8], NodeId)) {
            if let Some(children) = t.children(dir) {
                for (name, e) in children {
                    let len = path.len();
                    path.push(b'/');
                    path.extend_from_slice(name);
                    f(path, e.node);
                    rec(t, e.node, path, f);
                    path.truncate(len);
                }
            }
        }
        f(b"/", Self::ROOT);
        rec(self, Self::ROOT, &mut Vec::new(), &mut f);
    }
}
