//! Publishing: an artifact streamed into a multipart upload as it is built.
//!
//! The artifact's header (its seal) is only known once every section has been
//! hashed, yet it sits at offset 0. Multipart uploads take their parts in any
//! order, so the body is sent as parts 2, 3, … while it is produced, the first
//! part (header plus the start of the body) is held back and sent last, and
//! the upload is completed only then: the object appears whole, at once, or
//! not at all. A failed or dropped upload is aborted, so no parts linger.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::multipart::{MultipartStore, PartId};
use object_store::MultipartId;
use tokio::task::JoinSet;

use crate::{io_err, Cloud, RemoteError, Target};

/// Size of each uploaded part (S3 wants at least 5 MiB for all but the last).
const PART: usize = 8 << 20;
/// Parts in flight at once.
const IN_FLIGHT: usize = 4;

/// What publishing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The artifact was written under the key.
    Written,
    /// The same artifact was already there; nothing changed.
    AlreadyPresent,
}

/// A published artifact.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Published {
    pub url: String,
    pub digest: String,
    pub size: u64,
    pub outcome: Outcome,
}

/// The sink an artifact is written into when its destination is a URL.
#[derive(Debug)]
pub enum PublishSink {
    Cloud(Upload),
    File {
        sink: hvm::FileSink,
        url: String,
        path: PathBuf,
        replace: bool,
    },
}

impl PublishSink {
    /// Prepares publishing to `target` (for a cloud store this starts the
    /// multipart upload). With `replace`, a different artifact already under
    /// the key is replaced instead of refused.
    pub fn create(target: Target, replace: bool) -> Result<Self, RemoteError> {
        match target {
            Target::File { url, path } => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(io_err(format!("cannot create {}", dir.display())))?;
                }
                let sink = hvm::FileSink::create(&path).map_err(|e| RemoteError::Io {
                    what: format!("cannot write {url}"),
                    source: io::Error::other(e),
                })?;
                Ok(PublishSink::File {
                    sink,
                    url,
                    path,
                    replace,
                })
            }
            Target::Cloud(cloud) => Ok(PublishSink::Cloud(Upload::start(cloud, replace)?)),
        }
    }
}

/// The digest of a file's existing artifact header, if the file exists.
fn local_existing(path: &Path) -> Result<Option<Result<String, String>>, io::Error> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut header = Vec::with_capacity(hvm::HEADER_LEN);
    Read::by_ref(&mut f)
        .take(hvm::HEADER_LEN as u64)
        .read_to_end(&mut header)?;
    Ok(Some(crate::header_digest(&header)))
}

/// Decides whether a key that may already hold something can take `ours`.
fn may_publish(
    url: &str,
    existing: Option<Result<String, String>>,
    ours: &str,
    replace: bool,
) -> Result<Option<Outcome>, RemoteError> {
    match existing {
        None => Ok(None),
        Some(Ok(d)) if d == ours => Ok(Some(Outcome::AlreadyPresent)),
        _ if replace => Ok(None),
        Some(Ok(existing)) => Err(RemoteError::Exists {
            url: url.to_string(),
            existing,
            ours: ours.to_string(),
        }),
        Some(Err(reason)) => Err(RemoteError::ExistsNotArtifact {
            url: url.to_string(),
            reason,
        }),
    }
}

fn seal(header: &[u8]) -> String {
    use sha2::Digest;
    hvm::digest_string(&sha2::Sha256::digest(header).into())
}

fn to_write_err(e: RemoteError) -> hvm::WriteError {
    hvm::WriteError::Io(io::Error::other(e))
}

impl Write for PublishSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            PublishSink::Cloud(u) => u.write(buf),
            PublishSink::File { sink, .. } => sink.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            PublishSink::Cloud(_) => Ok(()),
            PublishSink::File { sink, .. } => sink.flush(),
        }
    }
}

impl hvm::Sink for PublishSink {
    type Done = Outcome;

