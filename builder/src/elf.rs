//! Just enough ELF reading to check the kernel and init the builder seals:
//! the kernel must be an x86-64 vmlinux with a PVH entry note, the init a
//! static x86-64 executable.

const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

struct Phdr {
    p_type: u32,
    offset: u64,
    filesz: u64,
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

fn phdrs(b: &[u8]) -> Result<Vec<Phdr>, String> {
    if b.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file".into());
    }
    if b.get(4) != Some(&2) || b.get(5) != Some(&1) || u16_at(b, 18) != Some(62) {
        return Err("not a 64-bit little-endian x86-64 ELF file".into());
    }
    let short = || "truncated ELF program headers".to_string();
    let phoff = u64_at(b, 0x20).ok_or_else(short)? as usize;
    let phentsize = u16_at(b, 0x36).ok_or_else(short)? as usize;
    let phnum = u16_at(b, 0x38).ok_or_else(short)? as usize;
    (0..phnum)
        .map(|i| {
            let o = phoff
                .checked_add(i.checked_mul(phentsize).ok_or_else(short)?)
                .ok_or_else(short)?;
            Ok(Phdr {
                p_type: u32_at(b, o).ok_or_else(short)?,
                offset: u64_at(b, o + 8).ok_or_else(short)?,
                filesz: u64_at(b, o + 32).ok_or_else(short)?,
            })
        })
        .collect()
}

/// The PVH entry point of a vmlinux, from its Xen `PHYS32_ENTRY` note.
pub fn pvh_entry(b: &[u8]) -> Result<u32, String> {
    for ph in phdrs(b)?.iter().filter(|p| p.p_type == PT_NOTE) {
        let end = ph.offset.saturating_add(ph.filesz) as usize;
        let mut o = ph.offset as usize;
        while o + 12 <= end.min(b.len()) {
            let namesz = u32_at(b, o).unwrap_or(0) as usize;
            let descsz = u32_at(b, o + 4).unwrap_or(0) as usize;
            let ntype = u32_at(b, o + 8).unwrap_or(0);
            let name_at = o + 12;
            let desc_at = name_at + namesz.div_ceil(4) * 4;
            if ntype == XEN_ELFNOTE_PHYS32_ENTRY && b.get(name_at..name_at + 4) == Some(b"Xen\0") {
                return u32_at(b, desc_at).ok_or_else(|| "truncated PVH note".to_string());
            }
            o = desc_at + descsz.div_ceil(4) * 4;
        }
    }
    Err("no PVH entry note (build the kernel with CONFIG_PVH=y)".into())
}

/// Refuses dynamically linked executables (the guest has no loader).
pub fn check_static(b: &[u8]) -> Result<(), String> {
    if phdrs(b)?.iter().any(|p| p.p_type == PT_INTERP) {
        return Err("dynamically linked; build it with -C target-feature=+crt-static".into());
    }
    Ok(())
}

/// The contents of the section named `name`, if the file has one.
pub fn section<'a>(b: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, String> {
    phdrs(b)?;
    let short = || "truncated ELF section headers".to_string();
    let shoff = u64_at(b, 0x28).ok_or_else(short)? as usize;
    let shentsize = u16_at(b, 0x3a).ok_or_else(short)? as usize;
    let shnum = u16_at(b, 0x3c).ok_or_else(short)? as usize;
    let shstrndx = u16_at(b, 0x3e).ok_or_else(short)? as usize;
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
        assert!(phdrs(&me).is_ok());
        assert!(pvh_entry(&me).is_err());
    }
}
