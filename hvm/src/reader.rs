//! Opening an artifact: the header is parsed, the file length checked and every
//! section's sha256 verified before anything is handed out.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::header::{Header, HeaderError, Section, SectionKind, HEADER_LEN};
use crate::manifest::Manifest;

/// Why an artifact was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a valid artifact")]
    Header {
        path: PathBuf,
        #[source]
        source: HeaderError,
    },
    #[error("{path} is truncated or has trailing bytes: the header says {expected} bytes, the file has {actual}")]
    Length {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path} is corrupt or was tampered with: section {kind} does not match its sha256 (the seal does not hold)")]
    Tampered { path: PathBuf, kind: SectionKind },
    #[error("{path} has a malformed manifest")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// A verified artifact, open for reading.
#[derive(Debug)]
pub struct Artifact {
    path: PathBuf,
    file: File,
    header: Header,
    digest: [u8; 32],
    manifest: Manifest,
}

impl Artifact {
    /// Opens `path`, checks the header and every section's hash.
    pub fn open(path: &Path) -> Result<Self, ReadError> {
        Self::open_with(path, |_, _| false)
    }

    /// Like [`open`](Self::open), but the bulk sections (kernel, initrd,
    /// rootfs) are not hashed again when `already_verified(digest, metadata)`
    /// says this very file was verified before (a caller keeps that record,
    /// keyed by what changes whenever the file's bytes do). The header and the
    /// manifest are always checked.
    pub fn open_with(
        path: &Path,
        already_verified: impl Fn(&[u8; 32], &std::fs::Metadata) -> bool,
    ) -> Result<Self, ReadError> {
        let io_err = |source| ReadError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        let actual = meta.len();
        let mut head = vec![0u8; HEADER_LEN.min(actual as usize)];
        file.read_exact_at(&mut head, 0).map_err(io_err)?;
        let header = Header::parse(&head).map_err(|source| ReadError::Header {
            path: path.to_owned(),
            source,
        })?;
        if header.file_len != actual {
            return Err(ReadError::Length {
                path: path.to_owned(),
                expected: header.file_len,
                actual,
            });
        }
        let digest: [u8; 32] = Sha256::digest(&head).into();
        let skip_bulk = already_verified(&digest, &meta);
        for s in &header.sections {
            if skip_bulk && s.kind != SectionKind::Manifest {
                continue;
            }
            if hash_range(&file, s.offset, s.length).map_err(io_err)? != s.sha256 {
                return Err(ReadError::Tampered {
                    path: path.to_owned(),
                    kind: s.kind,
                });
            }
        }
        let m = header
            .section(SectionKind::Manifest)
            .expect("validated header has a manifest");
        let mut bytes = vec![0u8; m.length as usize];
        file.read_exact_at(&mut bytes, m.offset).map_err(io_err)?;
        let manifest = Manifest::from_json(&bytes).map_err(|source| ReadError::Manifest {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            path: path.to_owned(),
            file,
            header,
            digest,
            manifest,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The artifact digest (sha256 of the header).
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// The section of a known kind.
    pub fn section(&self, kind: SectionKind) -> &Section {
        self.header
            .section(kind)
            .expect("validated header has every known kind")
    }

    /// Reads a whole section into memory.
    pub fn read_section(&self, kind: SectionKind) -> io::Result<Vec<u8>> {
        let s = self.section(kind);
        let mut buf = vec![0u8; s.length as usize];
        self.file.read_exact_at(&mut buf, s.offset)?;
        Ok(buf)
    }

    /// The open file (sections are served from it by offset).
    pub fn file(&self) -> &File {
        &self.file
    }
}

fn hash_range(file: &File, offset: u64, length: u64) -> io::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    let mut reader = RangeReader {
        file,
        pos: offset,
        end: offset + length,
    };
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

struct RangeReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min((self.end - self.pos) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.pos += n as u64;
        Ok(n)
    }
}
