//! The boot side of the contract: the ELF files hyperboot starts. The
//! kernel is an x86-64 little-endian executable whose PVH entry point is in
//! Xen's `PHYS32_ENTRY` note; the init is a static x86-64 executable that
//! stamps its contract version into [`crate::ELF_SECTION`]. hyperbuild
//! checks what it seals with these readers and the VMM parses the sealed
//! kernel with them. Every offset and size in a file is bounds-checked: a
//! malformed file gives an error or `None`, never a panic.

/// A loadable segment.
pub const PT_LOAD: u32 = 1;
/// A dynamic loader's path (a dynamically linked executable).
pub const PT_INTERP: u32 = 3;
/// Notes.
pub const PT_NOTE: u32 = 4;
/// An executable file (`e_type`).
pub const ET_EXEC: u16 = 2;
/// The bytes of the ELF header of a 64-bit file.
pub const HEADER_LEN: usize = 64;
/// The bytes of a 64-bit program header.
const PHDR_LEN: u16 = 56;
const EM_X86_64: u16 = 62;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Why a file is not an ELF file this contract takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("not a 64-bit little-endian x86-64 ELF file")]
    NotX86_64,
    #[error("truncated ELF {0}")]
    Truncated(&'static str),
}

/// A little-endian `u16` at `at`, if the bytes are there.
pub fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

/// A little-endian `u32` at `at`, if the bytes are there.
pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// A little-endian `u64` at `at`, if the bytes are there.
pub fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// The fields of an ELF header the readers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// `e_type` ([`ET_EXEC`] for a kernel).
    pub kind: u16,
    pub phoff: u64,
    pub phentsize: u16,
    pub phnum: u16,
    pub shoff: u64,
    pub shentsize: u16,
    pub shnum: u16,
    pub shstrndx: u16,
}

impl Header {
    /// Parses the first [`HEADER_LEN`] bytes of a file (more may follow).
    pub fn parse(b: &[u8]) -> Result<Header, ElfError> {
        if b.get(..4) != Some(b"\x7fELF") {
            return Err(ElfError::NotElf);
        }
        if b.get(4) != Some(&2) || b.get(5) != Some(&1) || u16_at(b, 18) != Some(EM_X86_64) {
            return Err(ElfError::NotX86_64);
        }
        let short = || ElfError::Truncated("header");
        Ok(Header {
            kind: u16_at(b, 16).ok_or_else(short)?,
            phoff: u64_at(b, 0x20).ok_or_else(short)?,
            shoff: u64_at(b, 0x28).ok_or_else(short)?,
            phentsize: u16_at(b, 0x36).ok_or_else(short)?,
            phnum: u16_at(b, 0x38).ok_or_else(short)?,
            shentsize: u16_at(b, 0x3a).ok_or_else(short)?,
            shnum: u16_at(b, 0x3c).ok_or_else(short)?,
            shstrndx: u16_at(b, 0x3e).ok_or_else(short)?,
        })
    }

    /// Where the program header table lies in the file: offset and length.
    pub fn program_table(&self) -> Result<(u64, u64), ElfError> {
        if self.phnum > 0 && self.phentsize < PHDR_LEN {
            return Err(ElfError::Truncated("program headers"));
        }
        let len = u64::from(self.phentsize) * u64::from(self.phnum);
        self.phoff
            .checked_add(len)
            .map(|_| (self.phoff, len))
            .ok_or(ElfError::Truncated("program headers"))
    }

