//! The blob cache: content-addressed, shared by every hyperbuild process of a
//! user, under `$XDG_CACHE_HOME/hyper` (`~/.cache/hyper`).
//!
//! ```text
//! blobs/sha256/<hex>     verified blobs: manifests, configs, layers
//! refs/<escaped ref>     "<manifest digest>\n" for a reference as resolved
//! tmp/                   downloads in progress (`<hex>.partial`, resumable)
//! ```
//!
//! A blob appears under `blobs/` only after its sha256 was checked, through a
//! rename from `tmp/`, so concurrent processes never see a torn or unverified
//! blob; two processes fetching the same blob both rename a verified copy.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Why the cache refused something.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("blob {expected} does not match its digest (got {actual}); it was not kept")]
    Mismatch { expected: String, actual: String },
    #[error("{0:?} is not a sha256 digest")]
    BadDigest(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The hex part of a well-formed `sha256:<64 hex>` digest.
pub fn digest_hex(digest: &str) -> Result<&str, CacheError> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| CacheError::BadDigest(digest.into()))?;
    if hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(hex)
    } else {
        Err(CacheError::BadDigest(digest.into()))
    }
}

/// One entry of `hyperbuild cache ls`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlobInfo {
    pub digest: String,
    pub size: u64,
}

/// The cache rooted at one directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// `$HYPER_BLOB_CACHE`, else `$XDG_CACHE_HOME/hyper`, else `~/.cache/hyper`.
    pub fn default_root() -> PathBuf {
        if let Some(p) = std::env::var_os("HYPER_BLOB_CACHE") {
            return PathBuf::from(p);
        }
        hvm::cache_home()
    }

    pub fn open(root: PathBuf) -> Result<Self, CacheError> {
        for d in ["blobs/sha256", "refs", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a verified blob lives (it may not exist yet).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, CacheError> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    pub fn has(&self, digest: &str) -> bool {
        self.blob_path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    /// Where an in-progress download of `digest` is kept between attempts.
    pub fn partial_path(&self, digest: &str) -> Result<PathBuf, CacheError> {
        Ok(self
            .root
            .join("tmp")
            .join(format!("{}.partial", digest_hex(digest)?)))
    }

    /// Checks a finished download and moves it into the cache, or deletes it.
    pub fn commit(&self, partial: &Path, digest: &str) -> Result<PathBuf, CacheError> {
        let actual = sha256_file(partial).map_err(io_err(partial))?;
        if actual != digest {
            let _ = fs::remove_file(partial);
            return Err(CacheError::Mismatch {
                expected: digest.into(),
                actual,
            });
        }
        let dest = self.blob_path(digest)?;
        fs::rename(partial, &dest).map_err(io_err(&dest))?;
        Ok(dest)
    }

    /// Stores a small blob held in memory after checking its digest.
    pub fn put_bytes(&self, digest: &str, bytes: &[u8]) -> Result<PathBuf, CacheError> {
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        if actual != digest {
            return Err(CacheError::Mismatch {
                expected: digest.into(),
                actual,
            });
        }
        let dest = self.blob_path(digest)?;
        if dest.is_file() {
            return Ok(dest);
        }
        let tmp_dir = self.root.join("tmp");
        let mut f = tempfile::NamedTempFile::new_in(&tmp_dir).map_err(io_err(&tmp_dir))?;
        f.write_all(bytes).map_err(io_err(&tmp_dir))?;
        f.persist(&dest).map_err(|e| CacheError::Io {
            path: dest.clone(),
            source: e.error,
        })?;
        Ok(dest)
    }

    /// Reads a cached blob, re-checking its digest (it may have been altered on disk).
    pub fn read_verified(&self, digest: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let p = self.blob_path(digest)?;
        match fs::read(&p) {
            Ok(b) => {
                let actual = format!("sha256:{}", hex::encode(Sha256::digest(&b)));
                if actual == digest {
                    Ok(Some(b))
                } else {
                    let _ = fs::remove_file(&p);
                    Ok(None)
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CacheError::Io { path: p, source: e }),
        }
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        let escaped: String = reference
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                    c
                } else {
                    '+'
                }
            })
            .collect();
        self.root.join("refs").join(escaped)
    }

    /// The manifest digest a reference resolved to last time, if any.
    pub fn get_ref(&self, reference: &str) -> Option<String> {
        let text = fs::read_to_string(self.ref_path(reference)).ok()?;
        let d = text.trim().to_string();
        digest_hex(&d).ok()?;
        Some(d)
    }

    pub fn set_ref(&self, reference: &str, digest: &str) -> Result<(), CacheError> {
        let p = self.ref_path(reference);
        let tmp_dir = self.root.join("tmp");
        let mut f = tempfile::NamedTempFile::new_in(&tmp_dir).map_err(io_err(&tmp_dir))?;
        writeln!(f, "{digest}").map_err(io_err(&tmp_dir))?;
        f.persist(&p).map_err(|e| CacheError::Io {
            path: p.clone(),
            source: e.error,
        })?;
        Ok(())
    }

    /// Every cached blob, sorted by digest.
    pub fn list(&self) -> Result<Vec<BlobInfo>, CacheError> {
        let dir = self.root.join("blobs/sha256");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            out.push(BlobInfo {
                digest: format!("sha256:{}", e.file_name().to_string_lossy()),
                size,
            });
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }

    /// Removes every blob (and partial download); with `keep_referenced`, keeps
    /// the manifests named by refs and everything they reach.
    pub fn prune(
        &self,
        keep: &std::collections::BTreeSet<String>,
    ) -> Result<(u64, u64), CacheError> {
        let (mut count, mut bytes) = (0, 0);
        for b in self.list()? {
            if !keep.contains(&b.digest) {
                let p = self.blob_path(&b.digest)?;
                fs::remove_file(&p).map_err(io_err(&p))?;
                count += 1;
                bytes += b.size;
            }
        }
        let tmp = self.root.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        if keep.is_empty() {
            let refs = self.root.join("refs");
            for e in fs::read_dir(&refs).map_err(io_err(&refs))?.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok((count, bytes))
    }

    /// Manifest digests named by refs.
    pub fn referenced_manifests(&self) -> Vec<String> {
        let refs = self.root.join("refs");
        let mut out: Vec<String> = fs::read_dir(refs)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| fs::read_to_string(e.path()).ok())
            .map(|s| s.trim().to_string())
            .filter(|d| digest_hex(d).is_ok())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// `sha256:<hex>` of a file's content.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h)?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(b: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(b)))
    }

    #[test]
    fn only_verified_blobs_enter() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path().to_owned()).unwrap();
        let d = digest(b"hello");
        assert!(c.put_bytes(&d, b"hellO").is_err());
        assert!(!c.has(&d));
        c.put_bytes(&d, b"hello").unwrap();
        assert!(c.has(&d));
        let partial = c.partial_path(&digest(b"other")).unwrap();
        fs::write(&partial, b"not other").unwrap();
        assert!(matches!(
            c.commit(&partial, &digest(b"other")),
            Err(CacheError::Mismatch { .. })
        ));
        assert!(!partial.exists() && !c.has(&digest(b"other")));
        assert_eq!(c.read_verified(&d).unwrap().unwrap(), b"hello");
    }

    #[test]
    fn a_blob_altered_on_disk_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path().to_owned()).unwrap();
        let d = digest(b"data");
        let p = c.put_bytes(&d, b"data").unwrap();
        fs::write(&p, b"evil").unwrap();
        assert_eq!(c.read_verified(&d).unwrap(), None);
        assert!(!c.has(&d));
    }

    #[test]
    fn refs_round_trip_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path().to_owned()).unwrap();
        let (a, b) = (digest(b"a"), digest(b"b"));
        c.put_bytes(&a, b"a").unwrap();
        c.put_bytes(&b, b"b").unwrap();
        c.set_ref("127.0.0.1:5000/x/y:latest", &a).unwrap();
        assert_eq!(c.get_ref("127.0.0.1:5000/x/y:latest"), Some(a.clone()));
        assert_eq!(c.referenced_manifests(), vec![a.clone()]);
        let keep = [a.clone()].into_iter().collect();
        assert_eq!(c.prune(&keep).unwrap(), (1, 1));
        assert!(c.has(&a) && !c.has(&b));
        assert!(digest_hex("sha256:../../etc").is_err());
    }
}