    fn finish(self, header: &[u8], file_len: u64) -> Result<Outcome, hvm::WriteError> {
        match self {
            PublishSink::Cloud(u) => u.finish(header).map_err(to_write_err),
            PublishSink::File {
                sink,
                url,
                path,
                replace,
            } => {
                let existing = local_existing(&path).map_err(hvm::WriteError::Io)?;
                if let Some(o) =
                    may_publish(&url, existing, &seal(header), replace).map_err(to_write_err)?
                {
                    return Ok(o); // dropping the sink removes its temporary file
                }
                sink.finish(header, file_len)?;
                Ok(Outcome::Written)
            }
        }
    }
}

/// A multipart upload in progress.
pub struct Upload {
    cloud: Cloud,
    mp: Arc<dyn MultipartStore>,
    id: MultipartId,
    replace: bool,
    /// The body bytes that share the first part with the header.
    first: Vec<u8>,
    /// The part being filled.
    buf: Vec<u8>,
    /// Index of the next body part (0 is the header's part).
    next: usize,
    inflight: JoinSet<Result<(usize, PartId), object_store::Error>>,
    parts: Vec<Option<PartId>>,
    done: bool,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("url", &self.cloud.url)
            .field("id", &self.id)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl Upload {
    fn start(cloud: Cloud, replace: bool) -> Result<Self, RemoteError> {
        let mp = cloud.multipart.clone().ok_or_else(|| RemoteError::Url {
            url: cloud.url.clone(),
            reason: "cannot publish over plain http(s); use s3://, gs://, az:// or file://".into(),
        })?;
        let id = cloud
            .rt
            .block_on(mp.create_multipart(&cloud.path))
            .map_err(|e| cloud.store_err(e))?;
        Ok(Self {
            cloud,
            mp,
            id,
            replace,
            first: Vec::with_capacity(PART - hvm::HEADER_LEN),
            buf: Vec::new(),
            next: 1,
            inflight: JoinSet::new(),
            parts: Vec::new(),
            done: false,
        })
    }

    fn failed(&self, e: object_store::Error) -> io::Error {
        io::Error::other(self.cloud.store_err(e))
    }

    /// Waits for one part in flight.
    fn reap_one(&mut self) -> io::Result<()> {
        match self.cloud.rt.block_on(self.inflight.join_next()) {
            None => Ok(()),
            Some(Ok(Ok((idx, part)))) => {
                if self.parts.len() <= idx {
                    self.parts.resize(idx + 1, None);
                }
                self.parts[idx] = Some(part);
                Ok(())
            }
            Some(Ok(Err(e))) => Err(self.failed(e)),
            Some(Err(e)) => Err(io::Error::other(e)),
        }
    }

    fn send(&mut self, idx: usize, data: Vec<u8>) -> io::Result<()> {
        while self.inflight.len() >= IN_FLIGHT {
            self.reap_one()?;
        }
        let (mp, path, id) = (self.mp.clone(), self.cloud.path.clone(), self.id.clone());
        self.inflight.spawn_on(
            async move {
                let part = mp.put_part(&path, &id, idx, data.into()).await?;
                Ok((idx, part))
            },
            self.cloud.rt.handle(),
        );
        Ok(())
    }

    fn finish(mut self, header: &[u8]) -> Result<Outcome, RemoteError> {
        let url = self.cloud.url.clone();
        let io = |e: io::Error| RemoteError::Io {
            what: format!("uploading {url}"),
            source: e,
        };
        if !self.buf.is_empty() {
            let idx = self.next;
            self.next += 1;
            let last = std::mem::take(&mut self.buf);
            self.send(idx, last).map_err(io)?;
        }
        let mut head = Vec::with_capacity(header.len() + self.first.len());
        head.extend_from_slice(header);
        head.extend_from_slice(&self.first);
        self.send(0, head).map_err(io)?;
        while !self.inflight.is_empty() {
            self.reap_one().map_err(io)?;
        }
        let ours = seal(header);
        let existing = self.cloud.existing()?;
        if let Some(o) = may_publish(&self.cloud.url, existing, &ours, self.replace)? {
            return Ok(o); // dropping self aborts the upload
        }
        let parts = std::mem::take(&mut self.parts)
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| RemoteError::Io {
                what: format!("uploading {}", self.cloud.url),
                source: io::Error::other("a part is missing"),
            })?;
        self.cloud
            .rt
            .block_on(
                self.mp
                    .complete_multipart(&self.cloud.path, &self.id, parts),
            )
            .map_err(|e| self.cloud.store_err(e))?;
        self.done = true;
        Ok(Outcome::Written)
    }
}

