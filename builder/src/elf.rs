//! Just enough ELF reading to check the kernel and init the builder seals:
//! the kernel must be an x86-64 vmlinux with a PVH entry note, the init a
//! static x86-64 executable.

use hyper_contract::elf::{self, u32_at, u64_at, Header, ProgramHeader, PT_INTERP, PT_NOTE};

fn phdrs(b: &[u8]) -> Result<(Header, Vec<ProgramHeader>), String> {
    let h = Header::parse(b).map_err(|e| e.to_string())?;
    let (offset, len) = h.program_table().map_err(|e| e.to_string())?;
    let table = b
        .get(offset as usize..)
        .and_then(|t| t.get(..len as usize))
        .ok_or("truncated ELF program headers")?;
    let ph = h.program_headers(table).map_err(|e| e.to_string())?;
    Ok((h, ph))
}

/// The PVH entry point of a vmlinux, from its Xen `PHYS32_ENTRY` note.
pub fn pvh_entry(b: &[u8]) -> Result<u32, String> {
    for ph in phdrs(b)?.1.iter().filter(|p| p.kind == PT_NOTE) {
        let start = (ph.offset as usize).min(b.len());
        let end = ph.offset.saturating_add(ph.filesz).min(b.len() as u64) as usize;
        if let Some(entry) = elf::pvh_entry(&b[start..end.max(start)]) {
            return Ok(entry);
        }
    }
    Err("no PVH entry note (build the kernel with CONFIG_PVH=y)".into())
}

/// Refuses dynamically linked executables (the guest has no loader).
pub fn check_static(b: &[u8]) -> Result<(), String> {
    if phdrs(b)?.1.iter().any(|p| p.kind == PT_INTERP) {
        return Err("dynamically linked; build it with -C target-feature=+crt-static".into());
    }
    Ok(())
}

/// The contents of the section named `name`, if the file has one.
pub fn section<'a>(b: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, String> {
    let h = phdrs(b)?.0;
    let short = || "truncated ELF section headers".to_string();
    let (shoff, shentsize) = (h.shoff as usize, usize::from(h.shentsize));
    let (shnum, shstrndx) = (usize::from(h.shnum), usize::from(h.shstrndx));
    let header = |i: usize| -> Result<(u32, usize, usize), String> {
        let o = i
            .checked_mul(shentsize)
            .and_then(|x| x.checked_add(shoff))
            .ok_or_else(short)?;
        Ok((
            u32_at(b, o).ok_or_else(short)?,
            u64_at(b, o + 0x18).ok_or_else(short)? as usize,
            u64_at(b, o + 0x20).ok_or_else(short)? as usize,
        ))
    };
    let bytes = |offset: usize, size: usize| {
        offset
            .checked_add(size)
            .and_then(|end| b.get(offset..end))
            .ok_or_else(|| "an ELF section lies outside the file".to_string())
    };
    if shnum == 0 || shstrndx >= shnum {
        return Ok(None);
    }
    let (_, str_off, str_size) = header(shstrndx)?;
    let names = bytes(str_off, str_size)?;
    for i in 0..shnum {
        let (name_at, offset, size) = header(i)?;
        let Some(rest) = names.get(name_at as usize..) else {
            continue;
        };
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        if &rest[..end] == name.as_bytes() {
            return bytes(offset, size).map(Some);
        }
    }
    Ok(None)
}

/// The host-guest contract version an init speaks (its
/// `hyper_contract::ELF_SECTION`); None for an init that does not say.
pub fn init_contract(b: &[u8]) -> Result<Option<u32>, String> {
    match section(b, hyper_contract::ELF_SECTION)? {
        None => Ok(None),
        Some(s) => match <[u8; 4]>::try_from(s) {
            Ok(v) => Ok(Some(u32::from_le_bytes(v))),
            Err(_) => Err(format!(
                "its {} section is {} bytes, not 4",
                hyper_contract::ELF_SECTION,
                s.len()
            )),
        },
    }
}

/// The release string from the kernel's `Linux version …` banner.
pub fn kernel_version(b: &[u8]) -> Option<String> {
    const BANNER: &[u8] = b"Linux version ";
    let at = b.windows(BANNER.len()).position(|w| w == BANNER)? + BANNER.len();
    let rest = &b[at..(at + 64).min(b.len())];
    let end = rest.iter().position(|&c| c == b' ' || c == 0)?;
    String::from_utf8(rest[..end].to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_non_elf_and_finds_banner() {
        assert!(pvh_entry(b"MZ not elf").is_err());
        assert!(check_static(&[0x7f, b'E', b'L', b'F', 1, 1]).is_err());
        assert_eq!(
            kernel_version(b"xx Linux version 6.12.1-hyper (root@x) #1").as_deref(),
            Some("6.12.1-hyper")
        );
    }

    #[test]
    fn sections_by_name() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(section(&me, ".text")
            .unwrap()
            .is_some_and(|t| !t.is_empty()));
        assert_eq!(section(&me, ".no-such-section").unwrap(), None);
        assert_eq!(init_contract(&me).unwrap(), None);
        assert!(section(b"MZ", ".text").is_err());
    }

    #[test]
    fn the_test_binary_itself_is_dynamic_x86_64() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(phdrs(&me).is_ok_and(|(h, ph)| h.phnum as usize == ph.len()));
        assert!(pvh_entry(&me).is_err());
    }
}
