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
    #[error("cannot write boot data into guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
    #[error("cannot write the PVH start info")]
    StartInfo(#[source] linux_loader::configurator::Error),
}

/// A byte range of a file, readable and seekable as if it were the whole file.
#[derive(Debug)]
pub struct SectionReader {
    file: File,
    start: u64,
    len: u64,
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

/// Loads kernel, initrd and command line, and writes the start info.
pub fn load(
    mem: &GuestMemoryMmap,
    memory_bytes: u64,
    kernel: &mut SectionReader,
    initrd: &[u8],
    cmdline: &str,
) -> Result<Loaded, LoadError> {
    let result = Elf::load(mem, None, kernel, Some(GuestAddress(layout::HIMEM_START)))
        .map_err(LoadError::Elf)?;
    let PvhBootCapability::PvhEntryPresent(entry) = result.pvh_boot_cap else {
        return Err(LoadError::NoPvh);
    };

    if cmdline.len() >= layout::CMDLINE_MAX {
        return Err(LoadError::CmdlineTooLong(cmdline.len()));
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    mem.write_slice(&c, GuestAddress(layout::CMDLINE_ADDR))
        .map_err(LoadError::Memory)?;

    let too_small = || LoadError::TooSmall {
        memory_mib: memory_bytes >> 20,
        initrd: initrd.len(),
    };
    let top = layout::low_ram_end(memory_bytes);
    let initrd_addr = top.checked_sub(initrd.len() as u64).ok_or_else(too_small)? & !0xfff;
    if initrd_addr < result.kernel_end {
        return Err(too_small());
    }
    mem.write_slice(initrd, GuestAddress(initrd_addr))
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
        nr_modules: u32::from(!initrd.is_empty()),
        modlist_paddr: layout::MODLIST_ADDR,
        cmdline_paddr: layout::CMDLINE_ADDR,
        rsdp_paddr: 0,
        memmap_paddr: layout::MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    let mut params = BootParams::new(&start_info, GuestAddress(layout::START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(layout::MEMMAP_ADDR));
    if !initrd.is_empty() {
        let module = hvm_modlist_entry {
            paddr: initrd_addr,
            size: initrd.len() as u64,
            cmdline_paddr: 0,
            reserved: 0,
        };
        params.set_modules(&[module], GuestAddress(layout::MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(LoadError::StartInfo)?;
    Ok(Loaded {
        entry: entry.0,
        kernel_end: result.kernel_end,
    })
}