impl Write for Upload {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = PART - hvm::HEADER_LEN - self.first.len();
        if room > 0 {
            let n = room.min(data.len());
            self.first.extend_from_slice(&data[..n]);
            return Ok(n);
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(PART);
        }
        let n = (PART - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == PART {
            let idx = self.next;
            self.next += 1;
            let full = std::mem::take(&mut self.buf);
            self.send(idx, full)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.inflight.abort_all();
        let rt = self.cloud.rt.clone();
        let _ = rt.block_on(async {
            while self.inflight.join_next().await.is_some() {}
            self.mp.abort_multipart(&self.cloud.path, &self.id).await
        });
    }
}

/// Hashes the sections of an artifact as its bytes stream past, so a push
/// reads the file once: a section that does not match its header entry fails
/// the push before the upload completes.
struct Checked<W> {
    inner: W,
    pos: u64,
    sections: Vec<(hvm::Section, sha2::Sha256)>,
}

impl<W: Write> Write for Checked<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.write(buf)?;
        let (start, end) = (self.pos, self.pos + n as u64);
        for (s, h) in &mut self.sections {
            let (a, b) = (start.max(s.offset), end.min(s.offset + s.length));
            if a < b {
                h.update(&buf[(a - start) as usize..(b - start) as usize]);
            }
        }
        self.pos = end;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Uploads a built artifact file. The same artifact already under the key is
/// a no-op; a different one is refused unless `replace`. Every section is
/// checked against the header while it is uploaded; a mismatch aborts the
/// upload, so nothing appears under the key.
pub fn push(file: &Path, target: Target, replace: bool) -> Result<Published, RemoteError> {
    let verify_err = |source| RemoteError::Verify {
        url: file.display().to_string(),
        source,
    };
    // Header and manifest now; the bulk sections on the way up.
    let artifact = hvm::Artifact::open_with(file, |_, _| true).map_err(verify_err)?;
    let digest = hvm::digest_string(&artifact.digest());
    let size = artifact.header().file_len;
    let url = target.url().to_string();
    let existing = match &target {
        Target::Cloud(c) => c.existing()?,
        Target::File { path, .. } => {
            local_existing(path).map_err(io_err(format!("cannot read {url}")))?
        }
    };
    if let Some(outcome) = may_publish(&url, existing, &digest, replace)? {
        return Ok(Published {
            url,
            digest,
            size,
            outcome,
        });
    }
    let mut f = artifact.file();
    let mut header = vec![0u8; hvm::HEADER_LEN];
    std::os::unix::fs::FileExt::read_exact_at(f, &mut header, 0)
        .map_err(io_err(format!("cannot read {}", file.display())))?;
    let mut sink = Checked {
        inner: PublishSink::create(target, replace)?,
        pos: hvm::HEADER_LEN as u64,
        sections: artifact
            .header()
            .sections
            .iter()
            .map(|s| (s.clone(), <sha2::Sha256 as sha2::Digest>::new()))
            .collect(),
    };
    io::Seek::seek(&mut f, io::SeekFrom::Start(hvm::HEADER_LEN as u64))
        .map_err(io_err(format!("cannot read {}", file.display())))?;
    let body = size - hvm::HEADER_LEN as u64;
    let copied = io::copy(&mut f.take(body), &mut sink).map_err(|e| RemoteError::Io {
        what: format!("uploading {} to {url}", file.display()),
        source: e,
    })?;
    if copied != body {
        return Err(RemoteError::Io {
            what: format!("{} changed while it was uploaded", file.display()),
            source: io::Error::from(io::ErrorKind::UnexpectedEof),
        });
    }
    for (s, h) in std::mem::take(&mut sink.sections) {
        if <[u8; 32]>::from(sha2::Digest::finalize(h)) != s.sha256 {
            // Dropping the sink aborts the upload.
            return Err(verify_err(hvm::ReadError::Tampered {
                path: file.to_owned(),
                kind: s.kind,
            }));
        }
    }
    let outcome = hvm::Sink::finish(sink.inner, &header, size).map_err(|e| RemoteError::Io {
        what: format!("publishing {url}"),
        source: io::Error::other(e),
    })?;
    Ok(Published {
        url,
        digest,
        size,
        outcome,
    })
}

/// Copies an artifact already in a store to another key of the same store
/// (server side: nothing is downloaded), with the usual immutability rules.
/// This is how a pointer such as `current.hvm` moves back to an older build.
pub fn copy(from: &str, to: Target, replace: bool) -> Result<Published, RemoteError> {
    let src = match Target::open(from)? {
        Target::Cloud(c) => c,
        Target::File { .. } => {
            return Err(RemoteError::Url {
                url: from.to_string(),
                reason: "push a local file by its path, not a file:// URL".into(),
            })
        }
    };
    let Target::Cloud(dst) = to else {
        return Err(RemoteError::Url {
            url: from.to_string(),
            reason: "copying from object storage to file:// is `hyperboot pull`'s job".into(),
        });
    };
    let scheme_bucket = |u: &str| {
        let (scheme, rest) = u.split_once("://").unwrap_or(("", u));
        (
            scheme.to_string(),
            rest.split('/').next().unwrap_or("").to_string(),
        )
    };
    if scheme_bucket(&src.url) != scheme_bucket(&dst.url) || src.multipart.is_none() {
        return Err(RemoteError::Url {
            url: dst.url.clone(),
            reason: format!(
                "{} is in another store: copy within one bucket, or pull and push",
                src.url
            ),
        });
    }
    let digest = match src.existing()? {
        Some(Ok(d)) => d,
        Some(Err(reason)) => {
            return Err(RemoteError::NotArtifact {
                url: src.url.clone(),
                reason,
            })
        }
        None => {
            return Err(RemoteError::NotFound {
                url: src.url.clone(),
            })
        }
    };
    let size = src
        .rt
        .block_on(object_store::ObjectStoreExt::head(&*src.store, &src.path))
        .map_err(|e| src.store_err(e))?
        .size;
    let url = dst.url.clone();
    if let Some(outcome) = may_publish(&url, dst.existing()?, &digest, replace)? {
        return Ok(Published {
            url,
            digest,
            size,
            outcome,
        });
    }
    src.rt
        .block_on(object_store::ObjectStoreExt::copy(
            &*src.store,
            &src.path,
            &dst.path,
        ))
        .map_err(|e| dst.store_err(e))?;
    // The copy is the source's bytes; make sure they are still the artifact named.
    if dst.existing()? != Some(Ok(digest.clone())) {
        return Err(RemoteError::Changed {
            url: src.url.clone(),
        });
    }
    Ok(Published {
        url,
        digest,
        size,
        outcome: Outcome::Written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immutability_rules() {
        let d = "sha256:aa";
        assert_eq!(may_publish("u", None, d, false).unwrap(), None);
        assert_eq!(
            may_publish("u", Some(Ok(d.into())), d, false).unwrap(),
            Some(Outcome::AlreadyPresent)
        );
        let e = may_publish("u", Some(Ok("sha256:bb".into())), d, false).unwrap_err();
        assert!(e.to_string().contains("different artifact"), "{e}");
        assert_eq!(
            may_publish("u", Some(Ok("sha256:bb".into())), d, true).unwrap(),
            None
        );
        let e = may_publish("u", Some(Err("12 bytes".into())), d, false).unwrap_err();
        assert!(e.to_string().contains("not a .hvm artifact"), "{e}");
    }
}
