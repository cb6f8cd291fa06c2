//! Fetching: artifacts from object storage, HTTP or an OCI registry into a
//! local cache keyed by artifact digest (`CACHE/artifacts/sha256/<hex>`),
//! verified before they are kept. With trusted signers, the artifact's
//! header and its signatures are checked first: an artifact no trusted key
//! signed is neither downloaded nor served from the cache. A URL whose object is unchanged (same ETag and size) is served from
//! the cache after one HEAD request; an object whose header names a cached
//! digest costs one 4 KiB range read. Interrupted downloads resume where they
//! stopped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use object_store::{GetOptions, GetRange, ObjectStoreExt};
use sha2::Digest;

use crate::signature::AllowedSigners;
use crate::{io_err, oci, Cloud, RemoteError, Target};

/// Attempts for one download before giving up.
const ATTEMPTS: u32 = 6;

/// A fetched artifact.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Fetched {
    pub url: String,
    pub digest: String,
    pub path: PathBuf,
    /// Bytes downloaded by this call (0 when the cache served it).
    pub transferred: u64,
}

/// What the cache remembers about a URL.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
struct UrlRecord {
    url: String,
    e_tag: Option<String>,
    size: u64,
    digest: String,
}

fn url_record_path(cache: &Path, url: &str) -> PathBuf {
    cache
        .join("artifacts/urls")
        .join(hex::encode(sha2::Sha256::digest(url.as_bytes())))
}

fn artifact_path(cache: &Path, digest: &str) -> PathBuf {
    cache
        .join("artifacts/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut t = tempfile::NamedTempFile::new_in(dir)?;
    t.write_all(bytes)?;
    t.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Brings the artifact at `url` into `cache` (normally `hvm::cache_home()`)
/// and returns its local path. `file://` URLs are used in place.
pub fn fetch(url: &str, cache: &Path, progress: bool) -> Result<Fetched, RemoteError> {
    fetch_checked(url, cache, progress, None)
}

/// The signatures stored beside the object at `url` (`URL.sig`).
fn object_signatures(url: &str) -> Result<Vec<Vec<u8>>, RemoteError> {
    Ok(crate::read_object(&format!("{url}.sig"))?
        .into_iter()
        .collect())
}

/// Checks `header` against the signatures `signatures()` finds, when there
/// are signers to trust.
fn check(
    signers: Option<&AllowedSigners>,
    url: &str,
    header: &[u8],
    signatures: impl FnOnce() -> Result<Vec<Vec<u8>>, RemoteError>,
) -> Result<(), RemoteError> {
    if let Some(s) = signers {
        let found = signatures()?;
        s.verify_any(url, &header[..hvm::HEADER_LEN.min(header.len())], &found)?;
    }
    Ok(())
}

/// [`fetch`], admitting only artifacts a key in `signers` signed (when
/// given): checked on the header before any download, and before a cached
/// copy is used.
pub fn fetch_checked(
    url: &str,
    cache: &Path,
    progress: bool,
    signers: Option<&AllowedSigners>,
) -> Result<Fetched, RemoteError> {
    if url.starts_with("docker://") {
        return fetch_registry(url, cache, progress, signers);
    }
    match Target::open(url)? {
        Target::File { url, path } => {
            let mut header = vec![0u8; hvm::HEADER_LEN];
            let f = std::fs::File::open(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => RemoteError::NotFound { url: url.clone() },
                _ => RemoteError::Io {
                    what: format!("cannot read {url}"),
                    source: e,
                },
            })?;
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut header, 0).map_err(|e| {
                RemoteError::NotArtifact {
                    url: url.clone(),
                    reason: e.to_string(),
                }
            })?;
            let digest =
                crate::header_digest(&header).map_err(|reason| RemoteError::NotArtifact {
                    url: url.clone(),
                    reason,
                })?;
            check(signers, &url, &header, || object_signatures(&url))?;
            Ok(Fetched {
                url,
                digest,
                path,
                transferred: 0,
            })
        }
        Target::Cloud(c) => fetch_cloud(&c, cache, progress, signers),
    }
}

/// The first 4 KiB of a cached artifact.
fn cached_header(path: &Path) -> Result<Vec<u8>, RemoteError> {
    let mut header = vec![0u8; hvm::HEADER_LEN];
    let f = std::fs::File::open(path).map_err(io_err(format!("cannot read {}", path.display())))?;
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut header, 0)
        .map_err(io_err(format!("cannot read {}", path.display())))?;
    Ok(header)
}

