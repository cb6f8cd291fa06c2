//! Loading the artifact's kernel (an ELF with a PVH entry note) straight from
//! the artifact file into guest memory, placing the initrd at the top of low
//! RAM, and writing the command line and the PVH start info.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile, VolatileMemoryError, VolatileSlice,
};

use super::layout;

/// Why the guest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the kernel section is not a loadable x86-64 ELF kernel")]
    Elf(#[source] linux_loader::loader::Error),
    #[error("the kernel has no PVH entry note (build it with CONFIG_PVH=y)")]
    NoPvh,
    #[error("the kernel command line is {0} bytes; the limit is {max}", max = layout::CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    #[error("{memory_mib} MiB of guest memory cannot hold the kernel and a {initrd} byte initrd; give more with --memory")]
    TooSmall { memory_mib: u64, initrd: usize },
    #[error("cannot read the kernel or initrd from the artifact")]
    Read(#[source] io::Error),
    #[error("cannot write boot data into guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
    #[error("cannot write the PVH start info")]
    StartInfo(#[source] linux_loader::configurator::Error),
}

/// A byte range of a file, readable and seekable as if it were the whole file.
#[derive(Debug)]
pub struct SectionReader {
    pub(crate) file: File,
    pub(crate) start: u64,
    pub(crate) len: u64,
    pos: u64,
}

impl SectionReader {
    pub fn new(file: File, start: u64, len: u64) -> Self {
        Self {
            file,
            start,
            len,
            pos: 0,
        }
    }
}

impl Seek for SectionReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let pos = target
            .filter(|p| *p <= self.len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.file.seek(SeekFrom::Start(self.start + pos))?;
        self.pos = pos;
        Ok(pos)
    }
}

impl Read for SectionReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min((self.len - self.pos) as usize);
        let k = self.file.read(&mut buf[..n])?;
        self.pos += k as u64;
        Ok(k)
    }
}

impl ReadVolatile for SectionReader {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let n = buf.len().min((self.len - self.pos) as usize);
        if n == 0 {
            return Ok(0);
        }
        let mut part = buf.subslice(0, n)?;
        let k = self.file.read_volatile(&mut part)?;
        self.pos += k as u64;
        Ok(k)
    }
}

/// What the vCPU needs to start.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    pub entry: u64,
    pub kernel_end: u64,
}

/// The initrd: the artifact's sealed part (a byte range of its file), then
/// `tail` (the run configuration's archive) at the next 4-byte boundary.
#[derive(Debug)]
pub struct Initrd {
    pub sealed: Option<(File, u64, u64)>,
    pub tail: Vec<u8>,
}

impl Initrd {
    fn len(&self) -> u64 {
        let sealed = self.sealed.as_ref().map_or(0, |s| s.2);
        sealed.div_ceil(4) * 4 + self.tail.len() as u64
    }
}

const PAGE: u64 = 4096;

/// One loadable segment of the kernel ELF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// The kernel ELF's segments and PVH entry, bounds-checked against the
/// section (the artifact is sealed, but its parser still takes nothing on
/// trust).
#[derive(Debug, PartialEq, Eq)]
struct KernelElf {
    segments: Vec<Segment>,
    entry: u64,
}

/// Reads `len` bytes at `at` of the section.
fn read_at(file: &File, section: (u64, u64), at: u64, len: u64) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    if at.checked_add(len)? > section.1 || len > 1 << 20 {
        return None;
    }
    let mut b = vec![0u8; len as usize];
    file.read_exact_at(&mut b, section.0 + at).ok()?;
    Some(b)
}

/// Parses the ELF header, program headers and notes (for the PVH entry).
/// None: not something this loader places (linux-loader's then decides).
fn parse_elf(file: &File, section: (u64, u64)) -> Option<KernelElf> {
    use hyper_contract::elf::{self, Header, ET_EXEC, HEADER_LEN, PT_LOAD, PT_NOTE};
    let h = Header::parse(&read_at(file, section, 0, HEADER_LEN as u64)?).ok()?;
    if h.kind != ET_EXEC || h.phnum == 0 || h.phnum > 64 {
        return None;
    }
    let (at, len) = h.program_table().ok()?;
    let headers = h.program_headers(&read_at(file, section, at, len)?).ok()?;
    let mut segments = Vec::new();
    let mut entry = None;
    for ph in headers {
        match ph.kind {
            PT_LOAD => {
                if ph.filesz > ph.memsz || ph.offset.checked_add(ph.filesz)? > section.1 {
                    return None;
                }
                ph.paddr.checked_add(ph.memsz)?;
                segments.push(Segment {
                    offset: ph.offset,
                    paddr: ph.paddr,
                    filesz: ph.filesz,
                    memsz: ph.memsz,
                });
            }
            PT_NOTE if entry.is_none() => {
                let notes = read_at(file, section, ph.offset, ph.filesz)?;
                entry = elf::pvh_entry(&notes).map(u64::from);
            }
            _ => {}
        }
    }
    Some(KernelElf {
        segments,
        entry: entry?,
    })
}

