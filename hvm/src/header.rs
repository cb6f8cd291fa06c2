//! The fixed header and its section table (a pure parser: bytes in, values out).

use std::fmt;

/// File magic.
pub const MAGIC: [u8; 8] = *b"HYPERHVM";
/// The only format version this crate reads and writes.
pub const VERSION: u16 = 1;
/// Section alignment and header size.
pub const BLOCK_SIZE: u64 = 4096;
/// Length of the header, which the artifact digest covers.
pub const HEADER_LEN: usize = 4096;
const FIXED_LEN: usize = 64;
const ENTRY_LEN: usize = 64;
/// How many sections fit in the header.
pub const MAX_SECTIONS: usize = (HEADER_LEN - FIXED_LEN) / ENTRY_LEN;
/// A reader that does not know this section's kind must refuse the file.
pub const FLAG_REQUIRED: u32 = 1;

/// What a section holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SectionKind {
    Manifest,
    Kernel,
    Initrd,
    Rootfs,
    /// A kind this version does not know.
    Other(u32),
}

impl SectionKind {
    pub fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::Manifest,
            2 => Self::Kernel,
            3 => Self::Initrd,
            4 => Self::Rootfs,
            other => Self::Other(other),
        }
    }

    pub fn to_u32(self) -> u32 {
        match self {
            Self::Manifest => 1,
            Self::Kernel => 2,
            Self::Initrd => 3,
            Self::Rootfs => 4,
            Self::Other(v) => v,
        }
    }

    pub fn is_known(self) -> bool {
        !matches!(self, Self::Other(_))
    }
}

impl fmt::Display for SectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Manifest => f.write_str("manifest"),
            Self::Kernel => f.write_str("kernel"),
            Self::Initrd => f.write_str("initrd"),
            Self::Rootfs => f.write_str("rootfs"),
            Self::Other(v) => write!(f, "unknown({v})"),
        }
    }
}

/// One entry of the section table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub kind: SectionKind,
    pub flags: u32,
    pub offset: u64,
    pub length: u64,
    pub sha256: [u8; 32],
}

/// The decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub file_len: u64,
    pub sections: Vec<Section>,
}

