//! Writing an artifact: sections are streamed into a temporary file beside the
//! destination, hashed on the way, and the file is renamed into place only once
//! the header is written — a failed build leaves nothing at the destination.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::header::{Header, Section, SectionKind, BLOCK_SIZE, HEADER_LEN, MAX_SECTIONS};

/// Why writing failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot create a temporary file beside {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the artifact")]
    Io(#[from] io::Error),
    #[error("more than {MAX_SECTIONS} sections")]
    TooManySections,
    #[error("cannot move the finished artifact to {path}")]
    Persist {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Streams sections into a new artifact.
#[derive(Debug)]
pub struct ArtifactWriter {
    file: tempfile::NamedTempFile,
    dest: PathBuf,
    pos: u64,
    sections: Vec<Section>,
}

/// A section being written: counts and hashes what goes through it.
#[derive(Debug)]
pub struct SectionWriter<'a> {
    file: &'a mut File,
    hasher: Sha256,
    length: u64,
}

impl Write for SectionWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.length += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl ArtifactWriter {
    /// Starts an artifact that will appear at `dest` on [`finish`](Self::finish).
    pub fn create(dest: &Path) -> Result<Self, WriteError> {
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut file = tempfile::Builder::new()
            .prefix(".hvm-partial-")
            .tempfile_in(dir)
            .map_err(|source| WriteError::Create {
                path: dest.to_owned(),
                source,
            })?;
        file.as_file_mut().write_all(&[0u8; HEADER_LEN])?;
        Ok(Self {
            file,
            dest: dest.to_owned(),
            pos: HEADER_LEN as u64,
            sections: Vec::new(),
        })
    }

    /// Writes one section: `fill` gets a writer and streams the bytes into it.
    pub fn section<E>(
        &mut self,
        kind: SectionKind,
        flags: u32,
        fill: impl FnOnce(&mut SectionWriter<'_>) -> Result<(), E>,
    ) -> Result<Result<(), E>, WriteError> {
        if self.sections.len() == MAX_SECTIONS {
            return Err(WriteError::TooManySections);
        }
        let offset = self.pos.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        let f = self.file.as_file_mut();
        f.seek(SeekFrom::Start(offset))?;
        let mut w = SectionWriter {
            file: f,
            hasher: Sha256::new(),
            length: 0,
        };
        if let Err(e) = fill(&mut w) {
            return Ok(Err(e));
        }
        let length = w.length;
        let sha256: [u8; 32] = w.hasher.finalize().into();
        self.pos = offset + length;
        self.sections.push(Section {
            kind,
            flags,
            offset,
            length,
            sha256,
        });
        Ok(Ok(()))
    }

    /// Writes a section from a byte slice.
    pub fn section_bytes(
        &mut self,
        kind: SectionKind,
        flags: u32,
        bytes: &[u8],
    ) -> Result<(), WriteError> {
        self.section(kind, flags, |w| w.write_all(bytes))?
            .map_err(WriteError::Io)
    }

    /// Pads the file to a block boundary, writes the header, syncs and renames
    /// the file into place. Returns the artifact digest.
    pub fn finish(mut self) -> Result<[u8; 32], WriteError> {
        let file_len = self.pos.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        let header = Header {
            file_len,
            sections: self.sections,
        };
        let bytes = header.encode();
        let f = self.file.as_file_mut();
        f.set_len(file_len)?;
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        self.file
            .persist(&self.dest)
            .map_err(|e| WriteError::Persist {
                path: self.dest.clone(),
                source: e.error,
            })?;
        // Artifacts are immutable: read-only for everyone once written.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&self.dest, std::fs::Permissions::from_mode(0o444)).map_err(
            |source| WriteError::Persist {
                path: self.dest.clone(),
                source,
            },
        )?;
        Ok(digest)
    }
}
