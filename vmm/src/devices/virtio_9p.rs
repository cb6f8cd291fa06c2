//! virtio-9p: one `-v` host directory, served by [`crate::p9`] under a
//! mount tag (`vol0`, `vol1`, …) as QEMU's `virtio-9p-device` is.
//!
//! A guest notification only wakes the share's own thread, which does the
//! file work outside the vCPU threads and under a seccomp filter of its own
//! (the vCPU filter has no file system calls at all).
//!
//! A request is the concatenation of the chain's readable descriptors, the
//! reply goes into its writable ones in order (so the kernel's zero-copy
//! reads and writes, with data pages as extra descriptors, work as is).
//! Chains are checked before any byte moves: readable before writable, a
//! size field of at least 7 and at most what the readable part holds and the
//! negotiated msize, and every descriptor inside guest memory. A malformed
//! chain is returned unanswered (length 0) and counted; the device goes on.

use std::sync::{Arc, Condvar, Mutex};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::virtio_mmio::{add_used, DeviceError, MmioTransport, VirtioDevice};
use crate::p9::Server;

use virtio_bindings::virtio_ids::VIRTIO_ID_9P;

/// VIRTIO_9P_MOUNT_TAG (virtio 1.2, 5.15.3; not in virtio-bindings).
const F_MOUNT_TAG: u64 = 1;
const QUEUE_SIZE: u16 = 128;

/// Wakes a share's thread; a ring while it works is not lost.
#[derive(Debug, Default)]
pub struct Wake {
    rung: Mutex<bool>,
    cv: Condvar,
}

impl Wake {
    fn ring(&self) {
        *self.rung.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_one();
    }

    fn wait(&self) {
        let mut rung = self.rung.lock().unwrap_or_else(|e| e.into_inner());
        while !*rung {
            rung = self.cv.wait(rung).unwrap_or_else(|e| e.into_inner());
        }
        *rung = false;
    }
}

/// The device for one shared directory.
#[derive(Debug)]
pub struct Share {
    config: Vec<u8>,
    server: Server,
    wake: Arc<Wake>,
    request: Vec<u8>,
    /// Requests answered (errors included).
    pub served: u64,
    /// Chains returned unanswered because they were malformed.
    pub refused: u64,
}

impl Share {
    /// `tag` is at most 32 bytes (the kernel's limit for mount tags).
    pub fn new(tag: &str, server: Server) -> Self {
        let tag = &tag.as_bytes()[..tag.len().min(32)];
        let mut config = (tag.len() as u16).to_le_bytes().to_vec();
        config.extend_from_slice(tag);
        Self {
            config,
            server,
            wake: Arc::new(Wake::default()),
            request: Vec::new(),
            served: 0,
            refused: 0,
        }
    }

    /// What the share's thread waits on.
    pub fn wake(&self) -> Arc<Wake> {
        self.wake.clone()
    }

    /// Serves the next request on the queue, if any (on the share's thread,
    /// which takes the device's lock per request, so a vCPU touching the
    /// device waits for one request at most).
    pub fn serve_one(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        let queue = &mut queues[0];
        if !queue.ready() || !queue.is_valid(mem) {
            return Ok(false);
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return Ok(false);
        };
        let head = chain.head_index();
        let descs: Vec<Descriptor> = chain.collect();
        let len = match self.handle(&descs, mem) {
            Some(n) => {
                self.served += 1;
                n
            }
            None => {
                self.refused += 1;
                0
            }
        };
        add_used(queue, mem, head, len)?;
        Ok(queue.needs_notification(mem).unwrap_or(true))
    }

    /// One request; the reply's length, or None for a malformed chain.
    fn handle(&mut self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> Option<u32> {
        let split = descs.iter().position(|d| d.is_write_only())?;
        let (out, replies) = descs.split_at(split);
        if out.is_empty() || replies.iter().any(|d| !d.is_write_only()) {
            return None;
        }
        let limit = self.server.msize() as usize;
        self.request.clear();
        for d in out {
            let take = (d.len() as usize).min(limit - self.request.len());
            let at = self.request.len();
            self.request.resize(at + take, 0);
            mem.read_slice(&mut self.request[at..], d.addr()).ok()?;
            if self.request.len() == limit {
                break;
            }
        }
        let size = u32::from_le_bytes(self.request.get(..4)?.try_into().ok()?) as usize;
        if size < crate::p9::wire::HEADER || size > self.request.len() {
            return None;
        }
        let room: u64 = replies.iter().map(|d| u64::from(d.len())).sum();
        let reply = self
            .server
            .handle(&self.request[..size], room.min(limit as u64) as usize);
        let mut rest = &reply[..];
        for d in replies {
            if rest.is_empty() {
                break;
            }
            let n = rest.len().min(d.len() as usize);
            mem.write_slice(&rest[..n], d.addr()).ok()?;
            rest = &rest[n..];
        }
        Some(reply.len() as u32)
    }
}

impl VirtioDevice for Share {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_9P
    }

