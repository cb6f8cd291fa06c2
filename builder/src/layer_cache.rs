//! Layers already read by an earlier build, kept so that a rebuild reads only
//! the layers that changed (usually the top one), as Docker's layer cache does.
//!
//! One entry per layer digest, diff_id and compression, under
//! `<cache>/layers/<compression>/<digest hex>-<diff_id hash>/`: `spool` (the
//! layer's file contents, compressed as the image stores them) and `record`
//! (its ops and tables, see [`hyperfs::record`]). Entries are written only
//! for layers whose digest and diff_id were verified, into a temporary
//! directory renamed into place, so a reader sees a whole entry or none. A
//! damaged entry is ignored and replaced; the cache never fails a build.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::layer::OpAt;
use crate::oci::Layer;
use crate::spool::{Compression, Spool, SpoolWriter};

#[derive(Debug, Clone)]
pub struct LayerCache {
    dir: PathBuf,
}

/// A layer being read into a spool file that is kept if the read succeeds.
#[derive(Debug)]
pub struct Pending {
    tmp: tempfile::TempDir,
}

impl LayerCache {
    /// The cache for one compression under `root` (the blob cache's root), or
    /// `None` when it cannot be created.
    pub fn open(root: &Path, c: Compression) -> Option<Self> {
        let dir = root.join("layers").join(c.name());
        fs::create_dir_all(&dir).ok()?;
        Some(Self { dir })
    }

    fn entry(&self, l: &Layer) -> Option<PathBuf> {
        let hex = crate::cache::digest_hex(&l.digest).ok()?;
        let diff = Sha256::digest(l.diff_id.as_deref().unwrap_or("").as_bytes());
        Some(self.dir.join(format!("{hex}-{}", &hex::encode(diff)[..16])))
    }

    /// The layer's ops, with its spool file added to `spool`, if an intact
    /// entry is there.
    pub fn load(&self, l: &Layer, spool: &mut Spool) -> Option<Vec<OpAt>> {
        let dir = self.entry(l)?;
        if !dir.exists() {
            return None;
        }
        let loaded = (|| {
            let file = OpenOptions::new().read(true).open(dir.join("spool")).ok()?;
            let len = file.metadata().ok()?.len();
            let bytes = fs::read(dir.join("record")).ok()?;
            let record = hyperfs::record::decode(&bytes, spool.next_id(), len).ok()?;
            Some((file, record))
        })();
        let Some((file, record)) = loaded else {
            // Damaged: drop it, so this build's read replaces it.
            let _ = fs::remove_dir_all(&dir);
            return None;
        };
        spool.add_stored(file, record.holes, record.packs);
        Some(record.ops)
    }

    /// A spool file for reading `l` afresh, inside a temporary entry.
    pub fn begin(&self) -> Option<(Pending, File)> {
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempdir_in(&self.dir)
            .ok()?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(tmp.path().join("spool"))
            .ok()?;
        Some((Pending { tmp }, file))
    }

    /// Keeps a layer read without error: writes its record and moves the
    /// entry into place (an entry another build put there first wins).
    pub fn keep(&self, p: Pending, l: &Layer, w: &SpoolWriter, ops: &[OpAt]) {
        let Some(dest) = self.entry(l) else { return };
        let Ok(bytes) = hyperfs::record::encode(ops, w.holes(), w.packs(), w.len()) else {
            return;
        };
        if fs::write(p.tmp.path().join("record"), bytes).is_ok()
            && fs::rename(p.tmp.path(), &dest).is_ok()
        {
            let _ = p.tmp.keep();
        }
    }

    fn stamp_path(&self, l: &Layer) -> Option<PathBuf> {
        let hex = crate::cache::digest_hex(&l.digest).ok()?;
        Some(self.dir.join(".verified").join(hex))
    }

    /// What identifies a layout's blob file as unchanged: the file, its size
    /// and its change time (which no one can set back by hand).
    fn stamp(l: &Layer) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(&l.path).ok()?;
        Some(format!(
            "{} {} {} {}.{} {}.{} {}",
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
            l.path.display()
        ))
    }

    /// Whether `l`'s blob file in a local layout is the very file verified
    /// against its digest before (same inode, size and change time).
    pub fn blob_unchanged(&self, l: &Layer) -> bool {
        match (self.stamp_path(l), Self::stamp(l)) {
            (Some(p), Some(now)) => fs::read_to_string(p).is_ok_and(|was| was == now),
            _ => false,
        }
    }

    /// Records that `l`'s blob file was just verified.
    pub fn remember_blob(&self, l: &Layer) {
        if let (Some(p), Some(now)) = (self.stamp_path(l), Self::stamp(l)) {
            let _ = fs::create_dir_all(self.dir.join(".verified"));
            let tmp = p.with_extension("tmp");
            if fs::write(&tmp, now).is_ok() {
                let _ = fs::rename(&tmp, &p);
            }
        }
    }

    /// Removes every entry whose layer digest is not in `keep`; returns how
    /// many entries and bytes went.
    pub fn prune(root: &Path, keep: &std::collections::BTreeSet<String>) -> (u64, u64) {
        let (mut count, mut bytes) = (0, 0);
        let Ok(kinds) = fs::read_dir(root.join("layers")) else {
            return (0, 0);
        };
        for kind in kinds.flatten() {
            for e in fs::read_dir(kind.path()).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name == ".verified" {
                    let _ = fs::remove_dir_all(e.path());
                    continue;
                }
                let digest = format!("sha256:{}", name.split('-').next().unwrap_or(""));
                if keep.contains(&digest) && !name.starts_with(".tmp-") {
                    continue;
                }
                let size: u64 = ["spool", "record"]
                    .iter()
                    .filter_map(|f| fs::metadata(e.path().join(f)).ok())
                    .map(|m| m.len())
                    .sum();
                if fs::remove_dir_all(e.path()).is_ok() {
                    count += 1;
                    bytes += size;
                }
            }
        }
        (count, bytes)
    }
}