fn fetch_cloud(
    c: &Cloud,
    cache: &Path,
    progress: bool,
    signers: Option<&AllowedSigners>,
) -> Result<Fetched, RemoteError> {
    let meta =
        c.rt.block_on(c.store.head(&c.path))
            .map_err(|e| c.store_err(e))?;
    let record_path = url_record_path(cache, &c.url);
    let done = |digest: String, transferred| Fetched {
        url: c.url.clone(),
        path: artifact_path(cache, &digest),
        digest,
        transferred,
    };
    if let Ok(text) = std::fs::read_to_string(&record_path) {
        if let Ok(r) = serde_json::from_str::<UrlRecord>(&text) {
            if r.url == c.url
                && r.e_tag.is_some()
                && r.e_tag == meta.e_tag
                && r.size == meta.size
                && artifact_path(cache, &r.digest).exists()
            {
                let header = cached_header(&artifact_path(cache, &r.digest))?;
                check(signers, &c.url, &header, || object_signatures(&c.url))?;
                return Ok(done(r.digest, 0));
            }
        }
    }
    let not_artifact = |reason: String| RemoteError::NotArtifact {
        url: c.url.clone(),
        reason,
    };
    if meta.size < hvm::HEADER_LEN as u64 {
        return Err(not_artifact(format!("only {} bytes", meta.size)));
    }
    let header =
        c.rt.block_on(c.store.get_opts(
            &c.path,
            GetOptions {
                range: Some(GetRange::Bounded(0..hvm::HEADER_LEN as u64)),
                if_match: meta.e_tag.clone(),
                ..Default::default()
            },
        ))
        .map_err(|e| c.store_err(e));
    let header =
        c.rt.block_on(async { header?.bytes().await.map_err(|e| c.store_err(e)) })?;
    let digest = crate::header_digest(&header).map_err(not_artifact)?;
    check(signers, &c.url, &header, || object_signatures(&c.url))?;
    let record = UrlRecord {
        url: c.url.clone(),
        e_tag: meta.e_tag.clone(),
        size: meta.size,
        digest: digest.clone(),
    };
    let remember = || {
        // Best effort: without the record the next fetch reads the header again.
        let _ = write_atomic(
            &record_path,
            serde_json::to_string(&record)
                .unwrap_or_default()
                .as_bytes(),
        );
    };
    let dest = artifact_path(cache, &digest);
    if dest.exists() {
        remember();
        return Ok(done(digest, 0));
    }
    if progress {
        eprintln!(
            "hyperboot: fetching {} ({:.1} MB, {digest})",
            c.url,
            meta.size as f64 / 1e6
        );
    }
    let tmp_dir = cache.join("artifacts/tmp");
    std::fs::create_dir_all(&tmp_dir)
        .map_err(io_err(format!("cannot create {}", tmp_dir.display())))?;
    let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir).map_err(io_err(format!(
        "cannot create a file in {}",
        tmp_dir.display()
    )))?;
    let transferred = download(c, meta.size, meta.e_tag.as_deref(), tmp.as_file_mut())?;
    let artifact = hvm::Artifact::open(tmp.path()).map_err(|source| RemoteError::Verify {
        url: c.url.clone(),
        source,
    })?;
    if hvm::digest_string(&artifact.digest()) != digest {
        return Err(RemoteError::Changed { url: c.url.clone() });
    }
    drop(artifact);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o444))
        .map_err(io_err("cannot make the artifact read-only"))?;
    std::fs::create_dir_all(dest.parent().unwrap_or(cache))
        .map_err(io_err(format!("cannot create {}", cache.display())))?;
    tmp.persist(&dest).map_err(|e| RemoteError::Io {
        what: format!("cannot move the artifact to {}", dest.display()),
        source: e.error,
    })?;
    remember();
    Ok(done(digest, transferred))
}