/// Copies `len` bytes of `file` at `offset` into guest memory at `guest`.
fn place(
    mem: &GuestMemoryMmap,
    file: &File,
    offset: u64,
    guest: u64,
    len: u64,
) -> Result<(), LoadError> {
    if len == 0 {
        return Ok(());
    }
    let mut reader = SectionReader::new(file.try_clone().map_err(LoadError::Read)?, offset, len);
    reader.seek(SeekFrom::Start(0)).map_err(LoadError::Read)?;
    mem.read_exact_volatile_from(GuestAddress(guest), &mut reader, len as usize)
        .map_err(LoadError::Memory)?;
    Ok(())
}

/// Loads kernel, initrd and command line, and writes the start info.
/// The kernel's segments and the initrd's sealed part are copied from the
/// artifact into guest memory, not mapped from it: a mapped page costs the
/// guest a fault to the host for each 4 KiB it touches (and a second for
/// each it writes — the kernel patches most of its text pages as it
/// boots), where copied memory sits in the host's huge pages (guest
/// memory is advised to be, [`crate::sys::advise_huge_pages`]). Measured in
/// the nested host (a cold boot): 6547 nested page faults mapped, 934
/// copied; the app's first output 2020 ms against 2282 (medians of 8), for
/// a copy of about 77 ms there.
pub fn load(
    mem: &GuestMemoryMmap,
    memory_bytes: u64,
    kernel: &mut SectionReader,
    initrd: &Initrd,
    cmdline: &str,
) -> Result<Loaded, LoadError> {
    let (entry, kernel_end) = match parse_elf(&kernel.file, (kernel.start, kernel.len)) {
        Some(elf)
            if elf.segments.iter().all(|s| {
                s.paddr >= layout::HIMEM_START
                    && s.paddr + s.memsz <= layout::low_ram_end(memory_bytes)
            }) =>
        {
            for seg in &elf.segments {
                place(
                    mem,
                    &kernel.file,
                    kernel.start + seg.offset,
                    seg.paddr,
                    seg.filesz,
                )?;
                // The rest up to memsz (.bss) is fresh memory: zero already.
            }
            let end = elf
                .segments
                .iter()
                .map(|s| s.paddr + s.memsz)
                .max()
                .unwrap_or(0);
            (elf.entry, end)
        }
        _ => {
            let result = Elf::load(mem, None, kernel, Some(GuestAddress(layout::HIMEM_START)))
                .map_err(LoadError::Elf)?;
            let PvhBootCapability::PvhEntryPresent(entry) = result.pvh_boot_cap else {
                return Err(LoadError::NoPvh);
            };
            (entry.0, result.kernel_end)
        }
    };

    if cmdline.len() >= layout::CMDLINE_MAX {
        return Err(LoadError::CmdlineTooLong(cmdline.len()));
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    mem.write_slice(&c, GuestAddress(layout::CMDLINE_ADDR))
        .map_err(LoadError::Memory)?;

    let initrd_len = initrd.len();
    let too_small = || LoadError::TooSmall {
        memory_mib: memory_bytes >> 20,
        initrd: initrd_len as usize,
    };
    let top = layout::low_ram_end(memory_bytes);
    let initrd_addr = top.checked_sub(initrd_len).ok_or_else(too_small)? & !(PAGE - 1);
    if initrd_addr < kernel_end {
        return Err(too_small());
    }
    let mut tail_at = initrd_addr;
    if let Some((file, offset, len)) = &initrd.sealed {
        place(mem, file, *offset, initrd_addr, *len)?;
        tail_at += len.div_ceil(4) * 4;
    }
    mem.write_slice(&initrd.tail, GuestAddress(tail_at))
        .map_err(LoadError::Memory)?;

    let memmap: Vec<hvm_memmap_table_entry> = layout::memmap(memory_bytes)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: 0x336e_c578,
        version: 1,
        flags: 0,
        nr_modules: u32::from(initrd_len > 0),
        modlist_paddr: layout::MODLIST_ADDR,
        cmdline_paddr: layout::CMDLINE_ADDR,
        rsdp_paddr: 0,
        memmap_paddr: layout::MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    let mut params = BootParams::new(&start_info, GuestAddress(layout::START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(layout::MEMMAP_ADDR));
    if initrd_len > 0 {
        let module = hvm_modlist_entry {
            paddr: initrd_addr,
            size: initrd_len,
            cmdline_paddr: 0,
            reserved: 0,
        };
        params.set_modules(&[module], GuestAddress(layout::MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(LoadError::StartInfo)?;
    Ok(Loaded { entry, kernel_end })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal ELF: two PT_LOAD segments and a PVH note.
    fn elf(offsets: [u64; 2]) -> Vec<u8> {
        let mut f = vec![0u8; 0x3000];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&3u16.to_le_bytes());
        let ph = |f: &mut Vec<u8>,
                  i: usize,
                  kind: u32,
                  off: u64,
                  paddr: u64,
                  filesz: u64,
                  memsz: u64| {
            let at = 64 + i * 56;
            f[at..at + 4].copy_from_slice(&kind.to_le_bytes());
            f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            f[at + 24..at + 32].copy_from_slice(&paddr.to_le_bytes());
            f[at + 32..at + 40].copy_from_slice(&filesz.to_le_bytes());
            f[at + 40..at + 48].copy_from_slice(&memsz.to_le_bytes());
        };
        ph(&mut f, 0, 1, offsets[0], 0x100_0000, 0x1000, 0x1000);
        ph(&mut f, 1, 1, offsets[1], 0x100_2000, 0x10, 0x3000);
        ph(&mut f, 2, 4, 0x400, 0, 24, 24);
        // Note: namesz 4 "Xen\0", descsz 4, type 18, entry 0x1000123.
        let note = [4u32, 4, 18]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .chain(*b"Xen\0")
            .chain(0x100_0123u32.to_le_bytes());
        for (i, b) in note.enumerate() {
            f[0x400 + i] = b;
        }
        f[offsets[0] as usize..offsets[0] as usize + 0x1000].fill(0xaa);
        f[offsets[1] as usize..offsets[1] as usize + 0x10].fill(0xbb);
        // Bytes after the segment's file part that must not show.
        f[offsets[1] as usize + 0x10..offsets[1] as usize + 0x20].fill(0xcc);
        f
    }

    fn file_with(prefix: usize, body: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![0x55; prefix]).unwrap();
        f.write_all(body).unwrap();
        f
    }

    fn boot(offsets: [u64; 2], prefix: usize) -> (GuestMemoryMmap, Loaded) {
        let body = elf(offsets);
        let file = file_with(prefix, &body);
        let mut k = SectionReader::new(file.try_clone().unwrap(), prefix as u64, body.len() as u64);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let initrd = Initrd {
            sealed: Some((file, prefix as u64 + 0x2000, 0x123)),
            tail: b"TAIL".to_vec(),
        };
        let loaded = load(&mem, 64 << 20, &mut k, &initrd, "console=ttyS0").unwrap();
        (mem, loaded)
    }

    fn byte(mem: &GuestMemoryMmap, at: u64) -> u8 {
        mem.read_obj::<u8>(GuestAddress(at)).unwrap()
    }

    #[test]
    fn segments_and_initrd_are_copied_as_the_file_says() {
        for prefix in [0x1000, 0x10] {
            let (mem, l) = boot([0x1000, 0x2000], prefix);
            assert_eq!(l.entry, 0x100_0123);
            assert_eq!(l.kernel_end, 0x100_5000);
            assert_eq!(byte(&mem, 0x100_0000), 0xaa);
            assert_eq!(byte(&mem, 0x100_0fff), 0xaa);
            assert_eq!(byte(&mem, 0x100_200f), 0xbb);
            assert_eq!(
                byte(&mem, 0x100_2010),
                0,
                "beyond filesz: zero, not the file's next bytes"
            );
            assert_eq!(byte(&mem, 0x100_4fff), 0, ".bss");
            // The initrd: the sealed part, zero padding to 4 bytes, the tail.
            let top = 64u64 << 20;
            let len = 0x124 + 4;
            let at = (top - len) & !0xfff;
            let mut b = vec![0u8; len as usize];
            mem.read_slice(&mut b, GuestAddress(at)).unwrap();
            assert_eq!(&b[0x123..], b"\0TAIL");
        }
    }

    #[test]
    fn malformed_headers_are_not_parsed() {
        let body = elf([0x1000, 0x2000]);
        let file = file_with(0, &body);
        let mut bad = body.clone();
        bad[56..58].copy_from_slice(&1000u16.to_le_bytes());
        let bad_file = file_with(0, &bad);
        assert!(parse_elf(&file, (0, body.len() as u64)).is_some());
        assert!(parse_elf(&bad_file, (0, bad.len() as u64)).is_none());
        // A segment reaching past the section.
        assert!(parse_elf(&file, (0, 0x2008)).is_none());
    }
}
