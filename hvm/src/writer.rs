//! Writing an artifact: sections are streamed into a [`Sink`] (a temporary file
//! beside the destination, or an object-store upload), hashed on the way, and
//! the artifact appears only once the header is written — a failed build
//! leaves nothing at the destination.

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

/// Where an artifact's bytes go. The writer streams everything after the
/// header in order, starting at offset [`HEADER_LEN`], zero padding included;
/// the header comes last, once every section's hash is known.
pub trait Sink: Write {
    /// What a finished sink reports (the path, the object written, ...).
    type Done;
    /// Places `header` at offset 0 and makes the artifact of `file_len` bytes
    /// appear at its destination, all at once.
    fn finish(self, header: &[u8], file_len: u64) -> Result<Self::Done, WriteError>;
}

/// A local file: a temporary file beside the destination, renamed into place
/// and made read-only at the end.
#[derive(Debug)]
pub struct FileSink {
    file: tempfile::NamedTempFile,
    dest: PathBuf,
    /// Small writes (inodes, directory blocks) gathered into large ones.
    buf: Vec<u8>,
}

/// How much a [`FileSink`] gathers before it writes.
const SINK_BUFFER: usize = 1 << 20;

impl FileSink {
    /// A sink whose artifact appears at `dest`.
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
        file.as_file_mut()
            .seek(SeekFrom::Start(HEADER_LEN as u64))?;
        Ok(Self {
            file,
            dest: dest.to_owned(),
            buf: Vec::with_capacity(SINK_BUFFER),
        })
    }
}

impl Write for FileSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > SINK_BUFFER {
            self.flush()?;
        }
        if data.len() >= SINK_BUFFER {
            return self.file.as_file_mut().write(data);
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let f = self.file.as_file_mut();
        f.write_all(&self.buf)?;
        self.buf.clear();
        f.flush()
    }
}

impl Sink for FileSink {
    type Done = PathBuf;

    fn finish(mut self, header: &[u8], file_len: u64) -> Result<PathBuf, WriteError> {
        self.flush()?;
        let f = self.file.as_file_mut();
        f.set_len(file_len)?;
        f.seek(SeekFrom::Start(0))?;
        f.write_all(header)?;
        f.sync_all()?;
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
        Ok(self.dest)
    }
}

/// Streams sections into a new artifact.
#[derive(Debug)]
pub struct ArtifactWriter<S: Sink = FileSink> {
    sink: S,
    pos: u64,
    sections: Vec<Section>,
}

/// A section being written: counts what goes through it, and hashes it on
/// a second thread, so hashing overlaps with producing and writing the bytes.
#[derive(Debug)]
pub struct SectionWriter<'a, W: Write> {
    out: &'a mut W,
    hasher: PipelinedHasher,
    length: u64,
}

impl<W: Write> Write for SectionWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.length += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// SHA-256 on a helper thread: bytes are gathered into 1 MiB buffers that
/// go to the thread and come back to be reused.
#[derive(Debug)]
struct PipelinedHasher {
    cur: Vec<u8>,
    to: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    back: std::sync::mpsc::Receiver<Vec<u8>>,
    thread: Option<std::thread::JoinHandle<[u8; 32]>>,
}

impl PipelinedHasher {
    const BUF: usize = 1 << 20;

    fn new() -> Self {
        let (to, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
        let (back_tx, back) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut h = Sha256::new();
            for buf in rx {
                h.update(&buf);
                let _ = back_tx.send(buf);
            }
            h.finalize().into()
        });
        Self {
            cur: Vec::with_capacity(Self::BUF),
            to: Some(to),
            back,
            thread: Some(thread),
        }
    }

    fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = (Self::BUF - self.cur.len()).min(data.len());
            self.cur.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.cur.len() == Self::BUF {
                self.send();
            }
        }
    }

    fn send(&mut self) {
        let mut next = self
            .back
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(Self::BUF));
        next.clear();
        let full = std::mem::replace(&mut self.cur, next);
        if let Some(to) = &self.to {
            to.send(full)
                .expect("the hashing thread runs until its channel closes");
        }
    }

    fn finalize(mut self) -> [u8; 32] {
        if !self.cur.is_empty() {
            self.send();
        }
        self.to = None;
        self.thread
            .take()
            .expect("finalized once")
            .join()
            .expect("the hashing thread does not panic")
    }
}

impl ArtifactWriter<FileSink> {
    /// Starts an artifact that will appear at `dest` on [`finish`](Self::finish).
    pub fn create(dest: &Path) -> Result<Self, WriteError> {
        Ok(Self::with_sink(FileSink::create(dest)?))
    }
}

impl<S: Sink> ArtifactWriter<S> {
    /// Starts an artifact streamed into `sink`.
    pub fn with_sink(sink: S) -> Self {
        Self {
            sink,
            pos: HEADER_LEN as u64,
            sections: Vec::new(),
        }
    }

    fn pad_to(&mut self, offset: u64) -> io::Result<()> {
        const ZEROS: [u8; BLOCK_SIZE as usize] = [0; BLOCK_SIZE as usize];
        while self.pos < offset {
            let n = (offset - self.pos).min(BLOCK_SIZE) as usize;
            self.sink.write_all(&ZEROS[..n])?;
            self.pos += n as u64;
        }
        Ok(())
    }

    /// Writes one section: `fill` gets a writer and streams the bytes into it.
    pub fn section<E>(
        &mut self,
        kind: SectionKind,
        flags: u32,
        fill: impl FnOnce(&mut SectionWriter<'_, S>) -> Result<(), E>,
    ) -> Result<Result<(), E>, WriteError> {
        if self.sections.len() == MAX_SECTIONS {
            return Err(WriteError::TooManySections);
        }
        let offset = self.pos.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        self.pad_to(offset)?;
        let mut w = SectionWriter {
            out: &mut self.sink,
            hasher: PipelinedHasher::new(),
            length: 0,
        };
        if let Err(e) = fill(&mut w) {
            return Ok(Err(e));
        }
        let length = w.length;
        let sha256 = w.hasher.finalize();
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

    /// The length of the artifact if it were finished now.
    pub fn file_len(&self) -> u64 {
        self.pos.div_ceil(BLOCK_SIZE) * BLOCK_SIZE
    }

    /// Pads to a block boundary, writes the header and makes the artifact
    /// appear (see [`Sink::finish`]). Returns the artifact digest.
    pub fn finish(self) -> Result<[u8; 32], WriteError> {
        Ok(self.finish_sink()?.0)
    }

    /// As [`finish`](Self::finish), also returning what the sink reported.
    pub fn finish_sink(mut self) -> Result<([u8; 32], S::Done), WriteError> {
        let file_len = self.pos.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        self.pad_to(file_len)?;
        let header = Header {
            file_len,
            sections: std::mem::take(&mut self.sections),
        };
        let bytes = header.encode();
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        let done = self.sink.finish(&bytes, file_len)?;
        Ok((digest, done))
    }
}