/// Why a header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("not an .hvm artifact (bad magic)")]
    BadMagic,
    #[error("file is shorter than the {HEADER_LEN}-byte header")]
    Short,
    #[error("format version {0} is not supported (this build reads version {VERSION})")]
    Version(u16),
    #[error("header claims {0} sections, at most {MAX_SECTIONS} fit")]
    TooManySections(u32),
    #[error("non-zero reserved bytes in the header")]
    Reserved,
    #[error("section {index} ({kind}) has unknown flags {flags:#x}")]
    Flags {
        index: usize,
        kind: SectionKind,
        flags: u32,
    },
    #[error("section {index} ({kind}) is not 4096-byte aligned or overlaps the header")]
    Misaligned { index: usize, kind: SectionKind },
    #[error("section {index} ({kind}) reaches past the end of the file")]
    OutOfBounds { index: usize, kind: SectionKind },
    #[error("sections {0} and {1} overlap")]
    Overlap(usize, usize),
    #[error("section kind {0} appears more than once")]
    Duplicate(SectionKind),
    #[error("required section {0} is missing")]
    Missing(SectionKind),
    #[error(
        "section {index} has unknown kind {kind} flagged required; a newer hyper wrote this file"
    )]
    UnknownRequired { index: usize, kind: u32 },
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// Decodes and validates a header. `bytes` must be the first
    /// [`HEADER_LEN`] bytes of the file.
    pub fn parse(bytes: &[u8]) -> Result<Header, HeaderError> {
        if bytes.len() >= 8 && bytes[..8] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if bytes.len() < HEADER_LEN {
            return Err(HeaderError::Short);
        }
        let version = u16_at(bytes, 8);
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        let count = u32_at(bytes, 12);
        if count as usize > MAX_SECTIONS {
            return Err(HeaderError::TooManySections(count));
        }
        let count = count as usize;
        let file_len = u64_at(bytes, 16);
        let table_end = FIXED_LEN + count * ENTRY_LEN;
        if u16_at(bytes, 10) != 0
            || bytes[24..FIXED_LEN].iter().any(|&b| b != 0)
            || bytes[table_end..HEADER_LEN].iter().any(|&b| b != 0)
        {
            return Err(HeaderError::Reserved);
        }
        let mut sections = Vec::with_capacity(count);
        for index in 0..count {
            let e = &bytes[FIXED_LEN + index * ENTRY_LEN..FIXED_LEN + (index + 1) * ENTRY_LEN];
            let kind = SectionKind::from_u32(u32_at(e, 0));
            let flags = u32_at(e, 4);
            let offset = u64_at(e, 8);
            let length = u64_at(e, 16);
            let sha256: [u8; 32] = e[24..56].try_into().expect("32 bytes");
            if e[56..64].iter().any(|&b| b != 0) {
                return Err(HeaderError::Reserved);
            }
            if flags & !FLAG_REQUIRED != 0 {
                return Err(HeaderError::Flags { index, kind, flags });
            }
            if !offset.is_multiple_of(BLOCK_SIZE) || offset < HEADER_LEN as u64 {
                return Err(HeaderError::Misaligned { index, kind });
            }
            match offset.checked_add(length) {
                Some(end) if end <= file_len => {}
                _ => return Err(HeaderError::OutOfBounds { index, kind }),
            }
            if let SectionKind::Other(k) = kind {
                if flags & FLAG_REQUIRED != 0 {
                    return Err(HeaderError::UnknownRequired { index, kind: k });
                }
            }
            sections.push(Section {
                kind,
                flags,
                offset,
                length,
                sha256,
            });
        }
        let mut by_offset: Vec<usize> = (0..count).collect();
        by_offset.sort_by_key(|&i| sections[i].offset);
        for pair in by_offset.windows(2) {
            let (a, b) = (&sections[pair[0]], &sections[pair[1]]);
            if a.offset + a.length > b.offset {
                return Err(HeaderError::Overlap(pair[0], pair[1]));
            }
        }
        for kind in [
            SectionKind::Manifest,
            SectionKind::Kernel,
            SectionKind::Initrd,
            SectionKind::Rootfs,
        ] {
            match sections.iter().filter(|s| s.kind == kind).count() {
                0 => return Err(HeaderError::Missing(kind)),
                1 => {}
                _ => return Err(HeaderError::Duplicate(kind)),
            }
        }
        Ok(Header { file_len, sections })
    }

    /// Encodes the header into its 4096-byte block.
    ///
    /// # Panics
    /// If there are more than [`MAX_SECTIONS`] sections (writers check first).
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.sections.len() <= MAX_SECTIONS, "too many sections");
        let mut b = vec![0u8; HEADER_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(self.sections.len() as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.file_len.to_le_bytes());
        for (i, s) in self.sections.iter().enumerate() {
            let e = &mut b[FIXED_LEN + i * ENTRY_LEN..FIXED_LEN + (i + 1) * ENTRY_LEN];
            e[0..4].copy_from_slice(&s.kind.to_u32().to_le_bytes());
            e[4..8].copy_from_slice(&s.flags.to_le_bytes());
            e[8..16].copy_from_slice(&s.offset.to_le_bytes());
            e[16..24].copy_from_slice(&s.length.to_le_bytes());
            e[24..56].copy_from_slice(&s.sha256);
        }
        b
    }

    /// The section of a known kind (validated headers have each exactly once).
    pub fn section(&self, kind: SectionKind) -> Option<&Section> {
        self.sections.iter().find(|s| s.kind == kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        let kinds = [
            SectionKind::Manifest,
            SectionKind::Kernel,
            SectionKind::Initrd,
            SectionKind::Rootfs,
        ];
        let sections = kinds
            .iter()
            .enumerate()
            .map(|(i, &kind)| Section {
                kind,
                flags: FLAG_REQUIRED,
                offset: 4096 * (i as u64 + 1),
                length: 100,
                sha256: [i as u8; 32],
            })
            .collect();
        Header {
            file_len: 4096 * 5,
            sections,
        }
    }

    #[test]
    fn round_trips() {
        let h = sample();
        assert_eq!(Header::parse(&h.encode()).unwrap(), h);
    }

    #[test]
    fn refuses_malformed_headers() {
        type Edit = fn(&mut Header, &mut Vec<u8>);
        let cases: Vec<(&str, Edit, HeaderError)> = vec![
            ("magic", |_, b| b[0] = b'X', HeaderError::BadMagic),
            ("short", |_, b| b.truncate(100), HeaderError::Short),
            ("version", |_, b| b[8] = 2, HeaderError::Version(2)),
            (
                "count",
                |_, b| b[12] = 200,
                HeaderError::TooManySections(200),
            ),
            ("reserved", |_, b| b[30] = 1, HeaderError::Reserved),
            ("padding", |_, b| b[4000] = 1, HeaderError::Reserved),
            (
                "misaligned",
                |h, b| {
                    h.sections[1].offset += 1;
                    *b = h.encode()
                },
                HeaderError::Misaligned {
                    index: 1,
                    kind: SectionKind::Kernel,
                },
            ),
            (
                "past end",
                |h, b| {
                    h.sections[3].length = 5000;
                    *b = h.encode()
                },
                HeaderError::OutOfBounds {
                    index: 3,
                    kind: SectionKind::Rootfs,
                },
            ),
            (
                "overlap",
                |h, b| {
                    h.sections[1].length = 5000;
                    *b = h.encode()
                },
                HeaderError::Overlap(1, 2),
            ),
            (
                "missing",
                |h, b| {
                    h.sections.pop();
                    *b = h.encode()
                },
                HeaderError::Missing(SectionKind::Rootfs),
            ),
            (
                "duplicate",
                |h, b| {
                    h.sections[3].kind = SectionKind::Initrd;
                    *b = h.encode()
                },
                HeaderError::Duplicate(SectionKind::Initrd),
            ),
            (
                "unknown required",
                |h, b| {
                    h.sections[3].kind = SectionKind::Other(99);
                    *b = h.encode()
                },
                HeaderError::UnknownRequired { index: 3, kind: 99 },
            ),
            (
                "flags",
                |h, b| {
                    h.sections[0].flags = 6;
                    *b = h.encode()
                },
                HeaderError::Flags {
                    index: 0,
                    kind: SectionKind::Manifest,
                    flags: 6,
                },
            ),
        ];
        for (name, edit, want) in cases {
            let mut h = sample();
            let mut b = h.encode();
            edit(&mut h, &mut b);
            assert_eq!(Header::parse(&b), Err(want), "case {name}");
        }
    }

    #[test]
    fn skips_unknown_optional_sections() {
        let mut h = sample();
        h.file_len += 4096;
        h.sections.push(Section {
            kind: SectionKind::Other(42),
            flags: 0,
            offset: 4096 * 5,
            length: 1,
            sha256: [0; 32],
        });
        let parsed = Header::parse(&h.encode()).unwrap();
        assert_eq!(parsed.sections.len(), 5);
    }
}