/// Downloads `size` bytes into `file`, resuming after an interruption.
fn download(
    c: &Cloud,
    size: u64,
    e_tag: Option<&str>,
    file: &mut std::fs::File,
) -> Result<u64, RemoteError> {
    let mut offset = 0u64;
    let mut failures = 0u32;
    while offset < size {
        let result: Result<(), object_store::Error> = c.rt.block_on(async {
            let got = c
                .store
                .get_opts(
                    &c.path,
                    GetOptions {
                        range: Some(GetRange::Bounded(offset..size)),
                        if_match: e_tag.map(str::to_string),
                        ..Default::default()
                    },
                )
                .await?;
            let mut stream = got.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                let take = chunk.len().min((size - offset) as usize);
                file.write_all(&chunk[..take])
                    .map_err(|e| object_store::Error::Generic {
                        store: "local cache",
                        source: Box::new(e),
                    })?;
                offset += take as u64;
            }
            Ok(())
        });
        match result {
            Ok(()) if offset >= size => break,
            Ok(()) => failures += 1, // a short body: ask for the rest
            Err(object_store::Error::Precondition { .. }) => {
                return Err(RemoteError::Changed { url: c.url.clone() })
            }
            Err(e @ object_store::Error::NotFound { .. }) => return Err(c.store_err(e)),
            Err(e) => {
                failures += 1;
                if failures >= ATTEMPTS {
                    return Err(c.store_err(e));
                }
            }
        }
        if failures >= ATTEMPTS {
            return Err(RemoteError::Io {
                what: format!("downloading {}", c.url),
                source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            });
        }
        std::thread::sleep(Duration::from_millis(100 << failures.min(5)));
    }
    file.sync_all()
        .map_err(io_err("cannot write the artifact cache"))?;
    Ok(offset)
}

/// `docker://`: the artifact manifest, then (with signers) the header and
/// the signatures, then the layer into the cache unless it is there.
fn fetch_registry(
    url: &str,
    cache: &Path,
    progress: bool,
    signers: Option<&AllowedSigners>,
) -> Result<Fetched, RemoteError> {
    let r = oci::Reference::parse(url)?;
    let reg = oci::Registry::connect(&r, None)?;
    let m = oci::resolve(&reg)?;
    let dest = artifact_path(cache, &m.artifact_digest);
    let done = |transferred| Fetched {
        url: url.to_string(),
        digest: m.artifact_digest.clone(),
        path: dest.clone(),
        transferred,
    };
    if signers.is_some() {
        let header = if dest.exists() {
            cached_header(&dest)?
        } else {
            reg.blob_range(&m.file_digest, 0, hvm::HEADER_LEN as u64)?
        };
        let sealed = crate::header_digest(&header).map_err(|reason| RemoteError::NotArtifact {
            url: url.to_string(),
            reason,
        })?;
        if sealed != m.artifact_digest {
            return Err(RemoteError::NotArtifact {
                url: url.to_string(),
                reason: format!(
                    "its header seals {sealed}, its manifest names {}",
                    m.artifact_digest
                ),
            });
        }
        check(signers, url, &header, || oci::signatures(&reg, &m.digest))?;
    }
    if dest.exists() {
        return Ok(done(0));
    }
    if progress {
        eprintln!(
            "hyperboot: fetching {url} ({:.1} MB, {})",
            m.size as f64 / 1e6,
            m.artifact_digest
        );
    }
    let tmp_dir = cache.join("artifacts/tmp");
    std::fs::create_dir_all(&tmp_dir)
        .map_err(io_err(format!("cannot create {}", tmp_dir.display())))?;
    let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir).map_err(io_err(format!(
        "cannot create a file in {}",
        tmp_dir.display()
    )))?;
    let transferred = reg.download(&m.file_digest, m.size, tmp.as_file_mut())?;
    let artifact = hvm::Artifact::open(tmp.path()).map_err(|source| RemoteError::Verify {
        url: url.to_string(),
        source,
    })?;
    if hvm::digest_string(&artifact.digest()) != m.artifact_digest {
        return Err(RemoteError::NotArtifact {
            url: url.to_string(),
            reason: format!(
                "the file seals {}, its manifest names {}",
                hvm::digest_string(&artifact.digest()),
                m.artifact_digest
            ),
        });
    }
    drop(artifact);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o444))
        .map_err(io_err("cannot make the artifact read-only"))?;
    std::fs::create_dir_all(dest.parent().unwrap_or(cache))
        .map_err(io_err(format!("cannot create {}", cache.display())))?;
    tmp.persist(&dest).map_err(|e| RemoteError::Io {
        what: format!("cannot move the artifact to {}", dest.display()),
        source: e.error,
    })?;
    Ok(done(transferred))
}
