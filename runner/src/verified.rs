//! A record of artifacts already verified on this host, so a boot does not
//! re-hash hundreds of MB that have not changed: `$XDG_CACHE_HOME/hyper/verified/
//! <artifact digest>` holds the device, inode, size, mtime and ctime of the file
//! that was checked. Any write to the file changes its ctime (which only root
//! can set back), so a changed file is always hashed again.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

fn dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HYPER_VERIFIED_CACHE") {
        return PathBuf::from(p);
    }
    hvm::cache_home().join("verified")
}

fn stamp(m: &std::fs::Metadata) -> String {
    format!(
        "{} {} {} {}.{} {}.{}\n",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    )
}

/// Whether this file, with this digest, was verified before.
pub fn seen(digest: &[u8; 32], m: &std::fs::Metadata) -> bool {
    std::fs::read_to_string(dir().join(hex::encode(digest))).is_ok_and(|s| s == stamp(m))
}

/// Records a file as verified (best effort: a failure only costs a re-hash).
pub fn record(digest: &[u8; 32], m: &std::fs::Metadata) {
    let d = dir();
    if std::fs::create_dir_all(&d).is_err() {
        return;
    }
    if let Ok(mut f) = tempfile::NamedTempFile::new_in(&d) {
        use std::io::Write;
        if f.write_all(stamp(m).as_bytes()).is_ok() {
            let _ = f.persist(d.join(hex::encode(digest)));
        }
    }
}