    fn features(&self) -> u64 {
        F_MOUNT_TAG
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn process(
        &mut self,
        _index: usize,
        _queues: &mut [Queue],
        _mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        self.wake.ring();
        Ok(false)
    }
}

/// A share's thread body: waits for the guest's notifications and answers
/// its requests, one per turn of the device lock (so a vCPU reading the
/// interrupt status waits for one request at most), until the queue is empty.
pub fn serve(share: &Mutex<MmioTransport<Share>>, mem: &GuestMemoryMmap) {
    let wake = crate::lock(share).device.wake();
    loop {
        wake.wait();
        loop {
            let mut t = crate::lock(share);
            let before = t.device.served + t.device.refused;
            t.poke(mem, |d, q, m| d.serve_one(q, m));
            if t.device.served + t.device.refused == before {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    /// A guest driver in miniature: a queue at fixed addresses, chains built
    /// by hand, the device driven through its registers as a vCPU would.
    struct Guest {
        mem: GuestMemoryMmap,
        dev: MmioTransport<Share>,
        next: u16,
        dir: tempfile::TempDir,
    }

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn reg(dev: &mut MmioTransport<Share>, mem: &GuestMemoryMmap, off: u64, v: u32) {
        dev.write(off, &v.to_le_bytes(), mem);
    }

    fn guest() -> Guest {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"host bytes").unwrap();
        let server = Server::new(dir.path(), false, 64).unwrap();
        let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = MmioTransport::new(Share::new("vol0", server), irq);
        for (off, v) in [
            (0x70, 1),
            (0x70, 3),
            (0x24, 1),
            (0x20, 1),
            (0x70, 11),
            (0x30, 0),
            (0x38, 8),
            (0x80, DESC as u32),
            (0x90, AVAIL as u32),
            (0xa0, USED as u32),
            (0x44, 1),
            (0x70, 15),
        ] {
            reg(&mut dev, &mem, off, v);
        }
        Guest {
            mem,
            dev,
            next: 0,
            dir,
        }
    }

    impl Guest {
        /// Offers a chain of (addr, len, writable) and serves it; returns
        /// the used length.
        fn submit(&mut self, chain: &[(u64, u32, bool)]) -> u32 {
            for (i, &(addr, len, w)) in chain.iter().enumerate() {
                let at = GuestAddress(DESC + 16 * i as u64);
                let next = i + 1 < chain.len();
                let flags = u16::from(next) | if w { 2 } else { 0 };
                let d = [
                    &addr.to_le_bytes()[..],
                    &len.to_le_bytes(),
                    &flags.to_le_bytes(),
                    &((i + 1) as u16).to_le_bytes(),
                ]
                .concat();
                self.mem.write_slice(&d, at).unwrap();
            }
            let slot = AVAIL + 4 + 2 * u64::from(self.next % 8);
            self.mem.write_obj(0u16, GuestAddress(slot)).unwrap();
            self.next += 1;
            self.mem
                .write_obj(self.next, GuestAddress(AVAIL + 2))
                .unwrap();
            reg(&mut self.dev, &self.mem, 0x50, 0);
            // What the share's thread does when woken.
            self.dev.poke(&self.mem, |d, q, m| d.serve_one(q, m));
            let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            assert_eq!(used, self.next, "every chain comes back");
            let at = USED + 4 + 8 * u64::from((self.next - 1) % 8) + 4;
            self.mem.read_obj(GuestAddress(at)).unwrap()
        }

        fn put(&self, addr: u64, b: &[u8]) {
            self.mem.write_slice(b, GuestAddress(addr)).unwrap();
        }

        fn get(&self, addr: u64, n: usize) -> Vec<u8> {
            let mut b = vec![0; n];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            b
        }
    }

    fn version() -> Vec<u8> {
        msg(100, b"\0\x20\0\0\x08\x009P2000.L") // msize 8192
    }

    impl Guest {
        /// Tversion, Tattach fid 0, Twalk to `f` as fid 1, Tlopen with
        /// `flags`: each answered with its R message.
        fn open_f(&mut self, flags: u8) {
            let setup = [
                version(),
                msg(104, b"\0\0\0\0\xff\xff\xff\xff\0\0\0\0\0\0\0\0"),
                msg(110, b"\0\0\0\0\x01\0\0\0\x01\0\x01\0f"),
                msg(12, &[1, 0, 0, 0, flags, 0, 0, 0]),
            ];
            for m in &setup {
                self.put(0x10000, m);
                self.submit(&[(0x10000, m.len() as u32, false), (0x20000, 64, true)]);
                assert_eq!(self.get(0x20000 + 4, 1), [m[4] + 1]);
            }
        }
    }

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = ((7 + body.len()) as u32).to_le_bytes().to_vec();
        m.push(kind);
        m.extend_from_slice(&1u16.to_le_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn the_tag_is_in_the_config_space() {
        let mut g = guest();
        let mut b = [0u8; 6];
        g.dev.read(0x100, &mut b);
        assert_eq!(&b, b"\x04\x00vol0");
        let mut t = [0u8; 4];
        g.dev.read(8, &mut t);
        assert_eq!(u32::from_le_bytes(t), VIRTIO_ID_9P);
    }

    #[test]
    fn a_read_is_scattered_over_the_writable_descriptors() {
        let mut g = guest();
        g.open_f(0); // O_RDONLY
                     // Tread as the kernel's zero-copy path sends it: an 11-byte header
                     // buffer, then data pages.
        let read = msg(116, b"\x01\0\0\0\0\0\0\0\0\0\0\0\x00\x10\0\0");
        g.put(0x10000, &read);
        let n = g.submit(&[
            (0x10000, read.len() as u32, false),
            (0x20000, 11, true),
            (0x30000, 4, true),
            (0x40000, 4096, true),
        ]);
        assert_eq!(n, 11 + 10);
        assert_eq!(g.get(0x20000 + 7, 4), 10u32.to_le_bytes());
        assert_eq!(g.get(0x30000, 4), b"host");
        assert_eq!(g.get(0x40000, 6), b" bytes");
        assert_eq!(g.dev.device.refused, 0);
    }

    #[test]
    fn a_write_is_gathered_from_the_readable_descriptors() {
        let mut g = guest();
        g.open_f(2); // O_RDWR
                     // Twrite as the kernel's zero-copy path sends it: the 23-byte header
                     // (its size counting the data too), then the data pages.
        let data = b"GUEST";
        let mut head = msg(
            118,
            &[
                &1u32.to_le_bytes()[..],
                &0u64.to_le_bytes(),
                &5u32.to_le_bytes(),
            ]
            .concat(),
        );
        let size = (head.len() + data.len()) as u32;
        head[..4].copy_from_slice(&size.to_le_bytes());
        g.put(0x10000, &head);
        g.put(0x30000, &data[..2]);
        g.put(0x40000, &data[2..]);
        let n = g.submit(&[
            (0x10000, head.len() as u32, false),
            (0x30000, 2, false),
            (0x40000, 3, false),
            (0x20000, 11, true),
        ]);
        assert_eq!(n, 11);
        assert_eq!(g.get(0x20000 + 4, 1), [119]);
        assert_eq!(g.get(0x20000 + 7, 4), 5u32.to_le_bytes());
        assert_eq!(
            std::fs::read(g.dir.path().join("f")).unwrap(),
            b"GUESTbytes"
        );
    }

    #[test]
    fn malformed_chains_come_back_unanswered() {
        let mut g = guest();
        let v = version();
        g.put(0x10000, &v);
        let len = v.len() as u32;
        // No reply buffer; the reply buffer first; a size beyond the data;
        // a size under the header; a descriptor outside guest memory.
        assert_eq!(g.submit(&[(0x10000, len, false)]), 0);
        assert_eq!(g.submit(&[(0x20000, 64, true), (0x10000, len, false)]), 0);
        assert_eq!(g.submit(&[(0x10000, 8, false), (0x20000, 64, true)]), 0);
        g.put(0x11000, &3u32.to_le_bytes());
        assert_eq!(g.submit(&[(0x11000, 8, false), (0x20000, 64, true)]), 0);
        assert_eq!(
            g.submit(&[(0x10000, len, false), (0xfff_0000, 64, true)]),
            0
        );
        assert_eq!(g.submit(&[(0xfff_0000, 64, false), (0x20000, 64, true)]), 0);
        assert_eq!(g.dev.device.refused, 6);
        assert!(g.dev.broken.is_none(), "the device goes on");
        // A reply that cannot fit the guest's buffer becomes an error that does.
        assert_eq!(g.submit(&[(0x10000, len, false), (0x20000, 11, true)]), 11);
        assert_eq!(g.get(0x20000 + 4, 1), [7]);
        assert_eq!(g.submit(&[(0x10000, len, false), (0x20000, 64, true)]), 21);
    }
}