    /// The program headers, from the table's bytes (read at
    /// [`Header::program_table`]).
    pub fn program_headers(&self, table: &[u8]) -> Result<Vec<ProgramHeader>, ElfError> {
        let short = || ElfError::Truncated("program headers");
        let (_, len) = self.program_table()?;
        if (table.len() as u64) < len {
            return Err(short());
        }
        (0..usize::from(self.phnum))
            .map(|i| {
                let e = &table[i * usize::from(self.phentsize)..];
                Ok(ProgramHeader {
                    kind: u32_at(e, 0).ok_or_else(short)?,
                    offset: u64_at(e, 8).ok_or_else(short)?,
                    paddr: u64_at(e, 24).ok_or_else(short)?,
                    filesz: u64_at(e, 32).ok_or_else(short)?,
                    memsz: u64_at(e, 40).ok_or_else(short)?,
                })
            })
            .collect()
    }
}

/// One program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramHeader {
    /// `p_type` ([`PT_LOAD`], [`PT_NOTE`], ...).
    pub kind: u32,
    pub offset: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// The PVH entry point in a note segment's bytes: the `Xen` note of type
/// `PHYS32_ENTRY`. `None` when the segment has none (or is malformed).
pub fn pvh_entry(notes: &[u8]) -> Option<u32> {
    let mut at = 0usize;
    while at.checked_add(12)? <= notes.len() {
        let namesz = u32_at(notes, at)? as usize;
        let descsz = u32_at(notes, at + 4)? as usize;
        let kind = u32_at(notes, at + 8)?;
        let name_end = (at + 12).checked_add(namesz)?;
        let desc = name_end.checked_add(3)? & !3;
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && notes.get(at + 12..name_end)? == b"Xen\0" {
            return u32_at(notes, desc);
        }
        at = desc.checked_add(descsz)?.checked_add(3)? & !3;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header with `phnum` program headers of 56 bytes right after it.
    fn header(phnum: u16) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[..6].copy_from_slice(b"\x7fELF\x02\x01");
        h[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        h[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        h[0x20..0x28].copy_from_slice(&(HEADER_LEN as u64).to_le_bytes());
        h[0x36..0x38].copy_from_slice(&PHDR_LEN.to_le_bytes());
        h[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
        h
    }

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    #[test]
    fn headers_and_program_headers_are_read_within_their_bytes() {
        assert_eq!(Header::parse(b"MZ"), Err(ElfError::NotElf));
        let mut arm = header(1);
        arm[18] = 183;
        assert_eq!(Header::parse(&arm), Err(ElfError::NotX86_64));
        assert_eq!(
            Header::parse(&header(1)[..40]),
            Err(ElfError::Truncated("header"))
        );
        let h = Header::parse(&header(2)).unwrap();
        assert_eq!((h.kind, h.program_table()), (ET_EXEC, Ok((64, 112))));
        let mut table = vec![0u8; 112];
        table[56..60].copy_from_slice(&PT_LOAD.to_le_bytes());
        table[56 + 24..56 + 32].copy_from_slice(&0x100_0000u64.to_le_bytes());
        let ph = h.program_headers(&table).unwrap();
        assert_eq!((ph[1].kind, ph[1].paddr), (PT_LOAD, 0x100_0000));
        assert!(h.program_headers(&table[..100]).is_err());
        // Entries shorter than a program header, or a table past the end
        // of the address space, are refused.
        let mut bad = header(2);
        bad[0x36] = 8;
        assert!(Header::parse(&bad).unwrap().program_table().is_err());
        let mut far = header(2);
        far[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Header::parse(&far).unwrap().program_table().is_err());
    }

    #[test]
    fn the_pvh_entry_is_the_xen_phys32_note() {
        let mut notes = note(b"GNU\0", 3, &[1; 20]);
        notes.extend(note(b"Xen\0", 17, &[9; 8]));
        assert_eq!(pvh_entry(&notes), None);
        notes.extend(note(
            b"Xen\0",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x100_0aa0u32.to_le_bytes(),
        ));
        assert_eq!(pvh_entry(&notes), Some(0x100_0aa0));
        // Cut inside the last note, or with sizes past the end: none.
        assert_eq!(pvh_entry(&notes[..notes.len() - 2]), None);
        let mut huge = note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &[0; 4]);
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(pvh_entry(&huge), None);
    }
}
