//! virtio-blk serving one byte range of a file read-only — the rootfs section,
//! straight from the artifact at its offset.
//!
//! Every request is checked before any byte moves: the header must be a
//! readable descriptor of at least 16 bytes, the status a writable descriptor,
//! data descriptors of the right direction, and the sector range inside the
//! device. Writes fail with VIRTIO_BLK_S_IOERR; unknown requests get UNSUPP.
//! A malformed request fails that request only.

use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::virtio_mmio::{serve_chains, DeviceError, VirtioDevice};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

const F_SEG_MAX: u64 = 1 << VIRTIO_BLK_F_SEG_MAX;
const F_RO: u64 = 1 << VIRTIO_BLK_F_RO;
const T_IN: u32 = VIRTIO_BLK_T_IN;
const T_OUT: u32 = VIRTIO_BLK_T_OUT;
const T_FLUSH: u32 = VIRTIO_BLK_T_FLUSH;
const T_GET_ID: u32 = VIRTIO_BLK_T_GET_ID;
const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const ID: &[u8] = b"hyper-rootfs";
const CHUNK: usize = 64 * 1024;

/// A read-only block device over `file[offset .. offset + len]`.
#[derive(Debug)]
pub struct Block {
    file: File,
    offset: u64,
    len: u64,
    config: Vec<u8>,
    buf: Vec<u8>,
    /// Requests refused as malformed or out of range (for `-v` and tests).
    pub refused: u64,
}

impl Block {
    pub fn new(file: File, offset: u64, len: u64) -> Self {
        let mut config = vec![0u8; 16];
        config[0..8].copy_from_slice(&(len / SECTOR).to_le_bytes());
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        Self {
            file,
            offset,
            len,
            config,
            buf: vec![0; CHUNK],
            refused: 0,
        }
    }

    /// Serves one chain; returns how many bytes were written to the guest.
    fn handle(&mut self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> u32 {
        let (Some(head), Some(status)) = (descs.first(), descs.last()) else {
            self.refused += 1;
            return 0;
        };
        // A chain whose last descriptor still points on was cut short: it loops,
        // is longer than the queue, or leads outside the table.
        if descs.len() < 2 || status.has_next() || !status.is_write_only() || status.len() < 1 {
            self.refused += 1;
            return 0;
        }
        let data = &descs[1..descs.len() - 1];
        let mut header = [0u8; 16];
        let code = if head.is_write_only()
            || head.len() < 16
            || mem.read_slice(&mut header, head.addr()).is_err()
        {
            S_IOERR
        } else {
            let rtype = u32::from_le_bytes(header[0..4].try_into().expect("4"));
            let sector = u64::from_le_bytes(header[8..16].try_into().expect("8"));
            match rtype {
                T_IN => match self.read(sector, data, mem) {
                    Ok(n) => {
                        return self
                            .finish(status, S_OK, mem)
                            .map_or(0, |_| n.saturating_add(1))
                    }
                    Err(()) => S_IOERR,
                },
                T_OUT => S_IOERR,
                T_FLUSH => S_OK,
                T_GET_ID => match data.first() {
                    Some(d) if d.is_write_only() => {
                        let mut id = [0u8; 20];
                        id[..ID.len()].copy_from_slice(ID);
                        let n = (d.len() as usize).min(20);
                        if mem.write_slice(&id[..n], d.addr()).is_ok() {
                            return self.finish(status, S_OK, mem).map_or(0, |_| n as u32 + 1);
                        }
                        S_IOERR
                    }
                    _ => S_IOERR,
                },
                _ => S_UNSUPP,
            }
        };
        if code != S_OK {
            self.refused += 1;
        }
        self.finish(status, code, mem).map_or(0, |_| 1)
    }

    fn finish(&self, status: &Descriptor, code: u8, mem: &GuestMemoryMmap) -> Result<(), ()> {
        mem.write_obj(code, status.addr()).map_err(|_| ())
    }

    /// Reads the sectors into the writable data descriptors.
    fn read(&mut self, sector: u64, data: &[Descriptor], mem: &GuestMemoryMmap) -> Result<u32, ()> {
        if data.iter().any(|d| !d.is_write_only()) {
            return Err(());
        }
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        let start = sector.checked_mul(SECTOR).ok_or(())?;
        match start.checked_add(total) {
            Some(end) if end <= self.len && total <= u64::from(u32::MAX) => {}
            _ => return Err(()),
        }
        let mut pos = start;
        for d in data {
            let mut done = 0u64;
            while done < u64::from(d.len()) {
                let n = (u64::from(d.len()) - done).min(CHUNK as u64) as usize;
                self.file
                    .read_exact_at(&mut self.buf[..n], self.offset + pos)
                    .map_err(|_| ())?;
                let at = d.addr().0.checked_add(done).ok_or(())?;
                mem.write_slice(&self.buf[..n], GuestAddress(at))
                    .map_err(|_| ())?;
                done += n as u64;
                pos += n as u64;
            }
        }
        Ok(total as u32)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        F_RO | F_SEG_MAX
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn process(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        let queue = &mut queues[index];
        let used = serve_chains(queue, mem, |descs| self.handle(descs, mem))?;
        Ok(used && queue.needs_notification(mem).unwrap_or(true))
    }
}
